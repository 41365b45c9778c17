//! The database roles the functions connect as: created and tuned outside the migrations
//! (roles are cluster-wide), granted to by them.
//!
//! - The owner (whoever `DATABASE_URL` names for `migrate` and `backup`) owns the schema.
//! - The app role reads and writes rows: orders, cancels, restocks, the processor.
//! - The read-only role reads: list-products, get-order, list-orders.
//!
//! `migrate --roles`, the local runner and the test harness call [`ensure`]; a managed
//! database (CloudNativePG, DigitalOcean) creates the roles itself and only the names are given.

use serde::Deserialize;
use tokio_postgres::Client;

/// The two role names the migrations grant to (`APP_DB_ROLE`, `READONLY_DB_ROLE`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Roles {
    #[serde(default = "defaults::app", rename = "app_db_role")]
    pub app: String,
    #[serde(default = "defaults::readonly", rename = "readonly_db_role")]
    pub readonly: String,
}

mod defaults {
    pub fn app() -> String {
        "tally_app".into()
    }
    pub fn readonly() -> String {
        "tally_readonly".into()
    }
}

impl Default for Roles {
    fn default() -> Self {
        Self {
            app: defaults::app(),
            readonly: defaults::readonly(),
        }
    }
}

/// How each role's sessions are bounded, set on the role itself (`ALTER ROLE ... SET`): no
/// connection string or pooler has to carry it, and nothing can leave it out.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Any one statement; 0 turns it off.
    pub statement_timeout_ms: u64,
    /// A transaction left open by a crashed or stuck client gives its locks back after this.
    pub idle_in_transaction_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            statement_timeout_ms: 5_000,
            idle_in_transaction_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("{0:?} is not a role name this tool creates: use 1 to 63 of a-z, 0-9 and _")]
    BadName(String),
    #[error("the app and read-only roles must be two different names")]
    SameName,
    #[error(
        "role {0:?} is the connecting user, or has SUPERUSER, CREATEROLE, CREATEDB, REPLICATION \
         or BYPASSRLS: the functions' roles may only log in (choose another APP_DB_ROLE / \
         READONLY_DB_ROLE, or remove those attributes)"
    )]
    Elevated(String),
    #[error(
        "creating or altering role {role}: {source} (the connecting user needs CREATEROLE, or \
         create the roles yourself and run without --roles)"
    )]
    Database {
        role: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl Roles {
    /// Refuses names that would need quoting: they end up in URLs, manifests and logs too.
    pub fn check(&self) -> Result<(), RoleError> {
        for name in [&self.app, &self.readonly] {
            let ok = (1..=63).contains(&name.len())
                && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !ok {
                return Err(RoleError::BadName(name.clone()));
            }
        }
        if self.app == self.readonly {
            return Err(RoleError::SameName);
        }
        Ok(())
    }

    /// Sets the names on the migrator's session, where V8 and later migrations read them.
    pub async fn announce(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        client
            .execute(
                "SELECT set_config('tally.app_role', $1, false), \
                        set_config('tally.readonly_role', $2, false)",
                &[&self.app, &self.readonly],
            )
            .await
            .map(drop)
    }
}

/// Creates the roles that do not exist yet, and (re)sets what each may do: log in, with the
/// given password (none: the server's authentication decides, as with `trust` in
/// development), within `limits`. Safe to run on every deploy, and by two migrators at once
/// (a concurrent catalog update is retried).
pub async fn ensure(
    client: &Client,
    roles: &Roles,
    passwords: [Option<&str>; 2],
    limits: Limits,
) -> Result<(), RoleError> {
    roles.check()?;
    let mut attempt = 0;
    loop {
        match ensure_once(client, roles, passwords, limits).await {
            Err(RoleError::Database { source, .. })
                if attempt < 5 && is_concurrent_update(&source) =>
            {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20 << attempt)).await;
            }
            other => return other,
        }
    }
}

/// Another session changed the same role at the same moment (two migrators, two runners).
fn is_concurrent_update(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code().is_some_and(|c| {
        [
            SqlState::UNIQUE_VIOLATION,
            SqlState::DUPLICATE_OBJECT,
            SqlState::INTERNAL_ERROR,
        ]
        .contains(c)
    })
}

async fn ensure_once(
    client: &Client,
    roles: &Roles,
    passwords: [Option<&str>; 2],
    limits: Limits,
) -> Result<(), RoleError> {
    let readonly_extra = ["ALTER ROLE %I SET default_transaction_read_only = on"];
    for ((role, password), extra) in [&roles.app, &roles.readonly]
        .into_iter()
        .zip(passwords)
        .zip([&[][..], &readonly_extra[..]])
    {
        let wrap = |source| RoleError::Database {
            role: role.clone(),
            source,
        };
        create_if_missing(client, role).await.map_err(wrap)?;
        refuse_elevated(client, role).await?;
        let mut statements = vec![
            "ALTER ROLE %I LOGIN".to_owned(),
            format!(
                "ALTER ROLE %I SET statement_timeout = {}",
                limits.statement_timeout_ms
            ),
            format!(
                "ALTER ROLE %I SET idle_in_transaction_session_timeout = {}",
                limits.idle_in_transaction_timeout_ms
            ),
        ];
        statements.extend(extra.iter().map(|s| s.to_string()));
        for statement in statements {
            run_for(client, &statement, role, None)
                .await
                .map_err(wrap)?;
        }
        if let Some(password) = password {
            // A SCRAM verifier made here: the password itself never reaches the server, so no
            // failed statement can write it to the server's log.
            let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
            run_for(client, "ALTER ROLE %I PASSWORD %L", role, Some(&verifier))
                .await
                .map_err(wrap)?;
        }
    }
    Ok(())
}

/// A role this tool would hand to the functions must not be the connecting user, or hold any
/// power beyond logging in: such a role is refused, never altered (changing a superuser's
/// attributes needs a superuser, and it is not this tool's to demote).
async fn refuse_elevated(client: &Client, role: &str) -> Result<(), RoleError> {
    let row = client
        .query_one(
            "SELECT r.rolname = current_user, \
                    r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls \
             FROM pg_roles r WHERE r.rolname = $1",
            &[&role],
        )
        .await
        .map_err(|source| RoleError::Database {
            role: role.to_owned(),
            source,
        })?;
    let (is_me, elevated): (bool, bool) = (row.get(0), row.get(1));
    if is_me || elevated {
        return Err(RoleError::Elevated(role.to_owned()));
    }
    Ok(())
}

/// `CREATE ROLE`, unless it exists.
async fn create_if_missing(client: &Client, role: &str) -> Result<(), tokio_postgres::Error> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await?
        .is_some();
    if exists {
        return Ok(());
    }
    run_for(client, "CREATE ROLE %I", role, None).await
}

/// Runs a role statement. Utility statements take no parameters, so the server quotes the name
/// (`%I`) and the password (`%L`) with `format()` and the result is run as it is.
async fn run_for(
    client: &Client,
    template: &str,
    role: &str,
    literal: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    let statement: String = client
        .query_one(
            "SELECT format($1::text, $2::text, $3::text)",
            &[&template, &role, &literal],
        )
        .await?
        .get(0);
    client.batch_execute(&statement).await
}
