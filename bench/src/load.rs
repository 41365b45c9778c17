//! The load generator: N keep-alive HTTP/1.1 connections, each sending its next request as
//! soon as the last is answered, for a fixed time. Latencies are kept whole (microseconds)
//! so the percentiles are exact.
//!
//! It runs on the same two cores as the API and PostgreSQL, so its own CPU is taken from
//! them; pgbench's C client, in the ceilings, costs almost nothing. So each connection is one
//! task that writes the request's bytes and parses the answer with `httparse`, no more: a
//! hyper client spent two tasks and a channel hand-off per request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::Request;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Makes request number `i` of connection `c`.
pub type MakeRequest = std::sync::Arc<dyn Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync>;

#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub requests: u64,
    pub seconds: f64,
    pub throughput: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub statuses: BTreeMap<u16, u64>,
    /// Non-2xx answers during the warm-up before the measured run: counted, never dropped.
    #[serde(default)]
    pub warmup_unexpected: u64,
}

impl LoadResult {
    fn non_2xx(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    /// Responses that were not 2xx, warm-up included: with unlimited stock, every one is
    /// unexpected.
    pub fn unexpected(&self) -> u64 {
        self.non_2xx() + self.warmup_unexpected
    }

    /// 2xx responses of the measured run.
    pub fn ok(&self) -> u64 {
        self.requests - self.non_2xx()
    }
}

/// A short warm-up (the pool fills, plans get cached): its non-2xx answers, to be counted.
pub async fn warm_up(addr: SocketAddr, connections: usize, make: MakeRequest) -> u64 {
    run(addr, connections, Duration::from_millis(300), make)
        .await
        .unexpected()
}

/// A warm-up, then the measured run.
pub async fn measure(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    make: MakeRequest,
) -> LoadResult {
    let warmup_unexpected = warm_up(addr, connections, make.clone()).await;
    LoadResult {
        warmup_unexpected,
        ..run(addr, connections, duration, make).await
    }
}

/// Drives `connections` connections at `addr` for `duration`.
pub async fn run(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    make: MakeRequest,
) -> LoadResult {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|c| tokio::spawn(drive(addr, c, deadline, make.clone())))
        .collect();
    let mut latencies = Vec::new();
    let mut statuses = BTreeMap::new();
    for t in tasks {
        let (l, s) = t.await.expect("a load task");
        latencies.extend(l);
        for (k, v) in s {
            *statuses.entry(k).or_default() += v;
        }
    }
    summarise(latencies, statuses, started.elapsed().as_secs_f64())
}

/// One connection until `deadline`: each request sent as soon as the last is answered. Its
/// latencies (µs) and statuses; 599 for a failed exchange, which ends the connection.
async fn drive(
    addr: SocketAddr,
    c: usize,
    deadline: Instant,
    make: MakeRequest,
) -> (Vec<u32>, BTreeMap<u16, u64>) {
    let mut latencies = Vec::with_capacity(16 * 1024);
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let mut stream = TcpStream::connect(addr).await.expect("connect to the API");
    stream.set_nodelay(true).ok();
    let mut buffer = BytesMut::with_capacity(16 * 1024);
    // A per-connection xorshift seed: request bodies differ but runs repeat.
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (c as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    while Instant::now() < deadline {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let request = encode(make(c, seed)).await;
        let sent = Instant::now();
        let status = exchange(&mut stream, &request, &mut buffer)
            .await
            .unwrap_or(599);
        latencies.push(sent.elapsed().as_micros() as u32);
        *statuses.entry(status).or_default() += 1;
        if status == 599 {
            break;
        }
    }
    (latencies, statuses)
}

/// Throughput and exact percentiles from every latency of a run.
fn summarise(mut latencies: Vec<u32>, statuses: BTreeMap<u16, u64>, seconds: f64) -> LoadResult {
    latencies.sort_unstable();
    let pct = |p: f64| {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        f64::from(latencies[i]) / 1000.0
    };
    LoadResult {
        requests: latencies.len() as u64,
        seconds,
        throughput: latencies.len() as f64 / seconds,
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: latencies.last().map_or(0.0, |m| f64::from(*m) / 1000.0),
        statuses,
        warmup_unexpected: 0,
    }
}

/// The request as HTTP/1.1 bytes, with its body's length.
async fn encode(request: Request<Full<Bytes>>) -> Vec<u8> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.expect("a full body").to_bytes();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = format!("{} {path} HTTP/1.1\r\nhost: bench\r\n", parts.method).into_bytes();
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(&body);
    out
}

/// Sends one request and reads its whole answer (a `content-length` body; the API sends no
/// other kind). None when the connection fails or the answer cannot be parsed.
async fn exchange(stream: &mut TcpStream, request: &[u8], buffer: &mut BytesMut) -> Option<u16> {
    stream.write_all(request).await.ok()?;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = response.parse(buffer).ok()? {
            let status = response.code?;
            let length: usize = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())?;
            while buffer.len() < head + length {
                if stream.read_buf(buffer).await.ok()? == 0 {
                    return None;
                }
            }
            buffer.advance(head + length);
            return Some(status);
        }
        if stream.read_buf(buffer).await.ok()? == 0 {
            return None;
        }
    }
}
