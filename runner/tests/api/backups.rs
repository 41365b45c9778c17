//! Backups and restores against a real S3-compatible server (the s3s-fs library, which checks
//! request signatures, served in-process) on loopback and a real PostgreSQL: content round trips, consistency under a
//! storm, storage failures, corrupted dumps, retention, the lock, and memory on a large base.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backup::dump;
use backup::restore::{self, Selector};

/// Restoring a test's backup into another test database: a source other than the target.
const OTHER_DB: restore::RestoreOptions = restore::RestoreOptions {
    replace_live: false,
    from_other_source: true,
};
use backup::store::StoreConfig;
use http::Method;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tally_shared::config::Secret;

use crate::faults::free_port;
use crate::helpers::{TestApp, admin_url, fresh_database, random_u64};

const ACCESS_KEY: &str = "tally-test-access";
const SECRET_KEY: &str = "tally-test-secret-key";
const BUCKET: &str = "tally-backups";

/// An S3-compatible server (the s3s-fs library, which checks request signatures) on a loopback
/// port with one bucket, in this process on a thread of its own (some tests block their own
/// thread on a `tally backup` child), stopped when dropped. Nothing to install: no test skips.
struct S3Server {
    port: u16,
    root: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl S3Server {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let root = PathBuf::from(format!(
            "{}/s3-{port}-{:x}",
            env!("CARGO_TARGET_TMPDIR"),
            random_u64()
        ));
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let mut builder = S3ServiceBuilder::new(s3s_fs::FileSystem::new(&root).unwrap());
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        listener.set_nonblocking(true).unwrap();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let http = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                loop {
                    let socket = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((socket, _)) => socket,
                            Err(_) => continue,
                        },
                        _ = &mut stopped => break,
                    };
                    let connection = http
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone())
                        .into_owned();
                    tokio::spawn(async move {
                        let _ = connection.await;
                    });
                }
            });
            // Dropping the runtime ends every open connection: the server is gone.
        });
        Self {
            port,
            root,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn config(&self) -> StoreConfig {
        StoreConfig {
            backup_store: "s3".into(),
            backup_dir: None,
            backup_bucket: Some(BUCKET.into()),
            backup_endpoint: Some(self.endpoint()),
            backup_region: "us-east-1".into(),
            backup_virtual_hosted: false,
            aws_access_key_id: Some(ACCESS_KEY.into()),
            aws_secret_access_key: Some(Secret(SECRET_KEY.into())),
            backup_prefix: "backups".into(),
            backup_retain: 7,
            backup_request_timeout_secs: 5,
            backup_lock_wait_timeout_ms: 5_000,
        }
    }

    /// The same settings as environment variables, for the `tally backup` command.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("BACKUP_STORE", "s3".into()),
            ("BACKUP_BUCKET", BUCKET.into()),
            ("BACKUP_ENDPOINT", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("BACKUP_REQUEST_TIMEOUT_SECS", "5".into()),
            ("LOG_LEVEL", "warn".into()),
        ]
    }

    /// Every object key in the bucket, sorted.
    async fn keys(&self) -> Vec<String> {
        let store = self.config().open().unwrap();
        let mut keys = Vec::new();
        let mut prefixes = vec![None::<Path>];
        while let Some(prefix) = prefixes.pop() {
            let listing = store.list_with_delimiter(prefix.as_ref()).await.unwrap();
            keys.extend(listing.objects.into_iter().map(|o| o.location.to_string()));
            prefixes.extend(listing.common_prefixes.into_iter().map(Some));
        }
        keys.sort();
        keys
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// An ordered checksum of every table's content.
async fn checksums(db_url: &str) -> BTreeMap<String, String> {
    let client = tally_shared::pg::connect(db_url).await.unwrap();
    let tables = client
        .query(
            "SELECT format('%I', tablename) FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let mut sums = BTreeMap::new();
    for t in tables {
        let table: String = t.get(0);
        let sum: String = client
            .query_one(&format!("SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), 'empty') FROM {table} t"), &[])
            .await
            .unwrap()
            .get(0);
        sums.insert(table, sum);
    }
    sums
}

fn database_of(url: &str) -> String {
    backup::pg::database_name(url).unwrap()
}

/// `tally backup <args>` with the store's settings; returns (exit code, stdout, stderr).
fn backup_command(
    s3: &S3Server,
    db_url: &str,
    args: &[&str],
    extra: &[(&str, &str)],
) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("backup")
        .args(args)
        .env("DATABASE_URL", db_url)
        .envs(s3.env())
        .envs(extra.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_brings_back_every_table_exactly_as_backed_up() {
    let s3 = S3Server::start();
    let app = TestApp::spawn().await;
    app.order(1, &[(1, 2), (2, 1)]).await;
    let cancelled = app.order_keyed(2, &[(3, 1)], "k-1").await.json()["order_id"]
        .as_i64()
        .unwrap();
    app.request(
        Method::POST,
        &format!("/orders/{cancelled}/cancel"),
        &[],
        "",
    )
    .await;
    let before = checksums(&app.db_url).await;

    let report = dump::backup(&app.db_url, &s3.config()).await.unwrap();
    assert_eq!(report.manifest.row_counts["public.orders"], 2);
    assert_eq!(report.manifest.migration_version, Some(11));
    assert_eq!(report.manifest.sha256.len(), 64);

    // Change and delete data after the backup.
    app.order(1, &[(1, 5)]).await;
    app.db
        .batch_execute(
            "DELETE FROM idempotency_keys; UPDATE users SET email = 'changed@x' WHERE id = 1",
        )
        .await
        .unwrap();
    assert_ne!(checksums(&app.db_url).await, before);

    let after = checksums(&app.db_url).await;
    // The API is still connected: the operator says to replace it live.
    let live = restore::RestoreOptions {
        replace_live: true,
        ..Default::default()
    };
    let r = restore::restore(
        &s3.config(),
        &database_of(&app.db_url),
        &Selector::Latest,
        &app.db_url,
        live,
    )
    .await
    .unwrap();
    assert_eq!(r.dump_key, report.manifest.dump_key);
    assert_eq!(
        checksums(&app.db_url).await,
        before,
        "every table as it was at the backup"
    );
    // The data it replaced is kept, whole, beside it.
    let kept = r.replaced_database.expect("the old database is kept");
    let kept_url = tally_shared::pg::with_database(&app.db_url, &kept);
    assert_eq!(checksums(&kept_url).await, after);
    let admin = tally_shared::pg::connect(admin_url()).await.unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE \"{kept}\""))
        .await
        .unwrap();
    // The API's sessions were ended: a request on a dead pooled connection gets 503 (the
    // pool then replaces it), and then orders are placed on the restored data.
    let again = TestApp::attach(app.addr.port(), &app.db_url).await;
    again.assert_books_balance().await;
    let mut statuses = Vec::new();
    while statuses.last() != Some(&201) && statuses.len() <= 8 {
        statuses.push(again.order(1, &[(1, 1)]).await.status.as_u16());
    }
    assert!(
        statuses.iter().all(|s| *s == 503 || *s == 201) && statuses.last() == Some(&201),
        "{statuses:?}"
    );
    again.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_during_a_storm_restores_consistent() {
    let s3 = S3Server::start();
    let app = Arc::new(TestApp::spawn().await);
    let product = app.add_product("STORM", 100, 100_000).await;
    let storm: Vec<_> = (0..16)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_millis(1500);
                let mut placed = 0;
                while Instant::now() < deadline {
                    let status = app.order(1, &[(product, 1)]).await.status.as_u16();
                    assert_eq!(status, 201, "no 5xx, and stock is ample");
                    placed += 1;
                }
                placed
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = dump::backup(&app.db_url, &s3.config()).await.unwrap();
    let mut placed = 0;
    for t in storm {
        placed += t.await.unwrap();
    }
    let at_backup = report.manifest.row_counts["public.orders"];
    eprintln!("backup during a storm: {at_backup} orders in the snapshot, {placed} placed in all");
    assert!(
        at_backup > 0 && at_backup < placed as i64,
        "the backup ran mid-storm"
    );

    let target = fresh_database(admin_url()).await;
    let r = restore::restore(
        &s3.config(),
        &database_of(&app.db_url),
        &Selector::Latest,
        &target,
        OTHER_DB,
    )
    .await
    .unwrap();
    assert!(r.tables_checked >= 7);
    // restore() verified the counts against the manifest and the ledger; check it here too.
    let client = tally_shared::pg::connect(&target).await.unwrap();
    let orders: i64 = client
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(orders, at_backup);
    let drift: i64 = client
        .query_one("SELECT count(*) FROM products p WHERE inventory <> (SELECT sum(delta) FROM inventory_movements m WHERE m.product_id = p.id)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(drift, 0);
}

#[tokio::test]
async fn storage_failures_are_clear_errors_and_leave_no_manifest() {
    let s3 = S3Server::start();
    let app = TestApp::spawn().await;
    let mut unreachable = s3.config();
    unreachable.backup_endpoint = Some(format!("http://127.0.0.1:{}", free_port()));
    unreachable.backup_request_timeout_secs = 2;
    let mut wrong_key = s3.config();
    wrong_key.aws_secret_access_key = Some(Secret("not-the-secret".into()));
    let mut no_bucket = s3.config();
    no_bucket.backup_bucket = Some("no-such-bucket".into());
    for (case, config, expect) in [
        ("unreachable", unreachable, "error sending request"),
        ("wrong credentials", wrong_key, "SignatureDoesNotMatch"),
        ("missing bucket", no_bucket, "NoSuchBucket"),
    ] {
        let e = dump::backup(&app.db_url, &config).await.unwrap_err();
        assert!(matches!(e, backup::BackupError::Storage(_)), "{case}: {e}");
        assert!(e.to_string().contains(expect), "{case}: {e}");
    }
    assert_eq!(s3.keys().await, Vec::<String>::new(), "nothing written");

    let (code, stdout, stderr) = backup_command(
        &s3,
        &app.db_url,
        &["run"],
        &[("AWS_SECRET_ACCESS_KEY", "wrong")],
    );
    assert_eq!(code, 1);
    assert!(stdout.is_empty(), "no report: {stdout}");
    assert_one_json_error_line(&stderr, "SignatureDoesNotMatch");
}

/// The command's log: JSON lines, exactly one of them an ERROR that says `expect`.
fn assert_one_json_error_line(log: &str, expect: &str) {
    let errors: Vec<serde_json::Value> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|_| panic!("not a JSON line: {l}"))
        })
        .filter(|v| v["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0]["error"].as_str().unwrap_or("").contains(expect),
        "{log}"
    );
}

/// A directory holding a `pg_dump` shell script with `body`, for fault injection.
fn fake_pg_dump(body: &str) -> PathBuf {
    let bin = PathBuf::from(format!(
        "{}/fake-pg-{:x}",
        env!("CARGO_TARGET_TMPDIR"),
        random_u64()
    ));
    std::fs::create_dir_all(&bin).unwrap();
    let script = bin.join("pg_dump");
    std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    bin
}

#[tokio::test]
async fn a_pg_dump_older_than_the_server_is_refused_clearly() {
    let s3 = S3Server::start();
    let app = TestApp::spawn().await;
    let bin = fake_pg_dump("echo 'pg_dump (PostgreSQL) 9.6.24'");
    let (code, _, stderr) = backup_command(
        &s3,
        &app.db_url,
        &["run"],
        &[("PG_BINDIR", bin.to_str().unwrap())],
    );
    assert_eq!(code, 1, "{stderr}");
    assert_one_json_error_line(&stderr, "pg_dump is version 9 but the server is");
    assert_eq!(s3.keys().await, Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&bin);
}

#[tokio::test]
async fn a_failing_pg_dump_aborts_the_upload_and_writes_no_manifest() {
    let s3 = S3Server::start();
    let app = TestApp::spawn().await;
    // A pg_dump that streams 20 MB (several parts) and then fails, as one killed mid-dump would.
    let bin = fake_pg_dump(
        "if [ \"$1\" = --version ]; then echo 'pg_dump (PostgreSQL) 99.0'; exit 0; fi\n\
         head -c 20000000 /dev/zero; echo 'pg_dump: error: connection lost' >&2; exit 1",
    );

    let (code, stdout, stderr) = backup_command(
        &s3,
        &app.db_url,
        &["run"],
        &[("PG_BINDIR", bin.to_str().unwrap())],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.is_empty());
    assert_one_json_error_line(&stderr, "connection lost");
    assert_eq!(
        s3.keys().await,
        Vec::<String>::new(),
        "no partial object, no manifest"
    );
    let _ = std::fs::remove_dir_all(&bin);
}

#[tokio::test]
async fn a_corrupted_or_truncated_dump_is_refused_before_the_target_is_touched() {
    let s3 = S3Server::start();
    let app = TestApp::spawn().await;
    let report = dump::backup(&app.db_url, &s3.config()).await.unwrap();
    let store = s3.config().open().unwrap();
    let key = Path::from(report.manifest.dump_key.as_str());
    let original = store.get(&key).await.unwrap().bytes().await.unwrap();

    let target = fresh_database(admin_url()).await;
    let client = tally_shared::pg::connect(&target).await.unwrap();
    client
        .batch_execute("CREATE TABLE marker (id int); INSERT INTO marker VALUES (42)")
        .await
        .unwrap();
    let target_before = checksums(&target).await;

    let mut flipped = original.to_vec();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    for (case, bytes) in [
        ("truncated", original.slice(..original.len() / 2).to_vec()),
        ("one byte flipped", flipped),
    ] {
        store.put(&key, PutPayload::from(bytes)).await.unwrap();
        let e = restore::restore(
            &s3.config(),
            &database_of(&app.db_url),
            &Selector::Latest,
            &target,
            // Even told to replace a live target, a bad dump never reaches it.
            restore::RestoreOptions {
                replace_live: true,
                from_other_source: true,
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(e, backup::BackupError::Verify(_)), "{case}: {e}");
        assert_eq!(
            checksums(&target).await,
            target_before,
            "{case}: the target is untouched"
        );
    }
}

#[tokio::test]
async fn retention_keeps_exactly_n_and_never_the_newest() {
    let s3 = S3Server::start();
    let app = TestApp::spawn().await;
    let mut config = s3.config();
    config.backup_retain = 2;
    let mut made = Vec::new();
    for _ in 0..4 {
        made.push(dump::backup(&app.db_url, &config).await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let keys = s3.keys().await;
    let kept: Vec<String> = made[2..]
        .iter()
        .flat_map(|r| [r.manifest.dump_key.clone(), r.manifest_key.clone()])
        .collect();
    let mut kept_sorted = kept.clone();
    kept_sorted.sort();
    assert_eq!(
        keys, kept_sorted,
        "the two newest backups, dump and manifest each"
    );
    assert_eq!(made[3].deleted_by_retention, 2);

    config.backup_retain = 1;
    dump::backup(&app.db_url, &config).await.unwrap();
    assert_eq!(s3.keys().await.len(), 2, "retain 1 keeps the newest");
    config.backup_retain = 0;
    assert!(
        dump::backup(&app.db_url, &config).await.is_err(),
        "retain 0 is refused"
    );
}

#[tokio::test]
async fn only_one_backup_runs_at_a_time() {
    let s3 = S3Server::start();
    let app = TestApp::spawn().await;
    // Another backup (another pod) holds the lock.
    app.db
        .execute("SELECT pg_advisory_lock($1)", &[&dump::BACKUP_LOCK])
        .await
        .unwrap();
    let (code, _, _) = backup_command(&s3, &app.db_url, &["run"], &[]);
    assert_eq!(code, 75, "EX_TEMPFAIL: try later");
    assert!(matches!(
        dump::backup(&app.db_url, &s3.config()).await,
        Err(backup::BackupError::InProgress)
    ));
    app.db
        .execute("SELECT pg_advisory_unlock($1)", &[&dump::BACKUP_LOCK])
        .await
        .unwrap();
    let (code, stdout, stderr) = backup_command(&s3, &app.db_url, &["run"], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("\"sha256\""));
}

#[tokio::test]
async fn the_drill_backs_up_restores_verifies_and_drops_its_scratch_database() {
    let s3 = S3Server::start();
    let app = TestApp::spawn().await;
    app.order(1, &[(1, 1)]).await;
    let (code, stdout, stderr) = backup_command(&s3, &app.db_url, &["drill"], &[]);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let scratch = report["scratch_database"].as_str().unwrap();
    assert_eq!(report["restore"]["tables_checked"], 9);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM pg_database WHERE datname = '{scratch}'"
        ))
        .await,
        0,
        "dropped"
    );
}

/// Peak resident memory of a running process, from /proc (kB).
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_database_backs_up_in_bounded_memory() {
    let s3 = S3Server::start();
    let megabytes: i64 = std::env::var("BACKUP_TEST_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let db_url = fresh_database(admin_url()).await;
    let client = tally_shared::pg::connect(&db_url).await.unwrap();
    // Rows of ~130 bytes that compress poorly, up to the requested size on disk.
    let rows = megabytes * 1024 * 1024 / 170;
    let started = Instant::now();
    client
        .batch_execute(&format!(
            "CREATE TABLE ballast (id bigint PRIMARY KEY, payload text NOT NULL);
             INSERT INTO ballast SELECT g, md5(g::text) || md5((g * 7)::text) || md5(random()::text) || md5(random()::text)
             FROM generate_series(1, {rows}) g;"
        ))
        .await
        .unwrap();
    let size: i64 = client
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .unwrap()
        .get(0);
    let fill = started.elapsed();

    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["backup", "run"])
        .env("DATABASE_URL", &db_url)
        .envs(s3.env())
        .env("BACKUP_REQUEST_TIMEOUT_SECS", "60")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(peak_rss_kb(pid).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().unwrap();
    let backup_time = started.elapsed();
    assert!(status.success());
    let manifest = s3.keys().await;
    assert_eq!(manifest.len(), 2);

    let target = fresh_database(admin_url()).await;
    let started = Instant::now();
    let r = restore::restore(
        &s3.config(),
        &database_of(&db_url),
        &Selector::Latest,
        &target,
        OTHER_DB,
    )
    .await
    .unwrap();
    let restore_time = started.elapsed();
    eprintln!(
        "large backup: database {} MB ({rows} rows, filled in {fill:.1?}), dump {} MB, backup {backup_time:.1?} at peak RSS {} MB, restore+verify {restore_time:.1?}",
        size / 1_048_576,
        r.size_bytes / 1_048_576,
        peak / 1024
    );
    assert!(
        size >= megabytes * 1_048_576 * 9 / 10,
        "the database is {size} bytes"
    );
    assert!(peak > 0 && peak < 50 * 1024, "peak RSS {peak} kB");
}

#[tokio::test]
async fn a_local_directory_store_serves_development() {
    let app = TestApp::spawn().await;
    app.order(1, &[(2, 3)]).await;
    let dir = PathBuf::from(format!(
        "{}/backup-dir-{:x}",
        env!("CARGO_TARGET_TMPDIR"),
        random_u64()
    ));
    let config = StoreConfig {
        backup_store: "file".into(),
        backup_dir: Some(dir.clone()),
        backup_bucket: None,
        backup_endpoint: None,
        backup_region: "us-east-1".into(),
        backup_virtual_hosted: false,
        aws_access_key_id: None,
        aws_secret_access_key: None,
        backup_prefix: "backups".into(),
        backup_retain: 7,
        backup_request_timeout_secs: 5,
        backup_lock_wait_timeout_ms: 5_000,
    };
    let report = dump::backup(&app.db_url, &config).await.unwrap();
    assert!(dir.join(&report.manifest.dump_key).is_file());
    assert!(dir.join(&report.manifest_key).is_file());
    let target = fresh_database(admin_url()).await;
    let r = restore::restore(
        &config,
        &database_of(&app.db_url),
        &Selector::Latest,
        &target,
        OTHER_DB,
    )
    .await
    .unwrap();
    assert_eq!(r.dump_key, report.manifest.dump_key);
    assert_eq!(checksums(&target).await, checksums(&app.db_url).await);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_restore_refuses_a_target_in_use_and_a_backup_of_another_database() {
    let s3 = S3Server::start();
    let app = TestApp::spawn().await;
    app.order(1, &[(1, 2)]).await;
    dump::backup(&app.db_url, &s3.config()).await.unwrap();
    let target = fresh_database(admin_url()).await;
    let client = tally_shared::pg::connect(&target).await.unwrap();
    client
        .batch_execute("CREATE TABLE marker (id int); INSERT INTO marker VALUES (42)")
        .await
        .unwrap();
    let before = checksums(&target).await;
    let source = database_of(&app.db_url);
    let attempt = |options| {
        let (config, source, target) = (s3.config(), source.clone(), target.clone());
        async move { restore::restore(&config, &source, &Selector::Latest, &target, options).await }
    };
    // In use (this test's session), and of another database.
    for options in [restore::RestoreOptions::default(), OTHER_DB] {
        let e = attempt(options).await.unwrap_err();
        assert!(
            matches!(&e, backup::BackupError::Refused(m) if m.contains("--replace-live")),
            "{e}"
        );
    }
    drop(client);
    let e = attempt(restore::RestoreOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, backup::BackupError::Refused(m) if m.contains("--from-other-source")),
        "{e}"
    );
    assert_eq!(
        checksums(&target).await,
        before,
        "each refusal left it as it was"
    );
    let admin = tally_shared::pg::connect(admin_url()).await.unwrap();
    let scratch: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname LIKE '%_restoring_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(scratch, 0, "no scratch database left behind");

    let r = attempt(OTHER_DB).await.unwrap();
    assert_eq!(checksums(&target).await, checksums(&app.db_url).await);
    let kept = r.replaced_database.expect("the old target is kept");
    let kept_url = tally_shared::pg::with_database(&target, &kept);
    assert_eq!(checksums(&kept_url).await, before);
    admin
        .batch_execute(&format!("DROP DATABASE \"{kept}\""))
        .await
        .unwrap();
}

/// `backup verify`, the point-in-time drill's check: a database as it is, no manifest.
#[tokio::test]
async fn verify_reports_the_rows_of_a_balanced_database_and_refuses_a_drifted_one() {
    let app = TestApp::spawn().await;
    assert_eq!(app.order(1, &[(1, 2)]).await.status, 201);
    let report = restore::verify_database(&app.db_url).await.unwrap();
    assert!(report.books_balance);
    assert_eq!(report.row_counts["public.orders"], 1);
    assert_eq!(report.row_counts["public.order_items"], 1);
    // Stock changed behind the ledger's back: the drill must say so.
    app.db
        .batch_execute("UPDATE products SET inventory = inventory + 1 WHERE id = 1")
        .await
        .unwrap();
    let err = restore::verify_database(&app.db_url).await.unwrap_err();
    assert!(
        err.to_string().contains("differs from their ledger"),
        "{err}"
    );
}
