//! Schema migrations (`sql/migrations`, embedded and applied by refinery) and the demo seed.

use tokio_postgres::Client;

use crate::roles::Roles;

mod embedded {
    refinery::embed_migrations!("../sql/migrations");
}

/// What the app and read-only roles may do, applied after every run (see the file).
const GRANTS_SQL: &str = include_str!("../../sql/grants.sql");

/// The demo data: the seed project's users and products, with prices.
pub const SEED_SQL: &str = include_str!("../../sql/seed.sql");

/// Any fixed number: it keeps two migrators (two pods of a Job, a runner and a test) from
/// applying the same migration at once.
const MIGRATION_LOCK: i64 = 0x7a11_0001;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] crate::pg::ConnectError),
    #[error("database error while migrating: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
    #[error(transparent)]
    Roles(#[from] crate::roles::RoleError),
}

/// How a migration waits for the table locks its DDL needs. A statement like `ALTER TABLE`
/// queues for an ACCESS EXCLUSIVE lock behind whatever holds the table (a backup's long read),
/// and every order queues behind *it*: so a migration waits at most `lock_timeout`, gives the
/// lock back, and tries again later, logging each wait.
#[derive(Debug, Clone, Copy)]
pub struct LockPolicy {
    pub lock_timeout: std::time::Duration,
    pub first_backoff: std::time::Duration,
    pub max_backoff: std::time::Duration,
    pub attempts: u32,
}

impl Default for LockPolicy {
    /// Orders wait at most 2 s behind the migrator at a time. It keeps trying for at most
    /// ~3 minutes (30 attempts: 2 s waits, sleeps from 250 ms up to 5 s), inside the deploy
    /// workflow's 300 s wait for the migrate Job.
    fn default() -> Self {
        Self {
            lock_timeout: std::time::Duration::from_secs(2),
            first_backoff: std::time::Duration::from_millis(250),
            max_backoff: std::time::Duration::from_secs(5),
            attempts: 30,
        }
    }
}

/// Connects, applies every pending migration under an advisory lock, and returns the client
/// for further setup (the seed). Returns the version now applied. The migrations grant
/// `roles` what the functions need; the roles must exist ([`crate::roles::ensure`]).
pub async fn migrate(
    database_url: &str,
    roles: &Roles,
) -> Result<(Client, Option<i32>), MigrateError> {
    migrate_to(database_url, None, roles).await
}

/// As [`migrate`], but stops after migration `target` when one is given: the schema an
/// earlier release ran on, for the expand/contract check.
pub async fn migrate_to(
    database_url: &str,
    target: Option<i32>,
    roles: &Roles,
) -> Result<(Client, Option<i32>), MigrateError> {
    migrate_with(database_url, target, roles, LockPolicy::default()).await
}

/// As [`migrate_to`], with the lock policy spelled out (tests use milliseconds).
pub async fn migrate_with(
    database_url: &str,
    target: Option<i32>,
    roles: &Roles,
    policy: LockPolicy,
) -> Result<(Client, Option<i32>), MigrateError> {
    roles.check()?;
    let mut client = crate::pg::connect(database_url)
        .await
        .map_err(MigrateError::Connect)?;
    roles.announce(&client).await?;
    // The advisory lock first, without a timeout: a second migrator simply waits its turn.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    client
        .batch_execute(&format!(
            "SET lock_timeout = {}",
            policy.lock_timeout.as_millis()
        ))
        .await?;
    let mut backoff = policy.first_backoff;
    let mut attempt = 1;
    let report = loop {
        let report = embedded::migrations::runner()
            .set_target(target.map_or(refinery::Target::Latest, |v| {
                refinery::Target::Version(v as _)
            }))
            .set_abort_divergent(true)
            .run_async(&mut client)
            .await;
        match report {
            Err(e) if waited_for_a_lock(&e) && attempt < policy.attempts => {
                // Each migration is its own transaction: the failed one rolled back, those
                // before it stay applied, and the next run starts where this one stopped.
                tracing::warn!(
                    attempt,
                    retry_in_ms = backoff.as_millis() as u64,
                    error = %e,
                    "migration waited too long for a table lock; it let go so requests can pass, and will try again"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(policy.max_backoff);
                attempt += 1;
            }
            other => break other,
        }
    };
    // The grants, still under the lock (two migrators granting at once could collide).
    if report.is_ok() {
        client.batch_execute(GRANTS_SQL).await?;
    }
    // The client goes back to the caller (the seed): without this migration's lock timeout.
    client.batch_execute("RESET lock_timeout").await?;
    if report.is_ok() && target.is_none() {
        build_indexes(&client).await?;
    }
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    let report = report?;
    for m in report.applied_migrations() {
        tracing::info!(version = m.version(), name = m.name(), "migration applied");
    }
    let version = embedded::migrations::runner()
        .get_last_applied_migration_async(&mut client)
        .await?
        .map(|m| m.version());
    Ok((client, version))
}

/// Indexes built after the migrations with `CREATE INDEX CONCURRENTLY`, which cannot run
/// inside a migration's transaction: building one never blocks the orders written meanwhile
/// (a plain `CREATE INDEX` would stop every insert for the whole build). (name, kind, definition)
const CONCURRENT_INDEXES: &[(&str, &str, &str)] = &[
    // GET /orders: a user's orders newest first (list-orders).
    ("orders_user_id_id_idx", "INDEX", "ON orders (user_id, id)"),
    // V9: one user per external subject, and the lookup user_for_subject makes.
    (
        "users_external_id_key",
        "UNIQUE INDEX",
        "ON users (external_id)",
    ),
    // V10: the outbox trigger's one question of the ledger, only when an order FAILs.
    (
        "inventory_movements_expiry_idx",
        "INDEX",
        "ON inventory_movements (order_id) WHERE reason = 'expiry'",
    ),
];

/// Indexes dropped (`DROP INDEX CONCURRENTLY`) once every index above is valid, each made
/// redundant by one of them: an index is never called by name, so an older release runs the
/// same without it, and every order stops paying for its upkeep.
const RETIRED_INDEXES: &[&str] = &[
    // V1's (user_id): orders_user_id_id_idx serves every query it did.
    "orders_user_id_idx",
];

/// Builds each missing index (one a failed build left invalid is dropped and built again),
/// then drops the indexes they make redundant.
async fn build_indexes(client: &Client) -> Result<(), tokio_postgres::Error> {
    for (name, kind, definition) in CONCURRENT_INDEXES {
        let valid: Option<bool> = client
            .query_opt(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE c.relname = $1 AND c.relnamespace = 'public'::regnamespace",
                &[name],
            )
            .await?
            .map(|row| row.get(0));
        match valid {
            Some(true) => continue,
            Some(false) => {
                tracing::warn!(
                    index = name,
                    "an earlier build left this index invalid: rebuilding"
                );
                client
                    .batch_execute(&format!("DROP INDEX CONCURRENTLY {name}"))
                    .await?;
            }
            None => {}
        }
        tracing::info!(index = name, "building index concurrently");
        client
            .batch_execute(&format!("CREATE {kind} CONCURRENTLY {name} {definition}"))
            .await?;
    }
    for name in RETIRED_INDEXES {
        client
            .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
            .await?;
    }
    Ok(())
}

/// Whether a failed run gave up on a lock (`lock_timeout`: SQLSTATE 55P03).
fn waited_for_a_lock(e: &refinery::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(pg) = err.downcast_ref::<tokio_postgres::Error>() {
            return pg.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE);
        }
        source = err.source();
    }
    false
}

/// Loads the demo seed if there are no products yet. Returns whether it did.
pub async fn seed_if_empty(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT NOT EXISTS (SELECT 1 FROM products)", &[])
        .await?;
    let empty: bool = row.get(0);
    if empty {
        client.batch_execute(SEED_SQL).await?;
    }
    Ok(empty)
}
