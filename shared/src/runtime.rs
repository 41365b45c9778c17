//! The hyper transport: connections on a listener (protocol, header and body timeouts, a cap
//! on connections), the body cap, and graceful shutdown (the Knative runtime contract). Each
//! request then goes through [`crate::service::respond`].

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::error::ApiError;
use crate::meters;
use crate::router::{AppState, Router};
use crate::service::{BODY_LIMIT, respond};

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and waits
/// (up to the configured grace) for in-flight requests to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) {
    let grace = state.config.shutdown_grace();
    meters::install();
    meters::spawn_upkeep();
    let metrics = metrics_listener(&state)
        .await
        .map(|l| tokio::spawn(serve_metrics(l, state.clone())));
    let router = Arc::new(router);
    let header_timeout = state.config.header_read_timeout();
    let builder = connection_builder(header_timeout);
    let slots = Arc::new(tokio::sync::Semaphore::new(state.config.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Over the cap: closed at once, so the client (or its load balancer) tries elsewhere
        // instead of waiting in a queue it cannot see.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("tally_http_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (router, state, builder) = (router.clone(), state.clone(), builder.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(stream, (router, state), &builder, watcher, header_timeout).await;
        });
    }
    drop(listener);
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: draining in-flight requests"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over with requests still in flight");
    }
}

/// One accepted connection, until it closes or the server shuts down.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    (router, state): (Arc<Router>, AppState),
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    header_timeout: std::time::Duration,
) {
    // hyper's header timeout starts once it knows the protocol: until then (nothing sent, or
    // half an HTTP/2 preface) this bound applies.
    if !protocol_known_in_time(&stream, header_timeout).await {
        return;
    }
    let service = service_fn(move |request| {
        let router = router.clone();
        let state = state.clone();
        async move { Ok::<_, Infallible>(answer(request, &router, state).await) }
    });
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// HTTP/1.1 and HTTP/2 as every connection is served: request heads at most 64 KiB and whole
/// within `header_timeout` (a timer makes hyper's header-read timeout effective); HTTP/2
/// connections are pinged, so a dead peer goes.
fn connection_builder(header_timeout: std::time::Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_timeout(std::time::Duration::from_secs(10));
    builder
}

/// Answers every request on `listener` with 503 `unavailable` (and `Retry-After`, and
/// `Connection: close`, so a client's next try reaches the real server) until `ready`
/// resolves: a process that is up but cannot serve yet, such as the local runner waiting for
/// PostgreSQL, says so instead of refusing connections.
pub async fn serve_unavailable(
    listener: &TcpListener,
    why: &'static str,
    ready: impl Future<Output = ()>,
) {
    tokio::pin!(ready);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut ready => return,
        };
        tokio::spawn(async move {
            let service = service_fn(move |_request: hyper::Request<Incoming>| async move {
                let mut response = ApiError::Unavailable(why.into()).into_response();
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                Ok::<_, Infallible>(response.map(Full::new))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The metrics listener on `METRICS_PORT` (none when it is 0). A port that cannot be bound is
/// logged and the API served without it: metrics are not worth an outage.
async fn metrics_listener(state: &AppState) -> Option<TcpListener> {
    let port = state.config.metrics_port;
    if port == 0 {
        return None;
    }
    let addr = std::net::SocketAddr::new(state.config.host, port);
    match TcpListener::bind(addr).await {
        Ok(listener) => {
            tracing::info!(%addr, "metrics on /metrics");
            Some(listener)
        }
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen for metrics; serving without them");
            None
        }
    }
}

/// Connections the metrics port serves at once: Prometheus needs one or two.
const METRICS_CONNECTIONS: usize = 8;

/// `GET /metrics` (Prometheus text) on its own port, never on the public one: a client of the
/// API can neither read it nor reach it. Knative allows a Service one container port, so
/// this one is not declared; Prometheus scrapes it on the pod IP (see the README).
async fn serve_metrics(listener: TcpListener, state: AppState) {
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let timeout = state.config.header_read_timeout();
            let service = service_fn(move |request: hyper::Request<Incoming>| {
                let response = metrics_response(&request, &state);
                async move { Ok::<_, Infallible>(response.map(Full::new)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `/metrics` answers GET and HEAD; nothing else is there.
fn metrics_response(request: &hyper::Request<Incoming>, state: &AppState) -> http::Response<Bytes> {
    match (request.uri().path(), request.method()) {
        ("/metrics", &http::Method::GET | &http::Method::HEAD) => http::Response::builder()
            .status(http::StatusCode::OK)
            .header(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )
            .body(Bytes::from(meters::render(&state.pool)))
            .expect("static response is valid"),
        ("/metrics", _) => {
            ApiError::MethodNotAllowed(vec![http::Method::GET, http::Method::HEAD]).into_response()
        }
        _ => ApiError::NotFound.into_response(),
    }
}

/// Request heads (line and headers) larger than this are refused (431).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Whether the client shows, within `limit`, which protocol it speaks: any first bytes that
/// are not the start of an HTTP/2 preface, or the whole preface. A client that sends nothing,
/// or stalls inside the preface, is dropped when the limit passes.
async fn protocol_known_in_time(
    stream: &tokio::net::TcpStream,
    limit: std::time::Duration,
) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let known = async {
        let mut buf = [0u8; PREFACE.len()];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if n == PREFACE.len() || buf[..n] != PREFACE[..n] => return true,
                // Part of a preface: wait for more (peek returns at once while data waits).
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
    };
    tokio::time::timeout(limit, known).await.unwrap_or(false)
}

/// One request from hyper: the body is read (capped) as part of answering it.
async fn answer(
    request: hyper::Request<Incoming>,
    router: &Router,
    state: AppState,
) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit_ms = state.config.body_read_timeout_ms;
    let body = async move {
        tokio::time::timeout(
            std::time::Duration::from_millis(limit_ms),
            read_body(declared, body),
        )
        .await
        .unwrap_or(Err(ApiError::RequestTimeout { limit_ms }))
    };
    let mut response = respond(parts, body, router, state).await;
    if response.status() == http::StatusCode::REQUEST_TIMEOUT {
        // The rest of the body may still come: this connection cannot carry another request.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response.map(Full::new)
}

/// Reads the body into memory, refusing more than [`BODY_LIMIT`] bytes: at once when the
/// declared length says so, else as soon as the stream passes the limit.
async fn read_body(declared: Option<u64>, body: Incoming) -> Result<Bytes, ApiError> {
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return Err(ApiError::PayloadTooLarge { limit: BODY_LIMIT });
    }
    Ok(Limited::new(body, BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                ApiError::PayloadTooLarge { limit: BODY_LIMIT }
            } else {
                ApiError::InvalidRequest(format!("the body could not be read: {e}"))
            }
        })?
        .to_bytes())
}
