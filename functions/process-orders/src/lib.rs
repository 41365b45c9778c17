//! `process-orders`: moves PENDING orders on. One sweep:
//! 1. expires PENDING orders older than `ORDER_TTL_SECS` that nobody holds (FAILED, restocked);
//! 2. claims a batch with `FOR UPDATE SKIP LOCKED`, setting a lease, and commits the claim;
//! 3. runs the fulfilment step for each claimed order outside any transaction, bounded by what
//!    is left of the lease and with its panics caught, and records its outcome at once
//!    (CONFIRMED; FAILED with restock; lease released for a retry; or, when the step panicked
//!    or was cut off, the claim left to run out);
//! 4. deletes idempotency keys older than `IDEMPOTENCY_RETENTION_SECS`.
//!
//! Then it publishes the outbox rows left behind (`events`). Between sweeps, an order's
//! `placed` event (from a Knative Trigger, or the local runner) runs that one order's step at
//! once, with the same claim, so an event and a sweep never both run it.
//!
//! Many processors may run at once: a claimed order is invisible to the others until its lease
//! runs out, and every status change is guarded by the status it expects.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use http::{Method, StatusCode};
use metrics::{counter, gauge};
use serde::{Deserialize, Serialize};
use tally_shared::events::{self, AttributesReader, Publisher};
use tally_shared::http::json_response;
use tally_shared::router::HandlerResult;
use tally_shared::{ApiError, AppState, Pool, Request, Route, app, auth, meters, outcomes, sql};
use tokio_postgres::types::Type;

/// The processor's own settings, from the environment; checked when read, so a bad value
/// stops the process at start rather than failing (or panicking) in a sweep later.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawProcessorConfig")]
pub struct ProcessorConfig {
    /// A PENDING order older than this is expired (its reservation lapses).
    pub order_ttl_secs: f64,
    /// How long a claim keeps other processors away while the step runs. A step is cut off
    /// when it would outlive it.
    pub claim_lease_secs: f64,
    pub process_batch_size: i64,
    pub idempotency_retention_secs: f64,
    /// A step that panics or outlives its lease this many times fails its order (a poison
    /// order would otherwise be claimed, and crash or time out, on every sweep until it expires).
    pub process_max_attempts: i32,
    /// An order's `placed` event waits this long before its step runs (locally, so a developer
    /// can try cancelling a PENDING order; 0 in production).
    pub fulfilment_delay_ms: u64,
    /// How long an outbox row is left to the function that wrote it before the sweep publishes
    /// it (placed and cancelled events; the processor's own go out at once).
    pub outbox_grace_secs: f64,
}

/// The settings as written, before [`ProcessorConfig`] checks them.
#[derive(Deserialize)]
struct RawProcessorConfig {
    #[serde(default = "defaults::order_ttl_secs")]
    order_ttl_secs: f64,
    #[serde(default = "defaults::claim_lease_secs")]
    claim_lease_secs: f64,
    #[serde(default = "defaults::batch_size")]
    process_batch_size: i64,
    #[serde(default = "defaults::retention_secs")]
    idempotency_retention_secs: f64,
    #[serde(default = "defaults::max_attempts")]
    process_max_attempts: i32,
    #[serde(default)]
    fulfilment_delay_ms: u64,
    #[serde(default = "defaults::outbox_grace_secs")]
    outbox_grace_secs: f64,
}

impl TryFrom<RawProcessorConfig> for ProcessorConfig {
    type Error = String;

    fn try_from(raw: RawProcessorConfig) -> Result<Self, String> {
        let seconds = [
            ("ORDER_TTL_SECS", raw.order_ttl_secs, 1.0),
            ("CLAIM_LEASE_SECS", raw.claim_lease_secs, 0.1),
            ("OUTBOX_GRACE_SECS", raw.outbox_grace_secs, 0.0),
            // A key must outlive any client's retries, or a retried order is placed twice.
            (
                "IDEMPOTENCY_RETENTION_SECS",
                raw.idempotency_retention_secs,
                3600.0,
            ),
        ];
        for (name, value, least) in seconds {
            // A day's worth of years is far past any sane value, and keeps Duration happy.
            if !(least..=1e9).contains(&value) {
                return Err(format!(
                    "{name}={value} must be between {least} and 1e9 seconds"
                ));
            }
        }
        if !(1..=10_000).contains(&raw.process_batch_size) {
            return Err(format!(
                "PROCESS_BATCH_SIZE={} must be between 1 and 10000",
                raw.process_batch_size
            ));
        }
        // The event's sender waits for the answer (the publish times out at 5 s).
        if raw.fulfilment_delay_ms > 4_000 {
            return Err(format!(
                "FULFILMENT_DELAY_MS={} must be at most 4000",
                raw.fulfilment_delay_ms
            ));
        }
        if !(1..=1_000).contains(&raw.process_max_attempts) {
            return Err(format!(
                "PROCESS_MAX_ATTEMPTS={} must be between 1 and 1000",
                raw.process_max_attempts
            ));
        }
        Ok(Self {
            order_ttl_secs: raw.order_ttl_secs,
            claim_lease_secs: raw.claim_lease_secs,
            process_batch_size: raw.process_batch_size,
            idempotency_retention_secs: raw.idempotency_retention_secs,
            process_max_attempts: raw.process_max_attempts,
            fulfilment_delay_ms: raw.fulfilment_delay_ms,
            outbox_grace_secs: raw.outbox_grace_secs,
        })
    }
}

mod defaults {
    pub fn order_ttl_secs() -> f64 {
        15.0 * 60.0
    }
    pub fn claim_lease_secs() -> f64 {
        60.0
    }
    pub fn batch_size() -> i64 {
        100
    }
    pub fn retention_secs() -> f64 {
        24.0 * 3600.0
    }
    pub fn outbox_grace_secs() -> f64 {
        10.0
    }
    pub fn max_attempts() -> i32 {
        5
    }
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            order_ttl_secs: defaults::order_ttl_secs(),
            claim_lease_secs: defaults::claim_lease_secs(),
            process_batch_size: defaults::batch_size(),
            idempotency_retention_secs: defaults::retention_secs(),
            process_max_attempts: defaults::max_attempts(),
            fulfilment_delay_ms: 0,
            outbox_grace_secs: defaults::outbox_grace_secs(),
        }
    }
}

/// An order the processor holds the lease on.
#[derive(Debug, Clone)]
pub struct ClaimedOrder {
    pub id: i64,
    pub user_id: i64,
    pub total_cents: i64,
    /// The claim token: the order's `attempts` when this processor claimed it. Outcomes are
    /// recorded only while it still matches, so a lapsed claim is never acted on twice.
    pub attempts: i32,
}

/// What the fulfilment step decided for one order.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    Confirmed,
    /// The order cannot be fulfilled: FAILED, stock returned.
    Failed(String),
    /// Try again on a later sweep (until the order's TTL expires it).
    RetryLater(String),
}

pub type StepFuture<'a> = Pin<Box<dyn Future<Output = StepOutcome> + Send + 'a>>;

/// The pluggable payment/fulfilment step. It runs with no transaction open and no lock held.
pub trait FulfilmentStep: Send + Sync {
    fn run<'a>(&'a self, order: &'a ClaimedOrder) -> StepFuture<'a>;
}

/// The default step: every order is confirmed.
pub struct ConfirmAll;

impl FulfilmentStep for ConfirmAll {
    fn run<'a>(&'a self, _order: &'a ClaimedOrder) -> StepFuture<'a> {
        Box::pin(async { StepOutcome::Confirmed })
    }
}

/// What one sweep did; the HTTP function returns it as JSON.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct SweepSummary {
    pub claimed: u64,
    pub confirmed: u64,
    pub failed: u64,
    pub retried: u64,
    pub expired: u64,
    pub keys_deleted: u64,
    /// Claimed, but the lease ran out before the step could start: left for the next sweep.
    pub lapsed: u64,
    /// The step finished, but another processor had taken the order over meanwhile: what the
    /// step did (a payment, say) was not recorded and needs compensation.
    pub lost_claims: u64,
    /// The step panicked or was cut off at the end of its lease: what it did is unknown; the
    /// claim runs out and the order is claimed again.
    pub outcome_unknown: u64,
}

impl SweepSummary {
    fn is_idle(&self) -> bool {
        *self == Self::default()
    }
}

const EXPIRE_SQL: &str = "SELECT expire_one_order($1)";
const CLAIM_SQL: &str = "UPDATE orders o \
     SET claimed_until = now() + make_interval(secs => $2), attempts = o.attempts + 1 \
     WHERE o.id IN (SELECT id FROM orders \
                    WHERE status = 'PENDING' \
                      AND created_at >= now() - make_interval(secs => $1) \
                      AND created_at < now() - make_interval(secs => $4) \
                      AND (claimed_until IS NULL OR claimed_until < now()) \
                    ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
     RETURNING o.id, o.user_id, o.total_cents, o.attempts";
const CONFIRM_SQL: &str = "UPDATE orders SET status = 'CONFIRMED', claimed_until = NULL, \
     updated_at = now() WHERE id = $1 AND attempts = $2 AND status = 'PENDING'";
const NOTE_FAILURE_SQL: &str = "UPDATE orders \
     SET last_error = $3 || coalesce(' (before: ' || last_error || ')', '') \
     WHERE id = $1 AND attempts = $2 AND status = 'PENDING'";
const FAIL_SQL: &str = "SELECT outcome FROM fail_claimed_order($1, $2)";
const RETRY_SQL: &str = "UPDATE orders SET claimed_until = NULL, last_error = $2 \
     WHERE id = $1 AND attempts = $3 AND status = 'PENDING'";
const FORGET_KEYS_SQL: &str =
    "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)";

/// Counters the alerts name exist from the process's first request on, at 0: a series that
/// appears at 1 is one `increase()` cannot see.
fn declare_metrics() {
    // Once per process: every later increment finds them registered.
    static DECLARED: std::sync::Once = std::sync::Once::new();
    DECLARED.call_once(declare_metrics_now);
}

fn declare_metrics_now() {
    for step_outcome in ["confirmed", "failed"] {
        counter!("tally_processor_lost_claims_total", "step_outcome" => step_outcome).increment(0);
    }
    for kind in ["placed", "ping", "other"] {
        counter!("tally_events_dead_lettered_total", "type" => kind).increment(0);
    }
    counter!("tally_events_published_total", "type" => "confirmed").increment(0);
}

/// One sweep. Each statement is its own short transaction; the step runs between them.
pub async fn sweep(
    pool: &Pool,
    config: &ProcessorConfig,
    step: &dyn FulfilmentStep,
) -> Result<SweepSummary, ApiError> {
    declare_metrics();
    let mut summary = SweepSummary::default();
    let result = sweep_into(pool, config, step, &mut summary).await;
    if result.is_ok() {
        // The alert on a silent processor reads this: a pod the pings keep alive whose sweeps
        // all fail still reports an old age, but no new success.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        gauge!("tally_processor_last_sweep_timestamp_seconds").set(now);
    }
    // What was recorded before an error is counted too: it happened.
    counter!("tally_processor_sweeps_total", "result" => if result.is_ok() { "ok" } else { "error" })
        .increment(1);
    for (outcome, n) in [
        ("claimed", summary.claimed),
        ("confirmed", summary.confirmed),
        ("failed", summary.failed),
        ("retried", summary.retried),
        ("expired", summary.expired),
        ("keys_deleted", summary.keys_deleted),
        ("lapsed", summary.lapsed),
        ("outcome_unknown", summary.outcome_unknown),
    ] {
        counter!("tally_processor_orders_total", "outcome" => outcome).increment(n);
    }
    result.map(|()| summary)
}

/// A sweep's phases: expire and claim on one connection; then, order by order, run the step
/// with no connection held and record its outcome at once, so a crash or a lost database
/// loses at most the step in flight; last, forget old idempotency keys.
async fn sweep_into(
    pool: &Pool,
    config: &ProcessorConfig,
    step: &dyn FulfilmentStep,
    summary: &mut SweepSummary,
) -> Result<(), ApiError> {
    let (claimed, claimed_at) = {
        let conn = meters::checkout(pool).await?;
        summary.expired = expire(&conn, config).await?;
        (claim(&conn, config).await?, Instant::now())
    };
    summary.claimed = claimed.len() as u64;
    // The lease, less a margin for recording the outcome: every step must end before it.
    let deadline = claimed_at + Duration::from_secs_f64(config.claim_lease_secs * 0.9);
    for order in &claimed {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            // Another processor may claim it now; this one leaves it alone.
            summary.lapsed += 1;
            continue;
        }
        let decision = run_step(step, order, remaining, config).await;
        let recorded = match meters::checkout(pool).await {
            Ok(conn) => record(&conn, order, decision, summary).await,
            Err(e) => Err(e),
        };
        if let Err(e) = recorded {
            // The claim runs out and the order is claimed again: a step that already ran will
            // run again, so say so.
            tracing::error!(
                order_id = order.id,
                cause = e.internal_cause().unwrap_or(""),
                "the step's outcome could not be recorded; the sweep stops here"
            );
            return Err(e);
        }
    }
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] =
        [(&config.idempotency_retention_secs, Type::FLOAT8)];
    let conn = meters::checkout(pool).await?;
    let forget = conn.execute_typed(FORGET_KEYS_SQL, &params);
    summary.keys_deleted = meters::timed("forget_keys", forget).await?;
    let oldest = meters::timed("oldest_pending", conn.query_typed(OLDEST_PENDING_SQL, &[])).await?;
    // The alert on a stuck order reads this (and fires on its absence: a processor that has
    // stopped sweeping reports nothing at all).
    gauge!("tally_oldest_pending_order_age_seconds")
        .set(oldest.first().map_or(0.0, |row| row.get::<_, f64>(0)));
    Ok(())
}

/// How long the oldest PENDING order has waited (0 when there is none), from the partial index
/// of PENDING orders.
const OLDEST_PENDING_SQL: &str = "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 \
     FROM orders WHERE status = 'PENDING'";

/// What became of one claimed order's step.
enum Decision {
    /// The step said.
    Step(StepOutcome),
    /// It panicked or was cut off at the end of its lease: it may have done its work (taken
    /// a payment) or not. The claim is left to run out, so nobody retries it before then, and
    /// the order is claimed again later; after `PROCESS_MAX_ATTEMPTS` claims it fails.
    Unknown(String),
}

/// Runs one order's step, cut off when its lease would run out, with its panics caught. An
/// order claimed more than `PROCESS_MAX_ATTEMPTS` times fails without running again: a step
/// that crashes the whole process never reaches an outcome at all.
async fn run_step(
    step: &dyn FulfilmentStep,
    order: &ClaimedOrder,
    remaining: Duration,
    config: &ProcessorConfig,
) -> Decision {
    if order.attempts > config.process_max_attempts {
        counter!("tally_processor_step_troubles_total", "kind" => "gave_up").increment(1);
        return Decision::Step(StepOutcome::Failed(format!(
            "gave up after {} claims without an outcome (PROCESS_MAX_ATTEMPTS={})",
            order.attempts - 1,
            config.process_max_attempts
        )));
    }
    // The call inside the async block, so a step that panics before returning its future is
    // caught as well.
    let run = std::panic::AssertUnwindSafe(async { step.run(order).await }).catch_unwind();
    let (kind, trouble) = match tokio::time::timeout(remaining, run).await {
        Ok(Ok(outcome)) => return Decision::Step(outcome),
        Ok(Err(panic)) => (
            "panic",
            format!("the fulfilment step panicked: {}", panic_text(&*panic)),
        ),
        Err(_) => (
            "timeout",
            format!("the fulfilment step was cut off after {remaining:?}, at the end of its lease"),
        ),
    };
    counter!("tally_processor_step_troubles_total", "kind" => kind).increment(1);
    tracing::error!(
        order_id = order.id,
        attempts = order.attempts,
        trouble,
        "fulfilment step ended without an outcome: what it did is unknown; the order is claimed again after its lease"
    );
    Decision::Unknown(trouble)
}

/// A panic's message, when it has one.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

outcomes! {
    /// What `fail_claimed_order` answers.
    enum Failed {
        Released = "released",
        ClaimLost = "claim_lost",
        NotFound = "not_found",
        InvalidTransition = "invalid_transition",
    }
}

/// Expires up to a batch of PENDING orders past their time to live, one at a time.
async fn expire(conn: &tokio_postgres::Client, config: &ProcessorConfig) -> Result<u64, ApiError> {
    let mut expired = 0;
    for _ in 0..config.process_batch_size {
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] =
            [(&config.order_ttl_secs, Type::FLOAT8)];
        let row = meters::timed("expire_order", conn.query_typed(EXPIRE_SQL, &params)).await?;
        match row.first().and_then(|r| r.get::<_, Option<i64>>(0)) {
            Some(_) => expired += 1,
            None => break,
        }
    }
    Ok(expired)
}

/// Claims up to a batch of PENDING orders for the lease.
async fn claim(
    conn: &tokio_postgres::Client,
    config: &ProcessorConfig,
) -> Result<Vec<ClaimedOrder>, ApiError> {
    // An order's fulfilment delay holds the sweep back too, not only its event.
    let delay_secs = config.fulfilment_delay_ms as f64 / 1000.0;
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 4] = [
        (&config.order_ttl_secs, Type::FLOAT8),
        (&config.claim_lease_secs, Type::FLOAT8),
        (&config.process_batch_size, Type::INT8),
        (&delay_secs, Type::FLOAT8),
    ];
    let mut claimed: Vec<ClaimedOrder> =
        meters::timed("claim_orders", conn.query_typed(CLAIM_SQL, &params))
            .await?
            .iter()
            .map(|r| ClaimedOrder {
                id: r.get(0),
                user_id: r.get(1),
                total_cents: r.get(2),
                attempts: r.get(3),
            })
            .collect();
    // RETURNING keeps no order: oldest first, as they were picked.
    claimed.sort_unstable_by_key(|o| o.id);
    Ok(claimed)
}

/// Writes one step's outcome, only while this processor's claim token still holds.
async fn record(
    conn: &tokio_postgres::Client,
    order: &ClaimedOrder,
    decision: Decision,
    summary: &mut SweepSummary,
) -> Result<(), ApiError> {
    let claim: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
        [(&order.id, Type::INT8), (&order.attempts, Type::INT4)];
    let outcome = match decision {
        Decision::Step(outcome) => outcome,
        Decision::Unknown(trouble) => {
            // Said on the order; the claim itself is left to run out.
            note_failure(conn, order, &trouble).await?;
            summary.outcome_unknown += 1;
            return Ok(());
        }
    };
    match outcome {
        StepOutcome::Confirmed => {
            let confirm = conn.execute_typed(CONFIRM_SQL, &claim);
            match meters::timed("confirm_order", confirm).await? {
                0 => lost_claim(order, "confirmed", summary),
                _ => summary.confirmed += 1,
            }
        }
        StepOutcome::Failed(reason) => {
            // The reason first, under the same guard, so a FAILED order says why.
            note_failure(conn, order, &reason).await?;
            let rows = meters::timed("fail_order", conn.query_typed(FAIL_SQL, &claim)).await?;
            // An answer this code does not know is logged, and the sweep goes on.
            match rows
                .first()
                .map(|row| sql::outcome::<Failed>(row, 0, "fail_claimed_order"))
            {
                Some(Ok(Failed::Released)) => summary.failed += 1,
                Some(Ok(Failed::ClaimLost)) => lost_claim(order, "failed", summary),
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::error!(
                    order_id = order.id,
                    cause = e.internal_cause(),
                    "failing an order"
                ),
                None => tracing::error!(order_id = order.id, "fail_claimed_order returned no row"),
            }
            tracing::info!(
                order_id = order.id,
                reason,
                "order failed by the fulfilment step"
            );
        }
        StepOutcome::RetryLater(reason) => {
            let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] = [
                (&order.id, Type::INT8),
                (&reason, Type::TEXT),
                (&order.attempts, Type::INT4),
            ];
            // A lapsed claim needs nothing here: the order is simply someone else's now.
            summary.retried +=
                meters::timed("retry_order", conn.execute_typed(RETRY_SQL, &params)).await?;
        }
    }
    Ok(())
}

/// Writes why on the order (the earlier reasons kept after it), while the claim holds.
async fn note_failure(
    conn: &tokio_postgres::Client,
    order: &ClaimedOrder,
    reason: &String,
) -> Result<(), ApiError> {
    let note: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] = [
        (&order.id, Type::INT8),
        (&order.attempts, Type::INT4),
        (reason, Type::TEXT),
    ];
    meters::timed("note_failure", conn.execute_typed(NOTE_FAILURE_SQL, &note)).await?;
    Ok(())
}

/// The step ran to its end, but the order was claimed again meanwhile (the lease ran out):
/// its outcome is dropped, and whatever the step did outside the database needs undoing.
fn lost_claim(order: &ClaimedOrder, step_outcome: &'static str, summary: &mut SweepSummary) {
    summary.lost_claims += 1;
    counter!("tally_processor_lost_claims_total", "step_outcome" => step_outcome).increment(1);
    tracing::warn!(
        order_id = order.id,
        attempts = order.attempts,
        step_outcome,
        "claim lost while the step ran: its outcome was not recorded; what the step did needs compensation"
    );
}

/// Sweeps every `every` until `shutdown` resolves; a failed sweep is logged and retried.
pub async fn run_every(
    pool: Pool,
    config: ProcessorConfig,
    step: Arc<dyn FulfilmentStep>,
    events: Publisher,
    every: Duration,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticks.tick() => {}
        }
        let swept = sweep(&pool, &config, step.as_ref()).await;
        if let Err(e) = publish_outbox(&pool, &config, &events).await {
            tracing::warn!(error = e.code(), "publishing the outbox failed");
        }
        match swept {
            Ok(summary) if summary.is_idle() => {}
            Ok(summary) => tracing::info!(?summary, "sweep"),
            Err(e) => tracing::warn!(
                error = e.code(),
                cause = e.internal_cause().unwrap_or(""),
                "sweep failed"
            ),
        }
    }
}

/// The outbox rows left behind: the processor's own events (confirmed, expired, failed) at
/// once, the others once their writer has had `OUTBOX_GRACE_SECS`.
async fn publish_outbox(
    pool: &Pool,
    config: &ProcessorConfig,
    events: &Publisher,
) -> Result<u64, ApiError> {
    let grace = Duration::from_secs_f64(config.outbox_grace_secs);
    events::publish_left_behind(pool, events, grace, config.process_batch_size).await
}

/// POST / runs one sweep and answers its summary (for a CronJob, or an operator). It needs an
/// admin token, like every endpoint that changes state.
pub fn routes() -> Vec<Route> {
    vec![Route::new(Method::POST, "/", sweep_once)]
}

async fn sweep_once(request: Request, state: AppState) -> HandlerResult {
    auth::principal(&request)?.require_admin()?;
    let config = state.extension::<ProcessorConfig>()?;
    let summary = sweep(&state.pool, config, &ConfirmAll).await?;
    if let Err(e) = publish_outbox(&state.pool, config, &state.events).await {
        tracing::warn!(error = e.code(), "publishing the outbox failed");
    }
    json_response(StatusCode::OK, &summary)
}

/// The routes events arrive on, from a Knative Trigger (and the local runner's delivery) and a
/// PingSource. No token: events carry none. So they are mounted only on the processor's own,
/// cluster-local service, whose NetworkPolicy admits the broker, the ping source and the
/// activator alone (README, "Events"); the runner does not put them on its public port.
/// - `POST /events`: `dev.tally.order.placed` runs that one order's step;
///   `dev.knative.sources.ping` runs a sweep; any other type is acknowledged and ignored.
/// - `POST /dead-letter`: the Trigger's `deadLetterSink`, for what could not be delivered.
pub fn event_routes() -> Vec<Route> {
    vec![
        Route::public(Method::POST, "/events", on_event),
        Route::public(Method::POST, "/dead-letter", on_dead_letter),
    ]
}

const CLAIM_ONE_SQL: &str = "UPDATE orders o \
     SET claimed_until = now() + make_interval(secs => $2), attempts = o.attempts + 1 \
     WHERE o.id = $1 AND o.status = 'PENDING' \
       AND o.created_at >= now() - make_interval(secs => $3) \
       AND (o.claimed_until IS NULL OR o.claimed_until < now()) \
     RETURNING o.id, o.user_id, o.total_cents, o.attempts";

async fn on_event(request: Request, state: AppState) -> HandlerResult {
    declare_metrics();
    let event = events::read_event(&request)?;
    let config = state.extension::<ProcessorConfig>()?;
    let answer = match event.ty() {
        events::PLACED => {
            let order_id = events::order_of(&event).ok_or_else(|| {
                ApiError::InvalidRequest("an order event names its order in subject".into())
            })?;
            let summary = handle_placed(&state.pool, config, &ConfirmAll, order_id).await?;
            // Only the event this call wrote goes out (queued, after the answer): publishing
            // the whole outbox from every event would republish what other calls are publishing.
            let written = (summary.confirmed == 1)
                .then_some(events::CONFIRMED)
                .or((summary.failed == 1).then_some(events::FAILED));
            if let Some(event_type) = written {
                state
                    .events
                    .spawn_deliver(&state.pool, order_id, event_type);
            }
            serde_json::to_value(summary)
        }
        events::PING => {
            let summary = sweep(&state.pool, config, &ConfirmAll).await?;
            // The order events are handled by now; an outbox that cannot be published is the
            // next ping's, not a reason to have the ping sent again.
            if let Err(e) = publish_outbox(&state.pool, config, &state.events).await {
                tracing::warn!(error = e.code(), "publishing the outbox failed");
            }
            serde_json::to_value(summary)
        }
        _ => Ok(serde_json::json!({ "ignored": event.ty() })),
    }
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    json_response(StatusCode::OK, &answer)
}

/// One order's `placed` event: claim it (only while PENDING and nobody holds it, so a
/// redelivered or duplicated event finds nothing to do), run its step, record the outcome.
pub async fn handle_placed(
    pool: &Pool,
    config: &ProcessorConfig,
    step: &dyn FulfilmentStep,
    order_id: i64,
) -> Result<SweepSummary, ApiError> {
    if config.fulfilment_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(config.fulfilment_delay_ms)).await;
    }
    let mut summary = SweepSummary::default();
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] = [
        (&order_id, Type::INT8),
        (&config.claim_lease_secs, Type::FLOAT8),
        (&config.order_ttl_secs, Type::FLOAT8),
    ];
    let conn = meters::checkout(pool).await?;
    let claimed = meters::timed("claim_order", conn.query_typed(CLAIM_ONE_SQL, &params)).await?;
    let claimed_at = Instant::now();
    let Some(row) = claimed.first() else {
        counter!("tally_processor_events_total", "outcome" => "nothing_to_do").increment(1);
        return Ok(summary);
    };
    let order = ClaimedOrder {
        id: row.get(0),
        user_id: row.get(1),
        total_cents: row.get(2),
        attempts: row.get(3),
    };
    drop(conn);
    summary.claimed = 1;
    let deadline = claimed_at + Duration::from_secs_f64(config.claim_lease_secs * 0.9);
    let remaining = deadline.saturating_duration_since(Instant::now());
    let decision = run_step(step, &order, remaining, config).await;
    let conn = meters::checkout(pool).await?;
    record(&conn, &order, decision, &mut summary).await?;
    counter!("tally_processor_events_total", "outcome" => "handled").increment(1);
    Ok(summary)
}

async fn on_dead_letter(request: Request, _state: AppState) -> HandlerResult {
    declare_metrics();
    let event = events::read_event(&request)?;
    let kind = match event.ty() {
        events::PLACED => "placed",
        events::PING => "ping",
        _ => "other",
    };
    counter!("tally_events_dead_lettered_total", "type" => kind).increment(1);
    tracing::error!(
        id = event.id(),
        event_type = event.ty(),
        "an event could not be delivered after every retry: its order is swept instead"
    );
    json_response(
        StatusCode::OK,
        &serde_json::json!({ "dead_lettered": event.id() }),
    )
}

/// The binary's entry point: `--every DURATION` runs the loop, no arguments serves HTTP.
pub fn main(mut args: impl Iterator<Item = String>) -> ExitCode {
    let every = match (args.next().as_deref(), args.next()) {
        (None, _) => None,
        (Some("--every"), Some(value)) => match humantime::parse_duration(&value) {
            Ok(d) if !d.is_zero() => Some(d),
            _ => {
                eprintln!("process-orders: --every takes a duration such as 1s or 500ms");
                return ExitCode::FAILURE;
            }
        },
        _ => {
            eprintln!("usage: process-orders [--every DURATION]");
            return ExitCode::FAILURE;
        }
    };
    let mut all = routes();
    all.extend(event_routes());
    let app = app::App::new("process-orders", all).settings::<ProcessorConfig>();
    match every {
        None => app.run(),
        Some(every) => app.run_worker(move |state| async move {
            tracing::info!(every = ?every, "processing orders");
            let Ok(processor) = state.extension::<ProcessorConfig>().cloned() else {
                return ExitCode::FAILURE;
            };
            run_every(
                state.pool,
                processor,
                Arc::new(ConfirmAll),
                state.events,
                every,
                app::shutdown_signal(),
            )
            .await;
            ExitCode::SUCCESS
        }),
    }
}
