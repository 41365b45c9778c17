//! `migrate`: applies pending migrations to `$DATABASE_URL` (the owner) and exits: the
//! Kubernetes Job before each rollout. `migrate --help` says how; see `tally_shared::cli`.

use clap::Parser;
use tally_shared::cli::{MigrateArgs, migrate_main};

/// Applies pending migrations to $DATABASE_URL, which must name the schema's owner.
#[derive(Debug, Parser)]
#[command(name = "migrate", version)]
struct Cli {
    #[command(flatten)]
    args: MigrateArgs,
}

fn main() -> std::process::ExitCode {
    migrate_main(&Cli::parse().args)
}
