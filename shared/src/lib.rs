//! The runtime every Tally function shares, so that a function crate holds only its handler.
//!
//! # Layout
//! Layers, top to bottom; a module uses only modules of the layers below its own
//! (`tests/layers.rs` checks every edge against its list of layers):
//! - [`cli`]: command lines more than one binary offers (`migrate`, `tally migrate`).
//! - [`app`]: assembles a process (settings, telemetry, runtime, pool, [`AppState`]) and runs a
//!   transport or a worker until SIGTERM. Every function's `main` is one call to it.
//! - [`runtime`] (hyper: connections, timeouts, the body cap, graceful shutdown, `/metrics` on
//!   its own port) and [`lambda`]
//!   (the same requests under AWS Lambda): the two transports, side by side.
//! - [`idempotency`]: `Idempotency-Key` for the writes a retry could double (one transaction:
//!   the key, the write, its answer), over [`sql`].
//! - [`service`]: one request end to end: request id, dispatch, the one error mapping, metrics
//!   and the access log. A request enters here from either transport.
//! - [`sql`]: where a handler's SQL runs (checkout, timing, first row or error) and how the
//!   outcomes SQL answers become the caller's enum.
//! - [`router`]: `(method, path pattern)` → handler, with 404/405, `/healthz`, and
//!   the [`AppState`] handlers get (the pool checkout, where SQL starts).
//! - [`auth`]: bearer JWT verification, the user a token's subject names (provisioned on
//!   first sight), and the [`auth::Principal`] a request acts as.
//!   [`meters`]: Prometheus metrics. [`events`]: order events, from the outbox to `K_SINK` as
//!   CloudEvents, and read back in either content mode.
//! - [`http`]: the request and response types, and where a request is parsed (JSON bodies,
//!   path ids, query strings) into 4xx on bad input. [`db`]: the lazily connected pool.
//!   [`jwks`]: an identity provider's keys, fetched by `kid`, cached, refreshed at a bounded rate.
//! - [`config`]: settings from the environment (`envy`) and the key material, failing at start
//!   with one clear line. [`error`]: [`ApiError`] and its one mapping to `problem+json`.
//!   Beside them: [`catalog`] (the product as the API shows it), [`telemetry`] (JSON log
//!   lines), [`migrate`] (the embedded `sql/migrations` and the seed).
//! - At the bottom: [`pg`] (URLs, a connection, the PostgreSQL binaries), [`encode`] (hex),
//!   [`roles`] (the database roles the functions connect as).
//!
//! Developer tooling (a private PostgreSQL, token minting) lives in the `tally-dev` crate, which
//! no function binary depends on.

pub mod app;
pub mod auth;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod db;
pub mod encode;
pub mod error;
pub mod events;
pub mod http;
pub mod idempotency;
pub mod jwks;
pub mod lambda;
pub mod meters;
pub mod migrate;
pub mod pg;
pub mod replica;
pub mod roles;
pub mod router;
pub mod runtime;
pub mod service;
pub mod sql;
pub mod telemetry;

pub use config::Config;
pub use db::Pool;
pub use error::ApiError;
pub use router::{Access, AppState, Request, Response, Route, Router};
