//! The order processor: confirmation by concurrent processors, expiry with restock, the race
//! between cancel and expiry, and the HTTP sweep.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::Method;
use process_orders::{
    ClaimedOrder, FulfilmentStep, ProcessorConfig, StepFuture, StepOutcome, sweep,
};
use tally_shared::{Pool, db};

use crate::helpers::{TestApp, test_config};

/// Counts how often the step ran for each order, and yields so that processors interleave.
#[derive(Default)]
struct CountingStep {
    calls: Mutex<HashMap<i64, u32>>,
}

impl FulfilmentStep for CountingStep {
    fn run<'a>(&'a self, order: &'a ClaimedOrder) -> StepFuture<'a> {
        Box::pin(async move {
            *self.calls.lock().unwrap().entry(order.id).or_default() += 1;
            tokio::task::yield_now().await;
            StepOutcome::Confirmed
        })
    }
}

fn pool_for(app: &TestApp, db_url: &str) -> Pool {
    let _ = app;
    db::lazy_pool(&test_config(db_url, &[]), "processor-test").unwrap()
}

async fn place_pending_orders(app: &TestApp, product: i64, n: i64) {
    app.db
        .execute(
            "SELECT place_order(1, ARRAY[$1::bigint], ARRAY[1]) FROM generate_series(1, $2::bigint)",
            &[&product, &n],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processors_over_1000_pending_orders_confirm_each_exactly_once() {
    let app = TestApp::spawn().await;
    let product = app.add_product("BULK", 10, 5000).await;
    place_pending_orders(&app, product, 1000).await;
    let step = Arc::new(CountingStep::default());
    let config = ProcessorConfig {
        process_batch_size: 50,
        ..ProcessorConfig::default()
    };
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (pool, step, config) = (pool_for(&app, &app.db_url), step.clone(), config.clone());
            tokio::spawn(async move {
                let mut confirmed = 0;
                loop {
                    let s = sweep(&pool, &config, step.as_ref()).await.unwrap();
                    confirmed += s.confirmed;
                    if s.claimed == 0 {
                        return confirmed;
                    }
                }
            })
        })
        .collect();
    let mut per_worker = Vec::new();
    for w in workers {
        per_worker.push(w.await.unwrap());
    }
    let calls = step.calls.lock().unwrap().clone();
    eprintln!(
        "two processors, 1000 orders: confirmed {per_worker:?}, step calls {}",
        calls.len()
    );
    assert_eq!(per_worker.iter().sum::<u64>(), 1000);
    assert_eq!(calls.len(), 1000);
    assert!(
        calls.values().all(|&n| n == 1),
        "an order was processed twice"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM orders WHERE status = 'CONFIRMED'")
            .await,
        1000
    );
    assert_eq!(app.inventory(product).await, 4000);
    app.assert_books_balance().await;
}

#[tokio::test]
async fn stale_pending_orders_expire_with_their_stock_returned_and_old_keys_go() {
    let app = TestApp::spawn().await;
    let fresh = app.order(1, &[(1, 1)]).await.json()["order_id"]
        .as_i64()
        .unwrap();
    let stale = app
        .order_keyed(1, &[(1, 5), (2, 2)], "old-key")
        .await
        .json()["order_id"]
        .as_i64()
        .unwrap();
    app.db
        .execute(
            "UPDATE orders SET created_at = now() - interval '1 hour' WHERE id = $1",
            &[&stale],
        )
        .await
        .unwrap();
    app.db
        .execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '2 days'",
            &[],
        )
        .await
        .unwrap();
    let pool = pool_for(&app, &app.db_url);
    let s = sweep(
        &pool,
        &ProcessorConfig::default(),
        &process_orders::ConfirmAll,
    )
    .await
    .unwrap();
    assert_eq!(
        (s.expired, s.claimed, s.confirmed, s.keys_deleted),
        (1, 1, 1, 1),
        "{s:?}"
    );
    let status = |id: i64| {
        let app = &app;
        async move { app.get(&format!("/orders/{id}")).await.json()["order"]["status"].clone() }
    };
    assert_eq!(status(stale).await, "FAILED");
    assert_eq!(status(fresh).await, "CONFIRMED");
    assert_eq!((app.inventory(1).await, app.inventory(2).await), (49, 10));
    // A confirmed order can still be cancelled by an admin, as a return whose goods came back;
    // a failed one cannot.
    let r = app
        .request(
            Method::POST,
            &format!("/orders/{fresh}/cancel"),
            &[("content-type", "application/json")],
            r#"{"restock":true}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    app.request(Method::POST, &format!("/orders/{stale}/cancel"), &[], "")
        .await
        .assert_problem(409, "invalid_transition");
    assert_eq!(app.inventory(1).await, 50);
    app.assert_books_balance().await;
}

/// A step that fails every order: they become FAILED with their stock back.
struct Decline;
impl FulfilmentStep for Decline {
    fn run<'a>(&'a self, _order: &'a ClaimedOrder) -> StepFuture<'a> {
        Box::pin(async { StepOutcome::Failed("card declined".into()) })
    }
}

#[tokio::test]
async fn a_failing_step_fails_the_order_and_restocks() {
    let app = TestApp::spawn().await;
    app.order(1, &[(2, 3)]).await;
    let pool = pool_for(&app, &app.db_url);
    let s = sweep(&pool, &ProcessorConfig::default(), &Decline)
        .await
        .unwrap();
    assert_eq!((s.claimed, s.failed, s.confirmed), (1, 1, 0));
    assert_eq!(app.inventory(2).await, 10);
    assert_eq!(
        app.count("SELECT count(*) FROM orders WHERE status = 'FAILED'")
            .await,
        1
    );
    app.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_racing_expiry_restocks_each_order_exactly_once() {
    let app = Arc::new(TestApp::spawn().await);
    let product = app.add_product("RACE", 10, 1000).await;
    const ORDERS: i64 = 200;
    place_pending_orders(&app, product, ORDERS).await;
    app.db
        .execute(
            "UPDATE orders SET created_at = now() - interval '1 hour'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(app.inventory(product).await, 1000 - ORDERS);

    let ids: Vec<i64> = app
        .db
        .query("SELECT id FROM orders ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let config = ProcessorConfig {
        process_batch_size: 5,
        ..ProcessorConfig::default()
    };
    let expirers: Vec<_> = (0..2)
        .map(|_| {
            let (pool, config) = (pool_for(&app, &app.db_url), config.clone());
            tokio::spawn(async move {
                let mut expired = 0;
                loop {
                    let s = sweep(&pool, &config, &process_orders::ConfirmAll)
                        .await
                        .unwrap();
                    expired += s.expired;
                    if s.expired == 0 {
                        return expired;
                    }
                }
            })
        })
        .collect();
    let cancellers: Vec<_> = ids
        .chunks(25)
        .map(|chunk| {
            let (app, chunk) = (app.clone(), chunk.to_vec());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for id in chunk.into_iter().rev() {
                    statuses.push(
                        app.request(Method::POST, &format!("/orders/{id}/cancel"), &[], "")
                            .await
                            .status
                            .as_u16(),
                    );
                }
                statuses
            })
        })
        .collect();
    let mut expired = 0;
    for e in expirers {
        expired += e.await.unwrap();
    }
    let (mut cancelled, mut conflicts) = (0, 0);
    for c in cancellers {
        for status in c.await.unwrap() {
            match status {
                200 => cancelled += 1,
                409 => conflicts += 1,
                other => panic!("cancel answered {other}"),
            }
        }
    }
    eprintln!(
        "cancel vs expiry over {ORDERS} orders: {cancelled} cancelled, {expired} expired, {conflicts} cancels too late"
    );
    assert_eq!(
        cancelled + expired as i64,
        ORDERS,
        "each order released exactly once"
    );
    assert_eq!(conflicts, expired as i64);
    assert_eq!(
        app.count("SELECT count(*) FROM orders WHERE status = 'CANCELLED'")
            .await,
        cancelled
    );
    assert_eq!(
        app.count("SELECT count(*) FROM orders WHERE status = 'FAILED'")
            .await,
        expired as i64
    );
    assert_eq!(
        app.inventory(product).await,
        1000,
        "all stock back, none twice"
    );
    assert_eq!(
        app.count(&format!("SELECT count(*) FROM inventory_movements WHERE product_id = {product} AND reason IN ('cancellation', 'expiry')")).await,
        ORDERS
    );
    app.assert_books_balance().await;
}

#[tokio::test]
async fn the_http_sweep_answers_its_summary() {
    let app = TestApp::spawn().await;
    app.order(1, &[(1, 1)]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Assembled as its main does, its settings read from the (test) environment.
    let function = tally_shared::app::App::new("process-orders", process_orders::routes())
        .settings::<ProcessorConfig>();
    let state = function.state(test_config(&app.db_url, &[])).unwrap();
    tokio::spawn(tally_shared::runtime::serve(
        listener,
        function.router(),
        state,
        std::future::pending(),
    ));
    let processor = TestApp::attach(port, &app.db_url).await;
    let r = processor.request(Method::POST, "/", &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        serde_json::json!({"claimed": 1, "confirmed": 1, "failed": 0, "retried": 0, "expired": 0, "keys_deleted": 0, "lapsed": 0})
    );
    processor
        .request(Method::GET, "/", &[], "")
        .await
        .assert_problem(405, "method_not_allowed");
    // As a PingSource delivers it: the token in the CloudEvents extension header.
    let admin = processor.admin();
    let r = processor
        .request(
            Method::POST,
            "/",
            &[
                ("authorization", crate::helpers::NO_AUTH),
                ("ce-authorization", &admin),
                ("ce-type", "dev.knative.sources.ping"),
                ("content-type", "application/json"),
            ],
            r#"{"source":"pingsource"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // A sweep changes state: customers may not trigger one, anonymous callers even less.
    let customer = processor.customer(1);
    processor
        .request(Method::POST, "/", &[("authorization", &customer)], "")
        .await
        .assert_problem(403, "forbidden");
    processor
        .request(
            Method::POST,
            "/",
            &[("authorization", crate::helpers::NO_AUTH)],
            "",
        )
        .await
        .assert_problem(401, "unauthorized");
}

/// A step slower than the lease: the claim lapses while it runs.
struct Slow;
impl FulfilmentStep for Slow {
    fn run<'a>(&'a self, _order: &'a ClaimedOrder) -> StepFuture<'a> {
        Box::pin(async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            StepOutcome::Confirmed
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_claim_is_left_to_the_next_processor_and_recorded_once() {
    let app = TestApp::spawn().await;
    let product = app.add_product("LEASE", 10, 100).await;
    place_pending_orders(&app, product, 3).await;
    let slow_config = ProcessorConfig {
        claim_lease_secs: 0.2,
        ..ProcessorConfig::default()
    };
    let pool_a = pool_for(&app, &app.db_url);
    let a = tokio::spawn(async move { sweep(&pool_a, &slow_config, &Slow).await.unwrap() });
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    let pool_b = pool_for(&app, &app.db_url);
    let b = sweep(
        &pool_b,
        &ProcessorConfig::default(),
        &process_orders::ConfirmAll,
    )
    .await
    .unwrap();
    let a = a.await.unwrap();
    eprintln!("lapsed claim: slow processor {a:?}, second processor {b:?}");
    assert_eq!(a.claimed, 3);
    assert_eq!(
        a.lapsed, 2,
        "the 2nd and 3rd steps would start after the lease"
    );
    assert_eq!(
        b.claimed, 3,
        "the lapsed claims, and the one whose step outran its lease"
    );
    assert_eq!(a.confirmed + b.confirmed, 3, "each order confirmed once");
    assert_eq!(
        a.confirmed, 0,
        "the first processor's claim was taken over: its outcome is dropped"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM orders WHERE status = 'CONFIRMED' AND attempts = 2")
            .await,
        3
    );
    app.assert_books_balance().await;
}
