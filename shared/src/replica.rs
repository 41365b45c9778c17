//! Reads from a replica, and reading one's own writes. With `DATABASE_URL_READ` set,
//! list-products and get-order read from that standby; with `COMMIT_LSN=true`, every
//! successful write answers `Tally-Commit-Lsn`, the primary's WAL position after its commit.
//! A read that sends it back as `Tally-Min-Lsn` is served by the replica once the replica has
//! replayed that far (waiting up to `READ_LSN_WAIT_MS`), else by the primary: a client that
//! passes on the LSN of its last write never reads from before it. A read without the header
//! takes the replica as it is, which may lag (get-order confirms a 404 on the primary, so the
//! `Location` of a new order is never missing). A replica that cannot be had within 250 ms is
//! skipped for the primary.

use std::str::FromStr;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method};
use tokio_postgres::types::{PgLsn, Type};

use crate::config::Config;
use crate::db::{Connection, Pool};
use crate::error::ApiError;
use crate::http::{Request, Response};
use crate::meters;

pub const COMMIT_LSN: &str = "tally-commit-lsn";
pub const MIN_LSN: &str = "tally-min-lsn";

/// How often a read waiting for the replica asks again.
const POLL: Duration = Duration::from_millis(5);

/// What a read's `Tally-Min-Lsn` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinLsn {
    Absent,
    At(PgLsn),
    /// Not a WAL position (`X/Y` in hex, as PostgreSQL writes it): the caller wants a read
    /// after some write we cannot place, so the primary answers; never an error, as the
    /// primary is always current.
    Unreadable,
}

pub fn min_lsn(request: &Request) -> MinLsn {
    let Some(value) = request.headers().get(MIN_LSN) else {
        return MinLsn::Absent;
    };
    value
        .to_str()
        .ok()
        .filter(|v| v.len() <= 17 && v.contains('/'))
        .and_then(|v| PgLsn::from_str(v).ok())
        .map_or(MinLsn::Unreadable, MinLsn::At)
}

/// How long a read's statement may take on the replica before the primary is asked instead
/// (a replica that stopped answering, or cancelled the query for a recovery conflict).
pub const REPLICA_QUERY: Duration = Duration::from_secs(2);

/// How long a read waits for a replica connection before it asks the primary instead: a
/// replica that is down or saturated is no reason to fail (or slow) a read the primary can
/// answer.
const REPLICA_CHECKOUT: Duration = Duration::from_millis(250);

/// A WAL position this far past what the replica has received was not handed out recently
/// (or at all): the primary answers at once rather than after the wait.
const FAR_AHEAD: u64 = 64 * 1024 * 1024;

/// Where a read ran: the replica's connection, or the primary's.
pub struct Reader<'a> {
    pub conn: Connection<'a>,
    pub on_replica: bool,
}

/// A connection for a read: the replica's (caught up to the request's `Tally-Min-Lsn`, if it
/// names one), else the primary's.
/// (Not the router's state: this module sits below the router, which stamps writes with it.)
pub async fn reader<'a>(
    primary_pool: &'a Pool,
    replica: Option<&'a Pool>,
    config: &Config,
    request: &Request,
) -> Result<Reader<'a>, ApiError> {
    let wanted = min_lsn(request);
    let primary = || async {
        Ok(Reader {
            conn: meters::checkout(primary_pool).await?,
            on_replica: false,
        })
    };
    let Some(replica) = replica.filter(|_| wanted != MinLsn::Unreadable) else {
        return primary().await;
    };
    let Ok(Ok(conn)) = tokio::time::timeout(REPLICA_CHECKOUT, meters::checkout(replica)).await
    else {
        metrics::counter!("tally_reads_sent_to_primary_total").increment(1);
        return primary().await;
    };
    let MinLsn::At(wanted) = wanted else {
        return Ok(Reader {
            conn,
            on_replica: true,
        });
    };
    let deadline = Instant::now() + config.read_lsn_wait();
    let far = FAR_AHEAD as f64;
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
        [(&wanted, Type::PG_LSN), (&far, Type::FLOAT8)];
    loop {
        // (caught up, far ahead of anything received); not in recovery: a primary behind the
        // read URL is always current. Bounded by the wait: a replica that stopped answering
        // (rather than refusing) must not hold the read.
        let remaining = deadline.saturating_duration_since(Instant::now()).max(POLL);
        let asked = tokio::time::timeout(
            remaining,
            conn.query_typed(
                "SELECT NOT pg_is_in_recovery() OR pg_last_wal_replay_lsn() >= $1, \
                        pg_is_in_recovery() AND $1 - pg_last_wal_receive_lsn() > $2::float8",
                &params,
            ),
        )
        .await;
        let Ok(Ok(rows)) = asked else { break };
        let state_of = rows.first().and_then(|row| {
            Some((
                row.get::<_, Option<bool>>(0)?,
                row.get::<_, Option<bool>>(1),
            ))
        });
        match state_of {
            Some((true, _)) => {
                return Ok(Reader {
                    conn,
                    on_replica: true,
                });
            }
            Some((false, Some(true))) => break,
            _ if Instant::now() >= deadline => break,
            _ => tokio::time::sleep(POLL).await,
        }
    }
    metrics::counter!("tally_reads_sent_to_primary_total").increment(1);
    drop(conn);
    primary().await
}

/// How long a write's response waits for a connection to learn the LSN; past it, the
/// response goes without the header (a client then reads the replica as it is).
const STAMP_CHECKOUT: Duration = Duration::from_millis(250);

/// Adds `Tally-Commit-Lsn` to a successful write's response, when `COMMIT_LSN` is on: the end
/// of the WAL inserted so far, read after the write committed, so at or past its commit record
/// even when that commit did not wait for the flush (`synchronous_commit = off`). Reads and
/// failures get nothing, and a failure to learn the position costs the write only the header.
pub async fn stamp(pool: &Pool, config: &Config, method: &Method, response: &mut Response) {
    let write = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !config.commit_lsn || !write || !response.status().is_success() {
        return;
    }
    let Ok(Ok(conn)) = tokio::time::timeout(STAMP_CHECKOUT, meters::checkout(pool)).await else {
        metrics::counter!("tally_commit_lsn_missing_total").increment(1);
        return;
    };
    let lsn = conn
        .query_typed("SELECT pg_current_wal_insert_lsn()", &[])
        .await
        .ok()
        .and_then(|rows| rows.first().and_then(|r| r.get::<_, Option<PgLsn>>(0)));
    match lsn.and_then(|lsn| HeaderValue::from_str(&lsn.to_string()).ok()) {
        Some(value) => {
            response.headers_mut().insert(COMMIT_LSN, value);
        }
        None => metrics::counter!("tally_commit_lsn_missing_total").increment(1),
    }
}
