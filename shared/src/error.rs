//! [`ApiError`]: every way a request can fail, mapped to HTTP in exactly one place.
//!
//! Bodies are `application/problem+json` (RFC 9457) with a stable machine code in `error`.
//! A 5xx never carries internals: they go to the log, the client gets the request id.

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use serde_json::{Map, Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidId(String),
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("no such resource")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed(Vec<Method>),
    #[error("the body must be application/json")]
    UnsupportedMediaType,
    #[error("the body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the body did not arrive within {limit_ms} ms")]
    RequestTimeout { limit_ms: u64 },
    /// A function's own refusal (see [`Domain`]): its status, code, message and fields.
    #[error("{detail}")]
    Domain {
        status: StatusCode,
        code: &'static str,
        detail: String,
        fields: Map<String, Value>,
    },
    /// The database could not be reached in time; the cause is logged, not shown.
    #[error("the service is temporarily unavailable")]
    Unavailable(String),
    /// A bug or an unexpected database error; the cause is logged, not shown.
    #[error("internal error")]
    Internal(String),
}

/// A function's own way to refuse a request (sold out, a duplicate sku, an order that cannot
/// be cancelled...): the function defines the error type, `shared` only maps it to HTTP,
/// through `?` like any other [`ApiError`].
pub trait Domain: std::error::Error {
    fn status(&self) -> StatusCode;
    /// The stable machine code clients branch on.
    fn code(&self) -> &'static str;
    /// Fields beside `error` and `detail` in the body, e.g. `product_id`.
    fn fields(&self) -> Map<String, Value> {
        Map::new()
    }
}

/// A [`Domain`] error's fields, from `(name, value)` pairs.
pub fn fields<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

impl<T: Domain> From<T> for ApiError {
    fn from(e: T) -> Self {
        // A refusal is the client's to fix; a failure of ours is Internal, whose cause is logged.
        if !e.status().is_client_error() {
            return ApiError::Internal(format!("{} ({})", e, e.code()));
        }
        ApiError::Domain {
            status: e.status(),
            code: e.code(),
            detail: e.to_string(),
            fields: e.fields(),
        }
    }
}

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: &str = "1";

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            InvalidJson(_) | InvalidRequest(_) | InvalidId(_) => StatusCode::BAD_REQUEST,
            Unauthorized => StatusCode::UNAUTHORIZED,
            Forbidden(_) => StatusCode::FORBIDDEN,
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Domain { status, .. } => *status,
            Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine code clients branch on.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            InvalidJson(_) => "invalid_json",
            InvalidRequest(_) => "invalid_request",
            InvalidId(_) => "invalid_id",
            Unauthorized => "unauthorized",
            Forbidden(_) => "forbidden",
            NotFound => "not_found",
            MethodNotAllowed(_) => "method_not_allowed",
            UnsupportedMediaType => "unsupported_media_type",
            PayloadTooLarge { .. } => "payload_too_large",
            RequestTimeout { .. } => "request_timeout",
            Domain { code, .. } => code,
            Unavailable(_) => "unavailable",
            Internal(_) => "internal_error",
        }
    }

    fn extra_fields(&self, body: &mut Map<String, Value>) {
        if let ApiError::Domain { fields, .. } = self {
            for (name, value) in fields {
                // A function's field never replaces the problem's own members.
                body.entry(name.clone()).or_insert_with(|| value.clone());
            }
        }
    }

    /// What the log should say about this error beyond its code: the hidden cause of a 5xx.
    pub fn internal_cause(&self) -> Option<&str> {
        match self {
            ApiError::Unavailable(cause) | ApiError::Internal(cause) => Some(cause),
            _ => None,
        }
    }

    /// The one mapping from an error to an HTTP response.
    pub fn into_response(self) -> http::Response<Bytes> {
        let status = self.status();
        let code = self.code();
        let mut body = Map::new();
        body.insert(
            "type".into(),
            json!(format!("tag:tally,2026:problem:{code}")),
        );
        body.insert(
            "title".into(),
            json!(status.canonical_reason().unwrap_or("Error")),
        );
        body.insert("status".into(), json!(status.as_u16()));
        body.insert("detail".into(), json!(self.to_string()));
        body.insert("error".into(), json!(code));
        self.extra_fields(&mut body);

        let mut response = http::Response::new(Bytes::from(Value::Object(body).to_string()));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            ApiError::MethodNotAllowed(allowed) => {
                let allow = allowed
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                if let Ok(value) = HeaderValue::from_str(&allow) {
                    headers.insert(header::ALLOW, value);
                }
            }
            ApiError::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tally\""),
                );
            }
            ApiError::Unavailable(_) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECS),
                );
            }
            _ => {}
        }
        response
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        if is_unavailable(&e) {
            ApiError::Unavailable(format!("database: {e}"))
        } else {
            ApiError::Internal(format!("database: {e:?}"))
        }
    }
}

impl From<bb8::RunError<tokio_postgres::Error>> for ApiError {
    fn from(e: bb8::RunError<tokio_postgres::Error>) -> Self {
        match e {
            bb8::RunError::TimedOut => {
                ApiError::Unavailable("no database connection within the pool timeout".into())
            }
            bb8::RunError::User(e) => ApiError::Unavailable(format!("database connect: {e}")),
        }
    }
}

/// Errors that mean "the database is not there right now" rather than "this request is wrong":
/// a closed connection, a server shutting down or starting, a cancelled statement.
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true, // an I/O error on the socket
        Some(state) => {
            let code = state.code();
            code.starts_with("08") // connection exception
                || code.starts_with("57") // operator intervention: shutdown, cancel, timeout
                || code.starts_with("53") // insufficient resources: too many connections
                || code == "40001" // serialization failure
                || code == "40P01" // deadlock detected
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(e: ApiError) -> (StatusCode, http::HeaderMap, Value) {
        let r = e.into_response();
        let v = serde_json::from_slice(r.body()).unwrap();
        (r.status(), r.headers().clone(), v)
    }

    #[derive(Debug, thiserror::Error)]
    #[error("product {product_id} has {available} in stock, {requested} requested")]
    struct Short {
        product_id: i64,
        requested: i64,
        available: i64,
    }

    impl Domain for Short {
        fn status(&self) -> StatusCode {
            StatusCode::CONFLICT
        }
        fn code(&self) -> &'static str {
            "insufficient_inventory"
        }
        fn fields(&self) -> Map<String, Value> {
            fields([
                ("product_id", json!(self.product_id)),
                ("requested", json!(self.requested)),
                ("available", json!(self.available)),
            ])
        }
    }

    #[test]
    fn a_functions_own_error_keeps_its_status_code_and_fields() {
        let (status, headers, v) = body_of(
            Short {
                product_id: 3,
                requested: 5,
                available: 2,
            }
            .into(),
        );
        assert_eq!(status, 409);
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(v["error"], "insufficient_inventory");
        assert_eq!(v["status"], 409);
        assert_eq!(v["product_id"], 3);
        assert_eq!(v["requested"], 5);
        assert_eq!(v["available"], 2);
        assert_eq!(v["title"], "Conflict");
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let (status, _, v) = body_of(ApiError::Internal("relation secret_table".into()));
        assert_eq!(status, 500);
        assert!(!v.to_string().contains("secret_table"));
    }

    #[test]
    fn unavailable_asks_to_retry() {
        let (status, headers, v) = body_of(ApiError::Unavailable("down".into()));
        assert_eq!(status, 503);
        assert_eq!(headers[header::RETRY_AFTER], "1");
        assert_eq!(v["error"], "unavailable");
        assert!(!v.to_string().contains("down"));
    }

    #[test]
    fn method_not_allowed_lists_allowed_methods() {
        let (status, headers, _) =
            body_of(ApiError::MethodNotAllowed(vec![Method::GET, Method::POST]));
        assert_eq!(status, 405);
        assert_eq!(headers[header::ALLOW], "GET, POST");
    }
}
