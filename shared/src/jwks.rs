//! An identity provider's signing keys, from its JWKS URL: fetched on first need, cached,
//! selected by `kid`, fetched again when they grow old or a token names a `kid` we do not
//! have (the provider rotated), and never more often than `JWT_JWKS_MIN_REFRESH_SECS`
//! however many unknown `kid`s arrive, so a flood of forged tokens cannot hammer the provider.
//! A fetch that fails keeps the keys we have: a provider outage does not log everyone out.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use metrics::counter;

use crate::config::{Config, ConfigError, jwks_algorithm, jwks_url};
use crate::error::ApiError;

/// A key set larger than this is refused: no provider publishes hundreds of keys.
const MAX_JWKS_BYTES: usize = 256 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One usable key: what it verifies with, and the algorithm it is pinned to, if it says.
struct Key {
    decoding: DecodingKey,
    algorithm: Option<Algorithm>,
    family: Family,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Ed,
}

impl Family {
    fn of(algorithm: Algorithm) -> Option<Self> {
        use Algorithm::*;
        match algorithm {
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Some(Self::Rsa),
            ES256 | ES384 => Some(Self::Ec),
            EdDSA => Some(Self::Ed),
            HS256 | HS384 | HS512 => None,
        }
    }
}

/// The keys as last fetched, and when.
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<Key>>,
    fetched: Option<Instant>,
}

pub struct Jwks {
    inner: Arc<Inner>,
}

struct Inner {
    url: url::Url,
    client: reqwest::Client,
    algorithms: Vec<Algorithm>,
    max_age: Duration,
    min_refresh: Duration,
    current: RwLock<Arc<KeySet>>,
    /// Held by the one task fetching; the instant is the last attempt, successful or not.
    refresh: tokio::sync::Mutex<Option<Instant>>,
}

impl Jwks {
    /// The key set for `JWT_JWKS_URL`, or None when it is not set. Nothing is fetched yet.
    pub fn from_config(config: &Config) -> Result<Option<Self>, ConfigError> {
        let Some(raw) = &config.jwt_jwks_url else {
            return Ok(None);
        };
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ConfigError::new(format!("JWT_JWKS_URL: an HTTP client: {e}")))?;
        Ok(Some(Self {
            inner: Arc::new(Inner {
                url: jwks_url(raw)?,
                client,
                algorithms: config
                    .jwt_jwks_algorithms
                    .iter()
                    .filter_map(|a| jwks_algorithm(a))
                    .collect(),
                max_age: Duration::from_secs(config.jwt_jwks_max_age_secs),
                min_refresh: Duration::from_secs(config.jwt_jwks_min_refresh_secs),
                current: RwLock::default(),
                refresh: tokio::sync::Mutex::new(None),
            }),
        }))
    }

    /// Whether a token may use `algorithm` here.
    pub fn allows(&self, algorithm: Algorithm) -> bool {
        self.inner.algorithms.contains(&algorithm)
    }

    /// The key `kid` names for a token signed with `algorithm`: None when the provider has no
    /// such key (or it does not fit the algorithm), 503 when no key set was ever fetched.
    ///
    /// A known key is answered from what we hold, even past its age: a stale set is fetched
    /// again beside the request, so a provider that is slow or down delays nobody. Only an
    /// unknown `kid` (or no set yet) waits for a fetch, and that fetch is a task of its own, so
    /// a caller that gives up does not take it (and its rate-limit slot) down with it.
    pub async fn key(
        &self,
        kid: &str,
        algorithm: Algorithm,
    ) -> Result<Option<DecodingKey>, ApiError> {
        let inner = &self.inner;
        let set = inner.snapshot();
        let fresh = set.fetched.is_some_and(|at| at.elapsed() < inner.max_age);
        let seen = set.fetched;
        if set.keys.contains_key(kid) {
            if !fresh {
                let inner = self.inner.clone();
                tokio::spawn(async move { inner.refresh(seen, false).await });
            }
        } else {
            let inner = self.inner.clone();
            // A panic in the fetch is the fetch's; the caller answers from what is held.
            let _ = tokio::spawn(async move { inner.refresh(seen, true).await }).await;
        }
        let set = inner.snapshot();
        if set.fetched.is_none() {
            return Err(ApiError::Unavailable(format!(
                "no signing keys could be fetched from {}",
                inner.url
            )));
        }
        Ok(set.keys.get(kid).and_then(|key| {
            let fits = key.algorithm.is_none_or(|a| a == algorithm)
                && Family::of(algorithm) == Some(key.family);
            fits.then(|| key.decoding.clone())
        }))
    }
}

impl Inner {
    fn snapshot(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Fetches the keys again unless another task did since `seen` was read, or the last
    /// attempt was under `min_refresh` ago. Callers that `wait` queue for the one fetch in
    /// progress; a background refresh leaves it to that fetch.
    async fn refresh(&self, seen: Option<Instant>, wait: bool) {
        let mut last = if wait {
            self.refresh.lock().await
        } else {
            match self.refresh.try_lock() {
                Ok(last) => last,
                Err(_) => return,
            }
        };
        if self.snapshot().fetched != seen {
            return;
        }
        if last.is_some_and(|at| at.elapsed() < self.min_refresh) {
            counter!("tally_jwks_fetches_total", "outcome" => "rate_limited").increment(1);
            return;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(url = %self.url, keys = keys.len(), "signing keys fetched");
                counter!("tally_jwks_fetches_total", "outcome" => "ok").increment(1);
                let set = Arc::new(KeySet {
                    keys,
                    fetched: Some(Instant::now()),
                });
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = set;
            }
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "signing keys could not be fetched: keeping the ones we have");
                counter!("tally_jwks_fetches_total", "outcome" => "failed").increment(1);
            }
        }
    }

    /// GET the key set (no redirects, bounded in time and size) and keep its usable keys.
    async fn fetch(&self) -> Result<HashMap<String, Arc<Key>>, String> {
        let mut response = self
            .client
            .get(self.url.clone())
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("a key set over {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))?;
        Ok(usable(&set))
    }
}

/// The keys of a set that can verify a signature: with a `kid`, for signing (or unsaid),
/// RSA, EC or OKP (never a symmetric `oct` key), and decodable.
fn usable(set: &JwkSet) -> HashMap<String, Arc<Key>> {
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = &jwk.common.key_id else {
            continue;
        };
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != PublicKeyUse::Signature)
        {
            continue;
        }
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Family::Rsa,
            AlgorithmParameters::EllipticCurve(_) => Family::Ec,
            AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
            AlgorithmParameters::OctetKey(_) => continue,
        };
        let algorithm = match jwk.common.key_algorithm {
            None => None,
            Some(declared) => match signing_algorithm(declared) {
                Some(a) => Some(a),
                // A key pinned to something we do not verify with (RSA-OAEP, HS256) is skipped.
                None => continue,
            },
        };
        match DecodingKey::from_jwk(jwk) {
            Ok(decoding) => {
                keys.insert(
                    kid.clone(),
                    Arc::new(Key {
                        decoding,
                        algorithm,
                        family,
                    }),
                );
            }
            Err(e) => tracing::warn!(kid, error = %e, "a JWKS key that cannot be used: skipped"),
        }
    }
    keys
}

fn signing_algorithm(declared: KeyAlgorithm) -> Option<Algorithm> {
    jwks_algorithm(&declared.to_string())
}
