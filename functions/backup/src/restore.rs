//! Restores, always verified: the dump is downloaded (streamed to a temporary file) and its
//! SHA-256 checked against the manifest before the target is touched; after `pg_restore` the
//! row counts must equal the manifest's, no stock may be negative, and the ledger must balance.
//! The drill does backup → restore into a scratch database → verify → drop.

use std::path::{Path as FsPath, PathBuf};
use std::process::Stdio;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_postgres::Client;

use crate::BackupError;
use crate::pg::{PgTool, connect, count_rows, database_name, db, tool_command};
use crate::store::{self, Manifest, StoreConfig};
use tally_shared::encode::hex;
use tally_shared::pg::with_database;

/// Which backup to restore.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    Latest,
    /// A dump or manifest key, as listed.
    Key(String),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub dump_key: String,
    pub size_bytes: u64,
    pub tables_checked: usize,
    pub rows: i64,
    pub seconds: f64,
}

/// Restores the selected backup of `database` into `target_url` and verifies it.
pub async fn restore(
    config: &StoreConfig,
    database: &str,
    selector: &Selector,
    target_url: &str,
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    let store = config.open()?;
    let manifest = find_manifest(store.as_ref(), config, database, selector).await?;
    let scratch = tempdir()?;
    let file = scratch.join("restore.dump");
    let result = async {
        download_verified(store.as_ref(), &manifest, &file).await?;
        pg_restore(&file, target_url).await?;
        verify(target_url, &manifest).await
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&scratch).await;
    let (tables_checked, rows) = result?;
    let report = RestoreReport {
        dump_key: manifest.dump_key.clone(),
        size_bytes: manifest.size_bytes,
        tables_checked,
        rows,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        key = report.dump_key,
        seconds = report.seconds,
        rows,
        "restore verified"
    );
    Ok(report)
}

async fn find_manifest(
    store: &dyn ObjectStore,
    config: &StoreConfig,
    database: &str,
    selector: &Selector,
) -> Result<Manifest, BackupError> {
    let key = match selector {
        Selector::Latest => store::list_manifests(store, &config.backup_prefix, database)
            .await?
            .pop()
            .ok_or_else(|| BackupError::NotFound(format!("no backup of {database} yet")))?,
        Selector::Key(key) => {
            let stem = key.trim_end_matches(".json").trim_end_matches(".dump");
            Path::from(format!("{stem}.json"))
        }
    };
    store::read_manifest(store, &key)
        .await
        .map_err(|e| match e {
            BackupError::Storage(s) if s.contains("not found") || s.contains("NotFound") => {
                BackupError::NotFound(format!(
                    "no manifest {key}: only finished backups can be restored"
                ))
            }
            other => other,
        })
}

/// Streams the dump to `file`, hashing as it goes; refuses it unless size and SHA-256 match.
async fn download_verified(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    file: &FsPath,
) -> Result<(), BackupError> {
    let mut stream = store
        .get(&Path::from(manifest.dump_key.as_str()))
        .await
        .map_err(store::storage)?
        .into_stream();
    let mut out = tokio::fs::File::create(file)
        .await
        .map_err(|e| BackupError::Storage(format!("creating {}: {e}", file.display())))?;
    let mut hash = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(store::storage)?;
        hash.update(&chunk);
        size += chunk.len() as u64;
        out.write_all(&chunk)
            .await
            .map_err(|e| BackupError::Storage(format!("writing {}: {e}", file.display())))?;
    }
    out.flush()
        .await
        .map_err(|e| BackupError::Storage(e.to_string()))?;
    let sha256 = hex(&hash.finalize());
    if size != manifest.size_bytes || sha256 != manifest.sha256 {
        return Err(BackupError::Verify(format!(
            "{} does not match its manifest (size {size} vs {}, sha256 {sha256} vs {}): refusing to restore it",
            manifest.dump_key, manifest.size_bytes, manifest.sha256
        )));
    }
    Ok(())
}

/// `pg_restore --clean --if-exists` in one transaction: the target gets all of it or none.
async fn pg_restore(file: &FsPath, target_url: &str) -> Result<(), BackupError> {
    let tool = PgTool::find("pg_restore")?;
    let mut command = tool_command(&tool, target_url)?;
    command
        .args(["--clean", "--if-exists", "--no-owner", "--no-privileges"])
        .args(["--single-transaction", "--exit-on-error"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = command
        .output()
        .await
        .map_err(|e| BackupError::Restore(format!("starting pg_restore: {e}")))?;
    if !out.status.success() {
        return Err(BackupError::Restore(format!(
            "pg_restore exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The checks every restore ends with. Returns (tables checked, rows counted).
pub async fn verify(target_url: &str, manifest: &Manifest) -> Result<(usize, i64), BackupError> {
    let client = connect(target_url).await?;
    let counts = count_rows(&client).await?;
    let mut problems = Vec::new();
    for (table, expected) in &manifest.row_counts {
        match counts.get(table) {
            Some(n) if n == expected => {}
            Some(n) => problems.push(format!("{table}: {n} rows, the manifest says {expected}")),
            None => problems.push(format!("{table}: missing")),
        }
    }
    if exists(&client, "products").await? {
        let negative: i64 = client
            .query_one("SELECT count(*) FROM products WHERE inventory < 0", &[])
            .await
            .map_err(db)?
            .get(0);
        if negative > 0 {
            problems.push(format!("{negative} products with negative inventory"));
        }
        if exists(&client, "inventory_movements").await? {
            // Since V5 a product's stock may be spread over inventory_shards (stock_of sums
            // it); a backup from before then has neither. One grouped pass over the ledger.
            let stock = if exists(&client, "inventory_shards").await? {
                "stock_of(p.id)"
            } else {
                "p.inventory"
            };
            let drifted: i64 = client
                .query_one(
                    &format!(
                        "SELECT count(*) FROM products p \
                         LEFT JOIN (SELECT product_id, sum(delta) AS total FROM inventory_movements \
                                    GROUP BY product_id) m ON m.product_id = p.id \
                         WHERE {stock} <> coalesce(m.total, 0)"
                    ),
                    &[],
                )
                .await
                .map_err(db)?
                .get(0);
            if drifted > 0 {
                problems.push(format!(
                    "{drifted} products whose inventory differs from their ledger"
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(BackupError::Verify(problems.join("; ")));
    }
    Ok((
        manifest.row_counts.len(),
        manifest.row_counts.values().sum(),
    ))
}

async fn exists(client: &Client, table: &str) -> Result<bool, BackupError> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(db)?
        .get(0))
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DrillReport {
    pub backup: crate::dump::BackupReport,
    pub restore: RestoreReport,
    pub scratch_database: String,
}

/// Backup, restore into a fresh scratch database on the same server, verify, drop it.
pub async fn drill(database_url: &str, config: &StoreConfig) -> Result<DrillReport, BackupError> {
    let backup = crate::dump::backup(database_url, config).await?;
    let database = database_name(database_url)?;
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let scratch = format!("tally_drill_{millis}");
    let admin = connect(database_url).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE \"{scratch}\""))
        .await
        .map_err(db)?;
    let target = with_database(database_url, &scratch);
    let restored = restore(
        config,
        &database,
        &Selector::Key(backup.manifest.dump_key.clone()),
        &target,
    )
    .await;
    let dropped = admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS \"{scratch}\" WITH (FORCE)"
        ))
        .await;
    let restore = restored?;
    dropped.map_err(db)?;
    Ok(DrillReport {
        backup,
        restore,
        scratch_database: scratch,
    })
}

fn tempdir() -> Result<PathBuf, BackupError> {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("tally-restore-{}-{millis}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| BackupError::Storage(format!("creating {}: {e}", dir.display())))?;
    Ok(dir)
}
