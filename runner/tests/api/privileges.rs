//! Least privilege in the database: what the app and read-only roles may not do, the limits
//! their sessions get from the role alone, and the read-only functions served by their role.

use http::Method;
use tokio_postgres::error::SqlState;

use crate::helpers::{TestApp, as_app, as_readonly};

/// Runs `sql` and returns its SQLSTATE, or None when it succeeded.
async fn refusal(db: &tokio_postgres::Client, sql: &str) -> Option<SqlState> {
    db.batch_execute(sql)
        .await
        .err()
        .and_then(|e| e.code().cloned())
}

#[tokio::test]
async fn the_app_role_cannot_change_the_schema_the_ledger_or_run_programs() {
    let app = TestApp::spawn().await;
    let db = tally_shared::pg::connect(&as_app(&app.db_url))
        .await
        .unwrap();
    for sql in [
        "ALTER TABLE products ADD COLUMN note text",
        "DROP TABLE orders",
        "ALTER TABLE inventory_movements DISABLE TRIGGER inventory_movements_append_only",
        "ALTER TABLE inventory_movements DISABLE TRIGGER ALL",
        "TRUNCATE inventory_movements",
        "DELETE FROM inventory_movements",
        "DELETE FROM orders",
        "CREATE TABLE mine (id int)",
        "CREATE FUNCTION mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "COPY (SELECT 1) TO PROGRAM 'true'",
        "COPY products FROM PROGRAM 'true'",
        "SELECT * FROM refinery_schema_history",
        "CREATE ROLE intruder",
    ] {
        assert_eq!(
            refusal(&db, sql).await,
            Some(SqlState::INSUFFICIENT_PRIVILEGE),
            "the app role was allowed: {sql}"
        );
    }
    // Products are never deleted, by anyone: the triggers refuse it even for the owner.
    assert!(
        refusal(&db, "DELETE FROM products WHERE id = 1")
            .await
            .is_some()
    );
    // What it is for still works.
    assert_eq!(app.order(1, &[(1, 1)]).await.status, 201);
    app.assert_books_balance().await;
}

#[tokio::test]
async fn the_roles_carry_their_session_limits_whatever_the_url_says() {
    let app = TestApp::spawn().await;
    for url in [as_app(&app.db_url), as_readonly(&app.db_url)] {
        // No startup options at all: the limits come from the role.
        let db = tally_shared::pg::connect(&url).await.unwrap();
        for (setting, expected) in [
            ("statement_timeout", "5s"),
            ("idle_in_transaction_session_timeout", "10s"),
        ] {
            let value: String = db
                .query_one(&format!("SHOW {setting}"), &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                value,
                expected,
                "{setting} for {}",
                tally_shared::pg::redact(&url)
            );
        }
        // A statement past the bound is cancelled by the server.
        let slow = db
            .batch_execute("SET statement_timeout = 50; SELECT pg_sleep(1)")
            .await;
        assert_eq!(slow.unwrap_err().code(), Some(&SqlState::QUERY_CANCELED));
    }
}

#[tokio::test]
async fn the_read_only_role_reads_and_cannot_write() {
    let app = TestApp::spawn().await;
    let db = tally_shared::pg::connect(&as_readonly(&app.db_url))
        .await
        .unwrap();
    for sql in [
        "INSERT INTO orders (user_id, status, total_cents) VALUES (1, 'PENDING', 1)",
        "UPDATE products SET inventory = 0",
        "DELETE FROM idempotency_keys",
        "SET default_transaction_read_only = off; UPDATE products SET inventory = 0",
    ] {
        assert!(
            refusal(&db, sql).await.is_some(),
            "the read-only role was allowed: {sql}"
        );
    }
    let order = app.order(1, &[(2, 1)]).await.json()["order_id"]
        .as_i64()
        .unwrap();
    // list-products and get-order, each alone and connected as the read-only role.
    let readonly_url = as_readonly(&app.db_url);
    let extra = [("DATABASE_URL", readonly_url.as_str())];
    let products = app
        .spawn_function("list-products", list_products::routes(), &extra)
        .await;
    let r = products.get("/products").await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(products.get("/products/2").await.status, 200);
    let orders = app
        .spawn_function("get-order", get_order::routes(), &extra)
        .await;
    let r = orders
        .request(
            Method::GET,
            &format!("/orders/{order}"),
            &[("authorization", &app.customer(1))],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
}
