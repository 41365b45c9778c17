//! The runtime every Tally function shares, so that a function crate holds only its handler.
//!
//! # Layout
//! - [`auth`]: bearer JWT verification and the [`auth::Principal`] a request acts as.
//! - [`catalog`]: the product as the API shows it.
//! - [`config`]: settings from the environment (`envy`), failing at start with one clear line.
//! - [`db`]: the lazily connected Postgres pool (`bb8` + `tokio-postgres`).
//! - [`error`]: [`ApiError`], the one error type, and its one mapping to `problem+json`.
//! - [`http`]: request helpers (JSON bodies, path ids, query strings) and response builders.
//! - [`router`]: `(method, path pattern)` → handler, with 404/405 and `/healthz`.
//! - [`runtime`]: the hyper server: listener, body cap, request id, access log, graceful shutdown.
//! - [`telemetry`]: JSON log lines on stdout.
//! - [`lambda`]: the same router under AWS Lambda (`lambda_http`), chosen at start.
//! - [`meters`]: Prometheus metrics, rendered at `/metrics`.
//! - [`migrate`]: the embedded `sql/migrations` (refinery) and the demo seed.
//! - [`devdb`]: a private PostgreSQL cluster for the local runner and the tests.

pub mod auth;
pub mod catalog;
pub mod config;
pub mod db;
pub mod devdb;
pub mod error;
pub mod http;
pub mod lambda;
pub mod meters;
pub mod migrate;
pub mod router;
pub mod runtime;
pub mod telemetry;

pub use config::Config;
pub use db::Pool;
pub use error::ApiError;
pub use router::{Access, AppState, Request, Response, Route, Router};
