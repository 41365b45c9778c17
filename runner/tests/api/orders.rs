//! Placing and reading orders: the happy path and every business error, one at a time.

use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn an_order_is_created_priced_and_read_back() {
    let app = TestApp::spawn().await;
    let r = app.order(1, &[(1, 2), (2, 1)]).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let body = r.json();
    let id = body["order_id"].as_i64().unwrap();
    assert_eq!(r.header("location"), format!("/orders/{id}"));
    assert_eq!(body["status"], "PENDING");
    assert_eq!(body["user_id"], 1);
    assert_eq!(body["total_cents"], 2 * 4999 + 2599);
    assert_eq!(
        body["items"],
        json!([
            {"product_id": 1, "quantity": 2, "unit_price_cents": 4999},
            {"product_id": 2, "quantity": 1, "unit_price_cents": 2599},
        ])
    );
    assert!(body["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(app.inventory(1).await, 48);
    assert_eq!(app.inventory(2).await, 9);

    let r = app.get(&format!("/orders/{id}")).await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(doc["order"]["id"], id);
    assert_eq!(doc["order"]["status"], "PENDING");
    assert_eq!(doc["order"]["total_cents"], 12597);
    assert_eq!(doc["order"]["created_at"], body["created_at"]);
    assert_eq!(doc["items"], body["items"]);
    app.assert_books_balance().await;
}

#[tokio::test]
async fn lines_for_the_same_product_are_summed_before_the_check() {
    let app = TestApp::spawn().await;
    // Stock of SKU-003 is 2: two lines of 1 fit, three do not.
    let r = app.order(1, &[(3, 1), (3, 1)]).await;
    assert_eq!(r.status, 201);
    assert_eq!(
        r.json()["items"],
        json!([{"product_id": 3, "quantity": 2, "unit_price_cents": 999}])
    );
    let r = app.order(1, &[(2, 4), (2, 4), (2, 4)]).await;
    let body = r.assert_problem(409, "insufficient_inventory");
    assert_eq!(
        (
            body["product_id"].as_i64(),
            body["requested"].as_i64(),
            body["available"].as_i64()
        ),
        (Some(2), Some(12), Some(10))
    );
}

#[tokio::test]
async fn a_short_line_sells_nothing_at_all() {
    let app = TestApp::spawn().await;
    let r = app.order(1, &[(1, 5), (3, 3)]).await;
    let body = r.assert_problem(409, "insufficient_inventory");
    assert_eq!(body["product_id"], 3);
    assert_eq!(body["requested"], 3);
    assert_eq!(body["available"], 2);
    assert_eq!(
        app.inventory(1).await,
        50,
        "the first line must not have been sold"
    );
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 0);
    app.assert_books_balance().await;
}

#[tokio::test]
async fn unknown_users_and_products_are_422_not_500() {
    let app = TestApp::spawn().await;
    let body = app
        .order(99, &[(1, 1)])
        .await
        .assert_problem(422, "unknown_user");
    assert_eq!(body["user_id"], 99);
    let body = app
        .order(1, &[(1, 1), (77, 1)])
        .await
        .assert_problem(422, "unknown_product");
    assert_eq!(body["product_id"], 77);
    let body = app
        .order(i64::MAX, &[(i64::MAX, 1)])
        .await
        .assert_problem(422, "unknown_user");
    assert_eq!(body["user_id"], i64::MAX);
    assert_eq!(app.inventory(1).await, 50);
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 0);
}

#[tokio::test]
async fn reading_orders_404_and_malformed_ids() {
    let app = TestApp::spawn().await;
    app.get("/orders/1").await.assert_problem(404, "not_found");
    app.get("/orders/9223372036854775807")
        .await
        .assert_problem(404, "not_found");
    for bad in [
        "abc",
        "-1",
        "0",
        "1.5",
        "18446744073709551616",
        "12345678901234567890123",
        "1e3",
        "%20",
    ] {
        app.get(&format!("/orders/{bad}"))
            .await
            .assert_problem(400, "invalid_id");
    }
}

#[tokio::test]
async fn the_201_body_is_byte_for_byte_the_same_whether_built_in_rust_or_in_sql() {
    let app = TestApp::spawn().await;
    // Unkeyed: place_order_lean's columns, JSON built by the handler. Keyed: place_order's JSON
    // (the release before V5 reads the same), built in SQL and stored for replays.
    let lines = [(3, 1), (1, 2)];
    let plain = app.order(1, &lines).await;
    let keyed = app.order_keyed(1, &lines, "same-shape-1").await;
    assert_eq!((plain.status.as_u16(), keyed.status.as_u16()), (201, 201));
    let normalise = |r: &crate::helpers::TestResponse| {
        let v = r.json();
        let text = String::from_utf8(r.body.to_vec()).unwrap();
        let created_at = v["created_at"].as_str().unwrap().to_owned();
        // UTC, microseconds, Z: 2026-11-26T01:03:50.940947Z
        assert_eq!(created_at.len(), 27, "{created_at}");
        assert!(
            created_at.ends_with('Z') && created_at.as_bytes()[19] == b'.',
            "{created_at}"
        );
        text.replace(&created_at, "T")
            .replace(&format!("\"order_id\":{}", v["order_id"]), "\"order_id\":N")
    };
    assert_eq!(normalise(&plain), normalise(&keyed));
    assert_eq!(
        normalise(&plain),
        r#"{"order_id":N,"status":"PENDING","user_id":1,"total_cents":10997,"items":[{"product_id":1,"quantity":2,"unit_price_cents":4999},{"product_id":3,"quantity":1,"unit_price_cents":999}],"created_at":"T"}"#
    );
    // One line: place_order_one's columns, on an unsharded and a sharded product.
    for (product, key) in [(1, "same-shape-2"), (2, "same-shape-3")] {
        if product == 2 {
            assert_eq!(app.set_shards(2, 4).await.status, 200);
        }
        let plain = app.order(1, &[(product, 1)]).await;
        let keyed = app.order_keyed(1, &[(product, 1)], key).await;
        assert_eq!((plain.status.as_u16(), keyed.status.as_u16()), (201, 201));
        assert_eq!(normalise(&plain), normalise(&keyed));
        assert!(normalise(&plain).contains(&format!(
            r#""items":[{{"product_id":{product},"quantity":1,"#
        )));
    }
    app.assert_books_balance().await;
}

#[tokio::test]
async fn a_product_is_never_deleted_so_no_order_loses_its_product() {
    let app = TestApp::spawn().await;
    assert_eq!(app.order(1, &[(1, 1)]).await.status, 201);
    for statement in [
        "DELETE FROM products WHERE id = 1",
        "TRUNCATE products CASCADE",
    ] {
        let err = app.db.batch_execute(statement).await.unwrap_err();
        assert!(
            err.as_db_error()
                .unwrap()
                .message()
                .contains("never deleted"),
            "{statement}: {err}"
        );
    }
    assert_eq!(app.count("SELECT count(*) FROM products").await, 3);
    app.assert_books_balance().await;
}
