//! Inventory administration: create, edit, adjust, and a storm of admin adjustments mixed
//! with customer orders on one product.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestResponse};

async fn admin_send(app: &TestApp, method: Method, path: &str, body: &Value) -> TestResponse {
    app.request(
        method,
        path,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

#[tokio::test]
async fn admins_create_products_with_their_starting_stock_in_the_ledger() {
    let app = TestApp::spawn().await;
    let r = admin_send(
        &app,
        Method::POST,
        "/products",
        &json!({"sku": "LAMP-1", "name": "Desk lamp", "price_cents": 3450, "inventory": 7}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let product = r.json();
    let id = product["id"].as_i64().unwrap();
    assert_eq!(r.header("location"), format!("/products/{id}"));
    assert_eq!(
        product,
        json!({"id": id, "sku": "LAMP-1", "name": "Desk lamp", "price_cents": 3450, "inventory": 7})
    );
    assert_eq!(app.get(&format!("/products/{id}")).await.json(), product);
    assert_eq!(
        app.count(&format!(
            "SELECT delta FROM inventory_movements WHERE product_id = {id} AND reason = 'initial'"
        ))
        .await,
        7
    );

    let dup = admin_send(
        &app,
        Method::POST,
        "/products",
        &json!({"sku": "LAMP-1", "name": "Other", "price_cents": 1}),
    )
    .await;
    let body = dup.assert_problem(409, "duplicate_sku");
    assert_eq!(body["sku"], "LAMP-1");

    for bad in [
        json!({"sku": "", "name": "x", "price_cents": 1}),
        json!({"sku": "has space", "name": "x", "price_cents": 1}),
        json!({"sku": "OK-1", "name": "", "price_cents": 1}),
        json!({"sku": "OK-1", "name": "x", "price_cents": -1}),
        json!({"sku": "OK-1", "name": "x", "price_cents": 10_000_000_001_i64}),
        json!({"sku": "OK-1", "name": "x", "price_cents": 1, "inventory": -5}),
        json!({"sku": "OK-1", "name": "x", "price_cents": 1.5}),
        json!({"sku": "OK-1", "name": "x"}),
        json!({"sku": "OK-1", "name": "x", "price_cents": 1, "colour": "red"}),
    ] {
        admin_send(&app, Method::POST, "/products", &bad)
            .await
            .assert_problem(400, "invalid_request");
    }
    assert_eq!(app.count("SELECT count(*) FROM products").await, 4);
}

#[tokio::test]
async fn admins_rename_and_reprice_without_touching_placed_orders() {
    let app = TestApp::spawn().await;
    let order = app.order(1, &[(1, 1)]).await.json();
    let r = admin_send(
        &app,
        Method::PATCH,
        "/products/1",
        &json!({"name": "Mechanical keyboard", "price_cents": 8999}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "Mechanical keyboard");
    assert_eq!(r.json()["price_cents"], 8999);
    assert_eq!(r.json()["inventory"], 49);
    let r = admin_send(
        &app,
        Method::PATCH,
        "/products/1",
        &json!({"price_cents": 100}),
    )
    .await;
    assert_eq!(
        r.json()["name"],
        "Mechanical keyboard",
        "a field left out is kept"
    );
    let placed = app
        .get(&format!("/orders/{}", order["order_id"]))
        .await
        .json();
    assert_eq!(placed["items"][0]["unit_price_cents"], 4999);

    admin_send(
        &app,
        Method::PATCH,
        "/products/999",
        &json!({"price_cents": 1}),
    )
    .await
    .assert_problem(404, "not_found");
    admin_send(&app, Method::PATCH, "/products/1", &json!({}))
        .await
        .assert_problem(400, "invalid_request");
    admin_send(&app, Method::PATCH, "/products/1", &json!({"inventory": 5}))
        .await
        .assert_problem(400, "invalid_request");
    admin_send(
        &app,
        Method::PATCH,
        "/products/x",
        &json!({"price_cents": 1}),
    )
    .await
    .assert_problem(400, "invalid_id");
}

#[tokio::test]
async fn adjustments_never_take_stock_below_zero_and_are_in_the_ledger() {
    let app = TestApp::spawn().await;
    let r = admin_send(
        &app,
        Method::POST,
        "/products/2/inventory",
        &json!({"delta": 25, "reason": "restock"}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["inventory"], 35);
    let r = admin_send(
        &app,
        Method::POST,
        "/products/2/inventory",
        &json!({"delta": -5, "reason": "adjustment", "note": "damaged"}),
    )
    .await;
    assert_eq!(r.json()["inventory"], 30);
    let body = admin_send(
        &app,
        Method::POST,
        "/products/2/inventory",
        &json!({"delta": -31, "reason": "adjustment"}),
    )
    .await
    .assert_problem(409, "insufficient_inventory");
    assert_eq!(
        (body["requested"].as_i64(), body["available"].as_i64()),
        (Some(31), Some(30))
    );
    for bad in [
        json!({"delta": 0, "reason": "restock"}),
        json!({"delta": 5, "reason": "theft"}),
        json!({"delta": 5}),
        json!({"delta": 1_000_000_001, "reason": "restock"}),
        json!({"delta": i64::MIN, "reason": "adjustment"}),
        json!({"delta": "5", "reason": "restock"}),
    ] {
        admin_send(&app, Method::POST, "/products/2/inventory", &bad)
            .await
            .assert_problem(400, "invalid_request");
    }
    admin_send(
        &app,
        Method::POST,
        "/products/999/inventory",
        &json!({"delta": 1, "reason": "restock"}),
    )
    .await
    .assert_problem(404, "not_found");
    assert_eq!(app.inventory(2).await, 30);
    assert_eq!(
        app.count("SELECT count(*) FROM inventory_movements WHERE product_id = 2 AND reason IN ('restock', 'adjustment')").await,
        2
    );
    app.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_of_restocks_write_offs_and_orders_on_one_product_keeps_the_books() {
    let app = Arc::new(TestApp::spawn().await);
    let product = app.add_product("CONTESTED", 500, 20).await;
    let tasks: Vec<_> = (0..32)
        .map(|client| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for i in 0..15 {
                    let r = match (client + i) % 4 {
                        0 => {
                            admin_send(
                                &app,
                                Method::POST,
                                &format!("/products/{product}/inventory"),
                                &json!({"delta": 4, "reason": "restock"}),
                            )
                            .await
                        }
                        1 => {
                            admin_send(
                                &app,
                                Method::POST,
                                &format!("/products/{product}/inventory"),
                                &json!({"delta": -3, "reason": "adjustment"}),
                            )
                            .await
                        }
                        _ => app.order(1, &[(product, 1 + (i % 2) as i64)]).await,
                    };
                    assert!(r.status.as_u16() < 500, "{} {:?}", r.status, r.body);
                    statuses.push(r.status.as_u16());
                }
                statuses
            })
        })
        .collect();
    let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
    for t in tasks {
        for s in t.await.unwrap() {
            *counts.entry(s).or_default() += 1;
        }
    }
    eprintln!(
        "admin/customer storm on one product (stock 20), 480 requests from 32 clients: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 480);
    assert!(
        counts.contains_key(&409),
        "stock should run short at times: {counts:?}"
    );
    let left = app.inventory(product).await;
    assert!(left >= 0);
    app.assert_books_balance().await;
}
