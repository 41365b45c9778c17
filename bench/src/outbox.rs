//! `--outbox-ab`: what the outbox costs an order. Per round, for the hot SKU and the spread
//! scenarios: the minimal ceiling (pgbench, none of our code), then the API with the outbox off
//! (its trigger disabled, nothing published: the previous release's write path), then the API
//! with it on (the trigger's row in the order's transaction, published after the 201 to a
//! sink on loopback that acknowledges, then deleted). Each side's ratio to the same round's
//! ceiling, medians over the rounds; the bar: on within 10% of off.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;

use crate::{Catalog, Options, Round, Server, connect, order_scenarios, report, run_round_with};

/// An event sink on loopback, in a thread of its own (the load generator has the main one):
/// 202 for every POST, counted.
struct Sink {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
}

fn start_sink() -> Sink {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let counted = received.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counted = counted.clone();
                let service = hyper::service::service_fn(move |_request| {
                    counted.fetch_add(1, Ordering::Relaxed);
                    async {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(202)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
    });
    Sink { addr, received }
}

async fn set_trigger(url: &str, on: bool) {
    let verb = if on { "ENABLE" } else { "DISABLE" };
    connect(url)
        .await
        .batch_execute(&format!("ALTER TABLE orders {verb} TRIGGER orders_outbox"))
        .await
        .unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub async fn ab(o: &Options, runner: &Path, urls: (&str, &str), catalog: Catalog) -> ExitCode {
    // The setup's orders (the reads' 1,000) wrote placed rows that nothing here publishes.
    connect(urls.0)
        .await
        .batch_execute("DELETE FROM outbox")
        .await
        .unwrap();
    let sink = start_sink();
    let k_sink = format!("http://{}/", sink.addr);
    let off = Server::start(&runner.to_path_buf(), urls.0, o.pool);
    let on = Server::start_with(
        &runner.to_path_buf(),
        urls.0,
        o.pool,
        &[("K_SINK", k_sink.as_str())],
    );
    let scenarios: Vec<_> = order_scenarios(catalog)
        .into_iter()
        .filter(|s| matches!(s.name, "hot SKU" | "spread"))
        .collect();
    let mut results = Vec::new();
    let mut unexpected = 0;
    for s in &scenarios {
        let (mut off_ratio, mut on_ratio, mut rounds) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=o.rounds {
            set_trigger(urls.0, false).await;
            let a: Round = run_round_with(o, &off, urls, s, true).await;
            set_trigger(urls.0, true).await;
            let before = sink.received.load(Ordering::Relaxed);
            let b: Round = run_round_with(o, &on, urls, s, false).await;
            let published = sink.received.load(Ordering::Relaxed) - before;
            let ceiling = a.minimal_ceiling.as_ref().map_or(f64::NAN, |c| c.best_tps);
            eprintln!(
                "bench: outbox round {round}, {}: off {}; on {} ({published} events published)",
                s.name,
                report::round_line(&a),
                report::round_line(&b)
            );
            unexpected += a.load.unexpected() + b.load.unexpected();
            off_ratio.push(a.load.throughput / ceiling);
            on_ratio.push(b.load.throughput / ceiling);
            rounds.push(json!({"off": a, "on": b, "events_published": published}));
        }
        let (off_m, on_m) = (median(off_ratio), median(on_ratio));
        println!(
            "outbox A/B, {}: ratio to the minimal ceiling off {off_m:.2}x, on {on_m:.2}x ({:+.1}%)",
            s.name,
            (on_m / off_m - 1.0) * 100.0
        );
        results.push(
            json!({"scenario": s.name, "off_ratio": off_m, "on_ratio": on_m,
                            "change": on_m / off_m - 1.0, "rounds": rounds}),
        );
    }
    // The outbox drains once the last publishes land.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let left: i64 = connect(urls.0)
        .await
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    println!("outbox A/B: {unexpected} non-2xx responses; {left} outbox rows left after the run");
    let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("outbox-ab.json"),
        serde_json::to_string_pretty(&json!({"rounds": o.rounds, "connections": o.connections,
            "seconds_per_run": o.duration.as_secs(), "scenarios": results,
            "unexpected_responses": unexpected, "outbox_rows_left": left}))
        .unwrap(),
    )
    .unwrap();
    drop((off, on));
    crate::drop_database(&o.server, urls.0).await;
    crate::drop_database(&o.server, urls.1).await;
    if unexpected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
