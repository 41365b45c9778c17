//! Conditional requests: `ETag` and `If-None-Match` (304) on a product and an order, caching
//! headers on the catalog, and `If-Match` on `PATCH /products/{id}`, where of two admins who
//! read the same version exactly one wins.

use std::sync::Arc;

use http::Method;

use crate::helpers::TestApp;

#[tokio::test]
async fn a_product_and_an_order_revalidate_with_304_until_they_change() {
    let app = TestApp::spawn().await;
    let r = app.get("/products/1").await;
    assert_eq!(r.status, 200);
    let etag = r.header("etag").to_owned();
    assert!(etag.starts_with('"') && etag.len() == 34, "{etag}");
    assert_eq!(r.header("cache-control"), "public, max-age=5");
    assert_eq!(
        app.get("/products").await.header("cache-control"),
        "public, max-age=5"
    );
    let r = app
        .request(Method::GET, "/products/1", &[("if-none-match", &etag)], "")
        .await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), etag);
    // A sale changes the representation (its stock), so the old tag no longer matches.
    let order = app.order(1, &[(1, 1)]).await.json()["order_id"]
        .as_i64()
        .unwrap();
    let r = app
        .request(Method::GET, "/products/1", &[("if-none-match", &etag)], "")
        .await;
    assert_eq!(r.status, 200);
    assert_ne!(r.header("etag"), etag);

    let path = format!("/orders/{order}");
    let owner = app.customer(1);
    let r = app
        .request(Method::GET, &path, &[("authorization", &owner)], "")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("cache-control"), "private, no-cache");
    let order_tag = r.header("etag").to_owned();
    let headers = [
        ("authorization", owner.as_str()),
        ("if-none-match", order_tag.as_str()),
    ];
    assert_eq!(
        app.request(Method::GET, &path, &headers, "").await.status,
        304
    );
    app.request(
        Method::POST,
        &format!("{path}/cancel"),
        &[("authorization", &owner)],
        "",
    )
    .await;
    assert_eq!(
        app.request(Method::GET, &path, &headers, "").await.status,
        200
    );
}

#[tokio::test]
async fn if_match_refuses_a_stale_version_with_412() {
    let app = TestApp::spawn().await;
    let admin = app.admin();
    let etag = app.get("/products/2").await.header("etag").to_owned();
    let patch = |tag: &str, name: &str| {
        let (app, admin, tag, body) = (
            &app,
            admin.clone(),
            tag.to_owned(),
            format!(r#"{{"name":"{name}"}}"#),
        );
        async move {
            app.request(
                Method::PATCH,
                "/products/2",
                &[
                    ("authorization", &admin),
                    ("content-type", "application/json"),
                    ("if-match", &tag),
                ],
                body,
            )
            .await
        }
    };
    let r = patch("\"not-the-tag\"", "Stale").await;
    r.assert_problem(412, "precondition_failed");
    let r = patch(&etag, "Fresh").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "Fresh");
    // The answer's ETag is the new version's: a GET now shows the same tag.
    assert_eq!(
        r.header("etag"),
        app.get("/products/2").await.header("etag")
    );
    // The tag it was read with is stale now; `*` matches any existing version.
    patch(&etag, "Again")
        .await
        .assert_problem(412, "precondition_failed");
    assert_eq!(patch("*", "Any").await.status, 200);
    assert_eq!(app.get("/products/2").await.json()["name"], "Any");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_admins_editing_the_same_version_exactly_one_wins() {
    let app = Arc::new(TestApp::spawn().await);
    for round in 0..20 {
        let etag = app.get("/products/3").await.header("etag").to_owned();
        let racers: Vec<_> = ["Alice", "Bob"]
            .into_iter()
            .map(|who| {
                let (app, etag) = (app.clone(), etag.clone());
                tokio::spawn(async move {
                    let body = format!(r#"{{"name":"{who} {round}"}}"#);
                    let admin = app.admin();
                    let headers = [
                        ("authorization", admin.as_str()),
                        ("content-type", "application/json"),
                        ("if-match", etag.as_str()),
                    ];
                    let r = app
                        .request(Method::PATCH, "/products/3", &headers, body)
                        .await;
                    (who, r.status.as_u16())
                })
            })
            .collect();
        let mut results = Vec::new();
        for racer in racers {
            results.push(racer.await.unwrap());
        }
        let winners: Vec<_> = results.iter().filter(|(_, s)| *s == 200).collect();
        let losers = results.iter().filter(|(_, s)| *s == 412).count();
        assert_eq!(
            (winners.len(), losers),
            (1, 1),
            "round {round}: {results:?}"
        );
        let name = app.get("/products/3").await.json()["name"].clone();
        assert_eq!(
            name,
            format!("{} {round}", winners[0].0),
            "the winner's change stands"
        );
    }
    app.assert_books_balance().await;
}
