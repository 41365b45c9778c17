//! Faults: the database going away and coming back, and SIGTERM with requests in flight.
//! Tests that stop Postgres use a private cluster of their own, never the shared server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tally_dev::devdb::PrivatePostgres;

use crate::helpers::{TestApp, admin_url, fresh_database};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway cluster, stopped and deleted when the test ends, pass or fail.
struct OwnCluster {
    cluster: PrivatePostgres,
    dir: PathBuf,
}

impl OwnCluster {
    fn start() -> Self {
        let port = free_port();
        // In this run's private directory, made anew: the cluster may run as `postgres`,
        // which can pass through it, and nothing planted in advance is followed.
        let dir = crate::helpers::fresh_dir("pg-fault");
        let cluster = PrivatePostgres::new(&dir, port, "-c fsync=off")
            .expect("server binaries for the fault tests");
        cluster.start().expect("start the private cluster");
        Self { cluster, dir }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = self.cluster.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_means_503_within_the_bound_then_recovery_in_the_same_process() {
    let own = tokio::task::spawn_blocking(OwnCluster::start)
        .await
        .unwrap();
    let app = TestApp::spawn_on(&own.cluster.url("postgres"), &[("POOL_TIMEOUT_MS", "1000")]).await;
    assert_eq!(app.get("/products").await.status, 200);
    assert_eq!(app.order(1, &[(1, 1)]).await.status, 201);

    let own = tokio::task::spawn_blocking(move || {
        own.cluster.stop().unwrap();
        own
    })
    .await
    .unwrap();
    for path in ["/products", "/orders/1"] {
        let started = Instant::now();
        let r = app.get(path).await;
        r.assert_problem(503, "unavailable");
        assert_eq!(r.header("retry-after"), "1");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{path} took {:?}",
            started.elapsed()
        );
    }
    let r = app.order(1, &[(1, 1)]).await;
    r.assert_problem(503, "unavailable");
    assert_eq!(app.get("/healthz").await.status, 503);
    // The probes' endpoint does not ask the database: the pod stays in rotation and answers
    // the fast 503s above, rather than leaving callers queued at the activator.
    let live = app.get("/livez").await;
    assert_eq!((live.status.as_u16(), &live.body[..]), (200, &b"ok"[..]));

    let own = tokio::task::spawn_blocking(move || {
        own.cluster.start().unwrap();
        own
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if app.get("/healthz").await.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.get("/products").await.status, 200);
    let r = app.order(1, &[(1, 1)]).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(
        r.json()["order_id"],
        2,
        "the order tried while down was not placed"
    );
    drop(own);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_0() {
    let db_url = fresh_database(admin_url()).await;
    let port = free_port();
    let mut child = crate::helpers::runner_command(&db_url, port)
        .env("POOL_SIZE", "4")
        .env("POOL_TIMEOUT_MS", "20000")
        .env("LOG_LEVEL", "warn")
        .spawn()
        .unwrap();
    let app = TestApp::attach(port, &db_url).await;
    app.wait_until_up().await;

    // Hold the product's row lock so that the orders below stay in flight.
    let locker = tally_shared::pg::connect(&db_url).await.unwrap();
    locker
        .batch_execute("BEGIN; SELECT 1 FROM products WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let app = std::sync::Arc::new(app);
    let orders: Vec<_> = (0..12)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { app.order(1, &[(1, 1)]).await.status.as_u16() })
        })
        .collect();
    // Two (create-order's turn per product) wait on the lock, the rest wait in its gate.
    let deadline = Instant::now() + Duration::from_secs(10);
    while app
        .count("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
        .await
        < 2
    {
        assert!(Instant::now() < deadline, "orders never reached the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "the listener must be closed after SIGTERM"
    );
    locker.batch_execute("COMMIT").await.unwrap();

    let mut statuses = Vec::new();
    for order in orders {
        statuses.push(order.await.unwrap());
    }
    assert_eq!(statuses, vec![201; 12], "every in-flight order completes");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits within the grace")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(app.inventory(1).await, 38);
    app.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_started_before_postgres_answers_503_then_serves_once_it_is_up() {
    let own = tokio::task::spawn_blocking(|| {
        let own = OwnCluster::start();
        own.cluster.stop().unwrap();
        own
    })
    .await
    .unwrap();
    let db_url = own.cluster.url("postgres");
    let port = free_port();
    let mut child = crate::helpers::runner_command(&db_url, port)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let app = TestApp::attach_lazily(port);
    // Up, and saying it cannot serve yet, rather than refusing connections or exiting.
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.try_get("/healthz").await != Some(503) {
        assert!(Instant::now() < deadline, "the runner did not answer");
        assert!(child.try_wait().unwrap().is_none(), "the runner exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = app.get("/products").await;
    r.assert_problem(503, "unavailable");
    assert_eq!(r.header("retry-after"), "1");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(child.try_wait().unwrap().is_none(), "the runner exited");

    let own = tokio::task::spawn_blocking(move || {
        own.cluster.start().unwrap();
        own
    })
    .await
    .unwrap();
    let app = TestApp::attach(port, &db_url).await;
    app.wait_until_up().await;
    assert_eq!(app.get("/products").await.status, 200);
    assert_eq!(app.order(1, &[(1, 1)]).await.status, 201);
    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tally: waiting for PostgreSQL at postgres://"),
        "{stderr}"
    );
    drop(own);
}
