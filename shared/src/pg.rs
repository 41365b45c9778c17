//! PostgreSQL outside the pool, in one place: a URL naming another database or shown without
//! its password, a client connection with its driver task running, and where the server and
//! client binaries are.

use std::path::{Path, PathBuf};
use std::process::Command;

use tokio_postgres::{Client, NoTls};

/// A client for `url`, its connection driven on a task of its own until the client is dropped.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "a PostgreSQL connection ended with an error");
        }
    });
    Ok(client)
}

/// The same URL naming another database; user, password, host and parameters are kept. A
/// key/value string (`host=... dbname=...`) gets a `dbname` that overrides its own.
pub fn with_database(url: &str, database: &str) -> String {
    if !url.contains("://") {
        return format!(
            "{url} dbname='{}'",
            database.replace('\\', "\\\\").replace('\'', "\\'")
        );
    }
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let head = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{head}/{database}?{q}"),
        None => format!("{head}/{database}"),
    }
}

/// The same URL connecting as `user` (with `password`, if given); host, database and
/// parameters are kept. A key/value string gets `user` and `password` that override its own.
/// Role names and passwords made by this project need no escaping in a URL (a-z, 0-9, _).
pub fn with_user(url: &str, user: &str, password: Option<&str>) -> String {
    let password = password.unwrap_or_default();
    if !url.contains("://") {
        let quote = |v: &str| v.replace('\\', "\\\\").replace('\'', "\\'");
        return format!(
            "{url} user='{}' password='{}'",
            quote(user),
            quote(password)
        );
    }
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme_end + i);
    let host = match url[scheme_end..authority_end].rfind('@') {
        Some(at) => &url[scheme_end + at + 1..authority_end],
        None => &url[scheme_end..authority_end],
    };
    let userinfo = if password.is_empty() {
        user.to_owned()
    } else {
        format!("{user}:{password}")
    };
    format!(
        "{}{userinfo}@{host}{}",
        &url[..scheme_end],
        &url[authority_end..]
    )
}

/// The URL without its password, for logs and messages: in the user info, and as a
/// `password` parameter (a query's or a key/value string's).
pub fn redact(url: &str) -> String {
    if let Some(at) = url.find("password=") {
        let end = url[at..].find(['&', ' ']).map_or(url.len(), |i| at + i);
        let rest = redact(&url[end..]);
        return redact_userinfo(&format!("{}password=***{rest}", &url[..at]));
    }
    redact_userinfo(url)
}

fn redact_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The newest server binaries on the machine: `$PG_BINDIR`, then `pg_config --bindir`, then
/// Debian's `/usr/lib/postgresql/<major>/bin`.
pub fn find_bindir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PG_BINDIR").map(PathBuf::from) {
        return has_server(&dir).then_some(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((major, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_names_another_database_and_hides_its_password() {
        let url = "postgres://app:s3cret@db:5432/tally?sslmode=require";
        assert_eq!(
            with_database(url, "scratch"),
            "postgres://app:s3cret@db:5432/scratch?sslmode=require"
        );
        assert_eq!(
            with_database("postgres://127.0.0.1", "x"),
            "postgres://127.0.0.1/x"
        );
        assert_eq!(
            redact(url),
            "postgres://app:***@db:5432/tally?sslmode=require"
        );
        assert_eq!(redact("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(
            redact("postgres://db/x?user=app&password=s3cret&sslmode=require"),
            "postgres://db/x?user=app&password=***&sslmode=require"
        );
        assert_eq!(
            redact("host=db password=s3cret dbname=x"),
            "host=db password=*** dbname=x"
        );
        assert_eq!(
            with_database("host=/run/pg dbname=tally", "scratch"),
            "host=/run/pg dbname=tally dbname='scratch'"
        );
    }

    #[test]
    fn a_url_connects_as_another_user() {
        assert_eq!(
            with_user(
                "postgres://postgres@db:5432/tally?sslmode=require",
                "app",
                Some("pw")
            ),
            "postgres://app:pw@db:5432/tally?sslmode=require"
        );
        assert_eq!(
            with_user("postgres://owner:x@db/tally", "ro", None),
            "postgres://ro@db/tally"
        );
        assert_eq!(
            with_user("postgresql://127.0.0.1:5432", "app", Some("pw")),
            "postgresql://app:pw@127.0.0.1:5432"
        );
        assert_eq!(
            with_user("host=db dbname=tally", "app", Some("p'w")),
            "host=db dbname=tally user='app' password='p\\'w'"
        );
    }
}
