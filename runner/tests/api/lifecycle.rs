//! Safe retries and cancellation: idempotency keys (sequential, concurrent, reused, killed
//! mid-storm) and cancel restocking exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;

use crate::helpers::{TestApp, admin_url, fresh_database, order_body};

#[tokio::test]
async fn a_repeated_key_replays_the_stored_response_and_sells_nothing() {
    let app = TestApp::spawn().await;
    let first = app.order_keyed(1, &[(1, 2)], "order-abc").await;
    assert_eq!(first.status, 201);
    assert_eq!(first.header("idempotent-replayed"), "");
    let again = app.order_keyed(1, &[(1, 2)], "order-abc").await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), "true");
    assert_eq!(again.body, first.body, "byte for byte");
    assert_eq!(again.header("location"), first.header("location"));
    assert_eq!(app.inventory(1).await, 48);
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 1);
    // Without a key the same body is a new order, as before.
    assert_eq!(app.order(1, &[(1, 2)]).await.status, 201);
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 2);
    app.assert_books_balance().await;
}

#[tokio::test]
async fn a_key_reused_for_another_request_is_422_and_sells_nothing() {
    let app = TestApp::spawn().await;
    assert_eq!(app.order_keyed(1, &[(1, 1)], "k-1").await.status, 201);
    app.order_keyed(1, &[(1, 5)], "k-1")
        .await
        .assert_problem(422, "idempotency_key_reused");
    app.order_keyed(1, &[(2, 1)], "k-1")
        .await
        .assert_problem(422, "idempotency_key_reused");
    assert_eq!(app.inventory(1).await, 49);
    assert_eq!(app.inventory(2).await, 10);
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 1);
}

#[tokio::test]
async fn keys_are_scoped_to_the_user_and_refused_orders_keep_no_key() {
    let app = TestApp::spawn().await;
    let a = app.order_keyed(1, &[(1, 1)], "shared-key").await;
    let b = app.order_keyed(2, &[(1, 1)], "shared-key").await;
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (201, 201));
    assert_ne!(a.json()["order_id"], b.json()["order_id"]);
    assert_eq!(b.header("idempotent-replayed"), "");

    // Out of stock: refused, and the key is not spent; after a restock the retry succeeds.
    app.order_keyed(1, &[(3, 5)], "retry-me")
        .await
        .assert_problem(409, "insufficient_inventory");
    app.db
        .execute(
            "UPDATE products SET inventory = inventory + 10 WHERE id = 3",
            &[],
        )
        .await
        .unwrap();
    app.db
        .execute(
            "INSERT INTO inventory_movements (product_id, delta, reason) VALUES (3, 10, 'restock')",
            &[],
        )
        .await
        .unwrap();
    let r = app.order_keyed(1, &[(3, 5)], "retry-me").await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("idempotent-replayed"), "");
    app.assert_books_balance().await;
}

#[tokio::test]
async fn malformed_idempotency_keys_are_400() {
    let app = TestApp::spawn().await;
    let long = "k".repeat(256);
    for key in ["", long.as_str(), "tab\there", "caf\u{e9}"] {
        let r = app
            .request(
                Method::POST,
                "/orders",
                &[
                    ("content-type", "application/json"),
                    ("idempotency-key", key),
                ],
                order_body(1, &[(1, 1)]).to_string(),
            )
            .await;
        r.assert_problem(400, "invalid_request");
    }
    assert_eq!(
        app.order_keyed(1, &[(1, 1)], &"k".repeat(255)).await.status,
        201
    );
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_requests_with_one_key_place_one_order() {
    let app = Arc::new(TestApp::spawn().await);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { app.order_keyed(1, &[(1, 3), (2, 1)], "storm-key").await })
        })
        .collect();
    let mut bodies = BTreeSet::new();
    let mut replayed = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.body);
        bodies.insert(r.body.clone());
        replayed += usize::from(r.header("idempotent-replayed") == "true");
    }
    eprintln!(
        "32 concurrent same-key requests: 1 placed, {replayed} replayed, {} distinct bodies",
        bodies.len()
    );
    assert_eq!(bodies.len(), 1, "identical bodies");
    assert_eq!(replayed, 31);
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 1);
    assert_eq!(app.inventory(1).await, 47);
    assert_eq!(app.inventory(2).await, 9);
    app.assert_books_balance().await;
}

#[tokio::test]
async fn cancel_restocks_exactly_once() {
    let app = TestApp::spawn().await;
    let id = app.order(1, &[(1, 4), (3, 2)]).await.json()["order_id"]
        .as_i64()
        .unwrap();
    assert_eq!((app.inventory(1).await, app.inventory(3).await), (46, 0));
    let r = app
        .request(Method::POST, &format!("/orders/{id}/cancel"), &[], "")
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["order"]["status"], "CANCELLED");
    assert_eq!((app.inventory(1).await, app.inventory(3).await), (50, 2));

    let again = app
        .request(Method::POST, &format!("/orders/{id}/cancel"), &[], "")
        .await;
    let body = again.assert_problem(409, "invalid_transition");
    assert_eq!(body["order_status"], "CANCELLED");
    assert_eq!(
        (app.inventory(1).await, app.inventory(3).await),
        (50, 2),
        "restocked once"
    );
    assert_eq!(
        app.get(&format!("/orders/{id}")).await.json()["order"]["status"],
        "CANCELLED"
    );

    app.request(Method::POST, "/orders/999/cancel", &[], "")
        .await
        .assert_problem(404, "not_found");
    app.request(Method::POST, "/orders/x/cancel", &[], "")
        .await
        .assert_problem(400, "invalid_id");
    app.request(Method::GET, "/orders/1/cancel", &[], "")
        .await
        .assert_problem(405, "method_not_allowed");
    app.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_mid_storm_then_retried_places_each_key_exactly_once() {
    let db_url = fresh_database(admin_url()).await;
    let port = crate::faults::free_port();
    let spawn = || {
        crate::helpers::runner_command(&db_url, port)
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    let app = Arc::new(TestApp::attach(port, &db_url).await);
    app.wait_until_up().await;
    let product = app.add_product("KILL-1", 100, 100_000).await;

    const KEYS: usize = 300;
    let storm = |app: Arc<TestApp>| {
        (0..24)
            .map(|client| {
                let app = app.clone();
                tokio::spawn(async move {
                    let mut results = Vec::new();
                    for k in (client..KEYS).step_by(24) {
                        let r = tokio::time::timeout(
                            Duration::from_secs(5),
                            app.try_order_keyed(
                                1,
                                &[(product, 1 + (k % 3) as i64)],
                                &format!("kill-{k}"),
                            ),
                        )
                        .await
                        .ok()
                        .flatten();
                        results.push((k, r));
                    }
                    results
                })
            })
            .collect::<Vec<_>>()
    };
    let first = storm(app.clone());
    // Let part of the storm land, then SIGKILL the process mid-flight.
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.count("SELECT count(*) FROM orders").await < 60 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let mut answered_before_kill = 0;
    for t in first {
        answered_before_kill += t.await.unwrap().iter().filter(|(_, r)| r.is_some()).count();
    }
    let placed_before_retry = app.count("SELECT count(*) FROM orders").await;

    let _child = spawn();
    app.wait_until_up().await;
    let mut outcomes: BTreeMap<u16, usize> = BTreeMap::new();
    for t in storm(app.clone()) {
        for (k, r) in t.await.unwrap() {
            let status = r.unwrap_or_else(|| panic!("key {k}: no answer after restart"));
            *outcomes.entry(status).or_default() += 1;
        }
    }
    eprintln!(
        "SIGKILL mid-storm: {answered_before_kill}/{KEYS} answered before the kill, {placed_before_retry} orders committed; \
         retry of all {KEYS} keys: {outcomes:?}"
    );
    assert_eq!(outcomes.get(&201), Some(&KEYS), "{outcomes:?}");
    assert_eq!(app.count("SELECT count(*) FROM orders").await, KEYS as i64);
    assert_eq!(
        app.count("SELECT count(DISTINCT order_id) FROM idempotency_keys WHERE key LIKE 'kill-%'")
            .await,
        KEYS as i64
    );
    let expected: i64 = (0..KEYS).map(|k| 1 + (k % 3) as i64).sum();
    assert_eq!(app.sold(product).await, expected);
    app.assert_books_balance().await;
}

#[tokio::test]
async fn customers_cancel_pending_orders_only_and_an_admins_return_says_whether_stock_came_back() {
    let app = TestApp::spawn().await;
    let place = || async {
        app.order(1, &[(1, 2)]).await.json()["order_id"]
            .as_i64()
            .unwrap()
    };
    let (kept, returned, lost) = (place().await, place().await, place().await);
    app.db
        .execute(
            "UPDATE orders SET status = 'CONFIRMED' WHERE id = ANY($1)",
            &[&vec![kept, returned, lost]],
        )
        .await
        .unwrap();
    assert_eq!(app.inventory(1).await, 44);
    let cancel = |id: i64, who: String, body: &'static str| {
        let app = &app;
        async move {
            let headers = [
                ("authorization", who.as_str()),
                ("content-type", "application/json"),
            ];
            app.request(
                Method::POST,
                &format!("/orders/{id}/cancel"),
                &headers,
                body,
            )
            .await
        }
    };
    // The owner: a fulfilled order is no longer theirs to cancel, whatever the body says.
    for body in ["", r#"{"restock":true}"#] {
        let r = cancel(kept, app.customer(1), body).await;
        assert_eq!(
            r.assert_problem(409, "invalid_transition")["order_status"],
            "CONFIRMED"
        );
    }
    // An admin must say whether the goods came back.
    cancel(kept, app.admin(), "")
        .await
        .assert_problem(409, "restock_required");
    cancel(kept, app.admin(), r#"{"restok":true}"#)
        .await
        .assert_problem(400, "invalid_request");
    assert_eq!(app.inventory(1).await, 44, "nothing moved yet");
    let r = cancel(returned, app.admin(), r#"{"restock":true}"#).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["order"]["status"], "CANCELLED");
    assert_eq!(
        app.inventory(1).await,
        46,
        "the returned goods are back in stock"
    );
    let r = cancel(lost, app.admin(), r#"{"restock":false}"#).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["order"]["status"], "CANCELLED");
    assert_eq!(
        app.inventory(1).await,
        46,
        "goods that did not come back stay sold"
    );
    // A PENDING order under a live processor claim is in fulfilment (its step may be charging
    // now): as CONFIRMED for a cancel.
    let claimed = place().await;
    app.db
        .execute(
            "UPDATE orders SET claimed_until = now() + interval '1 minute', attempts = 1 WHERE id = $1",
            &[&claimed],
        )
        .await
        .unwrap();
    let r = cancel(claimed, app.customer(1), "").await;
    assert_eq!(
        r.assert_problem(409, "invalid_transition")["order_status"],
        "PENDING"
    );
    cancel(claimed, app.admin(), "")
        .await
        .assert_problem(409, "restock_required");
    let r = cancel(claimed, app.admin(), r#"{"restock":false}"#).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        app.inventory(1).await,
        44,
        "a claimed order's goods may have left"
    );
    // A PENDING order: the owner cancels it, and its stock returns (it never left); saying
    // that it did not is refused.
    let pending = place().await;
    cancel(pending, app.admin(), r#"{"restock":false}"#)
        .await
        .assert_problem(409, "nothing_shipped");
    let r = cancel(pending, app.customer(1), "").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(app.inventory(1).await, 44);
    app.assert_books_balance().await;
}
