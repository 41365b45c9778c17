//! `Idempotency-Key` for the writes a retry could double (a new product, a restock, a
//! cancellation), with the semantics `POST /orders` has in SQL: a key belongs to its caller, is
//! bound to a fingerprint of the request, and a repeat replays the stored response byte for
//! byte; the key with another request is 422. Only a success keeps its key: a refusal rolls
//! the key back with everything else, so a retry after the cause is fixed can succeed.
//!
//! One transaction: the key's row is inserted first, so a concurrent repeat waits on its unique
//! index until the first commits (then replays) or rolls back (then runs itself). The write and
//! the stored response commit together, so a key never has one without the other.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use metrics::counter;
use serde::Serialize;
use serde_json::Map;
use sha2::{Digest, Sha256};
use tokio_postgres::Row;
use tokio_postgres::types::Type;

use crate::error::{ApiError, Domain};
use crate::http::{Request, Response, raw_json_response};
use crate::meters;
use crate::router::AppState;
use crate::sql::{self, Params};

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The `Idempotency-Key` header, if sent: 1 to 255 printable ASCII characters.
pub fn key(request: &Request) -> Result<Option<String>, ApiError> {
    let Some(value) = request.headers().get(&IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(ApiError::InvalidRequest(
            "Idempotency-Key must be 1 to 255 printable ASCII characters".into(),
        ));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// A key used for another request, or whose first request has no stored answer.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("this Idempotency-Key was used for a different request")]
    Reused,
    #[error("a request with this idempotency key is still being processed")]
    InFlight,
}

impl Domain for KeyError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Reused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InFlight => StatusCode::CONFLICT,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            Self::Reused => "idempotency_key_reused",
            Self::InFlight => "idempotency_key_in_flight",
        }
    }
    fn fields(&self) -> Map<String, serde_json::Value> {
        Map::new()
    }
}

/// A keyed request: whose key, the key, and what the request was.
pub struct Keyed {
    owner: i64,
    key: String,
    fingerprint: String,
}

impl Keyed {
    /// The request's key, if it sent one, owned by `owner` and bound to `operation` and
    /// `what`: the request as parsed (its path ids included), so reformatted JSON, or an id
    /// written `01`, is the same request.
    pub fn from_request(
        request: &Request,
        owner: i64,
        operation: &str,
        what: &impl Serialize,
    ) -> Result<Option<Self>, ApiError> {
        let Some(key) = key(request)? else {
            return Ok(None);
        };
        let canonical = serde_json::to_vec(what)
            .map_err(|e| ApiError::Internal(format!("fingerprinting a request: {e}")))?;
        let mut hash = Sha256::new();
        hash.update(operation);
        hash.update(b"\n");
        hash.update(&canonical);
        Ok(Some(Self {
            owner,
            key,
            fingerprint: crate::encode::hex(&hash.finalize()),
        }))
    }
}

/// A write's success: what is answered now and replayed later.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
    pub replayed: bool,
}

impl Answer {
    pub fn new(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            body: body.into(),
            replayed: false,
        }
    }

    /// The JSON response, marked `Idempotent-Replayed: true` when it is a replay.
    pub fn into_response(self) -> Response {
        let mut response = raw_json_response(self.status, self.body);
        if self.replayed {
            response
                .headers_mut()
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        response
    }
}

const CLAIM_SQL: &str = "INSERT INTO idempotency_keys (user_id, key, fingerprint) \
     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING true";
const STORED_SQL: &str = "SELECT fingerprint, status_code, response_body \
     FROM idempotency_keys WHERE user_id = $1 AND key = $2";
const STORE_SQL: &str = "UPDATE idempotency_keys SET status_code = $3, response_body = $4 \
     WHERE user_id = $1 AND key = $2";

/// Runs `statement` and turns its rows into an answer with `answer`: once per key when the
/// request is keyed, plainly when it is not. `name` labels the statement's duration metric.
pub async fn once(
    state: &AppState,
    keyed: Option<&Keyed>,
    (name, statement, params): (&'static str, &str, &Params<'_>),
    answer: impl FnOnce(Vec<Row>) -> Result<Answer, ApiError>,
) -> Result<Answer, ApiError> {
    let Some(keyed) = keyed else {
        return answer(sql::query(state, name, statement, params).await?);
    };
    let mut conn = state.db().await?;
    let tx = conn.transaction().await?;
    let id: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] = [
        (&keyed.owner, Type::INT8),
        (&keyed.key, Type::TEXT),
        (&keyed.fingerprint, Type::TEXT),
    ];
    // The INSERT waits while another transaction holds the same key, and conflicts once it
    // commits; the SELECT after it is a new statement, so it sees what that one stored.
    let mut claimed =
        meters::timed("claim_idempotency_key", tx.query_typed(CLAIM_SQL, &id)).await?;
    let mut stored = Vec::new();
    if claimed.is_empty() {
        stored = tx.query_typed(STORED_SQL, &id[..2]).await?;
        // Gone between the two statements (the processor forgets old keys): claim it again.
        if stored.is_empty() {
            claimed = tx.query_typed(CLAIM_SQL, &id).await?;
        }
    }
    if claimed.is_empty() {
        let row = stored.first().ok_or(KeyError::InFlight)?;
        if row.get::<_, &str>(0) != keyed.fingerprint {
            return Err(KeyError::Reused.into());
        }
        let (Some(status), Some(body)) = (
            row.get::<_, Option<i32>>(1),
            row.get::<_, Option<String>>(2),
        ) else {
            return Err(KeyError::InFlight.into());
        };
        let status = u16::try_from(status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .ok_or_else(|| ApiError::Internal(format!("stored status {status}")))?;
        counter!("tally_idempotent_replays_total", "operation" => name).increment(1);
        return Ok(Answer {
            replayed: true,
            ..Answer::new(status, body)
        });
    }
    let rows = meters::timed(name, tx.query_typed(statement, params)).await?;
    // A refusal returns here, and dropping the transaction rolls the key back with it.
    let answer = answer(rows)?;
    let text = std::str::from_utf8(&answer.body)
        .map_err(|e| ApiError::Internal(format!("{name}: a response that is not UTF-8: {e}")))?;
    let status = i32::from(answer.status.as_u16());
    let store: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 4] = [
        (&keyed.owner, Type::INT8),
        (&keyed.key, Type::TEXT),
        (&status, Type::INT4),
        (&text, Type::TEXT),
    ];
    tx.query_typed(STORE_SQL, &store).await?;
    tx.commit().await?;
    Ok(answer)
}
