//! `Idempotency-Key` on the writes other than orders: `POST /products`,
//! `POST /products/{id}/inventory` and `POST /orders/{id}/cancel`. A repeat replays byte for
//! byte and does the work once (also when 24 arrive at once), another request with the key is
//! 422, keys are per caller, and a refusal keeps no key.

use std::collections::BTreeSet;
use std::sync::Arc;

use http::Method;
use tally_shared::auth::Role;

use crate::helpers::{TestApp, TestResponse};

impl TestApp {
    /// POST `body` to `path` as `authorization` (the admin when None) with `key`.
    async fn keyed(&self, path: &str, key: &str, body: &str, as_who: Option<&str>) -> TestResponse {
        let admin = self.admin();
        self.request(
            Method::POST,
            path,
            &[
                ("content-type", "application/json"),
                ("idempotency-key", key),
                ("authorization", as_who.unwrap_or(&admin)),
            ],
            body.to_owned(),
        )
        .await
    }
}

fn assert_replay(first: &TestResponse, again: &TestResponse) {
    assert_eq!(again.status, first.status, "{:?}", again.body);
    assert_eq!(first.header("idempotent-replayed"), "");
    assert_eq!(again.header("idempotent-replayed"), "true");
    assert_eq!(again.body, first.body, "byte for byte");
    assert_eq!(again.header("location"), first.header("location"));
}

#[tokio::test]
async fn each_keyed_write_replays_byte_for_byte_and_does_its_work_once() {
    let app = TestApp::spawn().await;
    let products = "SELECT count(*) FROM products";
    let before = app.count(products).await;

    let new = r#"{"sku":"KEYED-1","name":"Keyed","price_cents":250,"inventory":7}"#;
    let first = app.keyed("/products", "new-1", new, None).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert!(first.header("location").starts_with("/products/"));
    // The same request reformatted, fields reordered: still the same request.
    let reformatted =
        "{ \"inventory\": 7, \"price_cents\": 250,\n \"name\": \" Keyed \", \"sku\": \"KEYED-1\" }";
    let again = app.keyed("/products", "new-1", reformatted, None).await;
    assert_replay(&first, &again);
    assert_eq!(app.count(products).await, before + 1);
    let id = first.json()["id"].as_i64().unwrap();

    let restock = r#"{"delta":5,"reason":"restock","note":"pallet 9"}"#;
    let path = format!("/products/{id}/inventory");
    let first = app.keyed(&path, "restock-1", restock, None).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.json()["inventory"], 12);
    let again = app.keyed(&path, "restock-1", restock, None).await;
    assert_replay(&first, &again);
    assert_eq!(app.inventory(id).await, 12, "restocked once");
    let ledger = format!("SELECT count(*) FROM inventory_movements WHERE product_id = {id}");
    assert_eq!(
        app.count(&ledger).await,
        2,
        "the first stock and one restock"
    );

    let order = app.order(1, &[(id, 3)]).await.json()["order_id"]
        .as_i64()
        .unwrap();
    let cancel = format!("/orders/{order}/cancel");
    let first = app.keyed(&cancel, "cancel-1", "", None).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    // Without the key a second cancel is 409; with it, the retry learns what the first did.
    let again = app.keyed(&cancel, "cancel-1", "{}", None).await;
    assert_replay(&first, &again);
    // The same order however its id is written: the fingerprint holds the parsed id.
    let zero_padded = format!("/orders/0{order}/cancel");
    assert_replay(&first, &app.keyed(&zero_padded, "cancel-1", "", None).await);
    app.request(Method::POST, &cancel, &[], "")
        .await
        .assert_problem(409, "invalid_transition");
    assert_eq!(app.inventory(id).await, 12, "restocked by the cancel once");
    app.assert_books_balance().await;
}

#[tokio::test]
async fn a_key_with_another_request_is_422_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let path = "/products/1/inventory";
    let restock = r#"{"delta":5,"reason":"restock"}"#;
    assert_eq!(app.keyed(path, "k", restock, None).await.status, 200);
    let others = [
        (path, r#"{"delta":6,"reason":"restock"}"#),
        (path, r#"{"delta":5,"reason":"adjustment"}"#),
        (path, r#"{"delta":5,"reason":"restock","note":"x"}"#),
        ("/products/2/inventory", restock),
        (
            "/products",
            r#"{"sku":"K-2","name":"K","price_cents":1,"inventory":0}"#,
        ),
        ("/orders/1/cancel", ""),
    ];
    for (other_path, body) in others {
        app.keyed(other_path, "k", body, None)
            .await
            .assert_problem(422, "idempotency_key_reused");
    }
    // A key an order used is the caller's too: reusing it for a cancel is another request.
    let customer = app.customer(1);
    let order = app.order_keyed(1, &[(1, 1)], "mine").await;
    let cancel = format!("/orders/{}/cancel", order.json()["order_id"]);
    app.keyed(&cancel, "mine", "", Some(&customer))
        .await
        .assert_problem(422, "idempotency_key_reused");
    assert_eq!(app.inventory(1).await, 54, "50, restocked 5 once, 1 sold");
    assert_eq!(app.inventory(2).await, 10);
    assert_eq!(
        app.count("SELECT count(*) FROM products WHERE sku = 'K-2'")
            .await,
        0
    );
    app.assert_books_balance().await;
}

#[tokio::test]
async fn keys_belong_to_their_caller_and_a_refusal_keeps_none() {
    let app = TestApp::spawn().await;
    let restock = r#"{"delta":4,"reason":"restock"}"#;
    let other_admin = format!("Bearer {}", app.token(77, Role::Admin));
    let a = app
        .keyed("/products/2/inventory", "same", restock, None)
        .await;
    let b = app
        .keyed("/products/2/inventory", "same", restock, Some(&other_admin))
        .await;
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
    assert_eq!(b.header("idempotent-replayed"), "", "another caller's key");
    assert_eq!(app.inventory(2).await, 18);

    // Product 3 has 2: taking 5 is refused and the key is not spent, so after stock arrives
    // the same request with the same key succeeds (it is not a replay of the refusal).
    let take = r#"{"delta":-5,"reason":"adjustment"}"#;
    app.keyed("/products/3/inventory", "take-5", take, None)
        .await
        .assert_problem(409, "insufficient_inventory");
    app.keyed("/products/999/inventory", "take-5", take, None)
        .await
        .assert_problem(404, "not_found");
    let more = r#"{"delta":10,"reason":"restock"}"#;
    assert_eq!(
        app.keyed("/products/3/inventory", "more", more, None)
            .await
            .status,
        200
    );
    let r = app
        .keyed("/products/3/inventory", "take-5", take, None)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("idempotent-replayed"), "");
    assert_eq!(app.inventory(3).await, 7);

    // A duplicate sku is refused and keeps no key either.
    let dup = r#"{"sku":"WIDGET-1","name":"again","price_cents":1}"#;
    let sku = app.get("/products/1").await.json()["sku"]
        .as_str()
        .unwrap()
        .to_owned();
    let dup = dup.replace("WIDGET-1", &sku);
    app.keyed("/products", "dup", &dup, None)
        .await
        .assert_problem(409, "duplicate_sku");
    assert_eq!(
        app.count("SELECT count(*) FROM idempotency_keys WHERE key = 'dup'")
            .await,
        0
    );
    // A malformed key is 400 on every keyed write.
    for path in ["/products", "/products/1/inventory", "/orders/1/cancel"] {
        app.keyed(path, "caf\u{e9}", "{}", None)
            .await
            .assert_problem(400, "invalid_request");
    }
    app.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_four_concurrent_restocks_with_one_key_restock_once() {
    let app = Arc::new(TestApp::spawn().await);
    let before = app.inventory(2).await;
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let body = r#"{"delta":3,"reason":"restock","note":"storm"}"#;
                app.keyed("/products/2/inventory", "storm", body, None)
                    .await
            })
        })
        .collect();
    let mut bodies = BTreeSet::new();
    let mut replayed = 0;
    for task in tasks {
        let r = task.await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        bodies.insert(r.body.clone());
        replayed += usize::from(r.header("idempotent-replayed") == "true");
    }
    assert_eq!((bodies.len(), replayed), (1, 23));
    assert_eq!(app.inventory(2).await, before + 3);
    assert_eq!(
        app.count("SELECT count(*) FROM inventory_movements WHERE note = 'storm'")
            .await,
        1
    );
    app.assert_books_balance().await;
}
