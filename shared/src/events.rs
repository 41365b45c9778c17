//! Order events: the outbox's rows (V10, V11) as CloudEvents. A row is written by a trigger in
//! the transaction that changes the order; after commit, the function that changed it publishes
//! it to `K_SINK` (binary content mode) and deletes it, off the request's path; what is left
//! behind is published by the processor's sweep ([`publish_left_behind`]). An event's id is
//! `<order id>:<type>`, the same on every attempt, so a subscriber can tell a redelivery.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use cloudevents::binding::http::{Builder, Serializer};
use cloudevents::binding::reqwest::RequestBuilderExt;
use cloudevents::message::BinaryDeserializer;
pub use cloudevents::{AttributesReader, Event};
use cloudevents::{EventBuilder, EventBuilderV10};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use metrics::counter;
use tokio_postgres::types::Type;

use crate::config::Config;
use crate::db::Pool;
use crate::error::ApiError;
use crate::http::Request;

pub const PLACED: &str = "dev.tally.order.placed";
pub const CONFIRMED: &str = "dev.tally.order.confirmed";
pub const CANCELLED: &str = "dev.tally.order.cancelled";
pub const EXPIRED: &str = "dev.tally.order.expired";
pub const FAILED: &str = "dev.tally.order.failed";
/// What a Knative PingSource sends: the processor sweeps.
pub const PING: &str = "dev.knative.sources.ping";

const SOURCE: &str = "/tally/orders";
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// The order event `event_type` of order `order_id`.
pub fn order_event(order_id: i64, event_type: &str) -> Result<Event, String> {
    EventBuilderV10::new()
        .id(format!("{order_id}:{event_type}"))
        .ty(event_type)
        .source(SOURCE)
        .subject(order_id.to_string())
        .data(
            "application/json",
            serde_json::json!({ "order_id": order_id }),
        )
        .build()
        .map_err(|e| e.to_string())
}

/// The order an order event is about: its `subject`, or `order_id` in its data.
pub fn order_of(event: &Event) -> Option<i64> {
    let from_subject = event.subject().and_then(|s| s.parse().ok());
    from_subject
        .or_else(|| match event.data() {
            Some(cloudevents::Data::Json(v)) => v.get("order_id")?.as_i64(),
            Some(cloudevents::Data::String(s)) => serde_json::from_str::<serde_json::Value>(s)
                .ok()?
                .get("order_id")?
                .as_i64(),
            Some(cloudevents::Data::Binary(b)) => serde_json::from_slice::<serde_json::Value>(b)
                .ok()?
                .get("order_id")?
                .as_i64(),
            None => None,
        })
        .filter(|id| *id > 0)
}

/// A CloudEvent as it arrives over HTTP, in either content mode: binary (`ce-*` headers and
/// the data as the body) or structured (`application/cloudevents+json`). Anything else is 400.
pub fn read_event(request: &Request) -> Result<Event, ApiError> {
    cloudevents::binding::http::to_event(request.headers(), request.body().to_vec())
        .map_err(|e| ApiError::InvalidRequest(format!("not a CloudEvent: {e}")))
}

/// Publishes order events to `K_SINK`, when there is one.
#[derive(Clone)]
pub struct Publisher {
    sink: Option<Sink>,
    /// Started with the first delivery (a task needs the runtime, and a pool).
    forgetter: Arc<OnceLock<Forgetter>>,
    /// The publishing task's queue, started the same way.
    outgoing: Arc<OnceLock<tokio::sync::mpsc::Sender<(i64, &'static str)>>>,
}

/// Deletes published outbox rows in batches: one statement, and one commit without waiting for
/// the WAL flush, per batch instead of a commit per event. Losing a batch to a crash only
/// means the sweep publishes those events again, which their ids make harmless.
#[derive(Clone)]
struct Forgetter {
    queue: tokio::sync::mpsc::UnboundedSender<(i64, &'static str)>,
}

/// A batch waits at most this long, or until it holds [`FORGET_BATCH`] rows.
const FORGET_EVERY: Duration = Duration::from_millis(20);
const FORGET_BATCH: usize = 1024;

impl Forgetter {
    fn start(pool: Pool) -> Self {
        let (queue, mut rows) = tokio::sync::mpsc::unbounded_channel::<(i64, &'static str)>();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(FORGET_BATCH);
            while rows.recv_many(&mut batch, FORGET_BATCH).await > 0 {
                tokio::time::sleep(FORGET_EVERY).await;
                while batch.len() < FORGET_BATCH
                    && let Ok(row) = rows.try_recv()
                {
                    batch.push(row);
                }
                if let Err(e) = forget_all(&pool, &batch).await {
                    // The rows stay, and the sweep publishes them again: duplicates, not losses.
                    tracing::warn!(rows = batch.len(), error = %e, "published outbox rows not deleted");
                }
                batch.clear();
            }
        });
        Self { queue }
    }

    fn forget(&self, order_id: i64, event_type: &str) {
        let _ = self.queue.send((order_id, known_type(event_type)));
    }
}

/// One of the outbox's event types as a `'static` (the CHECK constraint's list).
fn known_type(event_type: &str) -> &'static str {
    match event_type {
        PLACED => PLACED,
        CONFIRMED => CONFIRMED,
        CANCELLED => CANCELLED,
        EXPIRED => EXPIRED,
        _ => FAILED,
    }
}

/// Deletes `rows` in one transaction that does not wait for its WAL to reach the disk, in one
/// round trip. The statement is built from integers and the five known types only, so inlining
/// them is safe. A failure inside leaves the session in an aborted transaction, so it is
/// rolled back before the connection goes back to the pool.
async fn forget_all(pool: &Pool, rows: &[(i64, &'static str)]) -> Result<(), String> {
    use std::fmt::Write;
    let mut sql = String::from("BEGIN; SET LOCAL synchronous_commit = off;");
    for event_type in [PLACED, CONFIRMED, CANCELLED, EXPIRED, FAILED] {
        let ids: Vec<String> = rows
            .iter()
            .filter(|(_, t)| *t == event_type)
            .map(|(id, _)| id.to_string())
            .collect();
        if !ids.is_empty() {
            let _ = write!(
                sql,
                " DELETE FROM outbox WHERE event_type = '{event_type}' AND order_id IN ({});",
                ids.join(",")
            );
        }
    }
    sql.push_str(" COMMIT;");
    let conn = pool.get().await.map_err(|e| e.to_string())?;
    if let Err(e) = conn.batch_execute(&sql).await {
        let _ = conn.batch_execute("ROLLBACK").await;
        return Err(e.to_string());
    }
    Ok(())
}

/// Where events go, and how. A Knative sink (a Broker's ingress, from a SinkBinding) is plain
/// HTTP inside the cluster: that goes through hyper's own client, since the publish runs once
/// per order and reqwest's conveniences (redirects, its URL type, a timeout layer) cost the
/// order path measurable CPU (`bench --outbox-ab`). An `https://` sink (Knative's transport
/// encryption) goes through reqwest, for its TLS.
#[derive(Clone)]
enum Sink {
    Plain {
        uri: http::Uri,
        client: Box<HyperClient<HttpConnector, Full<Bytes>>>,
    },
    Tls {
        url: url::Url,
        client: reqwest::Client,
    },
}

impl Sink {
    fn from_url(url: url::Url) -> Option<Self> {
        match url.scheme() {
            "http" => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                let client = HyperClient::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .pool_max_idle_per_host(PUBLISH_AT_ONCE)
                    .build(connector);
                Some(Self::Plain {
                    uri: url.as_str().parse().ok()?,
                    client: Box::new(client),
                })
            }
            "https" => Some(Self::Tls {
                url,
                client: reqwest::Client::builder()
                    .timeout(PUBLISH_TIMEOUT)
                    .build()
                    .ok()?,
            }),
            _ => None,
        }
    }

    async fn post(&self, event: Event) -> Result<(), String> {
        let status = match self {
            Self::Plain { uri, client } => {
                let request = binary_request(uri, event)?;
                let exchange = async {
                    let response = client.request(request).await.map_err(|e| e.to_string())?;
                    let status = response.status();
                    // Read to the end (a sink's answer is small; a larger one is cut off), so
                    // the connection goes back to the pool for the next event.
                    let _ = Limited::new(response.into_body(), 64 * 1024)
                        .collect()
                        .await;
                    Ok::<_, String>(status)
                };
                tokio::time::timeout(PUBLISH_TIMEOUT, exchange)
                    .await
                    .map_err(|_| "the sink did not answer in time".to_string())??
            }
            Self::Tls { url, client } => client
                .post(url.clone())
                .event(event)
                .map_err(|e| e.to_string())?
                .send()
                .await
                .map_err(|e| e.to_string())?
                .status(),
        };
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the sink answered {status}"))
        }
    }
}

/// A binary-mode POST of `event` to `uri`, its `ce-*` headers and body written by the SDK's
/// HTTP serializer.
fn binary_request(uri: &http::Uri, event: Event) -> Result<http::Request<Full<Bytes>>, String> {
    BinaryDeserializer::deserialize_binary(
        event,
        Serializer::new(RequestAdapter(Some(http::Request::post(uri.clone())))),
    )
    .map_err(|e| e.to_string())
}

/// The SDK's [`Builder`] for a hyper request (it ships one for responses only).
struct RequestAdapter(Option<http::request::Builder>);

impl Builder<http::Request<Full<Bytes>>> for RequestAdapter {
    fn header(&mut self, key: &str, value: http::HeaderValue) {
        self.0 = self.0.take().map(|b| b.header(key, value));
    }

    fn body(&mut self, bytes: Vec<u8>) -> cloudevents::message::Result<http::Request<Full<Bytes>>> {
        // hyper writes the Content-Length from the body's exact size.
        self.0
            .take()
            .ok_or_else(|| other("the request was built twice"))?
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| other(&e.to_string()))
    }

    fn finish(&mut self) -> cloudevents::message::Result<http::Request<Full<Bytes>>> {
        self.body(Vec::new())
    }
}

fn other(message: &str) -> cloudevents::message::Error {
    cloudevents::message::Error::Other {
        source: message.to_string().into(),
    }
}

impl Publisher {
    pub fn from_config(config: &Config) -> Self {
        Self {
            sink: config
                .k_sink
                .as_deref()
                .and_then(|s| url::Url::parse(s).ok())
                .and_then(Sink::from_url),
            forgetter: Arc::default(),
            outgoing: Arc::default(),
        }
    }

    fn forgetter(&self, pool: &Pool) -> &Forgetter {
        self.forgetter
            .get_or_init(|| Forgetter::start(pool.clone()))
    }

    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    /// POSTs one event; Ok once the sink took it (2xx).
    pub async fn publish(&self, order_id: i64, event_type: &str) -> Result<(), String> {
        let sink = self.sink.as_ref().ok_or("no K_SINK")?;
        sink.post(order_event(order_id, event_type)?).await
    }

    /// Publishes one outbox row and deletes it once the sink has it (in a batch, later). A
    /// failure leaves the row for the sweep; it is counted and logged, never the caller's
    /// error.
    pub async fn deliver(&self, pool: &Pool, order_id: i64, event_type: &str) {
        if !self.enabled() {
            return;
        }
        match self.publish(order_id, event_type).await {
            Ok(()) => {
                self.forgetter(pool).forget(order_id, event_type);
                counter!("tally_events_published_total", "type" => short(event_type)).increment(1)
            }
            Err(e) => {
                counter!("tally_events_publish_failures_total").increment(1);
                tracing::warn!(order_id, event_type, error = %e, "event not published: the sweep will");
            }
        }
    }

    /// Queues [`Self::deliver`] for the process's one publishing task: the caller's response
    /// does not wait for it, and a burst of orders becomes a few kept-alive connections
    /// publishing [`PUBLISH_AT_ONCE`] events at a time, not a task and a connection per order.
    pub fn spawn_deliver(&self, pool: &Pool, order_id: i64, event_type: &'static str) {
        if !self.enabled() {
            return;
        }
        let outgoing = self.outgoing.get_or_init(|| {
            let (queue, events) = tokio::sync::mpsc::channel(PUBLISH_QUEUE);
            let (publisher, pool) = (self.clone(), pool.clone());
            tokio::spawn(publish_all(publisher, pool, events));
            queue
        });
        // A sink that is down or slow fills the queue: past it, the row simply waits for the
        // sweep, rather than the process's memory growing without bound.
        if outgoing.try_send((order_id, event_type)).is_err() {
            counter!("tally_events_deferred_total").increment(1);
        }
    }
}

/// The publishing task: events from the queue, [`PUBLISH_AT_ONCE`] in flight at a time.
async fn publish_all(
    publisher: Publisher,
    pool: Pool,
    mut events: tokio::sync::mpsc::Receiver<(i64, &'static str)>,
) {
    use futures_util::StreamExt;
    let mut batch = Vec::with_capacity(PUBLISH_AT_ONCE * 4);
    while events.recv_many(&mut batch, PUBLISH_AT_ONCE * 4).await > 0 {
        futures_util::stream::iter(batch.drain(..))
            .for_each_concurrent(PUBLISH_AT_ONCE, |(order_id, event_type)| {
                let (publisher, pool) = (&publisher, &pool);
                async move { publisher.deliver(pool, order_id, event_type).await }
            })
            .await;
    }
}

/// Events waiting for the publishing task at most.
const PUBLISH_QUEUE: usize = 10_000;

/// Events in flight at once from one process's publishing task.
const PUBLISH_AT_ONCE: usize = 8;

/// The label an event type gets on the metrics: its last word, from a closed set.
fn short(event_type: &str) -> &'static str {
    match event_type {
        PLACED => "placed",
        CONFIRMED => "confirmed",
        CANCELLED => "cancelled",
        EXPIRED => "expired",
        _ => "failed",
    }
}

/// Publishes up to `limit` outbox rows, oldest first, deleting each once the sink has it:
/// placed and cancelled ones once they are older than `grace` (the function that wrote them
/// publishes them itself, and had that long), the processor's own (confirmed, expired,
/// failed) at once, since the processor is their publisher. Returns how many went out; stops at the
/// first failure (the sink is likely down; the rest wait for the next sweep).
pub async fn publish_left_behind(
    pool: &Pool,
    publisher: &Publisher,
    grace: Duration,
    limit: i64,
) -> Result<u64, ApiError> {
    if !publisher.enabled() {
        return Ok(0);
    }
    let grace_secs = grace.as_secs_f64();
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
        [(&grace_secs, Type::FLOAT8), (&limit, Type::INT8)];
    let rows = {
        let conn = pool.get().await?;
        conn.query_typed(
            "SELECT order_id, event_type FROM outbox \
             WHERE created_at < now() - make_interval(secs => CASE \
                 WHEN event_type IN ('dev.tally.order.placed', 'dev.tally.order.cancelled') \
                 THEN $1 ELSE 0 END) \
             ORDER BY created_at LIMIT $2",
            &params,
        )
        .await?
    };
    let mut published = Vec::with_capacity(rows.len());
    for row in rows {
        let (order_id, event_type): (i64, String) = (row.get(0), row.get(1));
        if let Err(e) = publisher.publish(order_id, &event_type).await {
            counter!("tally_events_publish_failures_total").increment(1);
            tracing::warn!(order_id, event_type, error = %e, "the sweep could not publish: later");
            break;
        }
        counter!("tally_events_published_total", "type" => short(&event_type)).increment(1);
        published.push((order_id, known_type(&event_type)));
    }
    // One delete for all that went out, as the publishing task's batches do.
    if !published.is_empty() {
        forget_all(pool, &published)
            .await
            .map_err(ApiError::Internal)?;
    }
    Ok(published.len() as u64)
}
