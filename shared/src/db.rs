//! The Postgres pool: built lazily so that a cold start never waits for the database.

use bb8_postgres::PostgresConnectionManager;

use crate::config::{Config, ConfigError};
use crate::pg::Tls;

pub type Pool = bb8::Pool<PostgresConnectionManager<Tls>>;
pub type Connection<'a> = bb8::PooledConnection<'a, PostgresConnectionManager<Tls>>;

/// Builds the pool without opening a connection. The first request opens one; a request that
/// cannot get one within `POOL_TIMEOUT_MS` is answered 503, and the pool keeps trying, so the
/// function recovers by itself when Postgres comes back.
pub fn lazy_pool(config: &Config, application_name: &str) -> Result<Pool, ConfigError> {
    lazy_pool_at(
        config,
        "DATABASE_URL",
        config.require_database_url()?,
        application_name,
    )
}

/// [`lazy_pool`] for another URL than `DATABASE_URL` (the replica's), with the same settings.
pub fn lazy_pool_at(
    config: &Config,
    variable: &str,
    url: &str,
    application_name: &str,
) -> Result<Pool, ConfigError> {
    // sslmode and sslrootcert as libpq reads them (pg.rs): TLS unless the URL says disable.
    let crate::pg::Target {
        config: mut pg,
        tls,
        ..
    } = crate::pg::target(url).map_err(|e| ConfigError::new(format!("{variable}: {e}")))?;
    pg.connect_timeout(config.connect_timeout());
    pg.application_name(application_name);
    // No startup options: statement_timeout and the other session limits are set on the role
    // (crate::roles), which PgBouncer cannot drop the way it drops startup parameters.
    let manager = PostgresConnectionManager::new(pg, tls);
    Ok(bb8::Pool::builder()
        .max_size(config.pool_size)
        .min_idle(None)
        .connection_timeout(config.pool_timeout())
        // Checking every checkout would add a round trip to every request. A dead connection
        // is noticed by `has_broken` (its socket closed), and a request that still hits one
        // gets 503 once; the pool replaces it. Under Lambda the environment is frozen between
        // invocations and its sockets can die silently, so there every checkout is checked.
        .test_on_check_out(config.on_lambda())
        .build_unchecked(manager))
}
