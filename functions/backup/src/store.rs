//! Where backups live: an S3-compatible bucket (DigitalOcean Spaces) or a local directory,
//! through `object_store`, and the naming, listing and retention of dumps and manifests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};
use serde::{Deserialize, Serialize};
use tally_shared::config::Secret;

use crate::BackupError;

/// Storage settings, from the environment.
#[derive(Debug, Clone, Deserialize)]
pub struct StoreConfig {
    /// `s3` (Spaces or any S3-compatible endpoint) or `file`.
    #[serde(default = "defaults::store")]
    pub backup_store: String,
    /// `file`: the directory.
    pub backup_dir: Option<PathBuf>,
    pub backup_bucket: Option<String>,
    /// e.g. `https://nyc3.digitaloceanspaces.com`; AWS itself when unset.
    pub backup_endpoint: Option<String>,
    #[serde(default = "defaults::region")]
    pub backup_region: String,
    /// `https://<bucket>.<endpoint>` instead of `https://<endpoint>/<bucket>`.
    #[serde(default)]
    pub backup_virtual_hosted: bool,
    pub aws_access_key_id: Option<String>,
    pub aws_secret_access_key: Option<Secret>,
    /// Top folder of every key.
    #[serde(default = "defaults::prefix")]
    pub backup_prefix: String,
    /// How many backups to keep (at least 1; the newest is never deleted).
    #[serde(default = "defaults::retain")]
    pub backup_retain: usize,
    /// Bound on each storage request, and on its retries together.
    #[serde(default = "defaults::request_timeout_secs")]
    pub backup_request_timeout_secs: u64,
    /// How long pg_dump may wait for a table lock before giving up.
    #[serde(default = "defaults::lock_wait_timeout_ms")]
    pub backup_lock_wait_timeout_ms: u64,
}

mod defaults {
    pub fn store() -> String {
        "s3".into()
    }
    pub fn region() -> String {
        "us-east-1".into()
    }
    pub fn prefix() -> String {
        "backups".into()
    }
    pub fn retain() -> usize {
        7
    }
    pub fn request_timeout_secs() -> u64 {
        30
    }
    pub fn lock_wait_timeout_ms() -> u64 {
        60_000
    }
}

impl StoreConfig {
    /// Opens the configured store. Nothing is sent yet.
    pub fn open(&self) -> Result<Arc<dyn ObjectStore>, BackupError> {
        let config = |m: &str| BackupError::Config(m.to_owned());
        if self.backup_retain == 0 {
            return Err(config("BACKUP_RETAIN must be at least 1"));
        }
        match self.backup_store.as_str() {
            "file" => {
                let dir = self
                    .backup_dir
                    .as_ref()
                    .ok_or_else(|| config("BACKUP_STORE=file needs BACKUP_DIR"))?;
                std::fs::create_dir_all(dir).map_err(|e| BackupError::Storage(e.to_string()))?;
                Ok(Arc::new(
                    LocalFileSystem::new_with_prefix(dir)
                        .map_err(|e| BackupError::Storage(e.to_string()))?,
                ))
            }
            "s3" => Ok(Arc::new(
                self.s3()?
                    .build()
                    .map_err(|e| BackupError::Config(e.to_string()))?,
            )),
            other => Err(BackupError::Config(format!(
                "BACKUP_STORE={other:?}: use s3 or file"
            ))),
        }
    }

    /// An S3-compatible store (DigitalOcean Spaces, AWS, s3s-fs in the tests): bounded
    /// timeouts and retries, plain HTTP only for an `http://` endpoint.
    fn s3(&self) -> Result<AmazonS3Builder, BackupError> {
        let bucket = self
            .backup_bucket
            .as_ref()
            .ok_or_else(|| BackupError::Config("BACKUP_STORE=s3 needs BACKUP_BUCKET".into()))?;
        let timeout = Duration::from_secs(self.backup_request_timeout_secs);
        let plain_http = self
            .backup_endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&self.backup_region)
            .with_virtual_hosted_style_request(self.backup_virtual_hosted)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(timeout)
                    .with_allow_http(plain_http),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 3,
                retry_timeout: timeout,
            });
        if let Some(endpoint) = &self.backup_endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let (Some(id), Some(secret)) = (&self.aws_access_key_id, &self.aws_secret_access_key) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(&secret.0);
        }
        Ok(builder)
    }
}

/// What a backup was, stored as JSON beside the dump. A backup is done once this exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub database: String,
    pub dump_key: String,
    pub size_bytes: u64,
    pub sha256: String,
    pub server_version: String,
    pub pg_dump_version: String,
    /// The newest applied migration (refinery's history), if any.
    pub migration_version: Option<i32>,
    /// Rows per table, counted in the snapshot the dump was taken from.
    pub row_counts: BTreeMap<String, i64>,
    pub started_at: String,
    pub finished_at: String,
}

/// `<prefix>/<database>/`
pub fn folder(prefix: &str, database: &str) -> Path {
    Path::from(format!("{prefix}/{database}"))
}

/// The dump's key for a start time: `<prefix>/<database>/<UTC timestamp>.dump`, where the
/// timestamp (`20261125T184500.123Z`) sorts in time order.
pub fn dump_key(prefix: &str, database: &str, started: std::time::SystemTime) -> Path {
    let stamp: String = humantime::format_rfc3339_millis(started)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    Path::from(format!("{prefix}/{database}/{stamp}.dump"))
}

/// The manifest beside a dump: the same name with `.json`.
pub fn manifest_key(dump: &Path) -> Path {
    let raw = dump.as_ref();
    Path::from(format!("{}.json", raw.strip_suffix(".dump").unwrap_or(raw)))
}

/// Every key in the database's folder, sorted (so oldest first: the names are timestamps).
async fn list_folder(
    store: &dyn ObjectStore,
    prefix: &str,
    database: &str,
) -> Result<Vec<String>, BackupError> {
    let listing = store
        .list_with_delimiter(Some(&folder(prefix, database)))
        .await
        .map_err(storage)?;
    let mut keys: Vec<String> = listing
        .objects
        .into_iter()
        .map(|o| o.location.to_string())
        .collect();
    keys.sort();
    Ok(keys)
}

/// Every manifest in the database's folder, oldest first.
pub async fn list_manifests(
    store: &dyn ObjectStore,
    prefix: &str,
    database: &str,
) -> Result<Vec<Path>, BackupError> {
    Ok(list_folder(store, prefix, database)
        .await?
        .into_iter()
        .filter(|k| k.ends_with(".json"))
        .map(Path::from)
        .collect())
}

pub async fn read_manifest(store: &dyn ObjectStore, key: &Path) -> Result<Manifest, BackupError> {
    let bytes = store
        .get(key)
        .await
        .map_err(storage)?
        .bytes()
        .await
        .map_err(storage)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| BackupError::Verify(format!("manifest {key} is not readable: {e}")))
}

pub async fn write_manifest(
    store: &dyn ObjectStore,
    manifest: &Manifest,
) -> Result<Path, BackupError> {
    let key = manifest_key(&Path::from(manifest.dump_key.as_str()));
    let json = serde_json::to_vec_pretty(manifest).expect("a manifest serialises");
    store
        .put(&key, PutPayload::from(json))
        .await
        .map_err(storage)?;
    Ok(key)
}

/// Keeps the newest `retain` backups and deletes older dumps with their manifests, plus any
/// dump older than the newest kept one that never got a manifest (a run that died after
/// uploading). Returns how many objects were deleted.
pub async fn apply_retention(
    store: &dyn ObjectStore,
    prefix: &str,
    database: &str,
    retain: usize,
) -> Result<usize, BackupError> {
    let retain = retain.max(1);
    let keys = list_folder(store, prefix, database).await?;
    let manifests: Vec<&String> = keys.iter().filter(|k| k.ends_with(".json")).collect();
    if manifests.len() <= retain {
        return Ok(0);
    }
    let oldest_kept = manifests[manifests.len() - retain].trim_end_matches(".json");
    let doomed: Vec<&String> = keys
        .iter()
        .filter(|k| {
            let stem = k.trim_end_matches(".json").trim_end_matches(".dump");
            stem < oldest_kept
        })
        .collect();
    for key in &doomed {
        store
            .delete(&Path::from(key.as_str()))
            .await
            .map_err(storage)?;
        tracing::info!(key = key.as_str(), "retention: deleted");
    }
    Ok(doomed.len())
}

pub fn storage(e: object_store::Error) -> BackupError {
    BackupError::Storage(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_in_time_order_and_pair_dump_with_manifest() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_795_632_000_123);
        let dump = dump_key("backups", "tally", t);
        assert_eq!(dump.as_ref(), "backups/tally/20261125T184000.123Z.dump");
        assert_eq!(
            manifest_key(&dump).as_ref(),
            "backups/tally/20261125T184000.123Z.json"
        );
        let later = dump_key("backups", "tally", t + Duration::from_secs(1));
        assert!(later.as_ref() > dump.as_ref());
    }
}
