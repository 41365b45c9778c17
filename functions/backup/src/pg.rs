//! PostgreSQL from the backup's side: the client tools (`pg_dump`, `pg_restore`: finding them,
//! checking their version, starting them without a password on their command line), a client
//! connection, and what a backup records of a database (row counts, migration version).

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio::process::Command;
use tokio_postgres::Client;

use crate::BackupError;

/// A client tool and the version it reports.
#[derive(Debug, Clone)]
pub struct PgTool {
    pub path: PathBuf,
    pub version: String,
    pub major: i32,
}

impl PgTool {
    /// `$PG_BINDIR/<name>`, else the newest server binaries on the machine, else `$PATH`.
    pub fn find(name: &str) -> Result<Self, BackupError> {
        let candidates = [
            std::env::var_os("PG_BINDIR").map(|d| PathBuf::from(d).join(name)),
            tally_shared::pg::find_bindir().map(|d| d.join(name)),
            Some(PathBuf::from(name)),
        ];
        for path in candidates.into_iter().flatten() {
            if let Ok(out) = std::process::Command::new(&path).arg("--version").output()
                && out.status.success()
            {
                let text = String::from_utf8_lossy(&out.stdout);
                // "pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"
                let version = text.split_whitespace().nth(2).unwrap_or("").to_owned();
                let major = version
                    .split('.')
                    .next()
                    .and_then(|m| m.parse().ok())
                    .ok_or_else(|| {
                        BackupError::Config(format!(
                            "cannot read the version of {}: {text}",
                            path.display()
                        ))
                    })?;
                return Ok(Self {
                    path,
                    version,
                    major,
                });
            }
        }
        Err(BackupError::Config(format!(
            "{name} not found: install the PostgreSQL client (Debian: postgresql-client) or set PG_BINDIR"
        )))
    }
}

/// A command for `tool` against `url`: the password, if any, goes in `PGPASSWORD`, so that it
/// never shows in the process list.
pub fn tool_command(tool: &PgTool, url: &str) -> Result<Command, BackupError> {
    let (url, password) = split_password(url);
    let mut command = Command::new(&tool.path);
    command.arg(format!("--dbname={url}")).kill_on_drop(true);
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    Ok(command)
}

/// `postgres://user:secret@host/db` → (`postgres://user@host/db`, `secret`), percent-decoded.
pub fn split_password(url: &str) -> (String, Option<String>) {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return (url.to_owned(), None);
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_owned(), None);
    };
    let userinfo = &rest[..at];
    match userinfo.split_once(':') {
        Some((user, password)) => (
            format!("{}{user}{}", &url[..scheme_end], &rest[at..]),
            Some(percent_decode(password)),
        ),
        None => (url.to_owned(), None),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The database a URL names (libpq's default: the user name).
pub fn database_name(url: &str) -> Result<String, BackupError> {
    let config = tally_shared::pg::target(url)
        .map_err(|e| BackupError::Config(format!("DATABASE_URL: {e}")))?
        .config;
    config
        .get_dbname()
        .or(config.get_user())
        .map(str::to_owned)
        .ok_or_else(|| BackupError::Config("DATABASE_URL names no database".into()))
}

/// Rows in every user table, as `schema.table`.
pub async fn count_rows(client: &Client) -> Result<BTreeMap<String, i64>, BackupError> {
    let tables = client
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables \
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
            &[],
        )
        .await
        .map_err(db)?;
    let mut counts = BTreeMap::new();
    for row in tables {
        let table: String = row.get(0);
        // The name comes from the catalog, quoted by format('%I'): safe to interpolate.
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .map_err(db)?
            .get(0);
        counts.insert(table, n);
    }
    Ok(counts)
}

pub async fn migration_version(client: &Client) -> Result<Option<i32>, BackupError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_one("SELECT max(version) FROM refinery_schema_history", &[])
        .await
        .map_err(db)?;
    Ok(row.get(0))
}

/// A database error as the backup reports it.
pub fn db(e: tokio_postgres::Error) -> BackupError {
    BackupError::Database(e.to_string())
}

/// A client for `url`.
pub async fn connect(url: &str) -> Result<Client, BackupError> {
    tally_shared::pg::connect(url)
        .await
        .map_err(|e| BackupError::Database(format!("connecting: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_leave_the_url() {
        assert_eq!(
            split_password("postgres://app:s%40cret@db:5432/tally"),
            ("postgres://app@db:5432/tally".into(), Some("s@cret".into()))
        );
        assert_eq!(
            split_password("postgres://app@db/tally"),
            ("postgres://app@db/tally".into(), None)
        );
        assert_eq!(database_name("postgres://app@db/tally").unwrap(), "tally");
    }
}
