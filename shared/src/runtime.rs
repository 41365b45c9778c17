//! The hyper server every function runs in: listener on `$HOST:$PORT`, body cap, request id,
//! access log, and graceful shutdown on SIGTERM or Ctrl-C (the Knative runtime contract).

use std::convert::Infallible;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::db;
use crate::error::ApiError;
use crate::router::{Access, AppState, Route, Router};
use crate::{lambda, meters, telemetry};

/// Bodies larger than this are refused with 413 before they are read into memory.
pub const BODY_LIMIT: usize = 64 * 1024;

const REQUEST_ID: &str = "x-request-id";

/// The whole life of a deployed function: config, telemetry, lazy pool, serve until SIGTERM.
/// Each function's `main` is one call to this.
pub fn run(name: &'static str, routes: Vec<Route>) -> ExitCode {
    run_worker(name, move |state| async move {
        // There is no way to run a deployed function with authentication off.
        if state.verifier.is_none() && routes.iter().any(|r| r.access == Access::Authenticated) {
            eprintln!(
                "{name}: configuration error: set JWT_HS256_SECRET or JWT_PUBLIC_KEY_PEM (this function's routes need a bearer token)"
            );
            return ExitCode::FAILURE;
        }
        // The adapter is chosen here, before lambda_http could panic for want of its variables.
        if lambda::is_lambda() {
            tracing::info!(function = name, "serving AWS Lambda invocations");
            meters::install();
            return match lambda::serve(Router::new().mount(routes), state).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(function = name, error = %e, "the Lambda runtime stopped");
                    ExitCode::FAILURE
                }
            };
        }
        let addr = SocketAddr::new(state.config.host, state.config.port);
        let listener = match TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("{name}: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(function = name, %addr, "listening");
        serve(
            listener,
            Router::new().mount(routes),
            state,
            shutdown_signal(),
        )
        .await;
        tracing::info!(function = name, "stopped");
        ExitCode::SUCCESS
    })
}

/// Like [`run`], for a process that does something other than serve HTTP (the order
/// processor's loop): the same config, telemetry and pool, then `work` until it returns.
pub fn run_worker<F, Fut>(name: &'static str, work: F) -> ExitCode
where
    F: FnOnce(AppState) -> Fut,
    Fut: Future<Output = ExitCode>,
{
    let (config, runtime) = match start(name, Logs::Stdout) {
        Ok(started) => started,
        Err(code) => return code,
    };
    // bb8 starts its reaper task when the pool is built: that needs the runtime.
    let _guard = runtime.enter();
    let pool = match db::lazy_pool(&config, name) {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let state = match AppState::new(pool, config) {
        Ok(state) => state,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(work(state))
}

/// Where a process's JSON log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logs {
    /// Servers and workers.
    Stdout,
    /// Commands whose stdout is their result.
    Stderr,
}

/// What every process does first: settings from the environment, telemetry, the async
/// runtime. Any failure is one line on stderr naming `name`, and the exit code to return.
pub fn start(name: &str, logs: Logs) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    let config = Config::from_env().map_err(|e| {
        eprintln!("{name}: {e}");
        ExitCode::FAILURE
    })?;
    match logs {
        Logs::Stdout => telemetry::init(&config.log_level),
        Logs::Stderr => telemetry::init_stderr(&config.log_level),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("{name}: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })?;
    Ok((config, runtime))
}

/// Resolves on SIGTERM (what Kubernetes sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on Unix");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

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
    let router = Arc::new(router);
    let header_timeout = state.config.header_read_timeout();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Request heads: at most 64 KiB, and whole within the timeout (a timer makes hyper's
    // header-read timeout effective). HTTP/2 connections are pinged, so a dead peer goes.
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
        let router = router.clone();
        let state = state.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            // hyper's header timeout starts once it knows the protocol: until then (nothing
            // sent, or half an HTTP/2 preface) this bound applies.
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
        });
    }
    drop(listener);
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

    let (result, route) = match body.await {
        Ok(bytes) => {
            router
                .dispatch(http::Request::from_parts(parts, bytes), state)
                .await
        }
        Err(e) => (Err(e), "unmatched"),
    };
    let mut response = result.unwrap_or_else(|e| {
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
    });
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
