//! Settings from the environment, read once at start with `envy`.

use std::net::IpAddr;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

/// Everything a function reads from its environment. Variable names are the field names in
/// upper case (`DATABASE_URL`, `PORT`, `POOL_SIZE`, ...).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Required by every deployed function; the local runner starts its own Postgres without it.
    pub database_url: Option<String>,
    /// A standby for list-products and get-order (`replica.rs`); unset, they read the primary.
    pub database_url_read: Option<String>,
    /// Whether successful writes answer `Tally-Commit-Lsn` (one more statement each), which
    /// a read sends back to read its own write from the replica. Required with
    /// `DATABASE_URL_READ`; set it for every function (the shared ConfigMap does).
    #[serde(default)]
    pub commit_lsn: bool,
    /// How long a read naming an LSN waits for the replica before it asks the primary.
    #[serde(default = "defaults::read_lsn_wait_ms")]
    pub read_lsn_wait_ms: u64,
    /// Set by the Lambda service (or anything speaking its Runtime API): where this process
    /// runs, a deployment fact like any other setting.
    #[serde(default)]
    pub aws_lambda_runtime_api: Option<String>,
    #[serde(default = "defaults::host")]
    pub host: IpAddr,
    #[serde(default = "defaults::port")]
    pub port: u16,
    /// Where `/metrics` is served, on `HOST`: its own port, never the public one; 0 serves no
    /// metrics.
    #[serde(default = "defaults::metrics_port")]
    pub metrics_port: u16,
    /// Connections per process. Small on purpose: on a hot product, requests are better queued
    /// in the pool than on the row lock.
    #[serde(default = "defaults::pool_size")]
    pub pool_size: u32,
    /// How long a request may wait for a connection before it is answered 503.
    #[serde(default = "defaults::pool_timeout_ms")]
    pub pool_timeout_ms: u64,
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Server-side bound on any one statement; 0 turns it off. `migrate --roles` and the local
    /// runner set it on the app and read-only roles (`crate::roles`): a function's sessions get
    /// it from their role, whatever the connection string or a pooler carries.
    #[serde(default = "defaults::statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[serde(default = "defaults::shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    #[serde(default = "defaults::log_level")]
    pub log_level: String,
    /// How long a client has, from connecting, to send a whole request head (and, on a kept-
    /// alive connection, the next one): a silent or dribbling client is cut off after it.
    #[serde(default = "defaults::header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// How long a request body may take to arrive, once its head has: a body that stalls is
    /// answered 408 and its connection closed.
    #[serde(default = "defaults::body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// Origins whose pages may call the API from a browser (CORS), comma-separated, exactly as
    /// the browser sends them (`https://shop.example.com`); `*` allows any. None by default.
    #[serde(default, deserialize_with = "comma_list")]
    pub cors_allowed_origins: Vec<String>,
    /// Where order events go (a Knative Broker's URL): Knative's SinkBinding sets `K_SINK`.
    /// Unset, nothing is published and the outbox keeps its rows for a sweep that can.
    pub k_sink: Option<String>,
    /// Connections served at once; one more is closed at once rather than queued.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,

    /// HS256: the shared signing secret (at least 32 bytes).
    pub jwt_hs256_secret: Option<Secret>,
    /// RS256/ES256: the identity provider's public key, PEM.
    pub jwt_public_key_pem: Option<String>,
    /// RS256/ES256: the private key, PEM; only the `token` command reads it, to mint.
    pub jwt_private_key_pem: Option<Secret>,
    /// `RS256` or `ES256` with a PEM key; HS256 with a secret.
    pub jwt_algorithm: Option<String>,
    /// Checked when set.
    pub jwt_issuer: Option<String>,
    /// Checked when set.
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "defaults::jwt_leeway_secs")]
    pub jwt_leeway_secs: u64,
    /// An identity provider's JWKS (`https://`, or `http://` on loopback): tokens with a `kid`
    /// are verified with its key of that id. Beside a fixed key or instead of one.
    pub jwt_jwks_url: Option<String>,
    /// The algorithms a JWKS-verified token may use (never HMAC).
    #[serde(
        default = "defaults::jwt_jwks_algorithms",
        deserialize_with = "comma_list"
    )]
    pub jwt_jwks_algorithms: Vec<String>,
    /// Keys older than this are fetched again on the next token that needs them.
    #[serde(default = "defaults::jwt_jwks_max_age_secs")]
    pub jwt_jwks_max_age_secs: u64,
    /// At most one fetch per this many seconds, however many unknown `kid`s arrive.
    #[serde(default = "defaults::jwt_jwks_min_refresh_secs")]
    pub jwt_jwks_min_refresh_secs: u64,
    /// The claim that holds the role: a name, or a dotted path (`realm_access.roles`).
    #[serde(default = "defaults::jwt_role_claim")]
    pub jwt_role_claim: String,
    /// The value of that claim (a string, or one of an array's) that means an admin.
    #[serde(default = "defaults::jwt_admin_role")]
    pub jwt_admin_role: String,
    /// Whether a subject seen for the first time gets a user row.
    #[serde(default = "defaults::yes")]
    pub jwt_provision_users: bool,
    /// Whether every `sub` is an external subject, numeric ones too (else a positive integer
    /// `sub` is a users.id, as `tally token` mints).
    #[serde(default)]
    pub jwt_external_subjects_only: bool,
}

/// A value that must never reach a log: its `Debug` prints nothing of it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

mod defaults {
    use std::net::{IpAddr, Ipv4Addr};

    pub fn host() -> IpAddr {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
    pub fn port() -> u16 {
        8080
    }
    pub fn metrics_port() -> u16 {
        9464
    }
    pub fn pool_size() -> u32 {
        4
    }
    pub fn read_lsn_wait_ms() -> u64 {
        200
    }
    pub fn pool_timeout_ms() -> u64 {
        2_000
    }
    pub fn connect_timeout_ms() -> u64 {
        2_000
    }
    pub fn statement_timeout_ms() -> u64 {
        5_000
    }
    pub fn shutdown_grace_secs() -> u64 {
        25
    }
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn header_read_timeout_ms() -> u64 {
        10_000
    }
    pub fn body_read_timeout_ms() -> u64 {
        10_000
    }
    pub fn max_connections() -> usize {
        1_024
    }
    pub fn jwt_leeway_secs() -> u64 {
        5
    }
    pub fn jwt_jwks_algorithms() -> Vec<String> {
        vec!["RS256".into(), "ES256".into()]
    }
    pub fn jwt_jwks_max_age_secs() -> u64 {
        300
    }
    pub fn jwt_jwks_min_refresh_secs() -> u64 {
        10
    }
    pub fn jwt_role_claim() -> String {
        "role".into()
    }
    pub fn jwt_admin_role() -> String {
        "admin".into()
    }
    pub fn yes() -> bool {
        true
    }
}

/// A comma-separated list; blanks are skipped, so an empty variable is an empty list.
fn comma_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let text = String::deserialize(d)?;
    Ok(text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect())
}

/// `*`, or `http(s)://host[:port]` with nothing after it.
fn is_origin(value: &str) -> bool {
    if value == "*" {
        return true;
    }
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"));
    // Lower case only: browsers send the host in lower case, and origins compare bytewise.
    rest.is_some_and(|host| {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:[]".contains(&b))
    })
}

/// A configuration problem, worded as the one line an operator needs to fix it.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the given variables; tests and the local runner use this to avoid touching the
    /// process environment.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let config: Self = envy::from_iter(vars).map_err(|e| ConfigError(describe(e)))?;
        config.check()
    }

    /// Whether this process was started by the Lambda service.
    pub fn on_lambda(&self) -> bool {
        self.aws_lambda_runtime_api.is_some()
    }

    fn check(self) -> Result<Self, ConfigError> {
        if self.pool_size == 0 {
            return Err(ConfigError("POOL_SIZE must be at least 1".into()));
        }
        if self.header_read_timeout_ms == 0
            || self.body_read_timeout_ms == 0
            || self.max_connections == 0
        {
            return Err(ConfigError(
                "HEADER_READ_TIMEOUT_MS, BODY_READ_TIMEOUT_MS and MAX_CONNECTIONS must be at least 1"
                    .into(),
            ));
        }
        if let Some(bad) = self.cors_allowed_origins.iter().find(|o| !is_origin(o)) {
            return Err(ConfigError(format!(
                "CORS_ALLOWED_ORIGINS: {bad:?} is not an origin (scheme://host[:port], no path), nor *"
            )));
        }
        if self.metrics_port != 0 && self.metrics_port == self.port {
            return Err(ConfigError(format!(
                "METRICS_PORT={} is the public PORT: metrics get a port of their own (or 0 for none)",
                self.metrics_port
            )));
        }
        if self.log_level.parse::<tracing::Level>().is_err() {
            return Err(ConfigError(format!(
                "LOG_LEVEL={:?} is not one of trace, debug, info, warn, error",
                self.log_level
            )));
        }
        KeyConfig::from_config(&self)?;
        self.check_jwks()?;
        if let Some(sink) = &self.k_sink {
            url::Url::parse(sink)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| ConfigError(format!("K_SINK={sink:?} is not an http(s) URL")))?;
        }
        if let Some(url) = &self.database_url {
            crate::pg::target(url).map_err(|e| ConfigError(format!("DATABASE_URL: {e}")))?;
        }
        if let Some(url) = &self.database_url_read {
            crate::pg::target(url).map_err(|e| ConfigError(format!("DATABASE_URL_READ: {e}")))?;
            if !self.commit_lsn {
                return Err(ConfigError(
                    "DATABASE_URL_READ needs COMMIT_LSN=true on every function (the shared \
                     ConfigMap): without it no write answers Tally-Commit-Lsn, and no client \
                     can read its own writes from the replica"
                        .into(),
                ));
            }
        }
        Ok(self)
    }

    /// The JWKS settings: a URL that is `https://` (or `http://` on loopback, for tests and
    /// sidecars), asymmetric algorithms only, a refresh floor of at least a second, and a
    /// role claim and admin value that are not blank.
    fn check_jwks(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.jwt_jwks_url {
            jwks_url(url)?;
        }
        if let Some(bad) = self
            .jwt_jwks_algorithms
            .iter()
            .find(|a| jwks_algorithm(a).is_none())
        {
            return Err(ConfigError(format!(
                "JWT_JWKS_ALGORITHMS: {bad:?} is not one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
            )));
        }
        if self.jwt_jwks_algorithms.is_empty() {
            return Err(ConfigError("JWT_JWKS_ALGORITHMS is empty".into()));
        }
        if self.jwt_jwks_min_refresh_secs == 0 || self.jwt_jwks_max_age_secs == 0 {
            return Err(ConfigError(
                "JWT_JWKS_MIN_REFRESH_SECS and JWT_JWKS_MAX_AGE_SECS must be at least 1".into(),
            ));
        }
        if self.jwt_role_claim.trim().is_empty() || self.jwt_admin_role.trim().is_empty() {
            return Err(ConfigError(
                "JWT_ROLE_CLAIM and JWT_ADMIN_ROLE must not be blank".into(),
            ));
        }
        Ok(())
    }

    /// Whether a browser's `Origin` may call the API (see `CORS_ALLOWED_ORIGINS`).
    pub fn allows_origin(&self, origin: &[u8]) -> bool {
        self.cors_allowed_origins
            .iter()
            .any(|o| o == "*" || o.as_bytes() == origin)
    }

    /// The database URL, or the error a deployed function reports when it is missing.
    pub fn require_database_url(&self) -> Result<&str, ConfigError> {
        self.database_url
            .as_deref()
            .ok_or_else(|| ConfigError("missing environment variable DATABASE_URL".into()))
    }

    pub fn read_lsn_wait(&self) -> Duration {
        Duration::from_millis(self.read_lsn_wait_ms)
    }

    pub fn pool_timeout(&self) -> Duration {
        Duration::from_millis(self.pool_timeout_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
}

/// envy names fields in lower case; operators set upper-case variables, so say those.
fn describe(e: envy::Error) -> String {
    match e {
        envy::Error::MissingValue(field) => {
            format!("missing environment variable {}", field.to_uppercase())
        }
        envy::Error::Custom(msg) => {
            // envy's message ends with "... provided by port"; name the variable as it is set.
            match msg.rsplit_once(" by ") {
                Some((head, field)) => format!("{head} by {}", field.to_uppercase()),
                None => msg,
            }
        }
    }
}

/// `JWT_JWKS_URL` parsed: `https://`, or `http://` to a loopback address (where nobody can
/// sit between us and the keys).
pub fn jwks_url(raw: &str) -> Result<url::Url, ConfigError> {
    let url =
        url::Url::parse(raw).map_err(|e| ConfigError(format!("JWT_JWKS_URL is not a URL: {e}")))?;
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(ConfigError(
            "JWT_JWKS_URL must be https:// (http:// only to a loopback address)".into(),
        )),
    }
}

/// An algorithm a JWKS key may verify: asymmetric only, so a key set can never turn a
/// public value into an HMAC secret.
pub fn jwks_algorithm(name: &str) -> Option<Algorithm> {
    use Algorithm::*;
    let algorithm: Algorithm = name.trim().parse().ok()?;
    matches!(
        algorithm,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 | ES256 | ES384 | EdDSA
    )
    .then_some(algorithm)
}

/// The verification key material, as configured.
pub enum KeyConfig {
    Hs256(Vec<u8>),
    Pem { algorithm: Algorithm, pem: String },
}

/// HMAC secrets shorter than this are refused: they can be brute-forced from one token.
const MIN_SECRET_BYTES: usize = 32;

impl KeyConfig {
    /// The configured key, None when no key is set, or an error naming the variable at fault.
    pub fn from_config(config: &Config) -> Result<Option<Self>, ConfigError> {
        let algorithm = config.jwt_algorithm.as_deref().map(str::to_ascii_uppercase);
        match (&config.jwt_hs256_secret, &config.jwt_public_key_pem) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                "set JWT_HS256_SECRET or JWT_PUBLIC_KEY_PEM, not both",
            )),
            (Some(secret), None) => {
                if algorithm.as_deref().is_some_and(|a| a != "HS256") {
                    return Err(ConfigError::new(
                        "JWT_ALGORITHM must be HS256 with JWT_HS256_SECRET",
                    ));
                }
                if secret.0.len() < MIN_SECRET_BYTES {
                    return Err(ConfigError::new(format!(
                        "JWT_HS256_SECRET must be at least {MIN_SECRET_BYTES} bytes"
                    )));
                }
                Ok(Some(Self::Hs256(secret.0.as_bytes().to_vec())))
            }
            (None, Some(pem)) => {
                let algorithm = match algorithm.as_deref().unwrap_or("RS256") {
                    "RS256" => Algorithm::RS256,
                    "ES256" => Algorithm::ES256,
                    other => {
                        return Err(ConfigError::new(format!(
                            "JWT_ALGORITHM={other:?}: with a public key use RS256 or ES256"
                        )));
                    }
                };
                let key = Self::Pem {
                    algorithm,
                    pem: pem.replace("\\n", "\n"),
                };
                key.decoding_key()?;
                Ok(Some(key))
            }
            (None, None) => Ok(None),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            Self::Hs256(_) => Algorithm::HS256,
            Self::Pem { algorithm, .. } => *algorithm,
        }
    }

    pub(crate) fn decoding_key(&self) -> Result<DecodingKey, ConfigError> {
        match self {
            Self::Hs256(secret) => Ok(DecodingKey::from_secret(secret)),
            Self::Pem { algorithm, pem } => match algorithm {
                Algorithm::ES256 => DecodingKey::from_ec_pem(pem.as_bytes()),
                _ => DecodingKey::from_rsa_pem(pem.as_bytes()),
            }
            .map_err(|e| ConfigError::new(format!("JWT_PUBLIC_KEY_PEM is not a usable key: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_apply_when_only_the_database_is_set() {
        let c = Config::from_vars(vars(&[("DATABASE_URL", "postgres://u@h/db")])).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.pool_size, 4);
        assert_eq!(c.pool_timeout(), Duration::from_secs(2));
    }

    #[test]
    fn a_malformed_port_names_the_variable() {
        let e = Config::from_vars(vars(&[("PORT", "eighty")])).unwrap_err();
        assert!(e.to_string().contains("PORT"), "{e}");
    }

    #[test]
    fn a_missing_database_url_names_the_variable() {
        let c = Config::from_vars(vars(&[])).unwrap();
        let e = c.require_database_url().unwrap_err();
        assert_eq!(
            e.to_string(),
            "configuration error: missing environment variable DATABASE_URL"
        );
    }

    #[test]
    fn jwks_settings_are_checked_at_start() {
        let with = |pairs: &[(&str, &str)]| Config::from_vars(vars(pairs));
        for url in [
            "https://id.example.com/.well-known/jwks.json",
            "http://127.0.0.1:9/jwks",
            "http://[::1]:9/jwks",
            "http://localhost/jwks",
        ] {
            assert!(with(&[("JWT_JWKS_URL", url)]).is_ok(), "{url}");
        }
        for (name, value, says) in [
            ("JWT_JWKS_URL", "http://id.example.com/jwks", "https://"),
            ("JWT_JWKS_URL", "file:///etc/keys", "https://"),
            ("JWT_JWKS_URL", "not a url", "not a URL"),
            ("JWT_JWKS_ALGORITHMS", "RS256,HS256", "HS256"),
            ("JWT_JWKS_ALGORITHMS", "none", "none"),
            ("JWT_JWKS_ALGORITHMS", ",", "empty"),
            ("JWT_JWKS_MIN_REFRESH_SECS", "0", "at least 1"),
            ("JWT_ROLE_CLAIM", " ", "blank"),
        ] {
            let e = with(&[(name, value)]).unwrap_err().to_string();
            assert!(e.contains(says), "{name}={value}: {e}");
        }
        let c = with(&[]).unwrap();
        assert_eq!(c.jwt_jwks_algorithms, ["RS256", "ES256"]);
        assert!(c.jwt_provision_users && !c.jwt_external_subjects_only);
        assert_eq!(
            (c.jwt_role_claim.as_str(), c.jwt_admin_role.as_str()),
            ("role", "admin")
        );
    }

    #[test]
    fn a_bad_log_level_is_refused() {
        let e = Config::from_vars(vars(&[("LOG_LEVEL", "loud")])).unwrap_err();
        assert!(e.to_string().contains("LOG_LEVEL"), "{e}");
    }
}
