//! Prometheus metrics: one recorder per process (the `metrics` facade with the Prometheus
//! exporter, no HTTP listener of its own), rendered by the router at `/metrics`.
//!
//! Names: `tally_http_requests_total` and `tally_http_request_duration_seconds` by route
//! pattern, method and status; `tally_db_*` for the pool and statements; the functions add
//! their own (`tally_orders_*`, `tally_processor_*`, `tally_backup_*`).

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::db::Pool;
use crate::error::ApiError;

/// Seconds: from half a millisecond (a cached read) to ten seconds (a timed-out request).
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Installs the recorder once per process and returns its handle. Later calls return the
/// same handle (tests run many servers in one process).
pub fn install() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
            .expect("the buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed");
        }
        handle
    })
}

/// Drains histogram samples into their buckets now and then, so that memory stays flat when
/// nobody scrapes. Runs until the runtime stops.
pub fn spawn_upkeep() {
    let handle = install();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

/// The Prometheus text, with the pool gauges read at this moment.
pub fn render(pool: &Pool) -> String {
    let state = pool.state();
    gauge!("tally_db_pool_connections", "state" => "idle").set(f64::from(state.idle_connections));
    gauge!("tally_db_pool_connections", "state" => "in_use")
        .set(f64::from(state.connections - state.idle_connections));
    install().render()
}

/// One request: counted and timed by route pattern (not the raw path, which would make a
/// series per order id), method and status.
pub fn record_request(route: &'static str, method: &str, status: u16, elapsed: Duration) {
    let labels = [
        ("route", route.to_owned()),
        ("method", method_label(method).to_owned()),
        ("status", status.to_string()),
    ];
    counter!("tally_http_requests_total", &labels).increment(1);
    histogram!("tally_http_request_duration_seconds", &labels).record(elapsed);
}

/// The method as a metric label: the standard ones by name, anything a client invents as
/// `other`. Every label value is from a fixed set (routes are templates, statuses three
/// digits), so a hostile client cannot grow `/metrics`, or the memory behind it, without bound.
fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
    ];
    KNOWN.into_iter().find(|m| *m == method).unwrap_or("other")
}

/// Times one database statement under `statement`.
pub async fn timed<F: Future>(statement: &'static str, work: F) -> F::Output {
    let started = Instant::now();
    let out = work.await;
    histogram!("tally_db_statement_duration_seconds", "statement" => statement)
        .record(started.elapsed());
    out
}

/// A pooled connection, or 503 after `POOL_TIMEOUT_MS`; the wait is measured. Handlers get
/// theirs through `AppState::db` or `sql::query`; a worker with only the pool calls this.
pub async fn checkout(pool: &crate::db::Pool) -> Result<crate::db::Connection<'_>, ApiError> {
    let _wait = PoolWait::start();
    Ok(pool.get().await?)
}

/// Around a wait for a pooled connection: how many wait, and for how long.
pub(crate) struct PoolWait(Instant);

impl PoolWait {
    pub(crate) fn start() -> Self {
        gauge!("tally_db_pool_waiting").increment(1.0);
        Self(Instant::now())
    }
}

impl Drop for PoolWait {
    fn drop(&mut self) {
        gauge!("tally_db_pool_waiting").decrement(1.0);
        histogram!("tally_db_pool_wait_seconds").record(self.0.elapsed());
    }
}
