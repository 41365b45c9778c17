//! Reads from a replica, and reading one's own writes. With `DATABASE_URL_READ` set,
//! list-products and get-order read from that standby; with `COMMIT_LSN=true`, every
//! successful write answers `Tally-Commit-Lsn`, the primary's WAL position after its commit.
//! A read that sends it back as `Tally-Min-Lsn` is served by the replica once the replica has
//! replayed that far (waiting up to `READ_LSN_WAIT_MS`), else by the primary: a client that
//! passes on the LSN of its last write never reads from before it. A read without the header
//! takes the replica as it is, which may lag.

use std::str::FromStr;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method};
use tokio_postgres::types::{PgLsn, Type};

use crate::db::Connection;
use crate::error::ApiError;
use crate::http::{Request, Response};
use crate::meters;
use crate::router::AppState;

pub const COMMIT_LSN: &str = "tally-commit-lsn";
pub const MIN_LSN: &str = "tally-min-lsn";

/// How often a read waiting for the replica asks again.
const POLL: Duration = Duration::from_millis(5);

/// The LSN a read names, if any: `X/Y` in hex as PostgreSQL writes it; anything else is 400.
pub fn min_lsn(request: &Request) -> Result<Option<PgLsn>, ApiError> {
    let Some(value) = request.headers().get(MIN_LSN) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|v| v.len() <= 17 && v.contains('/'))
        .and_then(|v| PgLsn::from_str(v).ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "{MIN_LSN} must be a WAL position as a write's {COMMIT_LSN} gave it (e.g. 0/16B3748)"
            ))
        })
}

/// A connection for a read: the replica's (caught up to the request's `Tally-Min-Lsn`, if it
/// names one), else the primary's.
pub async fn reader<'a>(
    state: &'a AppState,
    request: &Request,
) -> Result<Connection<'a>, ApiError> {
    let wanted = min_lsn(request)?;
    let Some(replica) = state.read_pool.as_ref() else {
        return state.db().await;
    };
    let Some(wanted) = wanted else {
        return meters::checkout(replica).await;
    };
    // A replica that cannot be reached is no reason to fail a read the primary can answer.
    let Ok(conn) = meters::checkout(replica).await else {
        return state.db().await;
    };
    let deadline = Instant::now() + state.config.read_lsn_wait();
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] = [(&wanted, Type::PG_LSN)];
    loop {
        // Not in recovery: a primary behind the read URL is always current.
        let caught_up = conn
            .query_typed(
                "SELECT NOT pg_is_in_recovery() OR pg_last_wal_replay_lsn() >= $1",
                &params,
            )
            .await
            .ok()
            .and_then(|rows| rows.first().and_then(|r| r.get::<_, Option<bool>>(0)));
        if caught_up == Some(true) {
            return Ok(conn);
        }
        if Instant::now() >= deadline {
            metrics::counter!("tally_reads_sent_to_primary_total").increment(1);
            drop(conn);
            return state.db().await;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Adds `Tally-Commit-Lsn` to a successful write's response, when `COMMIT_LSN` is on: the
/// primary's WAL position now, after the write's commit, so at or past it. Reads and failures
/// get nothing, and a failure to learn the position costs the write nothing but the header.
pub async fn stamp(state: &AppState, method: &Method, response: &mut Response) {
    let write = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !state.config.commit_lsn || !write || !response.status().is_success() {
        return;
    }
    let Ok(conn) = state.db().await else { return };
    let lsn = conn
        .query_typed("SELECT pg_current_wal_lsn()", &[])
        .await
        .ok()
        .and_then(|rows| rows.first().and_then(|r| r.get::<_, Option<PgLsn>>(0)));
    if let Some(value) = lsn.and_then(|lsn| HeaderValue::from_str(&lsn.to_string()).ok()) {
        response.headers_mut().insert(COMMIT_LSN, value);
    }
}
