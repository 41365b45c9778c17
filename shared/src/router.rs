//! Routing: `(method, path pattern)` → handler, the one place a request finds its function.
//!
//! Every function crate exports `routes()`; a deployed function mounts its own, the local
//! runner and the tests mount them all. `/healthz` and `/openapi.json` are answered here for
//! every function.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode, header};

use crate::auth::Verifier;
use crate::config::{Config, ConfigError};
use crate::db::Pool;
use crate::error::ApiError;

pub use crate::http::{PathParams, Request, Response};

pub type HandlerResult = Result<Response, ApiError>;
pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;
/// A handler as stored: any `async fn(Request, AppState) -> HandlerResult`, boxed once.
pub type Handler = Arc<dyn Fn(Request, AppState) -> HandlerFuture + Send + Sync>;

/// What every handler gets: the pool, the settings and the token verifier. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: Pool,
    /// The replica's pool (`DATABASE_URL_READ`), for the reads that may use it (`replica.rs`).
    pub read_pool: Option<Pool>,
    pub config: Arc<Config>,
    /// None only where no key is configured; then every authenticated route answers 401.
    pub verifier: Option<Arc<Verifier>>,
    /// Where order events are published (`K_SINK`), if anywhere.
    pub events: crate::events::Publisher,
    /// A function's own settings, read at start (see `App::settings`).
    extensions: Arc<http::Extensions>,
}

impl AppState {
    /// A pooled connection, or 503 after `POOL_TIMEOUT_MS`; the wait is measured.
    pub async fn db(&self) -> Result<crate::db::Connection<'_>, ApiError> {
        crate::meters::checkout(&self.pool).await
    }

    pub fn new(pool: Pool, config: Config) -> Result<Self, ConfigError> {
        let verifier = Verifier::from_config(&config)?.map(Arc::new);
        Ok(Self {
            pool,
            read_pool: None,
            events: crate::events::Publisher::from_config(&config),
            config: Arc::new(config),
            verifier,
            extensions: Arc::default(),
        })
    }

    pub fn with_extensions(mut self, extensions: http::Extensions) -> Self {
        self.extensions = Arc::new(extensions);
        self
    }

    /// A function's own settings of type `T`; an internal error when its `App` did not read them.
    pub fn extension<T: Send + Sync + 'static>(&self) -> Result<&T, ApiError> {
        self.extensions.get::<T>().ok_or_else(|| {
            ApiError::Internal(format!(
                "{} was not read at start",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (the catalog, the health check).
    Public,
    /// A valid bearer token; the handler finds the [`crate::auth::Principal`] in the extensions.
    Authenticated,
}

/// One `(method, pattern)` a function answers. Patterns are literal segments and `{name}`
/// placeholders, e.g. `/orders/{id}`.
#[derive(Clone)]
pub struct Route {
    pub method: Method,
    pub pattern: &'static str,
    pub handler: Handler,
    pub access: Access,
}

impl Route {
    /// A route that needs a bearer token: the default, so that forgetting is safe. `handler`
    /// is the function's `async fn(Request, AppState) -> HandlerResult` itself.
    pub fn new<F, Fut>(method: Method, pattern: &'static str, handler: F) -> Self
    where
        F: Fn(Request, AppState) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        Self {
            method,
            pattern,
            handler: Arc::new(move |request, state| Box::pin(handler(request, state))),
            access: Access::Authenticated,
        }
    }

    /// A route anyone may call.
    pub fn public<F, Fut>(method: Method, pattern: &'static str, handler: F) -> Self
    where
        F: Fn(Request, AppState) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        Self {
            access: Access::Public,
            ..Self::new(method, pattern, handler)
        }
    }

    /// The captured placeholders if `path` fits the pattern.
    fn capture(&self, path: &str) -> Option<PathParams> {
        let mut params = Vec::new();
        let mut got = path.trim_start_matches('/').split('/');
        for want in self.pattern.trim_start_matches('/').split('/') {
            let segment = got.next()?;
            match want.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                Some(name) if !segment.is_empty() => params.push((name, segment.to_owned())),
                Some(_) => return None,
                None if want == segment => {}
                None => return None,
            }
        }
        got.next().is_none().then_some(PathParams::new(params))
    }
}

#[derive(Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
}

/// Runs a route's handler; with `COMMIT_LSN`, a successful write gets its commit's LSN
/// (`replica.rs`). Without it, nothing is added to the request's path.
async fn call(route: &Route, request: Request, state: AppState) -> HandlerResult {
    if !state.config.commit_lsn {
        return (route.handler)(request, state).await;
    }
    let method = request.method().clone();
    let mut result = (route.handler)(request, state.clone()).await;
    if let Ok(response) = &mut result {
        crate::replica::stamp(&state.pool, &state.config, &method, response).await;
    }
    result
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a function's routes.
    pub fn mount(mut self, routes: impl IntoIterator<Item = Route>) -> Self {
        self.routes.extend(routes);
        self
    }

    /// Finds the handler for the request, or says 404 / 405 (with the methods the path allows).
    /// Also returns the matched pattern, which the access log and the metrics use.
    pub async fn dispatch(
        &self,
        mut request: Request,
        state: AppState,
    ) -> (HandlerResult, &'static str) {
        let path = request.uri().path().to_owned();
        let get_only = |request: &Request| match *request.method() {
            Method::GET | Method::HEAD => Ok(()),
            _ => Err(ApiError::MethodNotAllowed(vec![Method::GET, Method::HEAD])),
        };
        if matches!(path.as_str(), "/openapi.json" | "/healthz" | "/livez")
            && request.method() == Method::OPTIONS
        {
            return (Ok(options(&[Method::GET, Method::HEAD])), "options");
        }
        if path == "/openapi.json" {
            let result = get_only(&request).map(|()| openapi());
            return (result, "/openapi.json");
        }
        if path == "/livez" {
            // The kubelet's probes: the process answers. Not the database, so a Postgres restart
            // does not take every function out of rotation; their requests get a fast 503.
            let result = get_only(&request).map(|()| text_ok());
            return (result, "/livez");
        }
        if path == "/healthz" {
            let result = match get_only(&request) {
                Ok(()) => health(&state).await,
                Err(e) => Err(e),
            };
            return (result, "/healthz");
        }
        let mut allowed = Vec::new();
        let mut matched = "unmatched";
        for route in &self.routes {
            if let Some(params) = route.capture(&path) {
                matched = route.pattern;
                // HEAD is GET without the body (hyper leaves the body out).
                let head_of_get = request.method() == Method::HEAD && route.method == Method::GET;
                if route.method == request.method() || head_of_get {
                    if route.access == Access::Authenticated {
                        let principal = match state.verifier.as_ref() {
                            Some(verifier) => {
                                verifier.authenticate(request.headers(), &state.pool).await
                            }
                            None => Err(ApiError::Unauthorized),
                        };
                        match principal {
                            Ok(principal) => request.extensions_mut().insert(principal),
                            Err(e) => return (Err(e), route.pattern),
                        };
                    }
                    request.extensions_mut().insert(params);
                    return (call(route, request, state).await, route.pattern);
                }
                allowed.push(route.method.clone());
            }
        }
        if allowed.is_empty() {
            (Err(ApiError::NotFound), "unmatched")
        } else if request.method() == Method::OPTIONS {
            // What the path allows, for anyone: a browser's CORS preflight carries no token.
            (Ok(options(&allowed)), matched)
        } else {
            (Err(ApiError::MethodNotAllowed(allowed)), "unmatched")
        }
    }
}

/// `OPTIONS` on a route: 204 with `Allow` (the service adds the CORS headers to it).
fn options(allowed: &[Method]) -> Response {
    let mut methods: Vec<&str> = Vec::new();
    for method in allowed {
        methods.push(method.as_str());
        // HEAD is answered wherever GET is.
        if *method == Method::GET && !allowed.contains(&Method::HEAD) {
            methods.push("HEAD");
        }
    }
    methods.push("OPTIONS");
    http::Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header(header::ALLOW, methods.join(", "))
        .body(Bytes::new())
        .expect("static response is valid")
}

/// The API's contract (OpenAPI 3.1), written beside the code in `shared/openapi.json`; a test
/// checks that it and the routes agree.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// `GET /openapi.json`, public, on every function: the whole API's document.
fn openapi() -> Response {
    http::Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "public, max-age=300")
        .body(Bytes::from_static(OPENAPI.as_bytes()))
        .expect("static response is valid")
}

/// The readiness probe: 200 `ok` when Postgres answers a query, 503 otherwise.
async fn health(state: &AppState) -> HandlerResult {
    let conn = state.db().await?;
    conn.simple_query("").await?;
    Ok(text_ok())
}

fn text_ok() -> Response {
    http::Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Bytes::from_static(b"ok"))
        .expect("static response is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn never(_: Request, _: AppState) -> HandlerResult {
        unreachable!()
    }

    #[test]
    fn patterns_capture_placeholders_and_reject_extra_segments() {
        let r = Route::new(Method::GET, "/orders/{id}", never);
        assert_eq!(r.capture("/orders/17").unwrap().get("id"), Some("17"));
        assert!(r.capture("/orders").is_none());
        assert!(r.capture("/orders/").is_none());
        assert!(r.capture("/orders/17/items").is_none());
        assert!(r.capture("/products/17").is_none());
        let c = Route::new(Method::POST, "/orders/{id}/cancel", never);
        assert_eq!(c.capture("/orders/9/cancel").unwrap().get("id"), Some("9"));
        let root = Route::new(Method::POST, "/", never);
        assert!(root.capture("/").is_some());
        assert!(root.capture("/x").is_none());
    }
}
