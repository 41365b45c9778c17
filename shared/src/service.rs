//! One request end to end, whichever transport carried it (the hyper server in [`crate::runtime`]
//! or the Lambda adapter in [`crate::lambda`]): request id, dispatch, the one error mapping,
//! metrics and the access log. Both transports sit above this module, never beside each other.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, header};

use crate::error::ApiError;
use crate::meters;
use crate::router::{AppState, Router};

/// Bodies larger than this are refused with 413 before they are read into memory.
pub const BODY_LIMIT: usize = 64 * 1024;

const REQUEST_ID: &str = "x-request-id";

/// One request, start to finish, whichever adapter carried it (hyper here, or Lambda): request
/// id, body, dispatch, the one error mapping, metrics and the access log.
pub async fn respond(
    parts: http::request::Parts,
    body: impl Future<Output = Result<Bytes, ApiError>>,
    router: &Router,
    state: AppState,
) -> crate::Response {
    let started = Instant::now();
    let request_id = parts
        .headers
        .get(REQUEST_ID)
        .filter(|v| is_reasonable_id(v))
        .cloned()
        .unwrap_or_else(new_request_id);
    let method = parts.method.clone();
    let path = parts.uri.path().to_owned();
    let trace_id = trace_id(&parts.headers).to_owned();
    // CORS costs a request nothing unless origins are configured (the hot path's default).
    let cors_config = (!state.config.cors_allowed_origins.is_empty()).then(|| state.config.clone());
    let origin = cors_config
        .as_ref()
        .and_then(|_| parts.headers.get(header::ORIGIN).cloned());
    let preflight = method == http::Method::OPTIONS
        && parts
            .headers
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let allowed = match (&cors_config, &origin) {
        (Some(config), Some(origin)) => config.allows_origin(origin.as_bytes()),
        _ => false,
    };

    let (result, route) = if preflight && allowed {
        // A CORS preflight from an allowed origin is answered here, whatever the path: a
        // deployed function knows only its own routes, and the proxy in front may send any
        // preflight to any of them. The real request then meets the real routes.
        (Ok(preflight_response()), "preflight")
    } else {
        match body.await {
            Ok(bytes) => {
                router
                    .dispatch(http::Request::from_parts(parts, bytes), state)
                    .await
            }
            Err(e) => (Err(e), "unmatched"),
        }
    };
    let mut response = result.unwrap_or_else(|e| error_response(e, &request_id, &trace_id));
    if let Some(config) = &cors_config {
        cors(config, origin.as_ref(), preflight, &mut response);
    }
    response
        .headers_mut()
        .insert(REQUEST_ID, request_id.clone());
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    meters::record_request(route, method.as_str(), status, elapsed);
    tracing::info!(
        method = method.as_str(),
        path,
        route,
        status,
        latency_us = elapsed.as_micros() as u64,
        request_id = request_id.to_str().unwrap_or(""),
        trace_id,
        "request"
    );
    response
}

/// The one mapping of an error to its response; a 5xx's hidden cause goes to the log, under
/// the request's ids.
fn error_response(e: ApiError, request_id: &HeaderValue, trace_id: &str) -> crate::Response {
    if let Some(cause) = e.internal_cause() {
        tracing::error!(
            request_id = request_id.to_str().unwrap_or(""),
            trace_id,
            error = e.code(),
            cause,
            "request failed"
        );
    }
    e.into_response()
}

/// CORS for the origins in `CORS_ALLOWED_ORIGINS` (called only when some are configured). A page on an allowed
/// origin may read the response and, after a preflight, send the headers a storefront needs;
/// any other origin gets no CORS headers, so its browser keeps the response from it. Tokens
/// travel as bearer headers, never cookies: no credentials mode.
fn cors(
    config: &crate::Config,
    origin: Option<&HeaderValue>,
    preflight: bool,
    response: &mut crate::Response,
) {
    let headers = response.headers_mut();
    // Caches must keep one answer per origin.
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    let Some(origin) = origin.filter(|o| config.allows_origin(o.as_bytes())) else {
        return;
    };
    // With `*` the answer is `*` itself, never an echo (a `null` origin included).
    let allowed = if config.cors_allowed_origins.iter().any(|o| o == "*") {
        HeaderValue::from_static("*")
    } else {
        origin.clone()
    };
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    if preflight {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(API_METHODS),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(
                "authorization, content-type, idempotency-key, if-match, if-none-match, \
                 tally-min-lsn, traceparent, x-request-id",
            ),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    } else {
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(
                "etag, link, location, retry-after, x-request-id, idempotent-replayed, \
                 tally-commit-lsn",
            ),
        );
    }
}

/// Every method the API answers, for a preflight.
const API_METHODS: &str = "GET, HEAD, POST, PATCH, OPTIONS";

/// `204` to a CORS preflight; [`cors`] adds the headers.
fn preflight_response() -> crate::Response {
    let mut response = http::Response::new(Bytes::new());
    *response.status_mut() = http::StatusCode::NO_CONTENT;
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(API_METHODS));
    response
}

/// The trace id of a W3C `traceparent` (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`),
/// as Knative's ingress and queue-proxy propagate it; empty when absent or malformed.
fn trace_id(headers: &http::HeaderMap) -> &str {
    let Some(value) = headers.get("traceparent").and_then(|v| v.to_str().ok()) else {
        return "";
    };
    let mut parts = value.split('-');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(version), Some(trace), Some(span), Some(_flags))
            if version.len() == 2
                && trace.len() == 32
                && span.len() == 16
                && trace.bytes().all(|b| b.is_ascii_hexdigit())
                && trace != "00000000000000000000000000000000" =>
        {
            trace
        }
        _ => "",
    }
}

/// A caller's id is kept if it is short visible ASCII, so it cannot smuggle anything into logs.
fn is_reasonable_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// 16 hex digits, unique per process and unpredictable across processes; no syscall per call.
fn new_request_id() -> HeaderValue {
    static SEED: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let id = SEED.get_or_init(RandomState::new).hash_one(n);
    HeaderValue::from_str(&format!("{id:016x}")).expect("hex is a valid header value")
}
