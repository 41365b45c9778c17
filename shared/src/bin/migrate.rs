//! `migrate`: applies pending migrations to `$DATABASE_URL` and exits (a Kubernetes Job).
//! With `--seed` it also loads the demo data into an empty catalog.

use std::process::ExitCode;

use tally_shared::app::{self, Logs};
use tally_shared::{Config, migrate};

fn main() -> ExitCode {
    let seed = std::env::args().skip(1).any(|a| a == "--seed");
    match app::start("migrate", Logs::Stdout) {
        Ok((config, runtime)) => runtime.block_on(run(&config, seed)),
        Err(code) => code,
    }
}

async fn run(config: &Config, seed: bool) -> ExitCode {
    let url = match config.require_database_url() {
        Ok(url) => url,
        Err(e) => {
            eprintln!("migrate: {e}");
            return ExitCode::FAILURE;
        }
    };
    match migrate::migrate(url).await {
        Ok((client, version)) => {
            if seed {
                match migrate::seed_if_empty(&client).await {
                    Ok(loaded) => tracing::info!(loaded, "demo seed"),
                    Err(e) => {
                        tracing::error!(error = %e, "seeding failed");
                        return ExitCode::FAILURE;
                    }
                }
            }
            tracing::info!(version, "schema up to date");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "migration failed");
            eprintln!("migrate: {e}");
            ExitCode::FAILURE
        }
    }
}
