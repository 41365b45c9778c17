//! Where a handler's SQL runs: one call is a pooled connection (its wait measured), one
//! statement sent with `query_typed` (parse, bind and execute in one round trip, nothing left
//! prepared, so it is safe behind PgBouncer in transaction mode) and timed under its name, and
//! the rows. Outcomes that SQL functions answer as text are parsed once, into the caller's enum.

use std::str::FromStr;

use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use crate::error::ApiError;
use crate::meters;
use crate::router::AppState;

/// A statement's parameters with the types they are sent as.
pub type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

/// Runs `sql` once and answers its rows; `name` labels its duration metric.
pub async fn query(
    state: &AppState,
    name: &'static str,
    sql: &str,
    params: &Params<'_>,
) -> Result<Vec<Row>, ApiError> {
    let conn = state.db().await?;
    Ok(meters::timed(name, conn.query_typed(sql, params)).await?)
}

/// [`query`] for a read that may go to the replica (`replica.rs`): the request's
/// `Tally-Min-Lsn` decides where.
pub async fn read(
    state: &AppState,
    request: &crate::http::Request,
    name: &'static str,
    sql: &str,
    params: &Params<'_>,
) -> Result<Vec<Row>, ApiError> {
    Ok(read_where(state, request, name, sql, params).await?.0)
}

/// [`read`], and whether the replica answered (false: the primary did).
pub async fn read_where(
    state: &AppState,
    request: &crate::http::Request,
    name: &'static str,
    sql: &str,
    params: &Params<'_>,
) -> Result<(Vec<Row>, bool), ApiError> {
    let reader = crate::replica::reader(
        &state.pool,
        state.read_pool.as_ref(),
        &state.config,
        request,
    )
    .await?;
    if !reader.on_replica {
        let rows = meters::timed(name, reader.conn.query_typed(sql, params)).await?;
        return Ok((rows, false));
    }
    let on_replica = meters::timed(name, reader.conn.query_typed(sql, params));
    let answered = tokio::time::timeout(crate::replica::REPLICA_QUERY, on_replica).await;
    // The replica's connection goes back before any fallback takes one of the primary's.
    drop(reader);
    match answered {
        Ok(Ok(rows)) => Ok((rows, true)),
        // A replica that hung or failed the statement: the primary answers instead.
        _ => {
            metrics::counter!("tally_reads_sent_to_primary_total").increment(1);
            Ok((query(state, name, sql, params).await?, false))
        }
    }
}

/// [`query`] for a statement that always answers one row: none is a bug, not a 404.
pub async fn query_one(
    state: &AppState,
    name: &'static str,
    sql: &str,
    params: &Params<'_>,
) -> Result<Row, ApiError> {
    query(state, name, sql, params)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Internal(format!("{name} returned no row")))
}

/// The outcome text in `column` of `row`, as the caller's enum; an outcome it does not know is
/// a bug (500), never guessed at.
pub fn outcome<T: FromStr>(row: &Row, column: usize, name: &str) -> Result<T, ApiError> {
    let text: Option<&str> = row
        .try_get(column)
        .map_err(|e| ApiError::Internal(format!("{name}: outcome column: {e}")))?;
    let text = text.ok_or_else(|| ApiError::Internal(format!("{name}: no outcome")))?;
    text.parse()
        .map_err(|_| ApiError::Internal(format!("{name}: unknown outcome {text:?}")))
}

/// Declares an outcome enum and how each variant is spelt in SQL.
#[macro_export]
macro_rules! outcomes {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name { $($variant),+ }

        impl std::str::FromStr for $name {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(()),
                }
            }
        }

        impl $name {
            /// The outcome as SQL spells it (also its metric label).
            #[allow(dead_code)]
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }
    };
}
