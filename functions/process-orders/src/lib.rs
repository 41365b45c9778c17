//! `process-orders`: moves PENDING orders on. One sweep:
//! 1. expires PENDING orders older than `ORDER_TTL_SECS` that nobody holds (FAILED, restocked);
//! 2. claims a batch with `FOR UPDATE SKIP LOCKED`, setting a lease, and commits the claim;
//! 3. runs the fulfilment step for each claimed order outside any transaction;
//! 4. records the outcomes (CONFIRMED; FAILED with restock; or lease released for a retry);
//! 5. deletes idempotency keys older than `IDEMPOTENCY_RETENTION_SECS`.
//!
//! Many processors may run at once: a claimed order is invisible to the others until its lease
//! runs out, and every status change is guarded by the status it expects.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use metrics::counter;
use serde::{Deserialize, Serialize};
use tally_shared::http::json_response;
use tally_shared::router::HandlerResult;
use tally_shared::{ApiError, AppState, Pool, Request, Route, app, auth, meters, outcomes, sql};
use tokio_postgres::types::Type;

/// The processor's own settings, from the environment.
#[derive(Debug, Clone, Deserialize)]
pub struct ProcessorConfig {
    /// A PENDING order older than this is expired (its reservation lapses).
    #[serde(default = "defaults::order_ttl_secs")]
    pub order_ttl_secs: f64,
    /// How long a claim keeps other processors away while the step runs.
    #[serde(default = "defaults::claim_lease_secs")]
    pub claim_lease_secs: f64,
    #[serde(default = "defaults::batch_size")]
    pub process_batch_size: i64,
    #[serde(default = "defaults::retention_secs")]
    pub idempotency_retention_secs: f64,
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
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            order_ttl_secs: defaults::order_ttl_secs(),
            claim_lease_secs: defaults::claim_lease_secs(),
            process_batch_size: defaults::batch_size(),
            idempotency_retention_secs: defaults::retention_secs(),
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
                      AND (claimed_until IS NULL OR claimed_until < now()) \
                    ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
     RETURNING o.id, o.user_id, o.total_cents, o.attempts";
const CONFIRM_SQL: &str = "UPDATE orders o SET status = 'CONFIRMED', claimed_until = NULL, \
     updated_at = now() FROM unnest($1::bigint[], $2::int[]) AS c (id, attempts) \
     WHERE o.id = c.id AND o.attempts = c.attempts AND o.status = 'PENDING'";
const FAIL_SQL: &str = "SELECT outcome FROM fail_claimed_order($1, $2)";
const RETRY_SQL: &str = "UPDATE orders SET claimed_until = NULL, last_error = $2 \
     WHERE id = $1 AND attempts = $3 AND status = 'PENDING'";
const FORGET_KEYS_SQL: &str =
    "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)";

/// One sweep. Each statement is its own short transaction; the step runs between them.
pub async fn sweep(
    pool: &Pool,
    config: &ProcessorConfig,
    step: &dyn FulfilmentStep,
) -> Result<SweepSummary, ApiError> {
    let result = sweep_inner(pool, config, step).await;
    match &result {
        Ok(s) => {
            counter!("tally_processor_sweeps_total", "result" => "ok").increment(1);
            for (outcome, n) in [
                ("claimed", s.claimed),
                ("confirmed", s.confirmed),
                ("failed", s.failed),
                ("retried", s.retried),
                ("expired", s.expired),
                ("keys_deleted", s.keys_deleted),
                ("lapsed", s.lapsed),
            ] {
                counter!("tally_processor_orders_total", "outcome" => outcome).increment(n);
            }
        }
        Err(_) => counter!("tally_processor_sweeps_total", "result" => "error").increment(1),
    }
    result
}

/// A sweep's phases: expire and claim on one connection, run the steps with no connection
/// held, then record what they decided.
async fn sweep_inner(
    pool: &Pool,
    config: &ProcessorConfig,
    step: &dyn FulfilmentStep,
) -> Result<SweepSummary, ApiError> {
    let mut summary = SweepSummary::default();
    let (claimed, claimed_at) = {
        let conn = meters::checkout(pool).await?;
        summary.expired = expire(&conn, config).await?;
        (claim(&conn, config).await?, std::time::Instant::now())
    };
    summary.claimed = claimed.len() as u64;
    // The lease, less a margin for recording the outcome: a step must not start after it.
    let lease = Duration::from_secs_f64(config.claim_lease_secs * 0.9);
    let mut decided = Decided::default();
    for order in &claimed {
        if claimed_at.elapsed() >= lease {
            // Another processor may claim it now; this one leaves it alone.
            summary.lapsed += 1;
            continue;
        }
        match step.run(order).await {
            StepOutcome::Confirmed => decided.confirmed.push((order.id, order.attempts)),
            StepOutcome::Failed(reason) => decided.failed.push((order.id, order.attempts, reason)),
            StepOutcome::RetryLater(reason) => {
                decided.retry.push((order.id, order.attempts, reason))
            }
        }
    }
    record(
        &*meters::checkout(pool).await?,
        config,
        decided,
        &mut summary,
    )
    .await?;
    Ok(summary)
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

/// What the steps decided, per claimed order: (id, claim token) and a reason where one fails.
#[derive(Default)]
struct Decided {
    confirmed: Vec<(i64, i32)>,
    failed: Vec<(i64, i32, String)>,
    retry: Vec<(i64, i32, String)>,
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
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] = [
        (&config.order_ttl_secs, Type::FLOAT8),
        (&config.claim_lease_secs, Type::FLOAT8),
        (&config.process_batch_size, Type::INT8),
    ];
    Ok(
        meters::timed("claim_orders", conn.query_typed(CLAIM_SQL, &params))
            .await?
            .iter()
            .map(|r| ClaimedOrder {
                id: r.get(0),
                user_id: r.get(1),
                total_cents: r.get(2),
                attempts: r.get(3),
            })
            .collect(),
    )
}

/// Writes what the steps decided (each only while its claim token still holds), and forgets
/// idempotency keys past their retention.
async fn record(
    conn: &tokio_postgres::Client,
    config: &ProcessorConfig,
    decided: Decided,
    summary: &mut SweepSummary,
) -> Result<(), ApiError> {
    if !decided.confirmed.is_empty() {
        let (ids, tokens): (Vec<i64>, Vec<i32>) = decided.confirmed.into_iter().unzip();
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
            [(&ids, Type::INT8_ARRAY), (&tokens, Type::INT4_ARRAY)];
        let confirm = conn.execute_typed(CONFIRM_SQL, &params);
        summary.confirmed = meters::timed("confirm_orders", confirm).await?;
    }
    for (id, attempts, reason) in decided.failed {
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
            [(&id, Type::INT8), (&attempts, Type::INT4)];
        let rows = meters::timed("fail_order", conn.query_typed(FAIL_SQL, &params)).await?;
        // Otherwise the claim was lost (or the order already left PENDING): nothing changed.
        // An answer this code does not know is logged, and the rest of the sweep still recorded.
        match rows
            .first()
            .map(|row| sql::outcome::<Failed>(row, 0, "fail_claimed_order"))
        {
            Some(Ok(Failed::Released)) => summary.failed += 1,
            Some(Ok(_)) => {}
            Some(Err(e)) => tracing::error!(
                order_id = id,
                cause = e.internal_cause(),
                "failing an order"
            ),
            None => tracing::error!(order_id = id, "fail_claimed_order returned no row"),
        }
        tracing::info!(order_id = id, reason, "order failed by the fulfilment step");
    }
    for (id, attempts, reason) in decided.retry {
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] = [
            (&id, Type::INT8),
            (&reason, Type::TEXT),
            (&attempts, Type::INT4),
        ];
        summary.retried +=
            meters::timed("retry_order", conn.execute_typed(RETRY_SQL, &params)).await?;
    }
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] =
        [(&config.idempotency_retention_secs, Type::FLOAT8)];
    let forget = conn.execute_typed(FORGET_KEYS_SQL, &params);
    summary.keys_deleted = meters::timed("forget_keys", forget).await?;
    Ok(())
}

/// Sweeps every `every` until `shutdown` resolves; a failed sweep is logged and retried.
pub async fn run_every(
    pool: Pool,
    config: ProcessorConfig,
    step: Arc<dyn FulfilmentStep>,
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
        match sweep(&pool, &config, step.as_ref()).await {
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

/// POST / runs one sweep and answers its summary (for a Knative PingSource or a CronJob).
/// It needs an admin token, like every endpoint that changes state.
pub fn routes() -> Vec<Route> {
    vec![Route::new(Method::POST, "/", sweep_once)]
}

async fn sweep_once(request: Request, state: AppState) -> HandlerResult {
    auth::principal(&request)?.require_admin()?;
    let summary = sweep(
        &state.pool,
        state.extension::<ProcessorConfig>()?,
        &ConfirmAll,
    )
    .await?;
    json_response(StatusCode::OK, &summary)
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
    let app = app::App::new("process-orders", routes()).settings::<ProcessorConfig>();
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
                every,
                app::shutdown_signal(),
            )
            .await;
            ExitCode::SUCCESS
        }),
    }
}
