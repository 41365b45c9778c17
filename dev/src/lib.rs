//! Developer and test tooling, kept out of the production library: the function binaries do
//! not depend on this crate, so none of it ships in their images.
//! - [`devdb`]: a private PostgreSQL cluster for the local runner and the fault tests.
//! - [`token`]: minting bearer tokens with the configured key (the runner's `tally token`, the
//!   demo tokens it prints, the tests and the bench).

pub mod devdb;
pub mod token;
