//! Restores, always verified, never onto the live data: the dump is downloaded (streamed to a
//! temporary file) and its SHA-256 checked against the manifest; it is restored into a scratch
//! database, where the row counts must equal the manifest's, no stock may be negative and the
//! ledger must balance; only then is it swapped in by rename, the old data kept beside it.
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
    /// The database that now holds the restored data.
    pub database: String,
    /// Where the target's data before the restore was kept, if the target existed.
    pub replaced_database: Option<String>,
}

/// What a restore may do beyond the safe default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RestoreOptions {
    /// End the sessions on a target that has them. Without it, such a target is refused.
    pub replace_live: bool,
    /// Restore a backup taken of another database than the target.
    pub from_other_source: bool,
}

/// Restores the selected backup of `database` into the database `target_url` names, without
/// touching the target until the restore is whole and verified:
/// 1. refuses a target with open sessions (unless `replace_live`), and a backup of another
///    database than the target (unless `from_other_source`);
/// 2. downloads the dump, checking its size and SHA-256, and restores it into a new scratch
///    database on the target's server, where row counts, stock and ledger are verified;
/// 3. swaps it in by rename. A target that existed is kept, renamed
///    `<target>_replaced_<millis>`, until the operator drops it.
pub async fn restore(
    config: &StoreConfig,
    database: &str,
    selector: &Selector,
    target_url: &str,
    options: RestoreOptions,
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    let target = database_name(target_url)?;
    let admin = connect(&with_database(target_url, "postgres")).await?;
    // One restore of a database at a time (held until `admin` closes).
    let mine: bool = admin
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('tally restore ' || $1))",
            &[&target],
        )
        .await
        .map_err(db)?
        .get(0);
    if !mine {
        return Err(BackupError::Refused(format!(
            "another restore of {target:?} is running"
        )));
    }
    refuse_busy(&admin, &target, options).await?;
    let store = config.open()?;
    let manifest = find_manifest(store.as_ref(), config, database, selector).await?;
    if manifest.database != target && !options.from_other_source {
        return Err(BackupError::Refused(format!(
            "the backup is of database {:?}, the target is {target:?}: pass --from-other-source to restore it there anyway",
            manifest.database
        )));
    }
    let scratch = side_name(&target, "restoring");
    admin
        .batch_execute(&format!("CREATE DATABASE {}", ident(&scratch)))
        .await
        .map_err(db)?;
    let scratch_url = with_database(target_url, &scratch);
    let filled = fill_and_verify(store.as_ref(), &manifest, &scratch_url);
    let swapped = match filled.await {
        Ok(counts) => swap(&admin, &scratch, &target, options)
            .await
            .map(|old| (counts, old)),
        Err(e) => Err(e),
    };
    let ((tables_checked, rows), replaced) = match swapped {
        Ok(done) => done,
        Err(e) => {
            let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(&scratch));
            let _ = admin.batch_execute(&drop).await;
            return Err(e);
        }
    };
    let report = RestoreReport {
        dump_key: manifest.dump_key.clone(),
        size_bytes: manifest.size_bytes,
        tables_checked,
        rows,
        seconds: started.elapsed().as_secs_f64(),
        database: target,
        replaced_database: replaced,
    };
    tracing::info!(?report, "restore verified and swapped in");
    Ok(report)
}

/// Downloads and verifies the dump, restores it into `scratch_url`, and verifies the data.
async fn fill_and_verify(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    scratch_url: &str,
) -> Result<(usize, i64), BackupError> {
    let dir = tempdir()?;
    let file = dir.join("restore.dump");
    let result = async {
        download_verified(store, manifest, &file).await?;
        pg_restore(&file, scratch_url).await?;
        verify(scratch_url, manifest).await
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

/// `<target>_<what>_<millis>`, within PostgreSQL's 63 bytes.
fn side_name(target: &str, what: &str) -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let mut base = target.to_owned();
    let room = 63 - what.len() - 2 - millis.to_string().len();
    while base.len() > room {
        base.pop();
    }
    format!("{base}_{what}_{millis}")
}

/// Sessions on `database` other than this one, after a short grace for ones closing.
async fn sessions(admin: &Client, database: &str) -> Result<i64, BackupError> {
    let mut waited = std::time::Duration::ZERO;
    loop {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&database],
            )
            .await
            .map_err(db)?
            .get(0);
        if n == 0 || waited >= std::time::Duration::from_secs(2) {
            return Ok(n);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        waited += std::time::Duration::from_millis(100);
    }
}

/// A target in use is refused unless the operator said to replace it live.
async fn refuse_busy(
    admin: &Client,
    target: &str,
    options: RestoreOptions,
) -> Result<(), BackupError> {
    if options.replace_live {
        return Ok(());
    }
    match sessions(admin, target).await? {
        0 => Ok(()),
        n => Err(BackupError::Refused(format!(
            "database {target:?} has {n} open sessions: stop its clients first, or pass --replace-live to end them (the old database is kept under another name)"
        ))),
    }
}

/// Renames the verified scratch database to `target`; a target that exists is first closed to
/// new sessions, its own ended (with `replace_live`), and kept under a new name, returned.
async fn swap(
    admin: &Client,
    scratch: &str,
    target: &str,
    options: RestoreOptions,
) -> Result<Option<String>, BackupError> {
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&target])
        .await
        .map_err(db)?
        .is_some();
    if exists {
        // Closed to new sessions first, then counted: nobody can connect between the count and
        // the rename, and without --replace-live nobody's session is ended.
        set_connections(admin, target, false).await?;
        let kept = async {
            refuse_busy(admin, target, options).await?;
            let kept = side_name(target, "replaced");
            end_sessions_and_rename(admin, target, &kept).await?;
            Ok::<_, BackupError>(kept)
        }
        .await;
        // Whatever happened, the database that now has the old data accepts sessions again.
        let reopen = kept.as_deref().unwrap_or(target);
        let _ = set_connections(admin, reopen, true).await;
        let kept = kept?;
        rename(admin, scratch, target).await?;
        return Ok(Some(kept));
    }
    rename(admin, scratch, target).await?;
    Ok(None)
}

async fn set_connections(admin: &Client, database: &str, allow: bool) -> Result<(), BackupError> {
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} WITH ALLOW_CONNECTIONS {allow}",
            ident(database)
        ))
        .await
        .map_err(db)
}

/// A database name as an SQL identifier, whatever it holds.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn end_sessions_and_rename(admin: &Client, from: &str, to: &str) -> Result<(), BackupError> {
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&from],
        )
        .await
        .map_err(db)?;
    match sessions(admin, from).await? {
        0 => rename(admin, from, to).await,
        n => Err(BackupError::Restore(format!(
            "{n} sessions on {from:?} would not end"
        ))),
    }
}

async fn rename(admin: &Client, from: &str, to: &str) -> Result<(), BackupError> {
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} RENAME TO {}",
            ident(from),
            ident(to)
        ))
        .await
        .map_err(db)
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

/// `pg_restore` into the fresh scratch database, in one transaction. The grants come with it
/// (the app and read-only roles must exist on the server: `migrate --roles` makes them).
async fn pg_restore(file: &FsPath, target_url: &str) -> Result<(), BackupError> {
    let tool = PgTool::find("pg_restore")?;
    let mut command = tool_command(&tool, target_url)?;
    command
        .args(["--no-owner"])
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
    problems.extend(books_problems(&client).await?);
    if !problems.is_empty() {
        return Err(BackupError::Verify(problems.join("; ")));
    }
    Ok((
        manifest.row_counts.len(),
        manifest.row_counts.values().sum(),
    ))
}

/// What `backup verify` prints: a database's rows per table, once its books balance.
#[derive(Debug, serde::Serialize)]
pub struct VerifyReport {
    pub database: String,
    pub row_counts: std::collections::BTreeMap<String, i64>,
    pub books_balance: bool,
}

/// A restore's checks on a database no manifest describes (a point-in-time recovery, a
/// replica promoted): the books must balance (no negative stock, every product's stock equal
/// to its ledger); the rows per table are reported.
pub async fn verify_database(target_url: &str) -> Result<VerifyReport, BackupError> {
    let client = connect(target_url).await?;
    let row_counts = count_rows(&client).await?;
    let problems = books_problems(&client).await?;
    if !problems.is_empty() {
        return Err(BackupError::Verify(problems.join("; ")));
    }
    Ok(VerifyReport {
        database: crate::pg::database_name(target_url)?,
        row_counts,
        books_balance: true,
    })
}

/// The ledger invariant: no product below zero, and each product's stock (its shards' too,
/// since V5) equal to the sum of its ledger.
async fn books_problems(client: &Client) -> Result<Vec<String>, BackupError> {
    let mut problems = Vec::new();
    if exists(client, "products").await? {
        let negative: i64 = client
            .query_one("SELECT count(*) FROM products WHERE inventory < 0", &[])
            .await
            .map_err(db)?
            .get(0);
        if negative > 0 {
            problems.push(format!("{negative} products with negative inventory"));
        }
        if exists(client, "inventory_movements").await? {
            // Since V5 a product's stock may be spread over inventory_shards (stock_of sums
            // it); a backup from before then has neither. One grouped pass over the ledger.
            let stock = if exists(client, "inventory_shards").await? {
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
    Ok(problems)
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
    let target = with_database(database_url, &scratch);
    let options = RestoreOptions {
        from_other_source: true,
        ..RestoreOptions::default()
    };
    let restored = restore(
        config,
        &database,
        &Selector::Key(backup.manifest.dump_key.clone()),
        &target,
        options,
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
