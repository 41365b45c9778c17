//! PostgreSQL in one place: a database URL read as libpq reads it (`sslmode` and
//! `sslrootcert` included, as TLS through rustls), a client connection with its driver task
//! running, a URL naming another database or shown without its password, and where the server
//! and client binaries are.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::Client;
/// The TLS every connection is made with (the pool's and [`connect`]'s).
pub use tokio_postgres_rustls::MakeRustlsConnect as Tls;

/// Why [`connect`] failed: the URL, before anything was sent, or the connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Url(#[from] UrlError),
    /// With its causes: the driver's "error performing TLS handshake" alone does not say that
    /// the certificate's issuer is unknown, or that it names another host.
    #[error("{}", with_causes(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// An error and each of its sources, `: `-separated.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// A client for `url`, its connection driven on a task of its own until the client is dropped.
pub async fn connect(url: &str) -> Result<Client, ConnectError> {
    let target = target(url)?;
    let (client, connection) = target.config.connect(target.tls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "a PostgreSQL connection ended with an error");
        }
    });
    Ok(client)
}

/// libpq's `sslmode`, honoured as libpq does (see [`target`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, UrlError> {
        Ok(match value {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(UrlError::SslMode(other.to_owned())),
        })
    }
}

/// What is wrong with a database URL, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("not a valid PostgreSQL URL: {0}")]
    Invalid(String),
    #[error(
        "sslrootcert=system trusts every public CA, so it needs sslmode=verify-full (the default \
         with it), as libpq does"
    )]
    WeakWithSystem,
    #[error("sslmode={0:?} is not one of disable, allow, prefer, require, verify-ca, verify-full")]
    SslMode(String),
    #[error(
        "sslmode={0} verifies the server's certificate, so it needs the CA that signed it: set \
         sslrootcert to a PEM file (or sslrootcert=system for the system's roots), or put it in \
         ~/.postgresql/root.crt"
    )]
    NoRootCert(&'static str),
    #[error("sslrootcert={path}: {reason}")]
    RootCert { path: String, reason: String },
}

/// A database URL ready to connect: the driver's settings, and the TLS its `sslmode` asks for.
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: Tls,
    pub ssl_mode: SslMode,
}

/// Parses a database URL (or key/value string) the way libpq reads it, TLS included. The
/// driver refuses `verify-ca`, `verify-full` and `sslrootcert`, so both are taken out here
/// first and become the TLS configuration:
///
/// - `disable`: no TLS. `allow` and `prefer` (the default, as in libpq): TLS when the server
///   offers it, the certificate not checked. `require`: TLS or no connection; the certificate
///   is checked against `sslrootcert` when one is given (libpq does the same with a root file).
/// - `verify-ca`: the certificate must chain to `sslrootcert`. `verify-full`: and name the host.
///
/// `sslrootcert=system` means the system's roots; without it, `~/.postgresql/root.crt`.
pub fn target(url: &str) -> Result<Target, UrlError> {
    let (rest, mode, root) = take_tls_settings(url);
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| UrlError::Invalid(e.to_string()))?;
    // The driver found an sslmode this parser did not take out (written in a way it does not
    // read alike): refuse, rather than let the line below overrule what the URL asked for.
    if config.get_ssl_mode() != tokio_postgres::config::SslMode::Prefer {
        return Err(UrlError::Invalid(
            "sslmode is written in a way this parser cannot read safely; write it as \
             sslmode=<mode>"
                .into(),
        ));
    }
    // libpq 16: the system's roots vouch for any public name, so with them only verify-full
    // means anything, and it is the default.
    let system = root.as_deref() == Some("system");
    let mode = match mode.as_deref().map(SslMode::parse).transpose()? {
        None if system => SslMode::VerifyFull,
        None => SslMode::Prefer,
        Some(m) if system && m != SslMode::VerifyFull => return Err(UrlError::WeakWithSystem),
        Some(m) => m,
    };
    // Only an address given (hostaddr): TLS is offered to that address (its IP in the
    // certificate satisfies verify-full; libpq 16 refuses verify-full without a host instead).
    if config.get_hosts().is_empty() {
        for addr in config.get_hostaddrs().to_vec() {
            config.host(addr.to_string());
        }
    }
    use tokio_postgres::config::SslMode as Driver;
    config.ssl_mode(match mode {
        SslMode::Disable => Driver::Disable,
        SslMode::Allow | SslMode::Prefer => Driver::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Driver::Require,
    });
    let tls = Tls::new(client_config(mode, root.as_deref())?);
    Ok(Target {
        config,
        tls,
        ssl_mode: mode,
    })
}

/// (the URL without `sslmode` and `sslrootcert`, their values), from a URL's query or a
/// key/value string, found where the driver's own parser finds parameters (so nothing it
/// would read as `sslmode` stays behind).
fn take_tls_settings(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut root) = (None, None);
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            mode = Some(value);
            true
        }
        "sslrootcert" => {
            root = Some(value);
            true
        }
        _ => false,
    };
    let decode = |v: &str| {
        percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned()
    };
    // A URL exactly when the driver takes it for one (its two prefixes), else key/value.
    let scheme_end = ["postgres://", "postgresql://"]
        .iter()
        .find(|prefix| url.starts_with(*prefix))
        .map(|prefix| prefix.len());
    let rest = if let Some(scheme_end) = scheme_end {
        // As tokio-postgres reads a URL: the user info runs to the first `@`, and the
        // parameters start at the first `?` after it.
        let after_credentials = url[scheme_end..]
            .find('@')
            .map_or(scheme_end, |at| scheme_end + at + 1);
        match url[after_credentials..].find('?') {
            None => url.to_owned(),
            Some(q) => {
                let (base, query) = url.split_at(after_credentials + q);
                let kept: Vec<&str> = query[1..]
                    .split('&')
                    .filter(|pair| {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        !take(&decode(key), decode(value))
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut rest = String::with_capacity(url.len());
        for (key, value, text) in key_values(url) {
            if !take(key, value) {
                rest.push_str(text);
                rest.push(' ');
            }
        }
        rest.trim_end().to_owned()
    };
    (rest, mode, root)
}

/// A key/value connection string's pairs, as libpq reads them (`key = value`, a value quoted
/// with `'` and `\` escaping, whitespace around `=`): (key, unescaped value, the pair's text).
fn key_values(s: &str) -> Vec<(&str, String, &str)> {
    let bytes = s.as_bytes();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= bytes.len() {
            return pairs;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[start..i];
        i = skip_ws(i);
        if i < bytes.len() && bytes[i] == b'=' {
            i = skip_ws(i + 1);
        }
        let mut value = Vec::new();
        let quoted = i < bytes.len() && bytes[i] == b'\'';
        if quoted {
            i += 1;
        }
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if i + 1 < bytes.len() => {
                    value.push(bytes[i + 1]);
                    i += 2;
                    continue;
                }
                b'\'' if quoted => {
                    i += 1;
                    break;
                }
                c if !quoted && c.is_ascii_whitespace() => break,
                c => value.push(c),
            }
            i += 1;
        }
        pairs.push((
            key,
            String::from_utf8_lossy(&value).into_owned(),
            &s[start..i],
        ));
    }
}

/// How much of the server's certificate is checked.
enum Check {
    Nothing,
    Chain(RootCertStore),
    ChainAndName(RootCertStore),
}

fn client_config(mode: SslMode, root: Option<&str>) -> Result<ClientConfig, UrlError> {
    let default_root = || {
        std::env::var_os("HOME")
            .map(|home| Path::new(&home).join(".postgresql/root.crt"))
            .filter(|p| p.is_file())
            .map(|p| p.to_string_lossy().into_owned())
    };
    let check = match mode {
        SslMode::Disable | SslMode::Allow | SslMode::Prefer => Check::Nothing,
        SslMode::Require => match root.map(str::to_owned).or_else(default_root) {
            Some(root) => Check::Chain(roots(&root)?),
            None => Check::Nothing,
        },
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let root =
                root.map(str::to_owned)
                    .or_else(default_root)
                    .ok_or(UrlError::NoRootCert(if mode == SslMode::VerifyCa {
                        "verify-ca"
                    } else {
                        "verify-full"
                    }))?;
            if mode == SslMode::VerifyCa {
                Check::Chain(roots(&root)?)
            } else {
                Check::ChainAndName(roots(&root)?)
            }
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| UrlError::RootCert {
            path: String::new(),
            reason: e.to_string(),
        })?;
    let webpki = |roots: RootCertStore| {
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| UrlError::RootCert {
                path: root.unwrap_or_default().to_owned(),
                reason: e.to_string(),
            })
    };
    let verifier: Arc<dyn ServerCertVerifier> = match check {
        Check::Nothing => Arc::new(Lenient {
            chain: None,
            provider: provider.clone(),
        }),
        Check::Chain(roots) => Arc::new(Lenient {
            chain: Some(webpki(roots)?),
            provider: provider.clone(),
        }),
        Check::ChainAndName(roots) => webpki(roots)?,
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The CA certificates in a PEM file, or the system's (`system`).
fn roots(path: &str) -> Result<RootCertStore, UrlError> {
    let fail = |reason: String| UrlError::RootCert {
        path: path.to_owned(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = if path == "system" {
        let found = rustls_native_certs::load_native_certs();
        found.certs
    } else {
        CertificateDer::pem_file_iter(path)
            .map_err(|e| fail(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| fail(e.to_string()))?
    };
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(fail("holds no CA certificate".into()));
    }
    Ok(store)
}

/// libpq's checks short of verify-full. Without a chain (`prefer`, `allow`, `require` with no
/// root): any certificate, the server not authenticated, as in libpq. With one (`verify-ca`,
/// `require` with a root): the certificate must chain to the given roots, but the name in it
/// is not compared with the host (for servers reached by an address their certificate does
/// not name). Either way the handshake's signatures are checked, so the key exchange stays
/// sound.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
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
    fn tls_settings_are_taken_where_the_driver_reads_parameters() {
        let (rest, mode, root) = take_tls_settings(
            "postgres://u:p%3Fw@db:5432/x?application_name=a&ssl%6Dode=verify-full&sslrootcert=%2Fca%20dir%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u:p%3Fw@db:5432/x?application_name=a");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/ca dir/ca.pem"));
        let (rest, mode, root) = take_tls_settings(
            "host=db  password='a b\\'c' sslmode = require sslrootcert='/x y/ca.pem' dbname=t",
        );
        assert_eq!(rest, "host=db password='a b\\'c' dbname=t");
        assert_eq!(mode.as_deref(), Some("require"));
        assert_eq!(root.as_deref(), Some("/x y/ca.pem"));
        assert!(take_tls_settings("postgres://db/x").1.is_none());
    }

    #[test]
    fn the_system_roots_mean_verify_full_and_nothing_weaker() {
        let system = target("postgres://db/x?sslrootcert=system").unwrap();
        assert_eq!(system.ssl_mode, SslMode::VerifyFull);
        for weak in ["disable", "prefer", "require", "verify-ca"] {
            let url = format!("postgres://db/x?sslrootcert=system&sslmode={weak}");
            assert!(
                matches!(target(&url), Err(UrlError::WeakWithSystem)),
                "{weak}"
            );
        }
        assert_eq!(target("postgres://db/x").unwrap().ssl_mode, SslMode::Prefer);
        let only_address = target("postgres://u@/x?hostaddr=127.0.0.1").unwrap();
        assert_eq!(only_address.config.get_hosts().len(), 1);
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
