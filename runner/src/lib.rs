//! The local runner: every function's routes on one port, as a developer (and the tests) run
//! the whole API without containers. Adding a function means one line in [`functions`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tally_dev::devdb::PrivatePostgres;
use tally_shared::app::{self, App};
use tally_shared::auth::Role;
use tally_shared::config::Secret;
use tally_shared::roles::{self, Roles};
use tally_shared::{Config, Route, migrate, runtime};

/// Every function that serves the public API, by name (its crate, image and Knative Service).
pub fn functions() -> Vec<(&'static str, Vec<Route>)> {
    vec![
        ("list-products", list_products::routes()),
        ("create-order", create_order::routes()),
        ("get-order", get_order::routes()),
        ("list-orders", list_orders::routes()),
        ("cancel-order", cancel_order::routes()),
        ("admin-products", admin_products::routes()),
    ]
}

/// Every function's routes, as one process serves them.
pub fn app() -> App {
    App::new(
        "tally",
        functions()
            .into_iter()
            .flat_map(|(_, routes)| routes)
            .collect(),
    )
}

/// `tally`: with no command, the whole API locally (the README's Quick start).
#[derive(clap::Parser)]
#[command(
    name = "tally",
    version,
    about = "Tally: an order backend that never oversells. With no command, runs the whole API locally."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Mint a bearer token with the configured key (JWT_HS256_SECRET, or JWT_PRIVATE_KEY_PEM
    /// with JWT_ALGORITHM).
    Token {
        /// The user id the token acts as (a positive integer).
        #[arg(long, value_parser = parse_sub)]
        sub: i64,
        #[arg(long, value_enum, default_value = "customer")]
        role: RoleArg,
        /// How long the token is valid (1h, 30m, 7d ...).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// The backup function's commands; with none, serves its HTTP function.
    Backup {
        #[command(subcommand)]
        command: Option<backup::BackupCommand>,
    },
    /// Apply pending migrations to DATABASE_URL (as the owner), then the grants.
    Migrate(tally_shared::cli::MigrateArgs),
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Customer,
    Admin,
}

fn parse_sub(value: &str) -> Result<i64, String> {
    tally_shared::http::parse_id(value).ok_or_else(|| "a positive integer".to_owned())
}

/// The entry point (`args` without the program's name). `--help` and `--version` print and
/// exit 0 before anything is read or started; a bad command line exits 2 with a usage line.
pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let cli =
        match <Cli as clap::Parser>::try_parse_from(std::iter::once("tally".into()).chain(args)) {
            Ok(cli) => cli,
            Err(e) => e.exit(),
        };
    match cli.command {
        None => run(),
        Some(Command::Token { sub, role, ttl }) => token(sub, role, ttl),
        Some(Command::Backup { command }) => backup::run(command),
        Some(Command::Migrate(args)) => tally_shared::cli::migrate_main(&args),
    }
}

fn token(sub: i64, role: RoleArg, ttl: Duration) -> ExitCode {
    let role = match role {
        RoleArg::Customer => Role::Customer,
        RoleArg::Admin => Role::Admin,
    };
    // app::start has said what was wrong with the settings, if anything.
    let Ok((config, _)) = app::start("tally token", app::Logs::Stderr) else {
        return ExitCode::FAILURE;
    };
    match tally_dev::token::mint(&config, sub, role, ttl) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tally token: {e}");
            ExitCode::FAILURE
        }
    }
}

/// 32 random bytes from the kernel, hex: the runner's signing secret when none is configured.
fn random_secret() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(tally_shared::encode::hex(&bytes))
}

/// The runner's own settings, read at start with the rest (`app::settings`).
#[derive(Debug, Clone, serde::Deserialize)]
struct RunnerSettings {
    /// Set: bind where it says (deployed functions' rule); unset: loopback only.
    host: Option<String>,
    /// Where the private cluster keeps its data: by default inside the workspace (ignored by
    /// git), so data survives restarts of the runner.
    #[serde(default = "defaults::data_dir")]
    tally_data_dir: PathBuf,
    #[serde(default = "defaults::private_pg_port")]
    private_pg_port: u16,
    /// The app and read-only roles' passwords: random for each start when unset.
    app_db_password: Option<Secret>,
    readonly_db_password: Option<Secret>,
    /// How often the built-in order processor sweeps; 0 turns it off.
    #[serde(default = "defaults::process_every_ms")]
    process_every_ms: u64,
    /// Order events delivered here as the cluster's Trigger delivers them, to the processor's
    /// same handler, so a placed order is confirmed at once. `false` leaves orders PENDING
    /// until a sweep (with `PROCESS_EVERY_MS=0`, until expiry): what a test of PENDING-only
    /// behaviour wants. `FULFILMENT_DELAY_MS` holds each one back instead.
    #[serde(default = "defaults::yes")]
    local_events: bool,
}

mod defaults {
    pub fn data_dir() -> std::path::PathBuf {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../.dev/pgdata").into()
    }
    pub fn private_pg_port() -> u16 {
        54329
    }
    pub fn process_every_ms() -> u64 {
        1000
    }
    pub fn yes() -> bool {
        true
    }
}

const PRIVATE_DB: &str = "tally";

/// Runs the whole API until SIGTERM or Ctrl-C.
pub fn run() -> ExitCode {
    let (mut config, runtime) = match app::start("tally", app::Logs::Stdout) {
        Ok(started) => started,
        Err(code) => return code,
    };
    let settings = app::settings::<RunnerSettings>()
        .and_then(|runner| Ok((runner, app::settings::<process_orders::ProcessorConfig>()?)));
    let (settings, processor) = match settings {
        Ok(both) => both,
        Err(e) => {
            eprintln!("tally: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A developer's runner listens on loopback unless told otherwise; deployed functions bind
    // all interfaces.
    if settings.host.is_none() {
        config.host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    }
    // The runner uses the configured key when there is one (so scripts can mint their own
    // tokens); otherwise a random secret for this run. Deployed functions have no such default.
    if config.jwt_hs256_secret.is_none() && config.jwt_public_key_pem.is_none() {
        match random_secret() {
            Ok(secret) => config.jwt_hs256_secret = Some(Secret(secret)),
            Err(e) => {
                eprintln!("tally: cannot make a signing secret: {e}");
                return ExitCode::FAILURE;
            }
        }
    }

    let private = if config.database_url.is_none() {
        match start_private_postgres(&settings) {
            Ok((cluster, url)) => {
                config.database_url = Some(url);
                Some(cluster)
            }
            Err(e) => {
                eprintln!("tally: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };

    let code = runtime.block_on(serve(config, settings, processor));
    if let Some(cluster) = private
        && let Err(e) = cluster.stop()
    {
        eprintln!("tally: stopping the private PostgreSQL: {e}");
    }
    code
}

/// The processor's event routes on a loopback port of their own, as its cluster-local
/// service: the sink the API publishes order events to. Returns that sink's URL.
async fn deliver_events_locally(config: &Config) -> Result<String, String> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|e| format!("a port for local events: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let sink = format!("http://{addr}/events");
    let events = App::new("process-orders-events", process_orders::event_routes())
        .settings::<process_orders::ProcessorConfig>();
    // Its own events (confirmed) go to itself, where they are acknowledged: the outbox drains.
    let state = events.state(Config {
        k_sink: Some(sink.clone()),
        ..config.clone()
    })?;
    tokio::spawn(runtime::serve(
        listener,
        events.router(),
        state,
        std::future::pending(),
    ));
    Ok(sink)
}

fn start_private_postgres(settings: &RunnerSettings) -> Result<(PrivatePostgres, String), String> {
    let cluster = PrivatePostgres::new(&settings.tally_data_dir, settings.private_pg_port, "")
        .map_err(|e| e.to_string())?;
    cluster.start().map_err(|e| e.to_string())?;
    // The cluster's own `postgres` database always exists; ours is created once.
    let created = std::process::Command::new("psql")
        .args([
            &cluster.url("postgres"),
            "-qAtc",
            &format!("SELECT 1 FROM pg_database WHERE datname = '{PRIVATE_DB}'"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "1");
    if !created.unwrap_or(false) {
        let out = std::process::Command::new("psql")
            .args([
                &cluster.url("postgres"),
                "-qc",
                &format!("CREATE DATABASE {PRIVATE_DB}"),
            ])
            .output()
            .map_err(|e| format!("running psql: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "creating database {PRIVATE_DB}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let url = cluster.url(PRIVATE_DB);
    Ok((cluster, url))
}

async fn serve(
    mut config: Config,
    settings: RunnerSettings,
    processor: process_orders::ProcessorConfig,
) -> ExitCode {
    let url = config.database_url.clone().unwrap_or_default();
    let addr = SocketAddr::new(config.host, config.port);
    let limits = roles::Limits {
        statement_timeout_ms: config.statement_timeout_ms,
        ..roles::Limits::default()
    };
    let listener = match bind_and_prepare(addr, &url, &settings, limits).await {
        Ok((listener, app_url)) => {
            config.database_url = Some(app_url);
            listener
        }
        Err(code) => return code,
    };
    if settings.local_events && config.k_sink.is_none() {
        match deliver_events_locally(&config).await {
            Ok(sink) => config.k_sink = Some(sink),
            Err(e) => {
                eprintln!("tally: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let app = app();
    let state = match app.state(config.clone()) {
        Ok(state) => state,
        Err(e) => {
            eprintln!("tally: {e}");
            return ExitCode::FAILURE;
        }
    };
    let every = settings.process_every_ms;
    // The order processor runs beside the API, as its own Knative function would.
    let worker = (every > 0).then(|| {
        tokio::spawn(process_orders::run_every(
            state.pool.clone(),
            processor,
            Arc::new(process_orders::ConfirmAll),
            state.events.clone(),
            Duration::from_millis(every),
            std::future::pending(),
        ))
    });
    eprintln!(
        "tally: API on http://{addr}  (database {})",
        tally_shared::pg::redact(&url)
    );
    for line in demo_tokens(&config) {
        eprintln!("{line}");
    }
    runtime::serve(listener, app.router(), state, app::shutdown_signal()).await;
    if let Some(worker) = worker {
        worker.abort();
    }
    ExitCode::SUCCESS
}

/// Listens at once, and answers 503 with Retry-After (`/healthz` included) until PostgreSQL
/// answers and the migrations are applied: compose and a laptop start things in any order.
async fn bind_and_prepare(
    addr: SocketAddr,
    url: &str,
    settings: &RunnerSettings,
    limits: roles::Limits,
) -> Result<(tokio::net::TcpListener, String), ExitCode> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        eprintln!("tally: cannot listen on {addr}: {e}");
        ExitCode::FAILURE
    })?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let waiting = tokio::spawn(async move {
        runtime::serve_unavailable(&listener, "starting: waiting for PostgreSQL", async {
            let _ = ready_rx.await;
        })
        .await;
        listener
    });
    let app_url = prepare_database(url, settings, limits).await?;
    let _ = ready_tx.send(());
    Ok((
        waiting.await.expect("the waiting server does not panic"),
        app_url,
    ))
}

/// Export lines for a customer's and an admin's token, valid for a day.
fn demo_tokens(config: &Config) -> [String; 2] {
    [
        (1, Role::Customer, "TOKEN"),
        (2, Role::Admin, "ADMIN_TOKEN"),
    ]
    .map(|(user, role, name)| {
        tally_dev::token::mint(config, user, role, Duration::from_secs(24 * 3600))
            .map(|t| format!("export {name}={t}   # user {user}, {role:?}"))
            .unwrap_or_else(|e| format!("# no {name}: {e}"))
    })
}

/// Connects (retrying, with a line each time it waits), makes the app and read-only roles,
/// migrates and loads the demo seed. Returns the URL the API connects with: the app role's,
/// with a password made for this run. Gives up only on errors that waiting cannot fix.
async fn prepare_database(
    url: &str,
    settings: &RunnerSettings,
    limits: roles::Limits,
) -> Result<String, ExitCode> {
    let names: Roles = app::settings().map_err(|e| {
        eprintln!("tally: {e}");
        ExitCode::FAILURE
    })?;
    let random = random_secret().map_err(|e| {
        eprintln!("tally: cannot make a role password: {e}");
        ExitCode::FAILURE
    })?;
    let password = (settings.app_db_password.as_ref()).map_or(random.as_str(), |s| &s.0);
    let readonly_password = (settings.readonly_db_password.as_ref()).map_or(password, |s| &s.0);
    let mut wait = Duration::from_millis(250);
    let client = loop {
        match tally_shared::pg::connect(url).await {
            Ok(client) => break client,
            Err(e) => {
                eprintln!(
                    "tally: waiting for PostgreSQL at {} ({e}); retrying in {} ms",
                    tally_shared::pg::redact(url),
                    wait.as_millis()
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    };
    // The runner serves every route with the app role; the read-only role is made too, so the
    // database looks as it does deployed (list-products, get-order and list-orders use it).
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("tally: {e}");
        ExitCode::FAILURE
    };
    let passwords = [Some(password), Some(readonly_password)];
    roles::ensure(&client, &names, passwords, limits)
        .await
        .map_err(|e| fail(&e))?;
    let (client, version) = migrate::migrate(url, &names).await.map_err(|e| fail(&e))?;
    let seeded = migrate::seed_if_empty(&client)
        .await
        .map_err(|e| fail(&format!("loading the demo seed: {e}")))?;
    tracing::info!(version, seeded, "database ready");
    Ok(tally_shared::pg::with_user(url, &names.app, Some(password)))
}
