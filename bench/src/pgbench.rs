//! The raw-SQL ceilings, measured with pgbench in the same run as the API:
//! - the minimal order write (`bench/ceiling/`, a copy of the shared reference: tables shaped
//!   like the original's and one plpgsql call with only the essential writes, none of our code);
//! - our own order call: the handler's statements (`place_order_one` for one line,
//!   `place_order_lean` for more), sent with `-M extended` as `query_typed` does.
//!
//! A ceiling is the best tps over 4, 8, 16 and 32 clients. pgbench connects over TCP to the same
//! server as the API's pool, without TLS as the pool does (libpq would otherwise negotiate TLS,
//! and the ceilings would pay for encryption the API does not).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

pub const CLIENTS: [usize; 4] = [4, 8, 16, 32];
const CEILING_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/ceiling");

#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub best_tps: f64,
    /// (clients, tps) for each client count.
    pub runs: Vec<(usize, f64)>,
}

/// One pgbench script: a file of ours, or one of the minimal ceiling's.
pub enum Script {
    Minimal(&'static str),
    Own(String),
}

impl Script {
    fn path(&self, scratch: &Path, name: &str) -> PathBuf {
        match self {
            Self::Minimal(file) => Path::new(CEILING_DIR).join(file),
            Self::Own(text) => {
                let path = scratch.join(format!("{name}.pgbench"));
                std::fs::write(&path, text).expect("writing a pgbench script");
                path
            }
        }
    }

    fn mode(&self) -> &'static str {
        match self {
            // The shared scripts, run as their README runs them.
            Self::Minimal(_) => "simple",
            Self::Own(_) => "extended",
        }
    }
}

/// Runs `script` at each client count for `duration`. An error when pgbench is missing, fails,
/// or reports failed transactions: a ceiling that silently went missing would flatter the API.
pub fn ceiling(
    url: &str,
    name: &str,
    script: &Script,
    duration: Duration,
) -> Result<Ceiling, String> {
    let scratch = std::env::temp_dir().join(format!("tally-pgbench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let file = script.path(&scratch, name);
    let mut runs = Vec::new();
    for clients in CLIENTS {
        let out = Command::new("pgbench")
            .env("PGSSLMODE", "disable")
            .args(["-n", "-j", "2", "-M", script.mode()])
            .args(["-c", &clients.to_string()])
            .args(["-T", &duration.as_secs().max(1).to_string()])
            .arg("-f")
            .arg(&file)
            .arg(url)
            .output()
            .map_err(|e| format!("pgbench: {e} (apt-get install postgresql-client)"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let tps = text
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse::<f64>().ok());
        let failed = text
            .lines()
            .find(|l| l.starts_with("number of failed transactions"))
            .is_some_and(|l| !l.contains(": 0 "));
        match tps {
            Some(tps) if out.status.success() && !failed => runs.push((clients, tps)),
            _ => {
                return Err(format!(
                    "pgbench {name} at {clients} clients failed: {}{}",
                    text,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    let best_tps = runs.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    Ok(Ceiling { best_tps, runs })
}

/// The minimal ceiling's database, loaded as its README says: one user, 1,003 products.
pub const MINIMAL_SETUP: &str = "INSERT INTO users (email) VALUES ('b@x'); \
     INSERT INTO products (sku, name, inventory) \
     SELECT 'B-' || g, 'b', 1000000000 FROM generate_series(1, 1003) g;";

pub fn minimal_schema() -> String {
    std::fs::read_to_string(Path::new(CEILING_DIR).join("minimal-ceiling.sql"))
        .expect("bench/ceiling/minimal-ceiling.sql")
}

/// The handler's statements for an unkeyed order, sent as it sends them: a one-line order is
/// create-order's `PLACE_ONE_SQL`, a longer one its `PLACE_ORDER_SQL`, their parameters written
/// as literals (user 1) and arrays built from pgbench variables (pgbench has no array variables).
pub fn own_hot(product: i64) -> String {
    one(&product.to_string())
}

fn one(product_id: &str) -> String {
    let sql = create_order::PLACE_ONE_SQL
        .replace("$1", "1")
        .replace("$2", product_id)
        .replace("$3", "1");
    format!("{sql};\n")
}

fn lean(product_ids: &str, quantities: &str) -> String {
    let sql = create_order::PLACE_ORDER_SQL
        .replace("$1", "1")
        .replace("$2", product_ids)
        .replace("$3", quantities);
    format!("{sql};\n")
}

/// 1-3 random lines, as the spread load sends them, and as the handler passes them on: one line
/// to `place_order_one`, more to `place_order_lean` in ascending product id order.
pub fn own_spread(first: i64, last: i64) -> String {
    format!(
        "\\set n random(1, 3)\n\\set a random({first}, {last})\n\\set b random({first}, {last})\n\\set c random({first}, {last})\n\
         \\if :n = 1\n{}\
         \\elif :n = 2\n\\set lo least(:a, :b)\n\\set hi greatest(:a, :b)\n{}\
         \\else\n\\set lo least(:a, :b, :c)\n\\set hi greatest(:a, :b, :c)\n\\set mid :a + :b + :c - :lo - :hi\n{}\
         \\endif\n",
        one(":a"),
        lean("ARRAY[:lo, :hi]::bigint[]", "ARRAY[1, 1]::int[]"),
        lean("ARRAY[:lo, :mid, :hi]::bigint[]", "ARRAY[1, 1, 1]::int[]"),
    )
}

pub fn own_spread1(first: i64, last: i64) -> String {
    format!("\\set a random({first}, {last})\n{}", one(":a"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_ceiling_sends_the_handlers_statement_with_its_parameters_written_out() {
        let hot = own_hot(4);
        assert_eq!(
            hot,
            "SELECT order_id, created_at, total_cents, unit_price_cents, \
             stock_shards FROM place_order_one(1, 4, 1);\n"
        );
        for script in [own_spread(5, 1004), own_spread1(5, 1004)] {
            assert!(!script.contains('$'), "{script}");
            assert!(
                script.contains("FROM place_order_one(1, :a, 1)"),
                "{script}"
            );
        }
        assert!(own_spread(5, 1004).contains("FROM place_order_lean(1, "));
    }
}
