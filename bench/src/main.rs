//! The benchmark harness. Starts the local runner against a fresh database, drives four
//! scenarios at a fixed concurrency for a fixed time, checks the books, runs pgbench with the
//! same SQL call as the ceiling, and measures cold start and memory of one function binary.
//!
//!     cargo run --release -p bench                 # full run; writes bench/results/latest.{json,md}
//!     cargo run -p bench -- --smoke                # a few seconds, debug binaries: no 5xx, books balance
//!
//! Options: --duration SECS (10), --connections N (32), --pool N (4), --only SCENARIO (just that
//! one, no pgbench), --server URL (the PostgreSQL server: $BENCH_DATABASE_URL,
//! $TEST_DATABASE_URL, or postgres://postgres@127.0.0.1:5432/postgres).

mod load;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use serde::Serialize;
use serde_json::json;
use tally_shared::auth::{self, Role};
use tally_shared::{Config, migrate};
use tokio_postgres::{Client, NoTls};

use crate::load::{LoadResult, MakeRequest};

const SPREAD_PRODUCTS: i64 = 1000;
const STOCK: i64 = 1_000_000_000;
const PGBENCH_CLIENTS: [usize; 4] = [4, 10, 16, 32];
const POOL_SIZES: [u32; 4] = [2, 4, 8, 12];

struct Options {
    smoke: bool,
    duration: Duration,
    connections: usize,
    server: String,
    profile: &'static str,
    pool: u32,
    /// Run just this scenario (by name prefix) and stop: for quick before/after comparisons.
    only: Option<String>,
}

fn options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut o = Options {
        smoke: false,
        duration: Duration::from_secs(10),
        connections: 32,
        server: std::env::var("BENCH_DATABASE_URL")
            .or_else(|_| std::env::var("TEST_DATABASE_URL"))
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        pool: 4,
        only: None,
    };
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--smoke" => {
                o.smoke = true;
                o.duration = Duration::from_secs(2);
                o.connections = 8;
            }
            "--duration" => {
                o.duration = Duration::from_secs(value()?.parse().map_err(|_| "--duration SECS")?)
            }
            "--connections" => o.connections = value()?.parse().map_err(|_| "--connections N")?,
            "--server" => o.server = value()?,
            "--pool" => o.pool = value()?.parse().map_err(|_| "--pool N")?,
            "--only" => o.only = Some(value()?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

/// A binary of this workspace, from the same profile as the harness.
fn binary(profile: &str, name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target"))
        .join(profile)
        .join(name)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn with_database(server: &str, db: &str) -> String {
    let (base, _) = server.rsplit_once('/').expect("a URL with a database");
    format!("{base}/{db}")
}

const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

/// A process under test, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(binary: &PathBuf, db_url: &str, pool: u32) -> Self {
        let port = free_port();
        let child = Command::new(binary)
            .env("DATABASE_URL", db_url)
            .env("PORT", port.to_string())
            .env("POOL_SIZE", pool.to_string())
            .env("JWT_HS256_SECRET", SECRET)
            .env("PROCESS_EVERY_MS", "0")
            // The access log is part of the cost being measured; BENCH_LOG_LEVEL=warn shows how much.
            .env(
                "LOG_LEVEL",
                std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e} (build it first)", binary.display()));
        let server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        server.wait_ready();
        server
    }

    fn get_status(&self, path: &str) -> Option<u16> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.addr).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.split_whitespace().nth(1)?.parse().ok()
    }

    fn wait_ready(&self) -> Duration {
        let started = Instant::now();
        while self.get_status("/healthz") != Some(200) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the server did not come up"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        started.elapsed()
    }

    fn rss_kb(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The database under test: migrated, the demo seed, one hot product, the spread catalog and
/// 1,000 orders to read back. Returns (url, hot product id, first spread id).
async fn prepare(server: &str) -> (String, i64, i64) {
    let name = format!(
        "tally_bench_{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let admin = connect(server).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = with_database(server, &name);
    let (client, _) = migrate::migrate(&url).await.expect("migrate");
    migrate::seed_if_empty(&client).await.unwrap();
    let hot: i64 = client
        .query_one(
            "INSERT INTO products (sku, name, price_cents, inventory) VALUES ('HOT', 'Hot item', 1000, $1) RETURNING id",
            &[&STOCK],
        )
        .await
        .unwrap()
        .get(0);
    client
        .execute(
            "INSERT INTO products (sku, name, price_cents, inventory) \
             SELECT 'S-' || g, 'Spread ' || g, 100 + g, $1 FROM generate_series(1, $2::bigint) g",
            &[&STOCK, &SPREAD_PRODUCTS],
        )
        .await
        .unwrap();
    let first_spread = hot + 1;
    client
        .execute(
            "SELECT place_order(1, ARRAY[$1::bigint], ARRAY[1]) FROM generate_series(1, 1000)",
            &[&first_spread],
        )
        .await
        .unwrap();
    client.batch_execute("VACUUM ANALYZE").await.unwrap();
    (url, hot, first_spread)
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    client
}

/// The books after the run: stock never negative, the ledger equals the stock, and the
/// starting stock equals what is left plus what was sold. Returns the products that drifted.
async fn books_drift(url: &str) -> i64 {
    connect(url)
        .await
        .query_one(
            // Grouped once, not per product: after a full run there are ~100k order lines.
            "WITH sold AS (
                 SELECT i.product_id, sum(i.quantity) AS quantity
                 FROM order_items i JOIN orders o ON o.id = i.order_id
                 WHERE o.status NOT IN ('CANCELLED', 'FAILED') GROUP BY i.product_id),
             ledger AS (
                 SELECT product_id, sum(delta) AS total,
                        sum(delta) FILTER (WHERE reason = 'initial') AS initial
                 FROM inventory_movements GROUP BY product_id)
             SELECT count(*) FROM products p
             LEFT JOIN sold s ON s.product_id = p.id
             LEFT JOIN ledger l ON l.product_id = p.id
             WHERE p.inventory < 0
                OR p.inventory <> coalesce(l.total, 0)
                OR coalesce(l.initial, 0) <> p.inventory + coalesce(s.quantity, 0)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn token() -> String {
    let config = Config::from_vars([("JWT_HS256_SECRET".to_owned(), SECRET.to_owned())]).unwrap();
    format!(
        "Bearer {}",
        auth::mint(&config, 1, Role::Customer, Duration::from_secs(3600)).unwrap()
    )
}

fn post_order(bearer: &str, body: String) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri("/orders")
        .header("host", "bench")
        .header("content-type", "application/json")
        .header("authorization", bearer)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn get(bearer: &str, path: String) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", "bench")
        .header("authorization", bearer)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn scenarios(hot: i64, first_spread: i64) -> Vec<(&'static str, MakeRequest)> {
    let bearer = Arc::new(token());
    let b = bearer.clone();
    let hot_sku: MakeRequest = Arc::new(move |_, _| {
        post_order(
            &b,
            format!(r#"{{"items":[{{"product_id":{hot},"quantity":1}}]}}"#),
        )
    });
    let b = bearer.clone();
    let spread: MakeRequest = Arc::new(move |_, r| {
        let lines = 1 + (r % 3) as i64;
        let items: Vec<String> = (0..lines)
            .map(|k| {
                let p = first_spread + ((r >> (8 + 10 * k)) % SPREAD_PRODUCTS as u64) as i64;
                format!(r#"{{"product_id":{p},"quantity":1}}"#)
            })
            .collect();
        post_order(&b, format!(r#"{{"items":[{}]}}"#, items.join(",")))
    });
    let b = bearer.clone();
    let products: MakeRequest = Arc::new(move |_, _| get(&b, "/products".into()));
    let b = bearer;
    let orders: MakeRequest = Arc::new(move |_, r| get(&b, format!("/orders/{}", 1 + r % 1000)));
    vec![
        ("hot SKU", hot_sku),
        ("spread", spread),
        ("GET /products", products),
        ("GET /orders/{id}", orders),
    ]
}

/// pgbench with the same single SQL call the function makes; the best tps over the client
/// counts is the ceiling. None when pgbench is not installed.
fn pgbench(url: &str, script: &str, duration: Duration) -> Option<(f64, Vec<(usize, f64)>)> {
    let dir = std::env::temp_dir().join(format!("tally-pgbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let file = dir.join("script.sql");
    std::fs::write(&file, script).ok()?;
    let mut runs = Vec::new();
    for clients in PGBENCH_CLIENTS {
        let out = Command::new("pgbench")
            .args(["-n", "-M", "prepared", "-j", "2"])
            .args([
                "-c",
                &clients.to_string(),
                "-T",
                &duration.as_secs().max(1).to_string(),
            ])
            .arg("-f")
            .arg(&file)
            .arg(url)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let tps = text
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse::<f64>().ok())?;
        runs.push((clients, tps));
    }
    let best = runs.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    Some((best, runs))
}

#[derive(Serialize)]
struct ScenarioReport {
    name: &'static str,
    #[serde(flatten)]
    load: LoadResult,
    pgbench_ceiling_tps: Option<f64>,
    pgbench_runs: Vec<(usize, f64)>,
    ratio: Option<f64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    // BENCH_SERVER points at another binary, e.g. one function built with symbols for perf
    // (with --only, since a single function serves only its own routes).
    let runner = std::env::var_os("BENCH_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| binary(o.profile, "tally"));
    let (url, hot, first_spread) = prepare(&o.server).await;
    eprintln!(
        "bench: database {url}, {} connections, {:?} per scenario, {} binaries",
        o.connections, o.duration, o.profile
    );

    let mut reports = Vec::new();
    let server = Server::start(&runner, &url, o.pool);
    for (name, make) in scenarios(hot, first_spread) {
        if o.only
            .as_ref()
            .is_some_and(|only| !name.starts_with(only.as_str()))
        {
            continue;
        }
        let result = load::measure(server.addr, o.connections, o.duration, make).await;
        eprintln!(
            "bench: {name}: {:.0}/s p50 {:.2} ms p99 {:.2} ms {:?}",
            result.throughput, result.p50_ms, result.p99_ms, result.statuses
        );
        reports.push(ScenarioReport {
            name,
            load: result,
            pgbench_ceiling_tps: None,
            pgbench_runs: vec![],
            ratio: None,
        });
    }
    drop(server);

    let server_errors: u64 = reports.iter().map(|r| r.load.server_errors()).sum();
    let drift = books_drift(&url).await;
    eprintln!("bench: {server_errors} server errors; {drift} products whose books do not balance");
    if o.smoke || o.only.is_some() {
        drop_database(&o.server, &url).await;
        return if server_errors == 0 && drift == 0 && reports.iter().all(|r| r.load.requests > 0) {
            println!(
                "bench smoke: ok ({} requests, no 5xx, books balanced)",
                reports.iter().map(|r| r.load.requests).sum::<u64>()
            );
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }

    // The raw-SQL ceilings, measured in the same run as the API figures.
    let hot_sql =
        format!("SELECT * FROM place_order(1, ARRAY[{hot}]::bigint[], ARRAY[1]::int[]);\n");
    let last = first_spread + SPREAD_PRODUCTS - 1;
    let spread_sql = format!(
        "\\set p1 random({first_spread}, {last})\n\\set p2 random({first_spread}, {last})\n\\set p3 random({first_spread}, {last})\n\\set n random(1, 3)\n\
         SELECT * FROM place_order(1, (ARRAY[:p1, :p2, :p3]::bigint[])[1:(:n)], (ARRAY[1, 1, 1]::int[])[1:(:n)]);\n"
    );
    for (i, script) in [(0, hot_sql), (1, spread_sql)] {
        if let Some((best, runs)) = pgbench(&url, &script, o.duration) {
            let r = &mut reports[i];
            r.ratio = Some(r.load.throughput / best);
            r.pgbench_ceiling_tps = Some(best);
            r.pgbench_runs = runs;
        } else {
            eprintln!("bench: pgbench not found: no ceiling (apt-get install postgresql-client)");
        }
    }

    // Orders by pool size: on a hot row requests should queue in the pool, not on the lock;
    // spread orders want enough concurrency in Postgres to share commits.
    let mut pool_sweep = Vec::new();
    for pool in POOL_SIZES {
        let server = Server::start(&runner, &url, pool);
        for (name, make) in scenarios(hot, first_spread).into_iter().take(2) {
            let r = load::measure(server.addr, o.connections, o.duration, make).await;
            eprintln!(
                "bench: {name}, pool {pool}: {:.0}/s p99 {:.2} ms",
                r.throughput, r.p99_ms
            );
            pool_sweep.push(json!({"scenario": name, "pool_size": pool, "throughput": r.throughput, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms}));
        }
    }

    // One function binary: cold start (median of 10) and memory idle and after load.
    let function = binary(o.profile, "create-order");
    let mut cold: Vec<Duration> = (0..10)
        .map(|_| {
            let started = Instant::now();
            let s = Server::start(&function, &url, 4);
            let d = started.elapsed();
            drop(s);
            d
        })
        .collect();
    cold.sort();
    let s = Server::start(&function, &url, 4);
    std::thread::sleep(Duration::from_millis(200));
    let rss_idle = s.rss_kb("VmRSS:");
    let make = scenarios(hot, first_spread).swap_remove(0).1;
    let under_load = load::run(
        s.addr,
        o.connections,
        o.duration.min(Duration::from_secs(5)),
        make,
    )
    .await;
    let rss_after = s.rss_kb("VmRSS:");
    let rss_peak = s.rss_kb("VmHWM:");
    drop(s);
    let drift_after = books_drift(&url).await;

    let machine = machine();
    let result = json!({
        "machine": machine,
        "connections": o.connections,
        "seconds_per_scenario": o.duration.as_secs(),
        "scenarios": reports,
        "pool_size": o.pool,
        "orders_by_pool_size": pool_sweep,
        "cold_start_ms": {"median": cold[5].as_secs_f64() * 1000.0, "min": cold[0].as_secs_f64() * 1000.0, "max": cold[9].as_secs_f64() * 1000.0},
        "create_order_rss_kb": {"idle": rss_idle, "after_load": rss_after, "peak": rss_peak, "load_requests": under_load.requests},
        "server_errors": server_errors,
        "books_drift": drift_after,
    });
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("latest.json"),
        serde_json::to_string_pretty(&result).unwrap(),
    )
    .unwrap();
    let table = markdown(&result, &reports);
    std::fs::write(dir.join("latest.md"), &table).unwrap();
    println!("{table}");
    drop_database(&o.server, &url).await;
    if server_errors == 0 && drift_after == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn drop_database(server: &str, url: &str) {
    let name = url.rsplit('/').next().unwrap_or_default();
    let _ = connect(server)
        .await
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let pgbench = Command::new("pgbench")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    json!({"cpu": cpu, "cores": cores, "pgbench": pgbench, "date": humantime_now()})
}

fn humantime_now() -> String {
    // "2026-11-25T19:00:00Z" -> the date.
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()[..10].to_owned()
}

fn markdown(result: &serde_json::Value, reports: &[ScenarioReport]) -> String {
    let mut t = String::new();
    let m = &result["machine"];
    t.push_str(&format!(
        "Measured {} on {} ({} cores), {} connections, {} s per scenario; API and PostgreSQL on the same machine.\n\n",
        m["date"].as_str().unwrap_or(""),
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        result["connections"],
        result["seconds_per_scenario"]
    ));
    t.push_str("| scenario | req/s | p50 ms | p90 ms | p99 ms | statuses | pgbench ceiling (best of 4/10/16/32 clients) | ratio |\n|---|---:|---:|---:|---:|---|---:|---:|\n");
    for r in reports {
        let statuses: Vec<String> = r
            .load
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        t.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} |\n",
            r.name,
            r.load.throughput,
            r.load.p50_ms,
            r.load.p90_ms,
            r.load.p99_ms,
            statuses.join(", "),
            r.pgbench_ceiling_tps
                .map_or("-".into(), |c| format!("{c:.0} tps")),
            r.ratio.map_or("-".into(), |x| format!("{x:.2}x")),
        ));
    }
    t.push_str(&format!("\nThe table's runs used POOL_SIZE {}. Orders by pool size:\n\n| pool | scenario | req/s | p99 ms |\n|---:|---|---:|---:|\n", result["pool_size"]));
    for p in result["orders_by_pool_size"].as_array().unwrap() {
        t.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} |\n",
            p["pool_size"],
            p["scenario"].as_str().unwrap_or(""),
            p["throughput"].as_f64().unwrap_or(0.0),
            p["p99_ms"].as_f64().unwrap_or(0.0)
        ));
    }
    let c = &result["cold_start_ms"];
    let r = &result["create_order_rss_kb"];
    t.push_str(&format!(
        "\n\nOne function binary (create-order): cold start (spawn to first 200 on /healthz) median {:.1} ms (min {:.1}, max {:.1}); RSS {:.1} MB idle, {:.1} MB after {} requests of load (peak {:.1} MB).\n\nBooks after all runs: {} products drifted; {} server errors.\n",
        c["median"].as_f64().unwrap_or(0.0),
        c["min"].as_f64().unwrap_or(0.0),
        c["max"].as_f64().unwrap_or(0.0),
        r["idle"].as_f64().unwrap_or(0.0) / 1024.0,
        r["after_load"].as_f64().unwrap_or(0.0) / 1024.0,
        r["load_requests"],
        r["peak"].as_f64().unwrap_or(0.0) / 1024.0,
        result["books_drift"],
        result["server_errors"],
    ));
    t
}
