//! Reads from a standby, and reading one's own writes: a primary and a standby made from it
//! with `pg_basebackup -R`, both private clusters, and the standby's replay paused, so that a
//! read that ignored `Tally-Min-Lsn` would see the replica's past and fail the test.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::Method;
use tally_dev::devdb::PrivatePostgres;
use tokio_postgres::types::PgLsn;

use crate::faults::free_port;
use crate::helpers::{TestApp, as_readonly, fresh_database, fresh_dir};

struct Pair {
    primary: PrivatePostgres,
    standby: PrivatePostgres,
    standby_port: u16,
    dir: PathBuf,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.standby.stop();
        let _ = self.primary.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start() -> Pair {
    let dir = fresh_dir("pg-replica");
    let primary_port = free_port();
    let primary = PrivatePostgres::new(&dir.join("primary"), primary_port, "-c fsync=off")
        .expect("server binaries for the replica test");
    primary.start().expect("start the primary");
    // The standby's directory, made by its future owner's rules: the primary's owner, 0700.
    let meta = std::fs::metadata(dir.join("primary")).unwrap();
    let (uid, gid) = (
        std::os::unix::fs::MetadataExt::uid(&meta),
        std::os::unix::fs::MetadataExt::gid(&meta),
    );
    let standby_dir = dir.join("standby");
    std::fs::create_dir(&standby_dir).unwrap();
    std::fs::set_permissions(
        &standby_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    std::os::unix::fs::chown(&standby_dir, Some(uid), Some(gid)).unwrap();
    let bindir = tally_shared::pg::find_bindir().unwrap();
    let mut basebackup = std::process::Command::new(bindir.join("pg_basebackup"));
    basebackup
        .arg("-D")
        .arg(&standby_dir)
        .args([
            "-R",
            "-X",
            "stream",
            "--no-sync",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .args(["-p", &primary_port.to_string()])
        .current_dir("/");
    std::os::unix::process::CommandExt::uid(&mut basebackup, uid);
    std::os::unix::process::CommandExt::gid(&mut basebackup, gid);
    let out = basebackup.output().unwrap();
    assert!(
        out.status.success(),
        "pg_basebackup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let standby_port = free_port();
    let standby = PrivatePostgres::new(&standby_dir, standby_port, "-c fsync=off")
        .expect("the standby's directory");
    standby.start().expect("start the standby");
    Pair {
        primary,
        standby,
        standby_port,
        dir,
    }
}

/// `url` on the standby: the same database, user and settings, another port.
fn on_standby(url: &str, primary_port: &str, standby_port: u16) -> String {
    url.replacen(
        &format!("127.0.0.1:{primary_port}"),
        &format!("127.0.0.1:{standby_port}"),
        1,
    )
}

async fn lsn_of(client: &tokio_postgres::Client, sql: &str) -> PgLsn {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Product 1's stock, as a read naming `lsn` (or none) is answered.
async fn stock(app: &TestApp, lsn: Option<&str>) -> serde_json::Value {
    let headers: Vec<(&str, &str)> = lsn.map(|l| ("tally-min-lsn", l)).into_iter().collect();
    app.request(Method::GET, "/products/1", &headers, "")
        .await
        .json()["inventory"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_naming_its_writes_lsn_never_sees_the_replicas_past() {
    let pair = tokio::task::spawn_blocking(start).await.unwrap();
    let primary_url = pair.primary.url("postgres");
    let primary_port = primary_url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap()
        .to_owned();
    // The database, its migrations and the roles are made on the primary; the standby replays.
    let db_url = fresh_database(&primary_url).await;
    let read_url = as_readonly(&on_standby(&db_url, &primary_port, pair.standby_port));
    let app = TestApp::serve(
        db_url.clone(),
        &[
            ("DATABASE_URL_READ", read_url.as_str()),
            ("COMMIT_LSN", "true"),
            ("READ_LSN_WAIT_MS", "100"),
        ],
    )
    .await;
    // The standby replays the database's creation when it gets to it: connect once it has.
    let standby_url = on_standby(&db_url, &primary_port, pair.standby_port);
    let deadline = Instant::now() + Duration::from_secs(30);
    let standby = loop {
        match tally_shared::pg::connect(&standby_url).await {
            Ok(client) => break client,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the standby never had the database: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // An order placed while the replica follows: it has it, PENDING.
    let earlier = app.order(1, &[(2, 1)]).await;
    assert_eq!(earlier.status, 201, "{:?}", earlier.body);
    let earlier = earlier.json()["order_id"].as_i64().unwrap();
    // Caught up, then replay paused: from here the replica is the past.
    let target = lsn_of(&app.db, "SELECT pg_current_wal_lsn()").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while lsn_of(&standby, "SELECT pg_last_wal_replay_lsn()").await < target {
        assert!(Instant::now() < deadline, "the standby did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let stock_before = app.get("/products/1").await.json()["inventory"].clone();
    let customer = app.customer(1);
    let read = |path: String, lsn: Option<String>| {
        let (app, customer) = (&app, customer.clone());
        async move {
            let mut headers = vec![("authorization", customer.as_str())];
            if let Some(lsn) = &lsn {
                headers.push(("tally-min-lsn", lsn.as_str()));
            }
            app.request(Method::GET, &path, &headers, "").await
        }
    };

    // The customer cancels the earlier order: the write answers its commit's LSN.
    let cancel = app
        .request(
            Method::POST,
            &format!("/orders/{earlier}/cancel"),
            &[("authorization", &customer)],
            "",
        )
        .await;
    assert_eq!(cancel.status, 200, "{:?}", cancel.body);
    let lsn = cancel.header("tally-commit-lsn").to_owned();
    assert!(
        lsn.contains('/'),
        "a write answers its commit's LSN: {lsn:?}"
    );
    let path = format!("/orders/{earlier}");
    // Without the LSN the replica answers, as it is: still PENDING there.
    let stale = read(path.clone(), None).await;
    assert_eq!(
        stale.json()["order"]["status"],
        "PENDING",
        "the read went to the replica"
    );
    // With it the replica (paused) cannot catch up in time, and the primary answers.
    let own = read(path.clone(), Some(lsn.clone())).await;
    assert_eq!(own.status, 200, "{:?}", own.body);
    assert_eq!(own.json()["order"]["status"], "CANCELLED");

    // A new order: the replica does not have it, so even without the LSN the primary is asked
    // rather than answering 404 to the Location just handed out.
    let placed = app.order(1, &[(1, 2)]).await;
    assert_eq!(placed.status, 201, "{:?}", placed.body);
    let placed_lsn = placed.header("tally-commit-lsn").to_owned();
    let id = placed.json()["order_id"].as_i64().unwrap();
    let fresh = read(format!("/orders/{id}"), None).await;
    assert_eq!(fresh.status, 200, "{:?}", fresh.body);
    // The catalogue has no such fallback: the stock as of the caller's write, or the past.
    assert_eq!(stock(&app, None).await, stock_before);
    assert_eq!(
        stock(&app, Some(&placed_lsn)).await,
        stock_before.as_i64().unwrap() - 2
    );
    // A header that is not a WAL position: the primary answers, never an error.
    assert_eq!(
        stock(&app, Some("latest")).await,
        stock_before.as_i64().unwrap() - 2
    );

    // Replay resumed: the replica catches up and shows the cancel itself.
    standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while read(path.clone(), None).await.json()["order"]["status"] != "CANCELLED" {
        assert!(
            Instant::now() < deadline,
            "the replica never showed the cancel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
