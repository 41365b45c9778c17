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

const USAGE: &str = "usage:
  backup                                   serve POST / (one backup per request)
  backup run                               take one backup, apply retention
  backup restore [--backup KEY|latest] --target-db URL [--database NAME]
                 [--replace-live] [--from-other-source]
                                           restore into a scratch database, verify, swap it in
                                           by rename (the old one is kept). NAME: the backed-up
                                           database, default the one in DATABASE_URL. Refused
                                           (exit 3): a target with open sessions without
                                           --replace-live; a backup of another database than
                                           the target without --from-other-source
  backup drill                             backup, restore into a scratch database, verify, drop
  backup list                              the finished backups, oldest first";

/// The binary's entry point (also `tally backup ...`).
pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let args: Vec<String> = args.collect();
    if args.is_empty() {
        return app::App::new("backup", routes())
            .settings::<StoreConfig>()
            .run();
    }
    let (config, runtime) = match app::start("backup", app::Logs::Stderr) {
        Ok(started) => started,
        Err(code) => return code,
    };
    match runtime.block_on(command(&args, &config)) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(Usage(message)) => {
            eprintln!("backup: {message}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failed(e)) => {
            tracing::error!(error = %e, command = args[0].as_str(), "backup command failed");
            ExitCode::from(match e {
                BackupError::InProgress => 75,
                BackupError::Refused(_) => 3,
                _ => 1,
            })
        }
    }
}

enum CommandError {
    Usage(String),
    Failed(BackupError),
}
use CommandError::{Failed, Usage};

impl From<BackupError> for CommandError {
    fn from(e: BackupError) -> Self {
        Failed(e)
    }
}

async fn command(args: &[String], config: &Config) -> Result<String, CommandError> {
    let store: StoreConfig = app::settings().map_err(BackupError::from)?;
    let source = || {
        config.database_url.clone().ok_or_else(|| {
            Failed(BackupError::Config(
                "missing environment variable DATABASE_URL".into(),
            ))
        })
    };
    let json = |v: &dyn erased::Json| v.to_json();
    match args[0].as_str() {
        "run" => Ok(json(&dump::backup(&source()?, &store).await?)),
        "drill" => Ok(json(&restore::drill(&source()?, &store).await?)),
        "list" => {
            let database = flag(args, "--database")?
                .map_or_else(|| source().and_then(|u| Ok(pg::database_name(&u)?)), Ok)?;
            let store_handle = store.open()?;
            let keys =
                store::list_manifests(store_handle.as_ref(), &store.backup_prefix, &database)
                    .await?;
            Ok(keys
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join("\n"))
        }
        "restore" => {
            let target = flag(args, "--target-db")?
                .ok_or_else(|| Usage("restore needs --target-db URL".into()))?;
            let selector = match flag(args, "--backup")? {
                None => Selector::Latest,
                Some(k) if k == "latest" => Selector::Latest,
                Some(k) => Selector::Key(k),
            };
            let database = match flag(args, "--database")? {
                Some(d) => d,
                None => pg::database_name(&source()?)?,
            };
            let options = restore::RestoreOptions {
                replace_live: args.iter().any(|a| a == "--replace-live"),
                from_other_source: args.iter().any(|a| a == "--from-other-source"),
            };
            Ok(json(
                &restore::restore(&store, &database, &selector, &target, options).await?,
            ))
        }
        other => Err(Usage(format!("unknown command {other:?}"))),
    }
}

/// The value after `name`, if given; a flag without a value is a usage error.
fn flag(args: &[String], name: &str) -> Result<Option<String>, CommandError> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => args
            .get(i + 1)
            .cloned()
            .map(Some)
            .ok_or_else(|| Usage(format!("{name} needs a value"))),
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
