//! Flash-sale stock sharding: a product's stock spread over several rows never oversells,
//! never strands a unit, and survives a change of shard count while orders flow.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::Method;
use serde_json::json;

use crate::helpers::TestApp;
use crate::storms::storm;

#[tokio::test]
async fn an_admin_spreads_stock_over_shards_and_the_catalog_shows_the_total() {
    let app = TestApp::spawn().await;
    let product = app.add_product("SHARD-1", 500, 103).await;
    let r = app.set_shards(product, 8).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["inventory"], 103);
    assert_eq!(r.json()["stock_shards"], 8);
    assert_eq!(
        app.shard_stock(product).await,
        vec![13, 13, 13, 13, 13, 13, 13, 12]
    );
    let listed = app.get(&format!("/products/{product}")).await;
    assert_eq!(listed.json()["inventory"], 103);
    let all = app.get("/products").await.json();
    let row = all
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == product)
        .unwrap()
        .clone();
    assert_eq!(row["inventory"], 103);
    // Gathered back: one row again, and the original shape.
    let r = app.set_shards(product, 1).await;
    assert_eq!(r.json()["inventory"], 103);
    assert!(r.json().get("stock_shards").is_none(), "{}", r.json());
    assert_eq!(app.shard_stock(product).await, Vec::<i64>::new());
    for bad in [json!(0), json!(65), json!(-1), json!("8"), json!(1.5)] {
        let r = app
            .request(
                Method::PATCH,
                &format!("/products/{product}"),
                &[("content-type", "application/json")],
                json!({ "stock_shards": bad }).to_string(),
            )
            .await;
        r.assert_problem(400, "invalid_request");
    }
    assert_eq!(app.set_shards(999_999, 4).await.status, 404);
    app.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_of_400_orders_never_oversells_a_sharded_stock_of_50() {
    let app = Arc::new(TestApp::spawn().await);
    let product = app.add_product("FLASH-1", 1000, 50).await;
    assert_eq!(app.set_shards(product, 8).await.status, 200);
    let counts = storm(&app, 48, 400, move |_| vec![(product, 1)]).await;
    eprintln!("sharded stock 50 (8 shards), 400 x 1 from 48 clients: {counts:?}");
    assert_eq!(counts.get(&201), Some(&50));
    assert_eq!(counts.get(&409), Some(&350));
    assert_eq!(app.inventory(product).await, 0);
    assert_eq!(app.sold(product).await, 50);
    app.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_units_sell_whichever_shard_holds_them() {
    let app = Arc::new(TestApp::spawn().await);
    // 16 shards for 5 units: eleven shards are empty from the start.
    let product = app.add_product("LAST-1", 100, 5).await;
    assert_eq!(app.set_shards(product, 16).await.status, 200);
    assert_eq!(app.shard_stock(product).await.iter().sum::<i64>(), 5);
    let counts = storm(&app, 32, 200, move |_| vec![(product, 1)]).await;
    assert_eq!(counts.get(&201), Some(&5), "{counts:?}");
    assert_eq!(counts.get(&409), Some(&195), "{counts:?}");
    assert_eq!(app.inventory(product).await, 0);
    // A single unit left on the last shard still sells.
    let product = app.add_product("LAST-2", 100, 0).await;
    assert_eq!(app.set_shards(product, 4).await.status, 200);
    app.db
        .execute(
            "UPDATE inventory_shards SET inventory = 1 WHERE product_id = $1 AND shard = 3",
            &[&product],
        )
        .await
        .unwrap();
    app.db
        .execute(
            "INSERT INTO inventory_movements (product_id, delta, reason) VALUES ($1, 1, 'restock')",
            &[&product],
        )
        .await
        .unwrap();
    assert_eq!(app.order(1, &[(product, 1)]).await.status, 201);
    let refused = app.order(1, &[(product, 1)]).await;
    let body = refused.assert_problem(409, "insufficient_inventory");
    assert_eq!(body["available"], 0);
    app.assert_books_balance().await;
}

#[tokio::test]
async fn an_order_larger_than_any_shard_succeeds_when_the_total_suffices() {
    let app = TestApp::spawn().await;
    let product = app.add_product("BIG-1", 10, 100).await;
    assert_eq!(app.set_shards(product, 8).await.status, 200);
    // No shard holds more than 13.
    let r = app.order(1, &[(product, 90)]).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(app.inventory(product).await, 10);
    let r = app.order(1, &[(product, 11)]).await;
    let body = r.assert_problem(409, "insufficient_inventory");
    assert_eq!(
        (&body["product_id"], &body["requested"], &body["available"]),
        (&json!(product), &json!(11), &json!(10))
    );
    // All or nothing across lines: the sharded line is put back when a later line fails.
    let other = app.add_product("BIG-2", 10, 1).await;
    let r = app.order(1, &[(product, 10), (other, 2)]).await;
    r.assert_problem(409, "insufficient_inventory");
    assert_eq!(app.inventory(product).await, 10);
    assert_eq!(app.inventory(other).await, 1);
    let r = app.order(1, &[(other, 1), (product, 10)]).await;
    assert_eq!(r.status, 201);
    assert_eq!(app.inventory(product).await, 0);
    app.assert_books_balance().await;
}

#[tokio::test]
async fn cancels_expiries_and_adjustments_keep_a_sharded_ledger_exact() {
    let app = TestApp::spawn().await;
    let product = app.add_product("LEDGER-1", 10, 40).await;
    assert_eq!(app.set_shards(product, 4).await.status, 200);
    let mut ids = Vec::new();
    for _ in 0..6 {
        let r = app.order(1, &[(product, 3)]).await;
        assert_eq!(r.status, 201);
        ids.push(r.json()["order_id"].as_i64().unwrap());
    }
    assert_eq!(app.inventory(product).await, 22);
    for id in &ids[..2] {
        let r = app
            .request(Method::POST, &format!("/orders/{id}/cancel"), &[], "")
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert_eq!(app.inventory(product).await, 28);
    for (delta, reason, expect) in [(12, "restock", 40), (-39, "adjustment", 1)] {
        let r = app
            .request(
                Method::POST,
                &format!("/products/{product}/inventory"),
                &[("content-type", "application/json")],
                json!({"delta": delta, "reason": reason}).to_string(),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.json()["inventory"], expect);
        assert_eq!(r.json()["stock_shards"], 4);
    }
    let r = app
        .request(
            Method::POST,
            &format!("/products/{product}/inventory"),
            &[("content-type", "application/json")],
            json!({"delta": -2, "reason": "adjustment"}).to_string(),
        )
        .await;
    assert_eq!(
        r.assert_problem(409, "insufficient_inventory")["available"],
        1
    );
    app.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resharding_while_orders_flow_loses_nothing() {
    let app = Arc::new(TestApp::spawn().await);
    let product = app.add_product("RESHARD-1", 10, 300).await;
    let done = Arc::new(AtomicBool::new(false));
    let (a, d) = (app.clone(), done.clone());
    let resharder = tokio::spawn(async move {
        // Shard counts, cycled until the storm ends; counted only while stock is still selling.
        let (mut changes, mut while_selling) = (0, 0);
        for n in [4, 16, 1, 7, 64, 2, 1, 9, 3, 12].iter().cycle() {
            if d.load(Ordering::Relaxed) {
                break;
            }
            let r = a.set_shards(product, *n).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            changes += 1;
            if r.json()["inventory"].as_i64().unwrap() > 0 {
                while_selling += 1;
            }
        }
        (changes, while_selling)
    });
    // More orders than stock (orders of 1 and 2 alternate, and orders of 1 keep coming after
    // the sell-out): every unit must sell, and not one more.
    let counts = storm(&app, 32, 420, move |i| vec![(product, 1 + (i % 2) as i64)]).await;
    done.store(true, Ordering::Relaxed);
    let (changes, while_selling) = resharder.await.unwrap();
    eprintln!("reshard storm: {changes} shard changes ({while_selling} while selling), {counts:?}");
    assert!(
        while_selling >= 3,
        "the shard count changed only {while_selling} times while stock was selling"
    );
    assert_eq!(app.inventory(product).await, 0, "stock stranded");
    assert_eq!(app.sold(product).await, 300);
    assert_eq!(counts.values().sum::<usize>(), 420);
    let placed = app
        .count(&format!(
            "SELECT count(*) FROM order_items WHERE product_id = {product}"
        ))
        .await;
    assert_eq!(counts.get(&201).copied().unwrap_or(0) as i64, placed);
    app.assert_books_balance().await;
}
