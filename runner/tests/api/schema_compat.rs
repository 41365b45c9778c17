//! Expand/contract guard: the statements the last release sends still run against the newest
//! schema, and still return the columns (names and types) that release reads. Old and new pods
//! run side by side during a rollout and after a rollback, so a migration that drops or
//! reshapes what the release calls would turn their requests into 500s.
//!
//! Each fixture (`tests/fixtures/releases/<commit>.json`) is copied from a release's code: the
//! last release, and the one before it while nothing has been contracted that it called.
//! `SCHEMA_COMPAT_RECORD=1` rewrites their expected columns from a database migrated only as far
//! as each release's migrations (`"schema_version"`), so recording never reads the new schema.

use serde::{Deserialize, Serialize};
use tokio_postgres::types::{ToSql, Type};

use crate::helpers::{admin_url, fresh_database_at};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/releases");

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
    /// Where the statement branches: the first column of the first row the release expects
    /// (an outcome, an id, a count), so a body that now takes another branch is caught too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expect: Option<serde_json::Value>,
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
        "bool" => (Box::new(value.as_bool()), Type::BOOL),
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

/// The first column of a row as JSON, for the types the fixture's expectations use.
fn first_value(row: &tokio_postgres::Row) -> serde_json::Value {
    let column = &row.columns()[0];
    match *column.type_() {
        Type::TEXT => row.get::<_, Option<String>>(0).into(),
        Type::INT8 => row.get::<_, Option<i64>>(0).into(),
        Type::INT4 => row.get::<_, Option<i32>>(0).into(),
        _ => serde_json::Value::String(format!("<{}>", column.type_().name())),
    }
}

/// Runs every statement in order (so a cancel finds the order placed before it) in one
/// transaction that is rolled back. Returns each one's result columns, or the first error: a
/// statement that fails, or one whose first value differs from its `expect`.
async fn run_all(
    db_url: &str,
    statements: &[Statement],
) -> Result<Vec<Vec<(String, String)>>, String> {
    let mut client = tally_shared::pg::connect(db_url).await.expect("connect");
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
        let rows = tx
            .query(&prepared, &values)
            .await
            .map_err(|e| format!("{}: {}", s.name, db_error(&e)))?;
        if let Some(expect) = &s.expect {
            let got = rows.first().map(first_value);
            if got.as_ref() != Some(expect) {
                return Err(format!("{}: expected {expect}, got {got:?}", s.name));
            }
        }
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

/// Every release fixture, oldest first by schema version, with its path.
fn fixtures() -> Vec<(std::path::PathBuf, Fixture)> {
    let mut all: Vec<_> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let fixture = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, fixture)
        })
        .collect();
    all.sort_by_key(|(_, f): &(_, Fixture)| f.schema_version);
    all
}

fn fixture(release: &str) -> Fixture {
    fixtures()
        .into_iter()
        .map(|(_, f)| f)
        .find(|f| f.release == release)
        .unwrap_or_else(|| panic!("no fixture for release {release}"))
}

/// The whole check against one database: every statement runs, takes the branch the release
/// expects, and returns the columns the release reads.
async fn check(db_url: &str, fixture: &Fixture) -> Result<(), String> {
    let columns = run_all(db_url, &fixture.statements).await?;
    for (s, got) in fixture.statements.iter().zip(columns) {
        if got != s.columns {
            return Err(format!(
                "{}: returns {got:?}, the release reads {:?}",
                s.name, s.columns
            ));
        }
    }
    Ok(())
}

#[tokio::test]
async fn the_last_releases_statements_run_unchanged_against_the_newest_schema() {
    let all = fixtures();
    assert!(all.len() >= 2, "the fixtures of the last two releases");
    for (path, mut fixture) in all {
        if std::env::var_os("SCHEMA_COMPAT_RECORD").is_some() {
            let old = fresh_database_at(admin_url(), Some(fixture.schema_version)).await;
            let columns = run_all(&old, &fixture.statements)
                .await
                .expect("the release's statements run against the release's own schema");
            for (s, c) in fixture.statements.iter_mut().zip(columns) {
                s.columns = c;
            }
            let text = serde_json::to_string_pretty(&fixture).unwrap();
            std::fs::write(&path, text + "\n").unwrap();
        }
        assert!(
            fixture.statements.len() >= 19,
            "{}: the fixture lost statements",
            path.display()
        );
        let newest = fresh_database_at(admin_url(), None).await;
        if let Err(e) = check(&newest, &fixture).await {
            panic!("release {}: {e}", fixture.release);
        }
    }
}

/// The guard bites: each of these changes would break the release, and each is caught.
#[tokio::test]
async fn the_guard_fails_on_a_dropped_function_a_changed_type_or_a_broken_body() {
    let fixture = fixture("f98f8af");
    for (change, expected) in [
        // What V3 once did to the release before it.
        (
            "DROP FUNCTION cancel_order(bigint, bigint)",
            "cancel-order: function cancel_order",
        ),
        (
            "ALTER TABLE orders ALTER COLUMN total_cents TYPE numeric",
            "create-order: place: structure of query does not match function result type",
        ),
        (
            "ALTER TABLE orders ALTER COLUMN attempts TYPE bigint",
            "process-orders: claim: returns",
        ),
        (
            "CREATE OR REPLACE FUNCTION release_order(p_order_id bigint, p_target text, p_reason text) \
             RETURNS TABLE (outcome text, status text) LANGUAGE plpgsql AS $$ \
             BEGIN RETURN QUERY SELECT o.state, o.status FROM orders o WHERE o.id = p_order_id; END $$",
            "cancel-order: column o.state does not exist",
        ),
        (
            "CREATE OR REPLACE FUNCTION expire_one_order(p_ttl_secs double precision) RETURNS bigint \
             LANGUAGE sql AS $$ SELECT NULL::bigint $$",
            "process-orders: expire: expected 2",
        ),
    ] {
        let db = fresh_database_at(admin_url(), None).await;
        let client = tally_shared::pg::connect(&db).await.unwrap();
        client.batch_execute(change).await.unwrap();
        let e = check(&db, &fixture).await.unwrap_err();
        assert!(e.starts_with(expected), "{change}: {e}");
    }
}

/// A migration whose DDL queues behind a long reader (a backup) must not make every order queue
/// behind it: it gives up the lock after `lock_timeout`, lets requests pass, and tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_behind_a_long_reader_lets_orders_pass_and_retries() {
    use std::time::{Duration, Instant};
    let db = fresh_database_at(admin_url(), Some(4)).await;
    let connect = || async { tally_shared::pg::connect(&db).await.unwrap() };
    let blocker = connect().await;
    tally_shared::migrate::seed_if_empty(&blocker)
        .await
        .unwrap();
    // A reader holding products for 1.5 s, as pg_dump holds every table it dumps.
    blocker
        .batch_execute("BEGIN; SELECT count(*) FROM products;")
        .await
        .unwrap();
    let policy = tally_shared::migrate::LockPolicy {
        lock_timeout: Duration::from_millis(100),
        first_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        attempts: 100,
    };
    let url = db.clone();
    let migrator = tokio::spawn(async move {
        tally_shared::migrate::migrate_with(&url, None, &crate::helpers::run_roles().names, policy)
            .await
            .map(|(_, v)| v)
    });
    // Meanwhile a write to the same table: without a lock timeout it would queue behind the
    // migrator's ACCESS EXCLUSIVE request until the reader finished.
    let writer = connect().await;
    // Without the migrator's lock timeout this write would wait until the reader is done (and
    // the reader waits for this loop): fail after 1 s instead of hanging.
    writer
        .batch_execute("SET lock_timeout = 1000")
        .await
        .unwrap();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_millis(1500) {
        let t = Instant::now();
        writer
            .execute("UPDATE products SET updated_at = now() WHERE id = 1", &[])
            .await
            .unwrap();
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    blocker.batch_execute("COMMIT").await.unwrap();
    let version = migrator
        .await
        .unwrap()
        .expect("the migration completes once the reader is done");
    assert!(version.unwrap() >= 5, "{version:?}");
    assert!(
        slowest < Duration::from_millis(700),
        "a write waited {slowest:?} behind the migrator"
    );
}
