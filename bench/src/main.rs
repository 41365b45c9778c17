//! The benchmark harness. Starts the local runner against a fresh database and measures each
//! order scenario against two raw-SQL ceilings taken in the same run (see `pgbench.rs`): the
//! minimal order write, and our own order call. Each scenario is the median of interleaved
//! rounds (ceilings, then the API, per scenario, per round), since the machine is shared and
//! noisy. Every run records WAL bytes, PostgreSQL and server CPU per order, and lock waits.
//!
//!     cargo run --release -p bench                 # full run; writes bench/results/latest.{json,md}
//!     cargo run -p bench -- --smoke                # a few seconds, debug binaries: no 5xx, books balance
//!
//! Options: --duration SECS (API run, 10), --pgbench-duration SECS (per client count, 5),
//! --rounds N (3), --connections N (32), --pool N (8), --shards N (16), --only SCENARIO (that
//! one, one round, no ceilings), --server URL (the PostgreSQL server: $BENCH_DATABASE_URL,
//! $TEST_DATABASE_URL, or postgres://postgres@127.0.0.1:5432/postgres), --outbox-ab (hot SKU and
//! spread with the outbox off, then with its events published, per round: `outbox.rs`).

mod load;
mod outbox;
mod pgbench;
mod probe;
mod report;

use std::collections::BTreeMap;
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
use tally_shared::auth::Role;
use tally_shared::roles::{self, Limits, Roles};
use tally_shared::{Config, migrate};
use tokio_postgres::Client;

use crate::load::{LoadResult, MakeRequest};
use crate::pgbench::{Ceiling, Script};
use crate::probe::{Cost, Probe};

const SPREAD_PRODUCTS: i64 = 1000;
const STOCK: i64 = 1_000_000_000;

struct Options {
    smoke: bool,
    duration: Duration,
    pgbench_duration: Duration,
    rounds: usize,
    connections: usize,
    server: String,
    profile: &'static str,
    pool: u32,
    shards: i32,
    only: Option<String>,
    outbox_ab: bool,
}

fn options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut o = Options {
        smoke: false,
        duration: Duration::from_secs(10),
        pgbench_duration: Duration::from_secs(5),
        rounds: 3,
        connections: 32,
        server: std::env::var("BENCH_DATABASE_URL")
            .or_else(|_| std::env::var("TEST_DATABASE_URL"))
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        pool: 8,
        shards: 16,
        only: None,
        outbox_ab: false,
    };
    let secs = |v: String, what: &str| {
        v.parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("{what} SECS"))
    };
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--smoke" => {
                o.smoke = true;
                o.duration = Duration::from_secs(2);
                o.connections = 8;
                o.rounds = 1;
            }
            "--duration" => o.duration = secs(value()?, "--duration")?,
            "--pgbench-duration" => o.pgbench_duration = secs(value()?, "--pgbench-duration")?,
            "--rounds" => o.rounds = value()?.parse().map_err(|_| "--rounds N")?,
            "--connections" => o.connections = value()?.parse().map_err(|_| "--connections N")?,
            "--server" => o.server = value()?,
            "--pool" => o.pool = value()?.parse().map_err(|_| "--pool N")?,
            "--shards" => o.shards = value()?.parse().map_err(|_| "--shards N")?,
            "--only" => o.only = Some(value()?),
            "--outbox-ab" => o.outbox_ab = true,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.only.is_some() {
        o.rounds = 1;
    }
    if o.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    // The same transport as the ceilings (pgbench runs with PGSSLMODE=disable): without it, a
    // server with ssl=on would give the API TLS (libpq's default, `prefer`) and the ceilings
    // none. A URL that names its sslmode keeps it, for measuring TLS on purpose.
    if !o.server.contains("sslmode=") {
        let joiner = if o.server.contains('?') { '&' } else { '?' };
        o.server = format!("{}{joiner}sslmode=disable", o.server);
    }
    Ok(o)
}

/// A binary of this workspace, from the same profile as the harness.
fn binary(profile: &str, name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target"))
        .join(profile)
        .join(name)
}

/// Where a server's stdout goes: `BENCH_SERVER_LOG`, or nowhere.
fn log_to() -> Stdio {
    std::env::var_os("BENCH_SERVER_LOG")
        .and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        })
        .map_or_else(Stdio::null, Stdio::from)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

/// A process under test, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    /// Serves `db_url` as the app role, as deployed functions do. The runner is given the
    /// owner's URL and the roles' password: it makes the roles and connects as the app role
    /// itself.
    fn start(binary: &PathBuf, db_url: &str, pool: u32) -> Self {
        Self::start_with(binary, db_url, pool, &[])
    }

    /// [`Self::start`] with more environment (`--outbox-ab` sets the event sink).
    fn start_with(binary: &PathBuf, db_url: &str, pool: u32, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let is_runner = binary.file_name().is_some_and(|n| n == "tally");
        let url = if is_runner {
            db_url.to_owned()
        } else {
            tally_shared::pg::with_user(db_url, &Roles::default().app, Some(app_password()))
        };
        let child = Command::new(binary)
            .env("DATABASE_URL", url)
            .env("APP_DB_PASSWORD", app_password())
            .env("READONLY_DB_PASSWORD", app_password())
            .env("METRICS_PORT", "0")
            .env("PORT", port.to_string())
            .env("POOL_SIZE", pool.to_string())
            .env("JWT_HS256_SECRET", SECRET)
            .env("PROCESS_EVERY_MS", "0")
            // Orders are placed, not confirmed: the runner's own event delivery is off (the
            // outbox row is still written; --outbox-ab measures publishing it).
            .env("LOCAL_EVENTS", "false")
            .envs(env.iter().copied())
            // The access log is part of the cost being measured; BENCH_LOG_LEVEL=warn shows how much.
            .env(
                "LOG_LEVEL",
                std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            )
            // BENCH_SERVER_LOG=FILE keeps the server's log (append), to see why something failed.
            .stdout(log_to())
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

/// The ids the scenarios use.
#[derive(Clone, Copy)]
struct Catalog {
    hot: i64,
    sharded: i64,
    first_spread: i64,
}

impl Catalog {
    fn last_spread(&self) -> i64 {
        self.first_spread + SPREAD_PRODUCTS - 1
    }
}

async fn create_database(server: &str, prefix: &str) -> String {
    let name = format!(
        "{prefix}_{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    connect(server)
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    tally_shared::pg::with_database(server, &name)
}

/// The database under test: migrated, the demo seed, one hot product, one hot product spread
/// over `shards` rows, the spread catalog and 1,000 orders to read back.
async fn prepare(server: &str, shards: i32) -> (String, Catalog) {
    let url = create_database(server, "tally_bench").await;
    let password = Some(app_password());
    let roles = Roles::default();
    roles::ensure(
        &connect(server).await,
        &roles,
        [password, password],
        Limits::default(),
    )
    .await
    .expect("the app and read-only roles");
    let (client, _) = migrate::migrate(&url, &roles).await.expect("migrate");
    migrate::seed_if_empty(&client).await.unwrap();
    let insert = "INSERT INTO products (sku, name, price_cents, inventory) \
                  SELECT $1 || g, 'Bench ' || g, 100 + g, $2 FROM generate_series(1, $3::bigint) g \
                  RETURNING id";
    let mut ids = Vec::new();
    for (prefix, n) in [("HOT-", 1i64), ("SHARDED-", 1), ("S-", SPREAD_PRODUCTS)] {
        let rows = client.query(insert, &[&prefix, &STOCK, &n]).await.unwrap();
        ids.push(rows[0].get::<_, i64>(0));
    }
    let catalog = Catalog {
        hot: ids[0],
        sharded: ids[1],
        first_spread: ids[2],
    };
    client
        .execute(
            "SELECT set_stock_shards($1, $2)",
            &[&catalog.sharded, &shards],
        )
        .await
        .unwrap();
    client
        .execute(
            "SELECT place_order(1, ARRAY[$1::bigint], ARRAY[1]) FROM generate_series(1, 1000)",
            &[&catalog.first_spread],
        )
        .await
        .unwrap();
    client.batch_execute("VACUUM ANALYZE").await.unwrap();
    (url, catalog)
}

/// The minimal ceiling's own database (bench/ceiling/README.md).
async fn prepare_minimal(server: &str) -> String {
    let url = create_database(server, "tally_ceiling").await;
    let client = connect(&url).await;
    client
        .batch_execute(&pgbench::minimal_schema())
        .await
        .unwrap();
    client.batch_execute(pgbench::MINIMAL_SETUP).await.unwrap();
    client.batch_execute("VACUUM ANALYZE").await.unwrap();
    url
}

/// The app and read-only roles' password for this bench run.
fn app_password() -> &'static str {
    static PASSWORD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PASSWORD.get_or_init(|| {
        use std::hash::BuildHasher;
        // RandomState is keyed from the OS's randomness: two of them, 128 bits.
        let word = || std::hash::RandomState::new().hash_one(Instant::now());
        format!("{:016x}{:016x}", word(), word())
    })
}

async fn connect(url: &str) -> Client {
    tally_shared::pg::connect(url)
        .await
        .expect("connect to PostgreSQL")
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
             CROSS JOIN LATERAL (SELECT stock_of(p.id) AS stock) c
             WHERE c.stock < 0
                OR c.stock <> coalesce(l.total, 0)
                OR coalesce(l.initial, 0) <> c.stock + coalesce(s.quantity, 0)",
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
        tally_dev::token::mint(&config, 1, Role::Customer, Duration::from_secs(3600)).unwrap()
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

/// An order scenario: its load, and the ceilings it is compared with.
struct Scenario {
    name: &'static str,
    make: MakeRequest,
    minimal: Option<Script>,
    own: Option<Script>,
}

fn xorshift_pick(r: u64, k: u32, first: i64) -> i64 {
    first + ((r >> (8 + 10 * k)) % SPREAD_PRODUCTS as u64) as i64
}

fn order_scenarios(c: Catalog) -> Vec<Scenario> {
    let bearer = Arc::new(token());
    let one = |b: Arc<String>, pick: Arc<dyn Fn(u64) -> i64 + Send + Sync>| -> MakeRequest {
        Arc::new(move |_, r| {
            let p = pick(r);
            post_order(
                &b,
                format!(r#"{{"items":[{{"product_id":{p},"quantity":1}}]}}"#),
            )
        })
    };
    let b = bearer.clone();
    let spread: MakeRequest = Arc::new(move |_, r| {
        let lines = 1 + (r % 3) as u32;
        let items: Vec<String> = (0..lines)
            .map(|k| {
                let p = xorshift_pick(r, k, c.first_spread);
                format!(r#"{{"product_id":{p},"quantity":1}}"#)
            })
            .collect();
        post_order(&b, format!(r#"{{"items":[{}]}}"#, items.join(",")))
    });
    let (first, last) = (c.first_spread, c.last_spread());
    vec![
        Scenario {
            name: "hot SKU",
            make: one(bearer.clone(), Arc::new(move |_| c.hot)),
            minimal: Some(Script::Minimal("hot.pgbench")),
            own: Some(Script::Own(pgbench::own_hot(c.hot))),
        },
        Scenario {
            name: "spread",
            make: spread,
            minimal: Some(Script::Minimal("spread.pgbench")),
            own: Some(Script::Own(pgbench::own_spread(first, last))),
        },
        Scenario {
            name: "hot SKU, sharded",
            make: one(bearer.clone(), Arc::new(move |_| c.sharded)),
            minimal: None,
            own: Some(Script::Own(pgbench::own_hot(c.sharded))),
        },
        Scenario {
            name: "one-line spread",
            make: one(bearer, Arc::new(move |r| xorshift_pick(r, 0, first))),
            minimal: Some(Script::Minimal("spread1.pgbench")),
            own: Some(Script::Own(pgbench::own_spread1(first, last))),
        },
    ]
}

fn read_scenarios() -> Vec<(&'static str, MakeRequest)> {
    let bearer = Arc::new(token());
    let b = bearer.clone();
    let products: MakeRequest = Arc::new(move |_, _| get(&b, "/products".into()));
    let orders: MakeRequest =
        Arc::new(move |_, r| get(&bearer, format!("/orders/{}", 1 + r % 1000)));
    vec![("GET /products", products), ("GET /orders/{id}", orders)]
}

/// One round of one order scenario: its ceilings, then the API under load with its costs.
#[derive(Debug, Clone, Serialize)]
struct Round {
    #[serde(flatten)]
    load: LoadResult,
    cost: Cost,
    minimal_ceiling: Option<Ceiling>,
    own_ceiling: Option<Ceiling>,
}

#[derive(Debug, Serialize)]
struct ScenarioReport {
    name: &'static str,
    /// The round with the median API throughput.
    median: Round,
    minimal_ratio: Option<f64>,
    own_ratio: Option<f64>,
    rounds: Vec<Round>,
}

fn summarise(name: &'static str, rounds: Vec<Round>) -> ScenarioReport {
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|a, b| {
        rounds[*a]
            .load
            .throughput
            .total_cmp(&rounds[*b].load.throughput)
    });
    let median = rounds[order[order.len() / 2]].clone();
    // Each ceiling's median over the rounds, so the ratio is median over median.
    let median_of = |pick: &dyn Fn(&Round) -> Option<f64>| {
        let mut v: Vec<f64> = rounds.iter().filter_map(pick).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let minimal = median_of(&|r| r.minimal_ceiling.as_ref().map(|c| c.best_tps));
    let own = median_of(&|r| r.own_ceiling.as_ref().map(|c| c.best_tps));
    let throughput = median.load.throughput;
    ScenarioReport {
        name,
        minimal_ratio: minimal.map(|c| throughput / c),
        own_ratio: own.map(|c| throughput / c),
        median,
        rounds,
    }
}

async fn run_round(o: &Options, server: &Server, urls: (&str, &str), s: &Scenario) -> Round {
    run_round_with(o, server, urls, s, !o.smoke && o.only.is_none()).await
}

async fn run_round_with(
    o: &Options,
    server: &Server,
    urls: (&str, &str),
    s: &Scenario,
    ceilings: bool,
) -> Round {
    let pgb = |script: &Option<Script>, url: &str, what: &str| {
        let name = format!("{}-{what}", s.name.replace([' ', ','], "_"));
        script.as_ref().filter(|_| ceilings).map(|sc| {
            pgbench::ceiling(url, &name, sc, o.pgbench_duration)
                .unwrap_or_else(|e| panic!("bench: no ceiling, so no figures: {e}"))
        })
    };
    let minimal_ceiling = pgb(&s.minimal, urls.1, "minimal");
    let own_ceiling = pgb(&s.own, urls.0, "own");
    // The costs cover the measured run only, not the warm-up.
    let warmup_unexpected = load::warm_up(server.addr, o.connections, s.make.clone()).await;
    let probe = Probe::start(connect(urls.0).await, server.child.id()).await;
    let load = LoadResult {
        warmup_unexpected,
        ..load::run(server.addr, o.connections, o.duration, s.make.clone()).await
    };
    let cost = probe
        .finish(&connect(urls.0).await, load.ok(), load.seconds)
        .await;
    Round {
        load,
        cost,
        minimal_ceiling,
        own_ceiling,
    }
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
    // BENCH_SERVER points at another binary, e.g. one built with symbols for perf.
    let runner = std::env::var_os("BENCH_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| binary(o.profile, "tally"));
    let (url, catalog) = prepare(&o.server, o.shards).await;
    let minimal_url = if o.smoke {
        String::new()
    } else {
        prepare_minimal(&o.server).await
    };
    eprintln!(
        "bench: database {url}, {} connections, {:?} per run, {} rounds, pool {}, {} shards, {} binaries",
        o.connections, o.duration, o.rounds, o.pool, o.shards, o.profile
    );
    if o.outbox_ab {
        return outbox::ab(&o, &runner, (&url, &minimal_url), catalog).await;
    }
    let server = Server::start(&runner, &url, o.pool);
    let (reports, reads) = measure(&o, &server, (&url, &minimal_url), catalog).await;
    drop(server);
    let unexpected: u64 = reports
        .iter()
        .flat_map(|r| r.rounds.iter().map(|x| x.load.unexpected()))
        .chain(reads.iter().map(|(_, r)| r.unexpected()))
        .sum();
    let drift = books_drift(&url).await;
    eprintln!(
        "bench: {unexpected} unexpected (non-2xx) responses; {drift} products whose books do not balance"
    );
    if o.smoke || o.only.is_some() {
        drop_database(&o.server, &url).await;
        let requests: u64 = reports.iter().map(|r| r.median.load.requests).sum::<u64>()
            + reads.iter().map(|(_, r)| r.requests).sum::<u64>();
        return smoke_verdict(requests, unexpected, drift);
    }
    let (cold, rss, function_unexpected) = one_function(&o, &url, catalog).await;
    let unexpected = unexpected + function_unexpected;
    let drift = books_drift(&url).await;
    let result = full_report(&o, reports, &reads, (cold, rss), unexpected, drift);
    write_results(&result);
    drop_database(&o.server, &url).await;
    drop_database(&o.server, &minimal_url).await;
    if unexpected == 0 && drift == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Everything a full run measured, as `latest.json` keeps it.
fn full_report(
    o: &Options,
    reports: Vec<ScenarioReport>,
    reads: &[(&'static str, LoadResult)],
    (cold, rss): (serde_json::Value, serde_json::Value),
    unexpected: u64,
    drift: i64,
) -> serde_json::Value {
    json!({
        "machine": machine(),
        "connections": o.connections,
        "seconds_per_run": o.duration.as_secs(),
        "pgbench_seconds_per_client_count": o.pgbench_duration.as_secs(),
        "rounds": o.rounds,
        "pool_size": o.pool,
        "stock_shards": o.shards,
        "scenarios": reports,
        "reads": reads.iter().map(|(n, r)| json!({"name": n, "load": r})).collect::<Vec<_>>(),
        "cold_start_ms": cold,
        "create_order_rss_kb": rss,
        "unexpected_responses": unexpected,
        "books_drift": drift,
    })
}

/// A short run passes when it sent requests, every one was 2xx and the books balance.
fn smoke_verdict(requests: u64, unexpected: u64, drift: i64) -> ExitCode {
    if unexpected == 0 && drift == 0 && requests > 0 {
        println!("bench smoke: ok ({requests} requests, every one 2xx, books balanced)");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Every order scenario, round after round (interleaved, so the machine's noise falls on all of
/// them alike), then the reads.
async fn measure(
    o: &Options,
    server: &Server,
    urls: (&str, &str),
    catalog: Catalog,
) -> (Vec<ScenarioReport>, Vec<(&'static str, LoadResult)>) {
    let scenarios: Vec<Scenario> = order_scenarios(catalog)
        .into_iter()
        .filter(|s| {
            o.only
                .as_ref()
                .is_none_or(|only| s.name.starts_with(only.as_str()))
        })
        .collect();
    let mut rounds: BTreeMap<&'static str, Vec<Round>> = BTreeMap::new();
    for round in 1..=o.rounds {
        for s in &scenarios {
            let r = run_round(o, server, urls, s).await;
            eprintln!(
                "bench: round {round}, {}: {}",
                s.name,
                report::round_line(&r)
            );
            rounds.entry(s.name).or_default().push(r);
        }
    }
    let reports = scenarios
        .iter()
        .map(|s| summarise(s.name, rounds.remove(s.name).unwrap_or_default()))
        .collect();
    let mut reads = Vec::new();
    if o.only.is_none() {
        for (name, make) in read_scenarios() {
            let r = load::measure(server.addr, o.connections, o.duration, make).await;
            eprintln!(
                "bench: {name}: {:.0}/s p99 {:.2} ms {:?}",
                r.throughput, r.p99_ms, r.statuses
            );
            reads.push((name, r));
        }
    }
    (reports, reads)
}

/// `bench/results/latest.json` and `latest.md`, and the table on stdout.
fn write_results(result: &serde_json::Value) {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("latest.json"),
        serde_json::to_string_pretty(result).unwrap(),
    )
    .unwrap();
    let table = report::markdown(result);
    std::fs::write(dir.join("latest.md"), &table).unwrap();
    println!("{table}");
}

/// One function binary (create-order): cold start (median of 10) and memory, idle and after
/// a few seconds of hot-SKU load.
async fn one_function(
    o: &Options,
    url: &str,
    c: Catalog,
) -> (serde_json::Value, serde_json::Value, u64) {
    let function = binary(o.profile, "create-order");
    let mut cold: Vec<Duration> = (0..10)
        .map(|_| {
            let started = Instant::now();
            let s = Server::start(&function, url, 4);
            let d = started.elapsed();
            drop(s);
            d
        })
        .collect();
    cold.sort();
    let s = Server::start(&function, url, 4);
    std::thread::sleep(Duration::from_millis(200));
    let rss_idle = s.rss_kb("VmRSS:");
    let make = order_scenarios(c).swap_remove(0).make;
    let under_load = load::run(
        s.addr,
        o.connections,
        o.duration.min(Duration::from_secs(5)),
        make,
    )
    .await;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (
        json!({"median": ms(cold[5]), "min": ms(cold[0]), "max": ms(cold[9])}),
        json!({"idle": rss_idle, "after_load": s.rss_kb("VmRSS:"), "peak": s.rss_kb("VmHWM:"), "load_requests": under_load.requests}),
        under_load.unexpected(),
    )
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
