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
        serde_json::json!({"claimed": 1, "confirmed": 1, "failed": 0, "retried": 0, "expired": 0, "keys_deleted": 0, "lapsed": 0, "lost_claims": 0, "outcome_unknown": 0})
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
        (a.confirmed, a.retried, a.outcome_unknown),
        (0, 0, 1),
        "the first step was cut off at the end of its lease, its claim left to run out"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM orders WHERE status = 'CONFIRMED' AND attempts = 2")
            .await,
        3
    );
    app.assert_books_balance().await;
}

/// Confirms every order but the first, whose step panics; and checks, before each step, that
/// every earlier order's outcome is already in the database.
struct PanicsOnFirst {
    first: i64,
    db_url: String,
    seen: Mutex<Vec<i64>>,
    /// Before each step: (earlier orders found CONFIRMED, earlier orders confirmed by a step).
    settled: Mutex<Vec<(usize, usize)>>,
}

impl FulfilmentStep for PanicsOnFirst {
    fn run<'a>(&'a self, order: &'a ClaimedOrder) -> StepFuture<'a> {
        Box::pin(async move {
            let db = tally_shared::pg::connect(&self.db_url).await.unwrap();
            let earlier: Vec<i64> = (self.seen.lock().unwrap().iter())
                .filter(|&&id| id != self.first)
                .copied()
                .collect();
            let settled: i64 = db
                .query_one(
                    "SELECT count(*) FROM orders WHERE id = ANY($1) AND status = 'CONFIRMED'",
                    &[&earlier],
                )
                .await
                .unwrap()
                .get(0);
            // A failed assertion here would be a panic the sweep catches: what was seen is
            // checked by the test instead.
            self.settled
                .lock()
                .unwrap()
                .push((settled as usize, earlier.len()));
            self.seen.lock().unwrap().push(order.id);
            if order.id == self.first {
                panic!("poison order {}", order.id);
            }
            StepOutcome::Confirmed
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_spares_its_batch_and_its_order_fails_after_max_attempts() {
    const LEASE_SECS: f64 = 2.0;
    let app = TestApp::spawn().await;
    let product = app.add_product("POISON", 10, 100).await;
    place_pending_orders(&app, product, 4).await;
    let first = app.count("SELECT min(id) FROM orders").await;
    let step = PanicsOnFirst {
        first,
        db_url: app.db_url.clone(),
        seen: Mutex::default(),
        settled: Mutex::default(),
    };
    // The lease covers all four steps of the first sweep, each of which connects to PostgreSQL:
    // 0.3 s was too short on a loaded 2-core CI run (the last step's claim ran out before its
    // outcome was recorded), so 2 s, and the waits below outlast it.
    let config = ProcessorConfig {
        process_max_attempts: 2,
        claim_lease_secs: LEASE_SECS,
        ..ProcessorConfig::default()
    };
    let pool = pool_for(&app, &app.db_url);
    let s = sweep(&pool, &config, &step).await.unwrap();
    assert_eq!(
        (s.claimed, s.confirmed, s.outcome_unknown, s.failed),
        (4, 3, 1, 0)
    );
    for (found, confirmed) in step.settled.lock().unwrap().drain(..) {
        assert_eq!(
            found, confirmed,
            "each outcome is recorded right after its step"
        );
    }
    // Its claim is left to run out (the step may have done its work): not claimed at once.
    let s = sweep(&pool, &config, &step).await.unwrap();
    assert_eq!(s.claimed, 0);
    // The second claim panics again; the third gives up without running the step.
    for (claimed, unknown, failed) in [(1, 1, 0), (1, 0, 1)] {
        tokio::time::sleep(std::time::Duration::from_secs_f64(LEASE_SECS + 0.05)).await;
        let s = sweep(&pool, &config, &step).await.unwrap();
        assert_eq!(
            (s.claimed, s.outcome_unknown, s.failed),
            (claimed, unknown, failed)
        );
    }
    let runs = step
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|&&id| id == first)
        .count();
    assert_eq!(runs, 2, "the step ran on the first two claims only");
    let (status, error): (String, String) = {
        let row = app
            .db
            .query_one(
                "SELECT status, last_error FROM orders WHERE id = $1",
                &[&first],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(status, "FAILED");
    assert!(
        error.starts_with("gave up after 2 claims without an outcome (PROCESS_MAX_ATTEMPTS=2) (before: the fulfilment step panicked: poison order"),
        "{error}"
    );
    assert_eq!(app.inventory(product).await, 97);
    app.assert_books_balance().await;
}

/// A step that never ends.
struct Hangs;
impl FulfilmentStep for Hangs {
    fn run<'a>(&'a self, _order: &'a ClaimedOrder) -> StepFuture<'a> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn a_step_is_cut_off_at_the_end_of_its_lease_and_its_claim_kept() {
    let app = TestApp::spawn().await;
    let product = app.add_product("HANG", 10, 100).await;
    place_pending_orders(&app, product, 1).await;
    let config = ProcessorConfig {
        claim_lease_secs: 0.3,
        ..ProcessorConfig::default()
    };
    let pool = pool_for(&app, &app.db_url);
    let started = std::time::Instant::now();
    let s = sweep(&pool, &config, &Hangs).await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(
        (s.claimed, s.outcome_unknown, s.retried, s.confirmed),
        (1, 1, 0, 0)
    );
    // What the step did is unknown: the claim is kept until the lease ends, and it says why.
    assert_eq!(
        app.count(
            "SELECT count(*) FROM orders WHERE status = 'PENDING' AND claimed_until IS NOT NULL \
             AND last_error LIKE 'the fulfilment step was cut off%'"
        )
        .await,
        1
    );
}

#[test]
fn processor_settings_out_of_range_are_refused_at_start() {
    for bad in [
        serde_json::json!({"process_batch_size": -1}),
        serde_json::json!({"process_batch_size": 0}),
        serde_json::json!({"claim_lease_secs": -5.0}),
        serde_json::json!({"order_ttl_secs": 0.0}),
        serde_json::json!({"process_max_attempts": 0}),
        serde_json::json!({"idempotency_retention_secs": 0.0}),
        serde_json::json!({"claim_lease_secs": 0.001}),
    ] {
        let refused = serde_json::from_value::<ProcessorConfig>(bad.clone());
        assert!(refused.is_err(), "{bad} was accepted");
    }
    let fine = serde_json::from_value::<ProcessorConfig>(serde_json::json!({})).unwrap();
    assert_eq!(fine.process_batch_size, 100);
}

/// Confirms, after another processor has taken the order over (as if its lease had run out
/// while the step ran: a pause, a slow network, clocks apart).
struct TakenOver {
    db_url: String,
}

impl FulfilmentStep for TakenOver {
    fn run<'a>(&'a self, order: &'a ClaimedOrder) -> StepFuture<'a> {
        Box::pin(async move {
            let db = tally_shared::pg::connect(&self.db_url).await.unwrap();
            db.execute(
                "UPDATE orders SET attempts = attempts + 1 WHERE id = $1",
                &[&order.id],
            )
            .await
            .unwrap();
            StepOutcome::Confirmed
        })
    }
}

#[tokio::test]
async fn a_claim_taken_over_during_its_step_is_counted_lost_and_not_recorded() {
    let app = TestApp::spawn().await;
    let product = app.add_product("TAKEN", 10, 100).await;
    place_pending_orders(&app, product, 2).await;
    let step = TakenOver {
        db_url: app.db_url.clone(),
    };
    let pool = pool_for(&app, &app.db_url);
    let s = sweep(&pool, &ProcessorConfig::default(), &step)
        .await
        .unwrap();
    assert_eq!((s.claimed, s.confirmed, s.lost_claims), (2, 0, 2));
    assert_eq!(
        app.count("SELECT count(*) FROM orders WHERE status = 'PENDING'")
            .await,
        2
    );
}
