//! Expand/contract guard: the statements the last release sends still run against the newest
//! schema, and still return the columns (names and types) that release reads. Old and new pods
//! run side by side during a rollout and after a rollback, so a migration that drops or
//! reshapes what the release calls would turn their requests into 500s.
//!
//! The fixture (`tests/fixtures/release-statements.json`) is copied from the release's code.
//! `SCHEMA_COMPAT_RECORD=1` rewrites its expected columns from a database migrated only as far
//! as the release's migrations (`"schema_version"`), so recording never reads the new schema.

use serde::{Deserialize, Serialize};
use tokio_postgres::types::{ToSql, Type};

use crate::helpers::{admin_url, fresh_database_at};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/release-statements.json"
);

#[derive(Deserialize, Serialize)]
struct Fixture {
    release: String,
    about: String,
    /// The last migration the release shipped.
    schema_version: i32,
    statements: Vec<Statement>,
}

#[derive(Deserialize, Serialize)]
struct Statement {
    name: String,
    sql: String,
    /// `[type name, sample value]` per parameter.
    params: Vec<(String, serde_json::Value)>,
    /// `[column name, type name]` per result column, as the release's schema gave them.
    #[serde(default)]
    columns: Vec<(String, String)>,
}

/// A sample value as the parameter type the release sent it with.
fn param(type_name: &str, value: &serde_json::Value) -> (Box<dyn ToSql + Sync + Send>, Type) {
    let list = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .expect("an array")
            .iter()
            .map(|x| x.as_i64().expect("an integer"))
            .collect()
    };
    match type_name {
        "int8" => (Box::new(value.as_i64()), Type::INT8),
        "int4" => (Box::new(value.as_i64().map(|v| v as i32)), Type::INT4),
        "float8" => (Box::new(value.as_f64()), Type::FLOAT8),
        "text" => (Box::new(value.as_str().map(str::to_owned)), Type::TEXT),
        "_int8" => (Box::new(list(value)), Type::INT8_ARRAY),
        "_int4" => (
            Box::new(
                list(value)
                    .into_iter()
                    .map(|v| v as i32)
                    .collect::<Vec<_>>(),
            ),
            Type::INT4_ARRAY,
        ),
        other => panic!("the fixture names a parameter type this test does not know: {other}"),
    }
}

/// Runs every statement in order (so a cancel finds the order placed before it) in one
/// transaction that is rolled back, and returns each one's result columns, or the first error.
async fn run_all(
    db_url: &str,
    statements: &[Statement],
) -> Result<Vec<Vec<(String, String)>>, String> {
    let (mut client, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    tally_shared::migrate::seed_if_empty(&client).await.unwrap();
    let tx = client.transaction().await.unwrap();
    let mut all = Vec::new();
    for s in statements {
        let params: Vec<_> = s.params.iter().map(|(t, v)| param(t, v)).collect();
        let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
        let prepared = tx
            .prepare_typed(&s.sql, &types)
            .await
            .map_err(|e| format!("{}: {}", s.name, db_error(&e)))?;
        let values: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|(v, _)| v.as_ref() as &(dyn ToSql + Sync))
            .collect();
        // Executed too: a plpgsql body is only checked when it runs.
        tx.query(&prepared, &values)
            .await
            .map_err(|e| format!("{}: {}", s.name, db_error(&e)))?;
        all.push(
            prepared
                .columns()
                .iter()
                .map(|c| (c.name().to_owned(), c.type_().name().to_owned()))
                .collect(),
        );
    }
    tx.rollback().await.unwrap();
    Ok(all)
}

fn db_error(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or_else(
        || e.to_string(),
        |d| format!("{} ({})", d.message(), d.code().code()),
    )
}

#[tokio::test]
async fn the_last_releases_statements_run_unchanged_against_the_newest_schema() {
    let mut fixture: Fixture =
        serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    if std::env::var_os("SCHEMA_COMPAT_RECORD").is_some() {
        let old = fresh_database_at(admin_url(), Some(fixture.schema_version)).await;
        let columns = run_all(&old, &fixture.statements)
            .await
            .expect("the release's statements run against the release's own schema");
        for (s, c) in fixture.statements.iter_mut().zip(columns) {
            s.columns = c;
        }
        let text = serde_json::to_string_pretty(&fixture).unwrap();
        std::fs::write(FIXTURE, text + "\n").unwrap();
    }
    assert!(
        fixture.statements.len() >= 18,
        "the fixture lost statements"
    );
    let newest = fresh_database_at(admin_url(), None).await;
    let columns = run_all(&newest, &fixture.statements)
        .await
        .unwrap_or_else(|e| panic!("release {}: {e}", fixture.release));
    for (s, got) in fixture.statements.iter().zip(columns) {
        assert_eq!(
            got, s.columns,
            "release {}: {} returns other columns than the release reads",
            fixture.release, s.name
        );
    }
}

#[tokio::test]
async fn the_guard_fails_when_a_called_function_is_dropped() {
    let fixture: Fixture =
        serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    let db = fresh_database_at(admin_url(), None).await;
    let (client, conn) = tokio_postgres::connect(&db, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    // What V3 once did to the release before it.
    client
        .batch_execute("DROP FUNCTION cancel_order(bigint, bigint)")
        .await
        .unwrap();
    let e = run_all(&db, &fixture.statements).await.unwrap_err();
    assert!(e.starts_with("cancel-order: function cancel_order"), "{e}");
    assert!(e.contains("(42883)"), "{e}");
}
