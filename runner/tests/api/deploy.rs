//! The deployment's contract with the code: every path the runner serves is routed by the
//! compose proxy, and by the cluster's HTTPS gateway, to the function that owns it and has a
//! Knative Service; and every function
//! binary keeps the Knative runtime contract (listens on $PORT, answers /healthz, writes
//! nothing outside /tmp, drains in-flight requests on SIGTERM and exits 0, starts fast).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::faults::free_port;
use crate::helpers::{TestApp, admin_url, fresh_database, jwt_env, random_u64};

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The `map "$request_method $uri" $function` block of compose/nginx.conf, in order.
fn proxy_routes() -> (String, Vec<(regex::Regex, String)>) {
    let conf = std::fs::read_to_string(format!("{WORKSPACE}/compose/nginx.conf")).unwrap();
    let block = conf
        .split("map \"$request_method $uri\" $function {")
        .nth(1)
        .unwrap();
    let block = block.split('}').next().unwrap();
    let mut default = String::new();
    let mut routes = Vec::new();
    for line in block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let line = line.trim_end_matches(';');
        let (key, function) = line.rsplit_once(char::is_whitespace).unwrap();
        let key = key.trim().trim_matches('"');
        match key.strip_prefix('~') {
            Some(pattern) => {
                routes.push((regex::Regex::new(pattern).unwrap(), function.to_owned()))
            }
            None if key == "default" => default = function.to_owned(),
            None => panic!("unexpected map key {key}"),
        }
    }
    (default, routes)
}

/// A rule of the gateway's HTTPRoutes (knative/overlays/doks/gateway.yaml): its matches, as
/// (method or any, path type, value), and the function its Host rewrite names.
struct GatewayRule {
    matches: Vec<(Option<String>, String, String)>,
    function: String,
}

fn gateway_rules() -> Vec<GatewayRule> {
    use serde::Deserialize;
    let text =
        std::fs::read_to_string(format!("{WORKSPACE}/knative/overlays/doks/gateway.yaml")).unwrap();
    let mut rules = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let doc = serde_json::Value::deserialize(document).unwrap();
        if doc["kind"] != "HTTPRoute" || doc["spec"]["parentRefs"][0]["sectionName"] != "https" {
            continue;
        }
        for rule in doc["spec"]["rules"].as_array().unwrap() {
            let host = rule["filters"][0]["urlRewrite"]["hostname"]
                .as_str()
                .unwrap();
            let function = host.strip_suffix(".tally.svc.cluster.local").unwrap();
            let backend = &rule["backendRefs"][0];
            assert_eq!(
                (&backend["name"], &backend["namespace"]),
                (&"kourier-internal".into(), &"kourier-system".into()),
                "{function}: every rule hands over to Knative's ingress"
            );
            let matches = rule["matches"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["method"].as_str().map(str::to_owned),
                        m["path"]["type"].as_str().unwrap().to_owned(),
                        m["path"]["value"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            rules.push(GatewayRule {
                matches,
                function: function.to_owned(),
            });
        }
    }
    rules
}

/// Where the gateway sends `method path`: Envoy Gateway's order, Exact before
/// RegularExpression before PathPrefix (longest first), a method match before none.
fn gateway_route(rules: &[GatewayRule], method: &str, path: &str) -> Option<String> {
    let mut best: Option<((u8, usize, u8), &str)> = None;
    for rule in rules {
        for (m, kind, value) in &rule.matches {
            if m.as_deref().is_some_and(|m| m != method) {
                continue;
            }
            let rank = match kind.as_str() {
                "Exact" if path == value => (3, value.len(), 0),
                "RegularExpression" if regex::Regex::new(value).unwrap().is_match(path) => {
                    (2, value.len(), 0)
                }
                "PathPrefix" if path.starts_with(value.as_str()) => (1, value.len(), 0),
                _ => continue,
            };
            let rank = (rank.0, rank.1, u8::from(m.is_some()));
            if best.is_none_or(|(b, _)| rank > b) {
                best = Some((rank, &rule.function));
            }
        }
    }
    best.map(|(_, f)| f.to_owned())
}

#[test]
fn the_gateway_routes_every_path_the_runner_serves_to_its_function() {
    let rules = gateway_rules();
    let mut checked = 0;
    for (function, function_routes) in tally::functions() {
        for route in function_routes {
            let path = route.pattern.replace("{id}", "17");
            let method = route.method.as_str();
            assert_eq!(
                gateway_route(&rules, method, &path).as_deref(),
                Some(function),
                "{method} {path}"
            );
            if method == "GET" {
                assert_eq!(
                    gateway_route(&rules, "HEAD", &path).as_deref(),
                    Some(function)
                );
            }
            // A browser's preflight for any route reaches a function, which answers it.
            assert!(gateway_route(&rules, "OPTIONS", &path).is_some());
            checked += 1;
        }
    }
    assert_eq!(checked, 9, "every route of the six public functions");
    for path in ["/healthz", "/livez", "/openapi.json"] {
        assert_eq!(
            gateway_route(&rules, "GET", path).as_deref(),
            Some("list-products")
        );
    }
    // What no function claims still reaches one, which answers 404 or 405 with a JSON body.
    for (method, path) in [
        ("GET", "/nope"),
        ("DELETE", "/orders/1"),
        ("PUT", "/products"),
    ] {
        assert_eq!(
            gateway_route(&rules, method, path).as_deref(),
            Some("list-products"),
            "{method} {path}"
        );
    }
}

#[test]
fn the_proxy_routes_every_path_the_runner_serves_to_its_function() {
    let (default, routes) = proxy_routes();
    let compose =
        std::fs::read_to_string(format!("{WORKSPACE}/compose/docker-compose.yml")).unwrap();
    let mut checked = 0;
    for (function, function_routes) in tally::functions() {
        assert!(
            compose.contains(&format!("\n  {function}:\n")),
            "{function} has no compose service"
        );
        assert!(
            Path::new(&format!("{WORKSPACE}/knative/base/ksvc-{function}.yaml")).exists(),
            "{function} has no Knative Service"
        );
        for route in function_routes {
            let path = route.pattern.replace("{id}", "17");
            let key = format!("{} {path}", route.method);
            let routed = routes
                .iter()
                .find(|(re, _)| re.is_match(&key))
                .map_or(default.as_str(), |(_, f)| f.as_str());
            assert_eq!(routed, function, "{key} is routed to {routed}");
            checked += 1;
        }
    }
    assert_eq!(checked, 9, "every route of the six public functions");
}

/// A function binary, spawned as Knative runs it: $PORT, config from the environment, a
/// non-root user, and a read-only working directory of its own (only /tmp is writable).
struct Function {
    child: Child,
    port: u16,
    metrics_port: u16,
    workdir: PathBuf,
}

impl Function {
    fn spawn(name: &str, db_url: &str) -> Self {
        Self::spawn_logging(name, db_url, false)
    }

    /// With `log`, the access log (info level) is readable on the child's stdout.
    fn spawn_logging(name: &str, db_url: &str, log: bool) -> Self {
        let (port, metrics_port) = (free_port(), free_port());
        let workdir = PathBuf::from(format!(
            "{}/cwd-{name}-{:x}",
            env!("CARGO_TARGET_TMPDIR"),
            random_u64()
        ));
        std::fs::create_dir_all(&workdir).unwrap();
        std::fs::set_permissions(
            &workdir,
            std::os::unix::fs::PermissionsExt::from_mode(0o555),
        )
        .unwrap();
        let mut command = Command::new(binary(name));
        // Root ignores permissions: run as `nobody`, as the images run as a non-root uid, when
        // `nobody` can reach the binary and the directory (a checkout under /root cannot).
        let is_root = std::fs::metadata("/proc/self")
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
        if is_root && others_can_reach(&binary(name)) && others_can_reach(&workdir) {
            std::os::unix::process::CommandExt::uid(&mut command, 65534);
            std::os::unix::process::CommandExt::gid(&mut command, 65534);
        }
        let child = command
            .current_dir(&workdir)
            .env_clear()
            .env("HOME", &workdir)
            .env("TMPDIR", "/tmp")
            .env("PORT", port.to_string())
            .env("METRICS_PORT", metrics_port.to_string())
            // Each function as deployed: connected as the app role.
            .env("DATABASE_URL", crate::helpers::as_app(db_url))
            .env("LOG_LEVEL", if log { "info" } else { "warn" })
            .envs(jwt_env())
            .stdout(if log { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self {
            child,
            port,
            metrics_port,
            workdir,
        }
    }

    /// Status of a GET, None while nothing listens.
    fn get(&self, path: &str) -> Option<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        response.split_whitespace().nth(1)?.parse().ok()
    }

    /// One HTTP/1.1 request on a fresh connection: (status, body).
    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        send_to(self.port, method, path, headers, body)
    }

    /// `GET /metrics` on the metrics port.
    fn scrape(&self) -> (u16, String) {
        send_to(self.metrics_port, "GET", "/metrics", &[], "")
    }

    /// Spawn → first 200 on /healthz (which asks Postgres).
    fn wait_ready(&self) -> Duration {
        let started = Instant::now();
        while self.get("/healthz") != Some(200) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no 200 on /healthz"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        started.elapsed()
    }

    fn terminate(&self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
    }
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

/// Whether every directory above `path` lets other users through (o+x).
fn others_can_reach(path: &Path) -> bool {
    path.ancestors().skip(1).all(|dir| {
        std::fs::metadata(dir)
            .is_ok_and(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o001 != 0)
    })
}

fn binary(name: &str) -> PathBuf {
    let tally = PathBuf::from(env!("CARGO_BIN_EXE_tally"));
    tally.with_file_name(format!("fn-{name}"))
}

const FUNCTIONS: [&str; 8] = [
    "list-products",
    "create-order",
    "get-order",
    "list-orders",
    "cancel-order",
    "admin-products",
    "process-orders",
    "backup",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_function_binary_keeps_the_knative_runtime_contract() {
    let db_url = fresh_database(admin_url()).await;
    let mut cold_starts = Vec::new();
    for name in FUNCTIONS {
        let db_url = db_url.clone();
        let (cold, leftovers, status) = tokio::task::spawn_blocking(move || {
            let mut f = Function::spawn(name, &db_url);
            let cold = f.wait_ready();
            assert_eq!(f.get("/nope"), Some(404), "{name}");

            // A request in flight: headers sent, half the body still to come.
            let mut slow = TcpStream::connect(("127.0.0.1", f.port)).unwrap();
            slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(slow, "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\n{{}}").unwrap();
            std::thread::sleep(Duration::from_millis(100));
            f.terminate();
            std::thread::sleep(Duration::from_millis(200));
            assert!(TcpStream::connect(("127.0.0.1", f.port)).is_err(), "{name}: still accepting after SIGTERM");
            slow.write_all(b"  ").unwrap();
            let mut response = String::new();
            let _ = slow.read_to_string(&mut response);
            assert!(response.starts_with("HTTP/1.1 405"), "{name}: the in-flight request got {response:?}");

            let deadline = Instant::now() + Duration::from_secs(10);
            let status = loop {
                if let Some(status) = f.child.try_wait().unwrap() {
                    break status;
                }
                assert!(Instant::now() < deadline, "{name}: did not exit after SIGTERM");
                std::thread::sleep(Duration::from_millis(10));
            };
            let leftovers: Vec<_> = std::fs::read_dir(&f.workdir).unwrap().map(|e| e.unwrap().file_name()).collect();
            (cold, leftovers, status)
        })
        .await
        .unwrap();
        assert_eq!(status.code(), Some(0), "{name} exit status");
        assert!(
            leftovers.is_empty(),
            "{name} wrote {leftovers:?} outside /tmp"
        );
        cold_starts.push((name, cold));
    }

    // Cold start of one function, median of 10: spawn to the first 200 on a DB-backed endpoint.
    let samples = tokio::task::spawn_blocking(move || {
        let mut samples: Vec<Duration> = (0..10)
            .map(|_| {
                let f = Function::spawn("list-products", &db_url);
                f.wait_ready()
            })
            .collect();
        samples.sort();
        samples
    })
    .await
    .unwrap();
    eprintln!(
        "cold start (spawn -> first 200 on /healthz): list-products median {:?} (min {:?}, max {:?}); first start of each: {}",
        samples[5],
        samples[0],
        samples[9],
        cold_starts
            .iter()
            .map(|(n, d)| format!("{n} {d:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(
        samples[5] < Duration::from_secs(2),
        "a debug build still starts in well under 2 s"
    );
}

#[test]
fn a_function_without_its_settings_stops_with_one_clear_line() {
    for (vars, expect) in [
        (vec![], "missing environment variable DATABASE_URL"),
        (
            vec![
                ("DATABASE_URL", "postgres://x@127.0.0.1/x"),
                ("PORT", "eighty"),
            ],
            "PORT",
        ),
        (
            vec![("DATABASE_URL", "postgres://x@127.0.0.1/x")],
            "set JWT_HS256_SECRET or JWT_PUBLIC_KEY_PEM",
        ),
    ] {
        let out = Command::new(binary("create-order"))
            .env_clear()
            .envs(vars)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expect), "{stderr}");
    }
}

/// The public catalog needs no key material at all (none is mounted into it), and runs as the
/// read-only role.
#[tokio::test]
async fn list_products_serves_with_no_signing_key_as_the_read_only_role() {
    let db_url = fresh_database(admin_url()).await;
    let client = tally_shared::pg::connect(&db_url).await.unwrap();
    tally_shared::migrate::seed_if_empty(&client).await.unwrap();
    let port = free_port();
    let mut child = tokio::process::Command::new(binary("list-products"))
        .env_clear()
        .env("DATABASE_URL", crate::helpers::as_readonly(&db_url))
        .env("PORT", port.to_string())
        .env("METRICS_PORT", "0")
        .env("LOG_LEVEL", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let app = TestApp::attach(port, &db_url).await;
    app.wait_until_up().await;
    let r = app.get("/products").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json().as_array().map(Vec::len), Some(3), "{:?}", r.json());
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

/// The value of the sample whose line contains every one of `parts`.
fn sample(metrics: &str, name: &str, parts: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{'))
        })
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_orders_and_rejections_exactly() {
    let (db_url, token) = seeded_database_and_customer_token().await;
    let text = tokio::task::spawn_blocking(move || {
        let f = Function::spawn("create-order", &db_url);
        f.wait_ready();
        let bearer = format!("Bearer {token}");
        let json = ("content-type", "application/json");
        let ok = r#"{"items":[{"product_id":1,"quantity":1}]}"#;
        let short = r#"{"items":[{"product_id":3,"quantity":5}]}"#;
        for _ in 0..3 {
            assert_eq!(
                f.send("POST", "/orders", &[json, ("authorization", &bearer)], ok)
                    .0,
                201
            );
        }
        for _ in 0..2 {
            assert_eq!(
                f.send(
                    "POST",
                    "/orders",
                    &[json, ("authorization", &bearer)],
                    short
                )
                .0,
                409
            );
        }
        assert_eq!(f.send("POST", "/orders", &[json], ok).0, 401);
        assert_eq!(
            f.send("GET", "/metrics", &[], "").0,
            404,
            "not on the public port"
        );
        let (status, text) = f.scrape();
        assert_eq!(status, 200);
        text
    })
    .await
    .unwrap();
    let route = "route=\"/orders\"";
    assert_eq!(
        sample(&text, "tally_orders_placed_total", &[]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "tally_orders_rejected_total",
            &["reason=\"insufficient_inventory\""]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "tally_inventory_conflicts_total", &[]),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "tally_http_requests_total",
            &[route, "status=\"201\""]
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            "tally_http_requests_total",
            &[route, "status=\"409\""]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "tally_http_requests_total",
            &[route, "status=\"401\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "tally_http_request_duration_seconds_count",
            &[route, "status=\"201\""]
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            "tally_db_statement_duration_seconds_count",
            &["statement=\"place_order_one\""]
        ),
        Some(5.0)
    );
    // The two refused one-line orders were handed back to place_order_lean for their 409.
    assert_eq!(
        sample(
            &text,
            "tally_db_statement_duration_seconds_count",
            &["statement=\"place_order\""]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "tally_orders_handed_back_total", &[]),
        Some(2.0)
    );
    assert!(
        sample(&text, "tally_db_pool_connections", &["state=\"idle\""]).is_some_and(|n| n >= 1.0)
    );
    assert_eq!(sample(&text, "tally_db_pool_waiting", &[]), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_carry_the_callers_trace_id() {
    let db_url = fresh_database(admin_url()).await;
    let line = tokio::task::spawn_blocking(move || {
        let mut f = Function::spawn_logging("list-products", &db_url, true);
        f.wait_ready();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            f.send(
                "GET",
                "/products",
                &[("traceparent", traceparent), ("x-request-id", "req-42")],
                ""
            )
            .0,
            200
        );
        f.terminate();
        let mut out = String::new();
        f.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        out.lines()
            .find(|l| l.contains("req-42"))
            .unwrap_or_default()
            .to_owned()
    })
    .await
    .unwrap();
    let log: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line:?}"));
    assert_eq!(log["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(log["request_id"], "req-42");
    assert_eq!(log["route"], "/products");
    assert_eq!(log["status"], 200);
    assert_eq!(log["method"], "GET");
    assert!(log["latency_us"].as_u64().is_some());
}

#[test]
fn the_runner_without_postgres_binaries_says_how_to_get_them() {
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .env_remove("DATABASE_URL")
        .env("PG_BINDIR", "/nonexistent/postgresql/bin")
        .env(
            "TALLY_DATA_DIR",
            format!("{}/no-pg-{:x}", env!("CARGO_TARGET_TMPDIR"), random_u64()),
        )
        .env("PORT", free_port().to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("apt-get install postgresql") && stderr.contains("DATABASE_URL"),
        "{stderr}"
    );
}

/// One HTTP/1.1 request to 127.0.0.1:`port` on a fresh connection: (status, body).
fn send_to(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    write!(s, "{head}\r\n{body}").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `--help` and `--version` print and exit 0 without touching anything (the database named
/// here answers nowhere); a bad command line exits 2 with a usage line.
#[test]
fn command_lines_answer_help_and_version_and_refuse_what_they_do_not_know() {
    let tally = PathBuf::from(env!("CARGO_BIN_EXE_tally"));
    let backup = binary("backup");
    let run = |program: &PathBuf, args: &[&str]| {
        let out = Command::new(program)
            .args(args)
            .env_clear()
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    for (program, args) in [
        (&tally, &["--help"][..]),
        (&tally, &["token", "--help"]),
        (&tally, &["backup", "--help"]),
        (&tally, &["backup", "restore", "--help"]),
        (&tally, &["migrate", "--help"]),
        (&backup, &["--help"]),
        (&backup, &["restore", "--help"]),
    ] {
        let (code, stdout, stderr) = run(program, args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(stdout.contains("Usage:"), "{args:?}: {stdout}");
    }
    let (_, help, _) = run(&tally, &["--help"]);
    for command in ["token", "backup", "migrate"] {
        assert!(
            help.contains(command),
            "tally --help lists {command}: {help}"
        );
    }
    for program in [&tally, &backup] {
        let (code, stdout, _) = run(program, &["--version"]);
        assert_eq!(code, Some(0));
        assert!(stdout.contains("0.1.0"), "{stdout}");
    }
    for (program, args) in [
        (&tally, &["--bogus"][..]),
        (&tally, &["token", "--sub", "x"]),
        (&tally, &["token", "--sub", "1", "--role", "root"]),
        (&tally, &["migrate", "--bogus"]),
        (&backup, &["restore"]),
        (&backup, &["frobnicate"]),
    ] {
        let (code, _, stderr) = run(program, args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error:")
                && (stderr.contains("Usage:") || stderr.contains("--help")),
            "{args:?}: {stderr}"
        );
    }
}

/// Metric names Knative and Kubernetes publish, as their documentation lists them: Knative
/// Serving's autoscaler, activator and queue-proxy metrics (knative.dev/docs, "Serving
/// metrics"), kube-state-metrics' CronJob metrics and the kubelet's volume statistics.
const PLATFORM_METRICS: &[&str] = &[
    "autoscaler_desired_pods",
    "autoscaler_requested_pods",
    "autoscaler_actual_pods",
    "autoscaler_not_ready_pods",
    "autoscaler_pending_pods",
    "autoscaler_terminating_pods",
    "autoscaler_stable_request_concurrency",
    "autoscaler_panic_request_concurrency",
    "autoscaler_target_concurrency_per_pod",
    "autoscaler_excess_burst_capacity",
    "autoscaler_panic_mode",
    "activator_request_concurrency",
    "activator_request_count",
    "activator_request_latencies",
    "revision_request_count",
    "revision_request_latencies",
    "revision_app_request_count",
    "revision_app_request_latencies",
    "revision_queue_depth",
    "kube_cronjob_status_last_successful_time",
    "kubelet_volume_stats_used_bytes",
    "kubelet_volume_stats_capacity_bytes",
];

/// The metric names a PromQL text reads: every identifier followed by `{`, `[` or a space and
/// an operator, less PromQL's own words. Good enough for our rules and panels, which always
/// select their metrics with braces.
fn metric_names(promql: &str) -> Vec<String> {
    let re = regex::Regex::new(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{").unwrap();
    re.captures_iter(promql)
        .map(|c| c[1].to_owned())
        // A histogram's buckets are published under its documented name.
        .map(|name| match name.strip_suffix("_bucket") {
            Some(histogram) if !name.starts_with("tally_") => histogram.to_owned(),
            _ => name,
        })
        .collect()
}

#[tokio::test]
async fn every_metric_the_alerts_and_the_dashboard_name_exists() {
    use serde::Deserialize;
    let mut named = std::collections::BTreeSet::new();
    let rules = std::fs::read_to_string(format!("{WORKSPACE}/knative/alerts/rules.yml")).unwrap();
    let rules =
        serde_json::Value::deserialize(serde_norway::Deserializer::from_str(&rules)).unwrap();
    for rule in rules["groups"][0]["rules"].as_array().unwrap() {
        named.extend(metric_names(rule["expr"].as_str().unwrap()));
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{WORKSPACE}/knative/alerts/dashboard-autoscaling.json"
        ))
        .unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            named.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    assert!(named.len() >= 15, "{named:?}");
    let (ours, theirs): (Vec<_>, Vec<_>) = named.iter().partition(|n| n.starts_with("tally_"));
    for name in &theirs {
        assert!(
            PLATFORM_METRICS.contains(&name.as_str()),
            "{name}: not a documented metric"
        );
    }

    // Ours, from the functions themselves: create-order takes an order and refuses one;
    // the processor sweeps once (a ping event, as the PingSource sends it).
    let (db_url, token) = seeded_database_and_customer_token().await;
    let text = tokio::task::spawn_blocking(move || {
        let bearer = format!("Bearer {token}");
        let json = ("content-type", "application/json");
        let orders = Function::spawn("create-order", &db_url);
        orders.wait_ready();
        for (body, status) in [
            (r#"{"items":[{"product_id":1,"quantity":1}]}"#, 201),
            (r#"{"items":[{"product_id":3,"quantity":5}]}"#, 409),
        ] {
            let sent = orders.send("POST", "/orders", &[json, ("authorization", &bearer)], body);
            assert_eq!(sent.0, status);
        }
        let processor = Function::spawn("process-orders", &db_url);
        processor.wait_ready();
        let ping = [
            ("ce-specversion", "1.0"),
            ("ce-id", "ping-1"),
            ("ce-source", "/apis/v1/namespaces/tally/pingsources/p"),
            ("ce-type", "dev.knative.sources.ping"),
        ];
        assert_eq!(processor.send("POST", "/events", &ping, "").0, 200);
        format!("{}\n{}", orders.scrape().1, processor.scrape().1)
    })
    .await
    .unwrap();
    for name in ours {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name.as_str())
                    && l[name.len()..].starts_with(['{', ' ', '_'])),
            "{name} is not in any function's /metrics"
        );
    }
}

/// A fresh database with the demo seed, and a customer token for user 1 that the spawned
/// function binaries accept.
async fn seeded_database_and_customer_token() -> (String, String) {
    let db_url = fresh_database(admin_url()).await;
    let client = tally_shared::pg::connect(&db_url).await.unwrap();
    tally_shared::migrate::seed_if_empty(&client).await.unwrap();
    let config = crate::helpers::test_config(&db_url, &[]);
    let token = tally_dev::token::mint(
        &config,
        1,
        tally_shared::auth::Role::Customer,
        Duration::from_secs(60),
    )
    .unwrap();
    (db_url, token)
}
