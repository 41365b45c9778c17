//! How a process is assembled and run: settings from the environment, telemetry, the async
//! runtime, the lazy pool and the [`AppState`], then a transport (the hyper server, or Lambda
//! when started by it) or a worker loop until SIGTERM. Every binary assembles here: the
//! functions through [`App`], the runner, `migrate` and the backup command through [`start`].

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::net::TcpListener;

use crate::config::{Config, ConfigError};
use crate::router::{Access, AppState, Route, Router};
use crate::{db, lambda, meters, runtime, telemetry};

/// A process being assembled: its name, its routes, and the settings of its own it reads
/// at start (besides [`Config`]). Every function's `main` is `App::new(..).run()`.
pub struct App {
    name: &'static str,
    routes: Vec<Route>,
    /// Reads a function's own settings into the state's extensions; runs once, at start.
    settings: Vec<SettingsReader>,
}

type SettingsReader = fn(http::Extensions) -> Result<http::Extensions, String>;

impl App {
    pub fn new(name: &'static str, routes: Vec<Route>) -> Self {
        Self {
            name,
            routes,
            settings: Vec::new(),
        }
    }

    /// Also reads `T` from the environment at start (`envy`: upper-case field names), so a bad
    /// value stops the process with one line instead of being ignored later. Handlers find it
    /// with [`AppState::extension`].
    pub fn settings<T>(mut self) -> Self
    where
        T: serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
    {
        self.settings.push(|mut extensions| {
            extensions.insert(settings::<T>().map_err(|e| e.to_string())?);
            Ok(extensions)
        });
        self
    }

    /// Serves the routes until SIGTERM: over HTTP, or to AWS Lambda when started by it.
    pub fn run(self) -> ExitCode {
        let (name, routes) = (self.name, self.routes.clone());
        self.run_worker(move |state| serve(name, routes, state))
    }

    /// Like [`App::run`], for a process that does something other than serve HTTP (the order
    /// processor's loop): the same settings, telemetry and pool, then `work` until it returns.
    pub fn run_worker<F, Fut>(self, work: F) -> ExitCode
    where
        F: FnOnce(AppState) -> Fut,
        Fut: Future<Output = ExitCode>,
    {
        let name = self.name;
        let (config, runtime) = match start(name, Logs::Stdout) {
            Ok(started) => started,
            Err(code) => return code,
        };
        // bb8 starts its reaper task when the pool is built: that needs the runtime.
        let _guard = runtime.enter();
        let state = match self.state(config) {
            Ok(state) => state,
            Err(e) => {
                eprintln!("{name}: {e}");
                return ExitCode::FAILURE;
            }
        };
        runtime.block_on(work(state))
    }

    /// The routes, mounted.
    pub fn router(&self) -> Router {
        Router::new().mount(self.routes.clone())
    }

    /// The state handlers get: the lazy pool, the settings and the token verifier. Inside a
    /// Tokio runtime (the pool's reaper is a task).
    pub fn state(&self, config: Config) -> Result<AppState, String> {
        let pool = db::lazy_pool(&config, self.name).map_err(|e| e.to_string())?;
        let read_pool = (config.database_url_read.as_deref())
            .map(|url| db::lazy_pool_at(&config, "DATABASE_URL_READ", url, self.name))
            .transpose()
            .map_err(|e| e.to_string())?;
        let mut extensions = http::Extensions::new();
        for read in &self.settings {
            extensions = read(extensions)?;
        }
        let mut state = AppState::new(pool, config).map_err(|e| e.to_string())?;
        state.read_pool = read_pool;
        Ok(state.with_extensions(extensions))
    }
}

/// Settings of a function's own from the environment (`envy`: upper-case field names). Read
/// once at start, by [`App::settings`] or by a command before it runs.
pub fn settings<T: serde::de::DeserializeOwned>() -> Result<T, ConfigError> {
    envy::from_env::<T>().map_err(|e| ConfigError::new(e.to_string()))
}

/// A function's transport until SIGTERM: Lambda when started by it, else HTTP on $HOST:$PORT.
async fn serve(name: &'static str, routes: Vec<Route>, state: AppState) -> ExitCode {
    // There is no way to run a deployed function with authentication off.
    if state.verifier.is_none() && routes.iter().any(|r| r.access == Access::Authenticated) {
        eprintln!(
            "{name}: configuration error: set JWT_HS256_SECRET or JWT_PUBLIC_KEY_PEM (this function's routes need a bearer token)"
        );
        return ExitCode::FAILURE;
    }
    // The adapter is chosen here, before lambda_http could panic for want of its variables.
    if state.config.on_lambda() {
        tracing::info!(function = name, "serving AWS Lambda invocations");
        meters::install();
        return match lambda::serve(Router::new().mount(routes), state).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(function = name, error = %e, "the Lambda runtime stopped");
                ExitCode::FAILURE
            }
        };
    }
    let addr = SocketAddr::new(state.config.host, state.config.port);
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("{name}: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(function = name, %addr, "listening");
    runtime::serve(
        listener,
        Router::new().mount(routes),
        state,
        shutdown_signal(),
    )
    .await;
    tracing::info!(function = name, "stopped");
    ExitCode::SUCCESS
}

/// Where a process's JSON log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logs {
    /// Servers and workers.
    Stdout,
    /// Commands whose stdout is their result.
    Stderr,
}

/// What every process does first: settings from the environment, telemetry, the async
/// runtime. Any failure is one line on stderr naming `name`, and the exit code to return.
pub fn start(name: &str, logs: Logs) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    let config = Config::from_env().map_err(|e| {
        eprintln!("{name}: {e}");
        ExitCode::FAILURE
    })?;
    match logs {
        Logs::Stdout => telemetry::init(&config.log_level),
        Logs::Stderr => telemetry::init_stderr(&config.log_level),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("{name}: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })?;
    Ok((config, runtime))
}

/// Resolves on SIGTERM (what Kubernetes sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on Unix");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
