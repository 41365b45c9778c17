//! One backup: `pg_dump -Fc` from an exported snapshot, streamed into a multipart upload
//! while hashed, then the manifest, then retention. Memory stays bounded whatever the size.

use std::process::Stdio;
use std::time::{Instant, SystemTime};

use object_store::{ObjectStore, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio_postgres::Client;

use crate::BackupError;
use crate::pg::{PgTool, connect, count_rows, database_name, db, migration_version, tool_command};
use crate::store::{self, Manifest, StoreConfig};

/// Parts of 8 MiB (S3 wants at least 5 MiB but the last), at most two uploading at once:
/// about 24 MiB of buffers at the most.
const PART_SIZE: usize = 8 * 1024 * 1024;
const PARTS_IN_FLIGHT: usize = 2;
const READ_CHUNK: usize = 256 * 1024;

/// Any fixed number: two backups (two pods, a CronJob and an HTTP call) never overlap.
pub const BACKUP_LOCK: i64 = 0x7a11_0b0b;

/// What a successful backup reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    pub manifest_key: String,
    pub manifest: Manifest,
    pub seconds: f64,
    pub deleted_by_retention: usize,
}

/// Takes one backup of `database_url` into the configured store.
pub async fn backup(database_url: &str, config: &StoreConfig) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let started_at = SystemTime::now();
    let store = config.open()?;
    let database = database_name(database_url)?;

    // Fail before dumping anything when the store is unreachable, the bucket is missing or the
    // credentials are wrong.
    store::list_manifests(store.as_ref(), &config.backup_prefix, &database).await?;

    let client = connect(database_url).await?;
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&BACKUP_LOCK])
        .await
        .map_err(db)?
        .get(0);
    if !locked {
        return Err(BackupError::InProgress);
    }
    let result = dump_and_upload(
        &client,
        database_url,
        &database,
        store.as_ref(),
        config,
        started_at,
    )
    .await;
    // Closing the session would release the lock too; say it explicitly for the log's sake.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&BACKUP_LOCK])
        .await;
    let (manifest_key, manifest) = result?;
    let deleted_by_retention = store::apply_retention(
        store.as_ref(),
        &config.backup_prefix,
        &database,
        config.backup_retain,
    )
    .await?;
    let report = BackupReport {
        manifest_key: manifest_key.to_string(),
        manifest,
        seconds: started.elapsed().as_secs_f64(),
        deleted_by_retention,
    };
    tracing::info!(
        key = report.manifest.dump_key,
        size_bytes = report.manifest.size_bytes,
        seconds = report.seconds,
        deleted_by_retention,
        "backup done"
    );
    Ok(report)
}

/// The backup's phases: check the tools against the server, take one snapshot for the row
/// counts and the dump, stream pg_dump into a multipart upload, then write the manifest.
async fn dump_and_upload(
    client: &Client,
    database_url: &str,
    database: &str,
    store: &dyn ObjectStore,
    config: &StoreConfig,
    started_at: SystemTime,
) -> Result<(object_store::path::Path, Manifest), BackupError> {
    let (server_version, pg_dump) = check_pg_dump(client).await?;
    // One snapshot for the row counts and the dump: the manifest describes exactly the dump.
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(db)?;
    let snapshot: String = client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(db)?
        .get(0);
    let row_counts = count_rows(client).await?;
    let migration_version = migration_version(client).await?;
    let key = store::dump_key(&config.backup_prefix, database, started_at);
    let (size_bytes, sha256) = stream_dump(
        client,
        &pg_dump,
        (database_url, &snapshot),
        config,
        store,
        &key,
    )
    .await?;
    let manifest = Manifest {
        database: database.to_owned(),
        dump_key: key.to_string(),
        size_bytes,
        sha256,
        server_version,
        pg_dump_version: pg_dump.version,
        migration_version,
        row_counts,
        started_at: humantime::format_rfc3339_millis(started_at).to_string(),
        finished_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
    };
    let manifest_key = store::write_manifest(store, &manifest).await?;
    Ok((manifest_key, manifest))
}

/// The server's version, and a pg_dump at least as new as its major version.
async fn check_pg_dump(client: &Client) -> Result<(String, PgTool), BackupError> {
    let server_version: String = client
        .query_one("SELECT current_setting('server_version')", &[])
        .await
        .map_err(db)?
        .get(0);
    let server_major: i32 = client
        .query_one(
            "SELECT current_setting('server_version_num')::int / 10000",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    let pg_dump = PgTool::find("pg_dump")?;
    if pg_dump.major < server_major {
        return Err(BackupError::Config(format!(
            "pg_dump is version {} but the server is {server_major}: install a pg_dump of at least the server's major version (or set PG_BINDIR)",
            pg_dump.major
        )));
    }
    Ok((server_version, pg_dump))
}

/// Runs pg_dump on `snapshot` and streams its output into a multipart upload at `key`,
/// hashing as it goes. Answers the size and SHA-256; on any failure the upload is aborted, so
/// no partial object is left behind.
async fn stream_dump(
    client: &Client,
    pg_dump: &PgTool,
    (database_url, snapshot): (&str, &str),
    config: &StoreConfig,
    store: &dyn ObjectStore,
    key: &object_store::path::Path,
) -> Result<(u64, String), BackupError> {
    let mut command = tool_command(pg_dump, database_url)?;
    command
        // The grants to the app and read-only roles come along: a restored database serves
        // the functions as it was. (The roles themselves are cluster-wide: `migrate --roles`.)
        .args(["--format=custom", "--no-owner"])
        // Never queue behind a long-held lock: fail, and let the next run try again.
        .arg(format!(
            "--lock-wait-timeout={}",
            config.backup_lock_wait_timeout_ms
        ))
        .arg(format!("--snapshot={snapshot}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| BackupError::Dump(format!("starting {}: {e}", pg_dump.path.display())))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let stderr_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let upload = store.put_multipart(key).await.map_err(store::storage)?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    // After a failed upload nobody reads pg_dump's output any more: it would block on a full
    // pipe and never exit, holding the lock and the snapshot. The pipe is closed (dropped with
    // `copy`'s reader) and pg_dump stopped.
    let streamed = copy(stdout, &mut writer).await;
    if streamed.is_err() {
        let _ = child.start_kill();
    }
    let status = child.wait().await;
    // The snapshot is no longer needed once pg_dump has finished with it: let it go before the
    // last parts upload.
    let _ = client.batch_execute("COMMIT").await;
    let pg_dump_errors = stderr_task.await.unwrap_or_default();
    let failure = match (&streamed, status) {
        (Err(_), _) => None,
        (Ok(_), Err(e)) => Some(BackupError::Dump(format!("waiting for pg_dump: {e}"))),
        (Ok(_), Ok(s)) if !s.success() => Some(BackupError::Dump(format!(
            "pg_dump exited with {s}: {}",
            pg_dump_errors.trim()
        ))),
        _ => None,
    };
    match (streamed, failure) {
        (Ok(done), None) => {
            writer.finish().await.map_err(store::storage)?;
            Ok(done)
        }
        (Err(e), _) | (Ok(_), Some(e)) => {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(error = %abort, "aborting the multipart upload failed");
            }
            Err(e)
        }
    }
}

/// Copies pg_dump's output into the upload, a bounded number of parts in flight; answers the
/// size and the SHA-256 of what was written.
async fn copy(
    mut stdout: tokio::process::ChildStdout,
    writer: &mut WriteMultipart,
) -> Result<(u64, String), BackupError> {
    let mut hash = Sha256::new();
    let mut size: u64 = 0;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = stdout
            .read(&mut buf)
            .await
            .map_err(|e| BackupError::Dump(format!("reading pg_dump: {e}")))?;
        if n == 0 {
            return Ok((size, tally_shared::encode::hex(&hash.finalize())));
        }
        writer
            .wait_for_capacity(PARTS_IN_FLIGHT)
            .await
            .map_err(store::storage)?;
        hash.update(&buf[..n]);
        size += n as u64;
        writer.write(&buf[..n]);
    }
}
