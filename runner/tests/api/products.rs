//! The catalog: listing, paging, one product, and the routing answers (404, 405, healthz).

use http::Method;
use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn lists_the_seeded_products_in_id_order_with_prices() {
    let app = TestApp::spawn().await;
    let r = app.get("/products").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("link"), "");
    assert_eq!(
        r.json(),
        json!([
            {"id": 1, "sku": "SKU-001", "name": "Keyboard", "price_cents": 4999, "inventory": 50},
            {"id": 2, "sku": "SKU-002", "name": "Mouse", "price_cents": 2599, "inventory": 10},
            {"id": 3, "sku": "SKU-003", "name": "USB-C Cable", "price_cents": 999, "inventory": 2},
        ])
    );
}

#[tokio::test]
async fn pages_follow_the_link_header_to_the_end() {
    let app = TestApp::spawn().await;
    for i in 0..4 {
        app.add_product(&format!("EXTRA-{i}"), 100, 1).await;
    }
    let mut path = "/products?limit=3".to_owned();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let r = app.get(&path).await;
        assert_eq!(r.status, 200);
        pages += 1;
        seen.extend(
            r.json()
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_i64().unwrap()),
        );
        let link = r.header("link").to_owned();
        if link.is_empty() {
            break;
        }
        assert!(link.ends_with(">; rel=\"next\""), "{link}");
        path = link
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap()
            .to_owned();
    }
    assert_eq!(seen, vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(pages, 3);
}

#[tokio::test]
async fn one_product_by_id_or_404_or_400() {
    let app = TestApp::spawn().await;
    let r = app.get("/products/2").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["sku"], "SKU-002");
    app.get("/products/999")
        .await
        .assert_problem(404, "not_found");
    app.get("/products/abc")
        .await
        .assert_problem(400, "invalid_id");
    app.get("/products?limit=0")
        .await
        .assert_problem(400, "invalid_request");
}

#[tokio::test]
async fn healthz_unknown_paths_and_wrong_methods() {
    let app = TestApp::spawn().await;
    let r = app.get("/healthz").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"ok");
    assert_eq!(r.header("x-request-id").len(), 16);

    app.get("/nope").await.assert_problem(404, "not_found");
    app.request(Method::PUT, "/orders/1", &[], "")
        .await
        .assert_problem(405, "method_not_allowed");
    let r = app.request(Method::DELETE, "/products/1", &[], "").await;
    r.assert_problem(405, "method_not_allowed");
    assert_eq!(r.header("allow"), "GET, PATCH");
    let r = app.request(Method::PUT, "/orders", &[], "").await;
    assert_eq!(r.header("allow"), "POST, GET");
}

#[tokio::test]
async fn a_callers_request_id_is_echoed() {
    let app = TestApp::spawn().await;
    let r = app
        .request(
            Method::GET,
            "/products/1",
            &[("x-request-id", "trace-me-42")],
            "",
        )
        .await;
    assert_eq!(r.header("x-request-id"), "trace-me-42");
}
