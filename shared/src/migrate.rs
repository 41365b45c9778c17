//! Schema migrations (`sql/migrations`, embedded and applied by refinery) and the demo seed.

use tokio_postgres::{Client, NoTls};

mod embedded {
    refinery::embed_migrations!("../sql/migrations");
}

/// The demo data: the seed project's users and products, with prices.
pub const SEED_SQL: &str = include_str!("../../sql/seed.sql");

/// Any fixed number: it keeps two migrators (two pods of a Job, a runner and a test) from
/// applying the same migration at once.
const MIGRATION_LOCK: i64 = 0x7a11_0001;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("database error while migrating: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
}

/// Connects, applies every pending migration under an advisory lock, and returns the client
/// for further setup (the seed). Returns the version now applied.
pub async fn migrate(database_url: &str) -> Result<(Client, Option<i32>), MigrateError> {
    migrate_to(database_url, None).await
}

/// As [`migrate`], but stops after migration `target` when one is given: the schema an
/// earlier release ran on, for the expand/contract check.
pub async fn migrate_to(
    database_url: &str,
    target: Option<i32>,
) -> Result<(Client, Option<i32>), MigrateError> {
    let (mut client, connection) = tokio_postgres::connect(database_url, NoTls)
        .await
        .map_err(MigrateError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "migration connection ended");
        }
    });
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let report = embedded::migrations::runner()
        .set_target(target.map_or(refinery::Target::Latest, |v| {
            refinery::Target::Version(v as _)
        }))
        .set_abort_divergent(true)
        .run_async(&mut client)
        .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    let report = report?;
    for m in report.applied_migrations() {
        tracing::info!(version = m.version(), name = m.name(), "migration applied");
    }
    let version = embedded::migrations::runner()
        .get_last_applied_migration_async(&mut client)
        .await?
        .map(|m| m.version());
    Ok((client, version))
}

/// Loads the demo seed if there are no products yet. Returns whether it did.
pub async fn seed_if_empty(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT NOT EXISTS (SELECT 1 FROM products)", &[])
        .await?;
    let empty: bool = row.get(0);
    if empty {
        client.batch_execute(SEED_SQL).await?;
    }
    Ok(empty)
}
