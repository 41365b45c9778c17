//! Command lines shared by several binaries: `migrate` and `tally migrate`.
//!
//! - `--roles` first creates or updates the app and read-only roles (`APP_DB_ROLE`,
//!   `READONLY_DB_ROLE`; passwords from `APP_DB_PASSWORD`, `READONLY_DB_PASSWORD`). Leave it
//!   out where the platform manages roles (CloudNativePG, a managed database).
//! - `--seed` also loads the demo data into an empty catalog.

use std::process::ExitCode;

use crate::app::{self, Logs};
use crate::config::Secret;
use crate::roles::{self, Roles};
use crate::{Config, migrate};

/// Applies pending migrations to $DATABASE_URL, which must name the schema's owner, then the
/// grants (sql/grants.sql).
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// Create or update the app and read-only roles before migrating (needs CREATEROLE).
    #[arg(long)]
    pub roles: bool,
    /// Load the demo data into an empty catalog.
    #[arg(long)]
    pub seed: bool,
}

/// The roles' passwords, read only with `--roles`.
#[derive(serde::Deserialize)]
struct Passwords {
    app_db_password: Secret,
    readonly_db_password: Secret,
}

/// `migrate` and `tally migrate`: settings, then the migrations; exit 0 when the schema is
/// up to date.
pub fn migrate_main(args: &MigrateArgs) -> ExitCode {
    match app::start("migrate", Logs::Stdout) {
        Ok((config, runtime)) => runtime.block_on(run(&config, args)),
        Err(code) => code,
    }
}

async fn run(config: &Config, args: &MigrateArgs) -> ExitCode {
    match migrate_all(config, args).await {
        Ok(version) => {
            tracing::info!(version, "schema up to date");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "migration failed");
            eprintln!("migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate_all(config: &Config, args: &MigrateArgs) -> Result<Option<i32>, String> {
    let url = config.require_database_url().map_err(|e| e.to_string())?;
    let names: Roles = app::settings().map_err(|e| e.to_string())?;
    if args.roles {
        let passwords: Passwords = app::settings()
            .map_err(|e| format!("--roles needs APP_DB_PASSWORD and READONLY_DB_PASSWORD ({e})"))?;
        let client = crate::pg::connect(url)
            .await
            .map_err(|e| format!("cannot connect to the database: {e}"))?;
        let limits = roles::Limits {
            statement_timeout_ms: config.statement_timeout_ms,
            ..roles::Limits::default()
        };
        let secrets = [
            Some(passwords.app_db_password.0.as_str()),
            Some(passwords.readonly_db_password.0.as_str()),
        ];
        roles::ensure(&client, &names, secrets, limits)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(app = names.app, readonly = names.readonly, "roles ready");
    }
    let (client, version) = migrate::migrate(url, &names)
        .await
        .map_err(|e| e.to_string())?;
    if args.seed {
        let loaded = migrate::seed_if_empty(&client)
            .await
            .map_err(|e| format!("seeding failed: {e}"))?;
        tracing::info!(loaded, "demo seed");
    }
    Ok(version)
}
