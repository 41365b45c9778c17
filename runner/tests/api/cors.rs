//! Browsers: CORS for the configured origins only, and `OPTIONS` (the preflight) on every
//! route, answered without a token.

use http::Method;

use crate::helpers::{TestApp, admin_url};

const SHOP: &str = "https://shop.example.com";

async fn with_cors() -> TestApp {
    TestApp::spawn_on(admin_url(), &[("CORS_ALLOWED_ORIGINS", SHOP)]).await
}

#[tokio::test]
async fn an_allowed_origin_may_read_responses_and_their_headers() {
    let app = with_cors().await;
    let r = app
        .request(Method::GET, "/products", &[("origin", SHOP)], "")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), SHOP);
    assert!(r.header("access-control-expose-headers").contains("etag"));
    assert!(r.header("vary").contains("origin"));
    // Errors too: a storefront must be able to read why.
    let r = app
        .request(
            Method::POST,
            "/orders",
            &[("origin", SHOP), ("authorization", crate::helpers::NO_AUTH)],
            "",
        )
        .await;
    r.assert_problem(401, "unauthorized");
    assert_eq!(r.header("access-control-allow-origin"), SHOP);
}

#[tokio::test]
async fn any_other_origin_gets_no_cors_headers() {
    let app = with_cors().await;
    for origin in [
        "https://evil.example.com",
        "https://shop.example.com.evil.io",
        "null",
    ] {
        let r = app
            .request(Method::GET, "/products", &[("origin", origin)], "")
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("access-control-allow-origin"), "", "{origin}");
    }
    // None configured (the default): no CORS at all.
    let plain = TestApp::spawn().await;
    let r = plain
        .request(Method::GET, "/products", &[("origin", SHOP)], "")
        .await;
    assert_eq!(r.header("access-control-allow-origin"), "");
}

#[tokio::test]
async fn a_preflight_with_authorization_is_answered_without_a_token() {
    let app = with_cors().await;
    let preflight = [
        ("origin", SHOP),
        ("access-control-request-method", "POST"),
        (
            "access-control-request-headers",
            "authorization, content-type, idempotency-key",
        ),
        ("authorization", crate::helpers::NO_AUTH),
    ];
    let r = app
        .request(Method::OPTIONS, "/orders", &preflight, "")
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), SHOP);
    assert!(r.header("access-control-allow-methods").contains("POST"));
    let allowed = r.header("access-control-allow-headers");
    for needed in ["authorization", "content-type", "idempotency-key"] {
        assert!(allowed.contains(needed), "{allowed}");
    }
    // Every route answers OPTIONS with what it allows; an unknown path is still 404.
    let r = app
        .request(
            Method::OPTIONS,
            "/products/1",
            &[("authorization", crate::helpers::NO_AUTH)],
            "",
        )
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("allow"), "GET, HEAD, PATCH, OPTIONS");
    app.request(Method::OPTIONS, "/nowhere", &[], "")
        .await
        .assert_problem(404, "not_found");
    // A deployed function answers any preflight, even for a path it does not serve: the
    // proxy in front may send it there.
    let catalog = app
        .spawn_function(
            "list-products",
            list_products::routes(),
            &[("CORS_ALLOWED_ORIGINS", SHOP)],
        )
        .await;
    let r = catalog
        .request(Method::OPTIONS, "/orders", &preflight, "")
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), SHOP);
    assert!(r.header("access-control-allow-methods").contains("POST"));
    // Nothing was sold by any of it.
    app.assert_books_balance().await;
}

#[tokio::test]
async fn with_any_origin_allowed_the_answer_is_a_star_not_an_echo() {
    let app = TestApp::spawn_on(admin_url(), &[("CORS_ALLOWED_ORIGINS", "*")]).await;
    for origin in [SHOP, "null"] {
        let r = app
            .request(Method::GET, "/products", &[("origin", origin)], "")
            .await;
        assert_eq!(r.header("access-control-allow-origin"), "*", "{origin}");
    }
    // HEAD is GET without the body.
    let r = app.request(Method::HEAD, "/products/1", &[], "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    let r = app.request(Method::OPTIONS, "/healthz", &[], "").await;
    assert_eq!(
        (r.status.as_u16(), r.header("allow")),
        (204, "GET, HEAD, OPTIONS")
    );
}

#[test]
fn a_malformed_origin_is_refused_at_start() {
    for bad in [
        "shop.example.com",
        "https://shop.example.com/",
        "ftp://x",
        "https://",
    ] {
        let vars = [("CORS_ALLOWED_ORIGINS".to_owned(), bad.to_owned())];
        let e = tally_shared::Config::from_vars(vars).unwrap_err();
        assert!(e.to_string().contains("CORS_ALLOWED_ORIGINS"), "{bad}: {e}");
    }
}
