//! `GET /orders`: a customer's own orders, newest first, every page read exactly once by
//! following `Link`; the status filter; admins and `user_id`; bad queries.

use std::collections::HashSet;

use http::Method;

use crate::helpers::TestApp;

/// `n` one-unit orders of `product` for `user`, placed in Postgres directly (fast).
async fn place(app: &TestApp, user: i64, product: i64, n: i64) {
    app.db
        .execute(
            "SELECT place_order($1, ARRAY[$2::bigint], ARRAY[1]) FROM generate_series(1, $3::bigint)",
            &[&user, &product, &n],
        )
        .await
        .unwrap();
}

/// Follows `Link: <...>; rel="next"` from `first` to the end: every order seen, in order.
async fn read_all(app: &TestApp, token: &str, first: &str) -> (Vec<serde_json::Value>, usize) {
    let (mut seen, mut pages, mut next) = (Vec::new(), 0, Some(first.to_owned()));
    while let Some(path) = next.take() {
        let r = app
            .request(Method::GET, &path, &[("authorization", token)], "")
            .await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.json());
        seen.extend(r.json().as_array().unwrap().iter().cloned());
        pages += 1;
        let link = r.header("link");
        if !link.is_empty() {
            let target = link.trim_start_matches('<').split('>').next().unwrap();
            next = Some(target.to_owned());
        }
    }
    (seen, pages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_reads_every_page_of_thousands_of_orders_exactly_once() {
    let app = TestApp::spawn().await;
    let product = app.add_product("MANY", 10, 100_000).await;
    place(&app, 1, product, 2500).await;
    place(&app, 2, product, 700).await;
    let (orders, pages) = read_all(&app, &app.customer(1), "/orders?limit=100").await;
    assert_eq!(pages, 25);
    assert_eq!(orders.len(), 2500);
    let ids: Vec<i64> = orders.iter().map(|o| o["id"].as_i64().unwrap()).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        2500,
        "each order once"
    );
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first");
    assert!(
        orders
            .iter()
            .all(|o| o["user_id"] == 1 && o["status"] == "PENDING")
    );
    assert!(orders[0]["created_at"].as_str().unwrap().ends_with('Z'));

    // The status filter, carried along the pages.
    app.db
        .execute(
            "UPDATE orders SET status = 'CONFIRMED' WHERE user_id = 1 AND id % 7 = 0",
            &[],
        )
        .await
        .unwrap();
    let confirmed = app
        .count("SELECT count(*) FROM orders WHERE user_id = 1 AND status = 'CONFIRMED'")
        .await;
    let (orders, _) = read_all(&app, &app.customer(1), "/orders?status=CONFIRMED&limit=50").await;
    assert_eq!(orders.len() as i64, confirmed);
    assert!(orders.iter().all(|o| o["status"] == "CONFIRMED"));

    // One query, served by the (user_id, id) index: no sort, no scan of other users' orders.
    app.db.batch_execute("ANALYZE orders").await.unwrap();
    // The handler's own statement, with its parameters, sent as the handler sends it.
    let (user, before, status, limit) = (Some(2i64), Some(1_000_000i64), None::<String>, 101i64);
    let params: [(
        &(dyn tokio_postgres::types::ToSql + Sync),
        tokio_postgres::types::Type,
    ); 4] = [
        (&user, tokio_postgres::types::Type::INT8),
        (&before, tokio_postgres::types::Type::INT8),
        (&status, tokio_postgres::types::Type::TEXT),
        (&limit, tokio_postgres::types::Type::INT8),
    ];
    let plan: Vec<String> = app
        .db
        .query_typed(&format!("EXPLAIN {}", list_orders::LIST_SQL), &params)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("orders_user_id_id_idx") && !plan.contains("Sort"),
        "{plan}"
    );
}

#[tokio::test]
async fn customers_see_their_own_and_admins_choose_whose() {
    let app = TestApp::spawn().await;
    let product = app.add_product("MINE", 10, 1000).await;
    place(&app, 1, product, 3).await;
    place(&app, 2, product, 2).await;
    let customer = app.customer(1);
    app.request(
        Method::GET,
        "/orders?user_id=2",
        &[("authorization", &customer)],
        "",
    )
    .await
    .assert_problem(403, "forbidden");
    let r = app
        .request(
            Method::GET,
            "/orders?user_id=1",
            &[("authorization", &customer)],
            "",
        )
        .await;
    assert_eq!(r.json().as_array().unwrap().len(), 3);
    let admin = app.admin();
    let r = app
        .request(
            Method::GET,
            "/orders?user_id=2",
            &[("authorization", &admin)],
            "",
        )
        .await;
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    let r = app
        .request(Method::GET, "/orders", &[("authorization", &admin)], "")
        .await;
    assert_eq!(
        r.json().as_array().unwrap().len(),
        5,
        "an admin without user_id sees all"
    );
    // The admin's next link keeps user_id.
    let r = app
        .request(
            Method::GET,
            "/orders?user_id=1&limit=2",
            &[("authorization", &admin)],
            "",
        )
        .await;
    assert!(
        r.header("link").contains("user_id=1"),
        "{}",
        r.header("link")
    );
}

#[tokio::test]
async fn bad_queries_are_400_and_no_token_is_401() {
    let app = TestApp::spawn().await;
    let customer = app.customer(1);
    for query in [
        "limit=0",
        "limit=101",
        "limit=x",
        "before_id=-1",
        "before_id=0",
        "status=SHIPPED",
        "status=pending",
        "user_id=abc",
        "page=2",
    ] {
        app.request(
            Method::GET,
            &format!("/orders?{query}"),
            &[("authorization", &customer)],
            "",
        )
        .await
        .assert_problem(400, "invalid_request");
    }
    app.request(
        Method::GET,
        "/orders",
        &[("authorization", crate::helpers::NO_AUTH)],
        "",
    )
    .await
    .assert_problem(401, "unauthorized");
    // Nobody's orders: an empty page, no link.
    let r = app
        .request(Method::GET, "/orders", &[("authorization", &customer)], "")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!([]));
    assert_eq!(r.header("link"), "");
}
