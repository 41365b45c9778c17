//! The test harness: a fresh database per test, the server on port 0 in-process, an HTTP
//! client, and the bookkeeping checks every storm ends with.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tally_dev::devdb::PrivatePostgres;
use tally_shared::auth::Role;
use tally_shared::roles::{self, Roles};
use tally_shared::{Config, migrate, runtime};

/// A header value that tells [`TestApp::request`] to send no such header at all.
pub const NO_AUTH: &str = "\u{0}no-auth";

/// The server that hosts the test databases: `TEST_DATABASE_URL`, or a private cluster of this
/// run's own, in this run's private directory, stopped and deleted when the run ends.
pub fn admin_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        tally_shared::telemetry::init_for_tests();
        let url = std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| {
            let cluster = PrivatePostgres::new(
                &fresh_dir("pg"),
                crate::faults::free_port(),
                "-c fsync=off -c max_connections=300",
            )
            .expect("a PostgreSQL server for the tests");
            cluster.start().expect("starting the test PostgreSQL");
            let url = cluster.url("postgres");
            RUN.lock().unwrap().cluster = Some(cluster);
            url
        });
        RUN.lock().unwrap().server = Some(url.clone());
        // SAFETY: registers a plain `extern "C" fn` with no captured state, once.
        unsafe { libc::atexit(clean_up_this_run) };
        url
    })
}

/// What this run made and must take away when it ends, and nothing else: another run sharing
/// the server keeps its databases and roles.
#[derive(Default)]
struct Run {
    server: Option<String>,
    cluster: Option<PrivatePostgres>,
    dir: Option<std::path::PathBuf>,
    databases: Vec<String>,
    /// Servers on which this run's roles exist.
    roles_on: Vec<String>,
}

static RUN: std::sync::Mutex<Run> = std::sync::Mutex::new(Run {
    server: None,
    cluster: None,
    dir: None,
    databases: Vec::new(),
    roles_on: Vec::new(),
});

/// At exit: this run's databases and roles are dropped, its cluster stopped, its directory
/// removed. It runs after the tokio runtimes are gone, so it uses `psql`.
extern "C" fn clean_up_this_run() {
    let Ok(mut run) = RUN.lock() else { return };
    if let Some(server) = run.server.clone() {
        let roles = run_roles();
        // Every database this run made, and those made from them (a restore's scratch and
        // replaced copies keep the name's start): all begin with this run's prefix.
        let listed = std::process::Command::new("psql")
            .args([server.as_str(), "-qAtX", "-c"])
            .arg(format!(
                "SELECT datname FROM pg_database WHERE starts_with(datname, '{}')",
                run_db_prefix()
            ))
            .output();
        let names = listed.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let mut sql: Vec<String> = (names.unwrap_or_default().lines())
            .chain(run.databases.iter().map(String::as_str))
            .map(|db| format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE);"))
            .collect();
        if run.roles_on.contains(&server) {
            sql.push(format!(
                "DROP ROLE IF EXISTS {}, {};",
                roles.names.app, roles.names.readonly
            ));
        }
        // One -c each: DROP DATABASE cannot run inside the transaction a multi-statement
        // string makes.
        let mut psql = std::process::Command::new("psql");
        psql.args([server.as_str(), "-qX"]);
        for statement in &sql {
            psql.args(["-c", statement]);
        }
        let _ = psql.output();
    }
    if let Some(cluster) = run.cluster.take() {
        let _ = cluster.stop();
    }
    if let Some(dir) = run.dir.take() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// This run's private directory: made anew under the system temp dir with a random name, so
/// nothing planted there in advance (a symlink, say) is ever followed. Others may pass through
/// it (a cluster run as `postgres` must reach its data) but not list it.
fn run_dir() -> std::path::PathBuf {
    let mut run = RUN.lock().unwrap();
    if let Some(dir) = &run.dir {
        return dir.clone();
    }
    let dir = std::env::temp_dir().join(format!(
        "tally-test-{}-{:016x}",
        std::process::id(),
        random_u64()
    ));
    // create_dir fails on anything already there, a symlink included.
    std::fs::create_dir(&dir).expect("a private directory for this test run");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    run.dir = Some(dir.clone());
    dir
}

/// A new directory in this run's private directory.
pub fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = run_dir().join(format!("{name}-{:016x}", random_u64()));
    std::fs::create_dir(&dir).expect("a fresh directory");
    dir
}

/// This run's app and read-only roles: names of its own (roles are cluster-wide, and parallel
/// runs must not race on them) and one password.
pub struct RunRoles {
    pub names: Roles,
    pub password: String,
}

pub fn run_roles() -> &'static RunRoles {
    static ROLES: OnceLock<RunRoles> = OnceLock::new();
    ROLES.get_or_init(|| {
        let run = format!("{}_{:08x}", std::process::id(), random_u64() as u32);
        RunRoles {
            names: Roles {
                app: format!("tally_test_app_{run}"),
                readonly: format!("tally_test_ro_{run}"),
            },
            password: format!("{:016x}{:016x}", random_u64(), random_u64()),
        }
    })
}

/// Makes this run's roles on `server_url`'s server, once per server.
async fn ensure_run_roles(server_url: &str) {
    static MADE: tokio::sync::Mutex<Vec<String>> = tokio::sync::Mutex::const_new(Vec::new());
    let mut made = MADE.lock().await;
    if made.iter().any(|s| s == server_url) {
        return;
    }
    let admin = tally_shared::pg::connect(server_url)
        .await
        .expect("connect");
    let roles = run_roles();
    let password = Some(roles.password.as_str());
    roles::ensure(
        &admin,
        &roles.names,
        [password, password],
        roles::Limits::default(),
    )
    .await
    .expect("this run's roles");
    made.push(server_url.to_owned());
    RUN.lock().unwrap().roles_on.push(server_url.to_owned());
}

/// The environment that makes a spawned `tally` runner make and use this run's roles (with
/// their password) rather than the default ones.
pub fn role_env() -> [(&'static str, String); 4] {
    let roles = run_roles();
    [
        ("APP_DB_ROLE", roles.names.app.clone()),
        ("READONLY_DB_ROLE", roles.names.readonly.clone()),
        ("APP_DB_PASSWORD", roles.password.clone()),
        ("READONLY_DB_PASSWORD", roles.password.clone()),
    ]
}

/// `db_url` connecting as this run's app role (as the functions do).
pub fn as_app(db_url: &str) -> String {
    let roles = run_roles();
    tally_shared::pg::with_user(db_url, &roles.names.app, Some(&roles.password))
}

/// `url` through the PgBouncer that `TEST_POOLER_URL` names (`.ci/pgbouncer.sh`: transaction
/// mode, in front of the tests' server), when `url` is on that server; otherwise `url` as it
/// is (a test's private cluster, or no pooler). Only the functions' own connections go
/// through it: migrations, seeding and the tests' checks connect directly, as migrate and
/// backup do in production.
pub fn through_pooler(url: &str) -> String {
    let Ok(pooler) = std::env::var("TEST_POOLER_URL") else {
        return url.to_owned();
    };
    let Some((start, end)) = host_and_port(url) else {
        return url.to_owned();
    };
    let (server, pooler_at) = (admin_url(), host_and_port(&pooler));
    let on_the_server = host_and_port(server).is_some_and(|(s, e)| server[s..e] == url[start..end]);
    match pooler_at {
        Some((ps, pe)) if on_the_server => {
            format!("{}{}{}", &url[..start], &pooler[ps..pe], &url[end..])
        }
        _ => url.to_owned(),
    }
}

/// Where a `postgres://` URL's `host:port` is: after the user info, before the path.
fn host_and_port(url: &str) -> Option<(usize, usize)> {
    let scheme_end = url.find("://")? + 3;
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme_end + i);
    let start = url[scheme_end..authority_end]
        .rfind('@')
        .map_or(scheme_end, |at| scheme_end + at + 1);
    Some((start, authority_end))
}

/// `db_url` connecting as this run's read-only role.
pub fn as_readonly(db_url: &str) -> String {
    let roles = run_roles();
    tally_shared::pg::with_user(db_url, &roles.names.readonly, Some(&roles.password))
}

const TEST_DB_PREFIX: &str = "tally_test_";

pub use tally_shared::pg::with_database;

/// A fresh, migrated database with a random name on `server_url`'s server.
pub async fn fresh_database(server_url: &str) -> String {
    fresh_database_at(server_url, None).await
}

/// A fresh database migrated up to `version` (all migrations when None), dropped when the run
/// ends.
pub async fn fresh_database_at(server_url: &str, version: Option<i32>) -> String {
    let url = empty_database(server_url).await;
    ensure_run_roles(server_url).await;
    migrate::migrate_to(&url, version, &run_roles().names)
        .await
        .expect("migrate");
    url
}

/// The start of every database name this run makes: the process id and a random run id, so
/// that no other run's names (on this machine or another sharing the server) share it.
fn run_db_prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| {
        format!(
            "{TEST_DB_PREFIX}{}x{:08x}_",
            std::process::id(),
            random_u64() as u32
        )
    })
}

/// A new, empty database of this run's on `server_url`'s server.
pub async fn empty_database(server_url: &str) -> String {
    let name = format!("{}{:012x}", run_db_prefix(), random_u64() >> 16);
    let admin = tally_shared::pg::connect(server_url)
        .await
        .expect("connect");
    admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .expect("create database");
    let mut run = RUN.lock().unwrap();
    if run.server.as_deref() == Some(server_url) {
        run.databases.push(name.clone());
    }
    with_database(server_url, &name)
}

pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub db_url: String,
    pub db: tokio_postgres::Client,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// [`TestApp`]'s HTTP side alone, for a server whose database is not up yet.
pub struct LazyApp {
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl LazyApp {
    pub async fn try_get(&self, path: &str) -> Option<u16> {
        let request = http::Request::get(format!("http://{}{path}", self.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.client
            .request(request)
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    pub async fn get(&self, path: &str) -> TestResponse {
        let request = http::Request::get(format!("http://{}{path}", self.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = self
            .client
            .request(request)
            .await
            .expect("the server answers");
        TestResponse::read(response).await
    }
}

pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    async fn read(response: http::Response<hyper::body::Incoming>) -> Self {
        let (parts, body) = response.into_parts();
        Self {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    /// Asserts an error response: status, `error` code and the problem+json shape.
    pub fn assert_problem(&self, status: u16, code: &str) -> Value {
        let body = self.json();
        assert_eq!(self.status.as_u16(), status, "body: {body}");
        assert_eq!(body["error"], code, "body: {body}");
        assert_eq!(body["status"], status, "body: {body}");
        assert_eq!(self.header("content-type"), "application/problem+json");
        assert!(
            body["type"].is_string() && body["title"].is_string() && body["detail"].is_string(),
            "{body}"
        );
        body
    }
}

/// The HS256 secret every test server and spawned binary is configured with.
pub const TEST_SECRET: &str = "tally-test-secret-0123456789abcdef0123456789";
pub const TEST_ISSUER: &str = "tally-tests";
pub const TEST_AUDIENCE: &str = "tally-api";

/// The JWT settings of the test servers, as environment variables.
pub fn jwt_env() -> [(&'static str, &'static str); 3] {
    [
        ("JWT_HS256_SECRET", TEST_SECRET),
        ("JWT_ISSUER", TEST_ISSUER),
        ("JWT_AUDIENCE", TEST_AUDIENCE),
    ]
}

/// Settings for an in-process server: the test database as the app role, small pool, short
/// timeouts.
pub fn test_config(db_url: &str, extra: &[(&str, &str)]) -> Config {
    // The app role, and no metrics port (parallel servers would contend for one), unless the
    // test says otherwise; what it says wins.
    let mut vars: std::collections::BTreeMap<String, String> = [
        ("DATABASE_URL", through_pooler(&as_app(db_url))),
        ("POOL_SIZE", "8".into()),
        ("SHUTDOWN_GRACE_SECS", "5".into()),
        ("JWT_LEEWAY_SECS", "0".into()),
        ("METRICS_PORT", "0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    // A test that configures its own keys gets none of the defaults.
    if !extra.iter().any(|(k, _)| k.starts_with("JWT_")) {
        vars.extend(
            jwt_env()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
    }
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::from_vars(vars).expect("test config")
}

impl TestApp {
    /// A fresh database with the demo seed, and the server on an ephemeral port.
    pub async fn spawn() -> Self {
        Self::spawn_on(admin_url(), &[]).await
    }

    pub async fn spawn_on(server_url: &str, extra: &[(&str, &str)]) -> Self {
        let db_url = fresh_database(server_url).await;
        Self::serve(db_url, extra).await
    }

    /// Serves an existing database.
    pub async fn serve(db_url: String, extra: &[(&str, &str)]) -> Self {
        let db = tally_shared::pg::connect(&db_url).await.expect("connect");
        migrate::seed_if_empty(&db).await.expect("seed");
        let app = tally::app();
        let state = app.state(test_config(&db_url, extra)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(runtime::serve(
            listener,
            app.router(),
            state,
            std::future::pending(),
        ));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        Self {
            addr,
            db_url,
            db,
            client,
        }
    }

    /// One function alone, assembled as its `main` does, on this app's database: the
    /// deployed shape (its own process, its own role), in-process.
    pub async fn spawn_function(
        &self,
        name: &'static str,
        routes: Vec<tally_shared::Route>,
        extra: &[(&str, &str)],
    ) -> TestApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let function = tally_shared::app::App::new(name, routes);
        let state = function.state(test_config(&self.db_url, extra)).unwrap();
        tokio::spawn(runtime::serve(
            listener,
            function.router(),
            state,
            std::future::pending(),
        ));
        TestApp::attach(port, &self.db_url).await
    }

    /// A client for a server on 127.0.0.1:`port` whose database may not answer yet: requests
    /// only, with no database connection of its own.
    pub fn attach_lazily(port: u16) -> LazyApp {
        LazyApp {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// A client for a server running elsewhere (a spawned binary) on 127.0.0.1:`port`.
    pub async fn attach(port: u16, db_url: &str) -> Self {
        let db = tally_shared::pg::connect(db_url).await.expect("connect");
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            db_url: db_url.to_owned(),
            db,
            client,
        }
    }

    /// The status of a GET, or None when the server does not answer (yet).
    pub async fn try_get(&self, path: &str) -> Option<u16> {
        LazyApp {
            addr: self.addr,
            client: self.client.clone(),
        }
        .try_get(path)
        .await
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> TestResponse {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        // An admin token unless the caller chose: its own `authorization`, or `NO_AUTH`.
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("authorization"))
        {
            builder = builder.header("authorization", self.admin());
        }
        for (name, value) in headers {
            if *value != NO_AUTH {
                builder = builder.header(*name, *value);
            }
        }
        let response = self
            .client
            .request(builder.body(Full::new(body.into())).unwrap())
            .await
            .expect("the server answers");
        TestResponse::read(response).await
    }

    /// A valid token for `user_id` with `role`, signed with the test secret.
    pub fn token(&self, user_id: i64, role: Role) -> String {
        tally_dev::token::mint(
            &test_config("postgres://x@localhost/x", &[]),
            user_id,
            role,
            Duration::from_secs(600),
        )
        .unwrap()
    }

    /// `Bearer <token>` for a customer.
    pub fn customer(&self, user_id: i64) -> String {
        format!("Bearer {}", self.token(user_id, Role::Customer))
    }

    /// `Bearer <token>` for an admin (user 2, the demo admin).
    pub fn admin(&self) -> String {
        format!("Bearer {}", self.token(2, Role::Admin))
    }

    /// Waits (up to 20 s) until `/healthz` answers 200.
    pub async fn wait_until_up(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.try_get("/healthz").await != Some(200) {
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A keyed order's status, or None when the connection fails (the server was killed).
    pub async fn try_order_keyed(
        &self,
        user_id: i64,
        lines: &[(i64, i64)],
        key: &str,
    ) -> Option<u16> {
        let request = http::Request::post(format!("http://{}/orders", self.addr))
            .header("content-type", "application/json")
            .header("authorization", self.customer(user_id))
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from(
                order_body(user_id, lines).to_string(),
            )))
            .unwrap();
        let response = self.client.request(request).await.ok()?;
        let status = response.status().as_u16();
        response.into_body().collect().await.ok()?;
        Some(status)
    }

    pub async fn get(&self, path: &str) -> TestResponse {
        self.request(Method::GET, path, &[], Bytes::new()).await
    }

    /// POST JSON with the given `authorization` header value.
    pub async fn post_json_as(
        &self,
        authorization: &str,
        path: &str,
        body: &Value,
    ) -> TestResponse {
        self.request(
            Method::POST,
            path,
            &[
                ("content-type", "application/json"),
                ("authorization", authorization),
            ],
            body.to_string(),
        )
        .await
    }

    /// Places an order as customer `user_id` with `(product_id, quantity)` lines.
    pub async fn order(&self, user_id: i64, lines: &[(i64, i64)]) -> TestResponse {
        self.post_json_as(
            &self.customer(user_id),
            "/orders",
            &order_body(user_id, lines),
        )
        .await
    }

    /// Places an order as customer `user_id` with an `Idempotency-Key`.
    pub async fn order_keyed(&self, user_id: i64, lines: &[(i64, i64)], key: &str) -> TestResponse {
        let authorization = self.customer(user_id);
        self.request(
            Method::POST,
            "/orders",
            &[
                ("content-type", "application/json"),
                ("idempotency-key", key),
                ("authorization", &authorization),
            ],
            order_body(user_id, lines).to_string(),
        )
        .await
    }

    /// `PATCH /products/{id}` as an admin, spreading its stock over `shards` rows.
    pub async fn set_shards(&self, product_id: i64, shards: i64) -> TestResponse {
        self.request(
            Method::PATCH,
            &format!("/products/{product_id}"),
            &[("content-type", "application/json")],
            serde_json::json!({ "stock_shards": shards }).to_string(),
        )
        .await
    }

    /// The stock of each shard row of a product, in shard order (empty when unsharded).
    pub async fn shard_stock(&self, product_id: i64) -> Vec<i64> {
        self.db
            .query(
                "SELECT inventory FROM inventory_shards WHERE product_id = $1 ORDER BY shard",
                &[&product_id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Inserts a product directly and returns its id.
    pub async fn add_product(&self, sku: &str, price_cents: i64, inventory: i64) -> i64 {
        self.db
            .query_one(
                "INSERT INTO products (sku, name, price_cents, inventory) VALUES ($1, $1, $2, $3) RETURNING id",
                &[&sku, &price_cents, &inventory],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// The whole stock of a product, however many shards hold it.
    pub async fn inventory(&self, product_id: i64) -> i64 {
        self.db
            .query_one("SELECT stock_of($1)", &[&product_id])
            .await
            .unwrap()
            .get(0)
    }

    /// Units of a product that left with orders and did not come back: live orders' items,
    /// and those of orders cancelled as a return whose goods stayed away (`restocked = false`).
    pub async fn sold(&self, product_id: i64) -> i64 {
        self.db
            .query_one(
                "SELECT coalesce(sum(quantity), 0)::bigint FROM order_items i JOIN orders o ON o.id = i.order_id \
                 WHERE i.product_id = $1 \
                   AND (o.status NOT IN ('CANCELLED', 'FAILED') OR o.restocked IS NOT DISTINCT FROM false)",
                &[&product_id],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.db.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// The books balance for every product: starting stock = stock left + stock sold, and the
    /// ledger agrees (stock = sum of movements). Panics naming the product that drifted.
    pub async fn assert_books_balance(&self) {
        // Stock came back for exactly the orders that were released with a restock: a live
        // order with a return row, or a released one without, is stock lost or sold twice.
        let wrong = self
            .count(
                "SELECT count(*) FROM orders o \
                 WHERE (o.status IN ('CANCELLED', 'FAILED') AND o.restocked IS DISTINCT FROM false) \
                   <> EXISTS (SELECT FROM inventory_movements m WHERE m.order_id = o.id \
                              AND m.reason IN ('cancellation', 'expiry', 'failure'))",
            )
            .await;
        assert_eq!(
            wrong, 0,
            "orders whose stock return does not match their status"
        );
        // V7 dropped the product keys on items and ledger rows; the functions keep them whole.
        let orphans = self
            .count(
                "SELECT (SELECT count(*) FROM order_items i \
                         WHERE NOT EXISTS (SELECT FROM products p WHERE p.id = i.product_id)) \
                      + (SELECT count(*) FROM inventory_movements m \
                         WHERE NOT EXISTS (SELECT FROM products p WHERE p.id = m.product_id))",
            )
            .await;
        assert_eq!(orphans, 0, "item or ledger rows naming no product");
        let rows = self
            .db
            .query(
                "SELECT p.id, stock_of(p.id),
                        (SELECT delta FROM inventory_movements m WHERE m.product_id = p.id AND m.reason = 'initial'),
                        (SELECT coalesce(sum(delta), 0)::bigint FROM inventory_movements m WHERE m.product_id = p.id)
                 FROM products p ORDER BY p.id",
                &[],
            )
            .await
            .unwrap();
        for row in rows {
            let (id, inventory, initial, ledger): (i64, i64, i64, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            assert!(inventory >= 0, "product {id} is negative: {inventory}");
            let negative_shards = self
                .count(&format!(
                    "SELECT count(*) FROM inventory_shards WHERE product_id = {id} AND inventory < 0"
                ))
                .await;
            assert_eq!(negative_shards, 0, "product {id} has a negative shard");
            // The layout: an unsharded product has no shard rows, a sharded one exactly
            // shards 0..n-1; and the catalog shows the same stock as stock_of.
            let layout = self
                .db
                .query_one(
                    "SELECT p.stock_shards::bigint, count(s.shard),
                            coalesce(min(s.shard), 0)::bigint, coalesce(max(s.shard), 0)::bigint,
                            (SELECT c.inventory FROM catalog c WHERE c.id = p.id)
                     FROM products p LEFT JOIN inventory_shards s ON s.product_id = p.id
                     WHERE p.id = $1 GROUP BY p.id",
                    &[&id],
                )
                .await
                .unwrap();
            let (shards, rows, low, high, shown): (i64, i64, i64, i64, i64) = (
                layout.get(0),
                layout.get(1),
                layout.get(2),
                layout.get(3),
                layout.get(4),
            );
            let expected = if shards == 1 {
                (0, 0, 0)
            } else {
                (shards, 0, shards - 1)
            };
            assert_eq!((rows, low, high), expected, "product {id}: shard rows");
            assert_eq!(
                shown, inventory,
                "product {id}: the catalog shows another stock"
            );
            assert_eq!(
                inventory, ledger,
                "product {id}: inventory {inventory} but the ledger sums to {ledger}"
            );
            let sold = self.sold(id).await;
            let adjusted: i64 = self
                .db
                .query_one(
                    "SELECT coalesce(sum(delta), 0)::bigint FROM inventory_movements WHERE product_id = $1 AND reason IN ('adjustment', 'restock')",
                    &[&id],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                initial + adjusted,
                inventory + sold,
                "product {id}: initial {initial} + adjustments {adjusted} != left {inventory} + sold {sold}"
            );
        }
    }
}

/// The runner binary on 127.0.0.1:`port` against `db_url`: test keys, errors-only logs, no
/// processor loop, stdout discarded, killed when dropped.
pub fn runner_command(db_url: &str, port: u16) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .env("DATABASE_URL", db_url)
        .envs(role_env())
        .env("PORT", port.to_string())
        .env("METRICS_PORT", "0")
        .env("LOG_LEVEL", "error")
        .envs(jwt_env())
        .env("PROCESS_EVERY_MS", "0")
        // Orders stay PENDING unless a test asks for events (events.rs does).
        .env("LOCAL_EVENTS", "false")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

/// `{"user_id": .., "items": [{"product_id": .., "quantity": ..}, ..]}`
pub fn order_body(user_id: i64, lines: &[(i64, i64)]) -> Value {
    let items: Vec<Value> = lines
        .iter()
        .map(|(p, q)| serde_json::json!({"product_id": p, "quantity": q}))
        .collect();
    serde_json::json!({"user_id": user_id, "items": items})
}
