//! `backup`: backups of the database to S3-compatible storage (DigitalOcean Spaces) or a local
//! directory, and restores that are always verified.
//!
//! One code path, two ways in: the commands (`backup run` for a Kubernetes CronJob,
//! `backup restore`, `backup drill`, `backup list`) and an HTTP function (`POST /` takes one
//! backup; a second while one runs gets 409, guarded by a Postgres advisory lock).
//!
//! # Layout
//! - [`store`]: the object store, key names, manifests, retention.
//! - [`dump`]: `pg_dump` from one exported snapshot, streamed into a multipart upload.
//! - [`restore`]: download, verify the hash, `pg_restore`, verify the data; the drill.
//! - [`pg`]: finding `pg_dump`/`pg_restore` and starting them.

pub mod dump;
pub mod pg;
pub mod restore;
pub mod store;

use std::process::ExitCode;

use http::{Method, StatusCode};
use metrics::gauge;
use tally_shared::http::json_response;
use tally_shared::router::HandlerResult;
use tally_shared::{ApiError, AppState, Config, Request, Route, app, auth};

use crate::restore::Selector;
use crate::store::StoreConfig;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("configuration error: {0}")]
    Config(String),
    #[error(transparent)]
    Settings(#[from] tally_shared::config::ConfigError),
    #[error("a backup is already running")]
    InProgress,
    #[error("database: {0}")]
    Database(String),
    #[error("pg_dump: {0}")]
    Dump(String),
    #[error("object storage: {0}")]
    Storage(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("restore: {0}")]
    Restore(String),
    #[error("verification failed: {0}")]
    Verify(String),
    /// The operator's safeguards said no; the message says which flag overrides it.
    #[error("refused: {0}")]
    Refused(String),
}

/// Another backup holds the lock: a refusal of this function's own (409), not an outage.
#[derive(Debug, thiserror::Error)]
#[error("a backup is already running")]
struct BackupRunning;

impl tally_shared::error::Domain for BackupRunning {
    fn status(&self) -> StatusCode {
        StatusCode::CONFLICT
    }
    fn code(&self) -> &'static str {
        "backup_in_progress"
    }
}

impl From<BackupError> for ApiError {
    fn from(e: BackupError) -> Self {
        match e {
            BackupError::InProgress => BackupRunning.into(),
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

/// POST / takes one backup and answers its report (admins only).
pub fn routes() -> Vec<Route> {
    vec![Route::new(Method::POST, "/", backup_now)]
}

async fn backup_now(request: Request, state: AppState) -> HandlerResult {
    auth::principal(&request)?.require_admin()?;
    let url = state
        .config
        .database_url
        .clone()
        .ok_or_else(|| ApiError::Internal("no DATABASE_URL".into()))?;
    let report = dump::backup(&url, state.extension::<StoreConfig>()?).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    gauge!("tally_backup_last_success_timestamp_seconds").set(now.as_secs_f64());
    gauge!("tally_backup_duration_seconds").set(report.seconds);
    gauge!("tally_backup_size_bytes").set(report.manifest.size_bytes as f64);
    json_response(StatusCode::OK, &report)
}

/// `backup`: with no command, serves POST / (one backup per request); otherwise one command.
#[derive(clap::Parser)]
#[command(
    name = "backup",
    version,
    about = "Backups to S3-compatible storage, and verified restores."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<BackupCommand>,
}

/// The backup commands; `tally backup` takes the same.
// No Debug: a restore's target URL may carry a password.
#[derive(Clone, clap::Subcommand)]
pub enum BackupCommand {
    /// Take one backup of DATABASE_URL and apply retention (the daily CronJob).
    Run,
    /// Restore into a scratch database, verify it there, and swap it in by rename (the old
    /// database is kept). Refused, exit 3: a target with open sessions without
    /// --replace-live; a backup of another database than the target without
    /// --from-other-source.
    Restore {
        /// A dump or manifest key from `backup list`, or `latest`.
        #[arg(long, default_value = "latest", value_name = "KEY")]
        backup: String,
        /// The database to restore into (its URL, as the owner).
        #[arg(long, value_name = "URL")]
        target_db: String,
        /// The backed-up database, whose backups to look at [default: the one in DATABASE_URL].
        #[arg(long, value_name = "NAME")]
        database: Option<String>,
        /// End the sessions on the target at the swap.
        #[arg(long)]
        replace_live: bool,
        /// Restore a backup of another database than the target.
        #[arg(long)]
        from_other_source: bool,
    },
    /// Back up, restore into a scratch database, verify, drop it (the weekly drill).
    Drill,
    /// The restore's checks on a database as it is (after a point-in-time recovery): the
    /// books balance, and its rows per table. Exit 1 when they do not.
    Verify {
        /// The database to check [default: DATABASE_URL].
        #[arg(long, value_name = "URL")]
        target_db: Option<String>,
    },
    /// The finished backups, oldest first.
    List {
        /// The backed-up database [default: the one in DATABASE_URL].
        #[arg(long, value_name = "NAME")]
        database: Option<String>,
    },
}

/// The binary's entry point (`args` without the program's name). `--help` and `--version`
/// print and exit 0 before anything is read or touched; a bad command line exits 2.
pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let cli =
        match <Cli as clap::Parser>::try_parse_from(std::iter::once("backup".into()).chain(args)) {
            Ok(cli) => cli,
            Err(e) => e.exit(),
        };
    run(cli.command)
}

/// Serves the HTTP function (no command), or runs one command and prints its report.
pub fn run(command: Option<BackupCommand>) -> ExitCode {
    let Some(command) = command else {
        return app::App::new("backup", routes())
            .settings::<StoreConfig>()
            .run();
    };
    let (config, runtime) = match app::start("backup", app::Logs::Stderr) {
        Ok(started) => started,
        Err(code) => return code,
    };
    match runtime.block_on(execute(&command, &config)) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The command's name only: a restore's target URL may carry a password.
            let name = match command {
                BackupCommand::Run => "run",
                BackupCommand::Restore { .. } => "restore",
                BackupCommand::Drill => "drill",
                BackupCommand::Verify { .. } => "verify",
                BackupCommand::List { .. } => "list",
            };
            tracing::error!(error = %e, command = name, "backup command failed");
            ExitCode::from(match e {
                BackupError::InProgress => 75,
                BackupError::Refused(_) => 3,
                _ => 1,
            })
        }
    }
}

async fn execute(command: &BackupCommand, config: &Config) -> Result<String, BackupError> {
    let source = || {
        config
            .database_url
            .clone()
            .ok_or_else(|| BackupError::Config("missing environment variable DATABASE_URL".into()))
    };
    // Read per command: `verify` needs no object store.
    let settings = || -> Result<StoreConfig, BackupError> { Ok(app::settings()?) };
    let named = |database: &Option<String>| match database {
        Some(d) => Ok(d.clone()),
        None => pg::database_name(&source()?),
    };
    let json = |v: &dyn erased::Json| v.to_json();
    match command {
        BackupCommand::Run => Ok(json(&dump::backup(&source()?, &settings()?).await?)),
        BackupCommand::Drill => Ok(json(&restore::drill(&source()?, &settings()?).await?)),
        BackupCommand::Verify { target_db } => {
            let target = target_db.clone().map_or_else(source, Ok)?;
            Ok(json(&restore::verify_database(&target).await?))
        }
        BackupCommand::List { database } => {
            let store = settings()?;
            let handle = store.open()?;
            let keys =
                store::list_manifests(handle.as_ref(), &store.backup_prefix, &named(database)?)
                    .await?;
            Ok(keys
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join("\n"))
        }
        BackupCommand::Restore {
            backup,
            target_db,
            database,
            replace_live,
            from_other_source,
        } => {
            let selector = match backup.as_str() {
                "latest" => Selector::Latest,
                key => Selector::Key(key.to_owned()),
            };
            let options = restore::RestoreOptions {
                replace_live: *replace_live,
                from_other_source: *from_other_source,
            };
            let report = restore::restore(
                &settings()?,
                &named(database)?,
                &selector,
                target_db,
                options,
            )
            .await?;
            Ok(json(&report))
        }
    }
}

/// Reports print as one JSON document.
mod erased {
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string_pretty(self).expect("reports serialise")
        }
    }
}
