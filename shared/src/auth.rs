//! Authentication: bearer JWTs verified with `jsonwebtoken`, and the [`Principal`] they name.
//!
//! Keys: a fixed one from the environment (an HS256 secret, or an RS256/ES256 public key in
//! PEM), and/or an identity provider's JWKS (`jwks`), which verifies the tokens whose `kid` it
//! publishes. `exp` and `sub` are required, `nbf` honoured, issuer and audience checked when
//! configured. A fixed key accepts only its algorithm and JWKS keys only asymmetric ones, so
//! `alg: none` and algorithm confusion (a token HMAC-signed with a public key) fail.
//!
//! The subject: a positive integer `sub` is a users.id (what `tally token` mints); any other
//! (a UUID, `auth0|...`), or every one with `JWT_EXTERNAL_SUBJECTS_ONLY`, names a user through
//! users.external_id, created on first sight unless `JWT_PROVISION_USERS=false`. The role comes
//! from `JWT_ROLE_CLAIM` (a string, or an array of them), compared with `JWT_ADMIN_ROLE`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use metrics::counter;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio_postgres::types::Type;

use crate::config::{Config, ConfigError, KeyConfig};
use crate::db::Pool;
use crate::error::ApiError;
use crate::http::{Request, parse_id};
use crate::jwks::Jwks;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Customer,
    Admin,
}

/// Who is calling: the token's `sub` as a user id, and its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub user_id: i64,
    pub role: Role,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Admins only; anyone else gets 403.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::Forbidden("this needs the admin role".into()))
        }
    }

    /// May this caller see `owner`'s things? Owners and admins may.
    pub fn may_access(&self, owner: i64) -> bool {
        self.is_admin() || self.user_id == owner
    }
}

/// The principal the router put on an authenticated request.
pub fn principal(request: &Request) -> Result<Principal, ApiError> {
    request
        .extensions()
        .get::<Principal>()
        .copied()
        .ok_or(ApiError::Unauthorized)
}

const CE_AUTHORIZATION: &str = "ce-authorization";

/// External subjects resolved in this process, so a subject's next requests cost no query.
/// Bounded (emptied when full), and each entry trusted for a minute only: a restore or a
/// deleted user may give its id to someone else, and a minute bounds how long a pod can
/// believe the old mapping.
const KNOWN_SUBJECTS: usize = 10_000;
const KNOWN_FOR: Duration = Duration::from_secs(60);

/// Verifies bearer tokens and resolves their subjects. Built once at start.
pub struct Verifier {
    fixed: Option<(DecodingKey, Validation)>,
    jwks: Option<Jwks>,
    /// iss, aud, leeway and the required claims; JWKS tokens add their own algorithm.
    base: Validation,
    role_claim: String,
    admin_role: String,
    provision: bool,
    external_only: bool,
    known: Mutex<HashMap<String, (i64, Instant)>>,
}

/// A token's `sub`: a users.id, or a subject to look up in users.external_id.
enum Subject {
    Id(i64),
    External(String),
}

impl Verifier {
    /// The verifier for the configured keys, or None when none is configured.
    pub fn from_config(config: &Config) -> Result<Option<Self>, ConfigError> {
        let fixed = KeyConfig::from_config(config)?;
        let jwks = Jwks::from_config(config)?;
        if fixed.is_none() && jwks.is_none() {
            return Ok(None);
        }
        let mut base = Validation::new(Algorithm::RS256);
        base.algorithms.clear();
        base.leeway = config.jwt_leeway_secs;
        base.validate_nbf = true;
        // A configured issuer or audience must also be present, not merely match when present.
        let mut required = vec!["exp", "sub"];
        match &config.jwt_issuer {
            Some(iss) => {
                base.set_issuer(&[iss]);
                required.push("iss");
            }
            None => base.iss = None,
        }
        match &config.jwt_audience {
            Some(aud) => {
                base.set_audience(&[aud]);
                required.push("aud");
            }
            None => base.validate_aud = false,
        }
        base.set_required_spec_claims(&required);
        let fixed = match fixed {
            Some(keys) => {
                let mut validation = base.clone();
                validation.algorithms = vec![keys.algorithm()];
                Some((keys.decoding_key()?, validation))
            }
            None => None,
        };
        Ok(Some(Self {
            fixed,
            jwks,
            base,
            role_claim: config.jwt_role_claim.trim().to_owned(),
            admin_role: config.jwt_admin_role.trim().to_owned(),
            provision: config.jwt_provision_users,
            external_only: config.jwt_external_subjects_only,
            known: Mutex::default(),
        }))
    }

    /// The caller named by `Authorization: Bearer <token>`, or by `ce-authorization` (the same
    /// value as a CloudEvents extension: how a Knative PingSource, which cannot set headers,
    /// carries the processor's token). Every refused token is the same 401, whatever went
    /// wrong: the reason is nothing a caller should be able to probe. 503 only when the keys
    /// or the user cannot be looked up at all.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        pool: &Pool,
    ) -> Result<Principal, ApiError> {
        let token = bearer(headers).ok_or(ApiError::Unauthorized)?;
        let (claims, from_provider) = self.verify(token).await?;
        let role = self.role(&claims)?;
        let user_id = match self.subject(&claims, from_provider)? {
            Subject::Id(id) => id,
            Subject::External(subject) => self.user_for(&subject, pool).await?,
        };
        Ok(Principal { user_id, role })
    }

    /// The token's claims, once its signature and its time, issuer and audience are checked,
    /// and whether a JWKS key verified it (rather than the fixed key).
    async fn verify(&self, token: &str) -> Result<(Map<String, Value>, bool), ApiError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| ApiError::Unauthorized)?;
        // Borrowed on the fixed key's path, which every request of `tally token`'s takes.
        let (key, validation): (Cow<'_, DecodingKey>, Cow<'_, Validation>) =
            match (&header.kid, &self.jwks, &self.fixed) {
                (Some(kid), Some(jwks), _) => {
                    if !jwks.allows(header.alg) {
                        return Err(refused("algorithm not allowed for JWKS keys"));
                    }
                    let key = jwks
                        .key(kid, header.alg)
                        .await?
                        .ok_or_else(|| refused("no JWKS key with this kid and algorithm"))?;
                    let mut validation = self.base.clone();
                    validation.algorithms = vec![header.alg];
                    (Cow::Owned(key), Cow::Owned(validation))
                }
                (_, _, Some((key, validation))) => (Cow::Borrowed(key), Cow::Borrowed(validation)),
                (None, Some(_), None) => return Err(refused("no kid, and no fixed key")),
                (_, None, None) => return Err(ApiError::Unauthorized),
            };
        let from_provider = matches!(key, Cow::Owned(_));
        jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map(|data| (data.claims, from_provider))
            .map_err(|e| {
                tracing::debug!(reason = ?e.kind(), "token refused");
                ApiError::Unauthorized
            })
    }

    /// The role claim: absent is a customer; a string must be the admin value or `customer`;
    /// an array (how providers list roles) is an admin when it holds the admin value.
    fn role(&self, claims: &Map<String, Value>) -> Result<Role, ApiError> {
        let admin = |v: &Value| v.as_str() == Some(self.admin_role.as_str());
        match claim(claims, &self.role_claim) {
            None | Some(Value::Null) => Ok(Role::Customer),
            Some(Value::String(s)) if s == &self.admin_role => Ok(Role::Admin),
            Some(Value::String(s)) if s == "customer" => Ok(Role::Customer),
            Some(Value::Array(values)) if values.iter().any(admin) => Ok(Role::Admin),
            Some(Value::Array(_)) => Ok(Role::Customer),
            Some(_) => Err(refused(
                "a role that is neither the admin role nor customer",
            )),
        }
    }

    /// A provider's subject is always external: its `"17"` is the provider's user 17, not
    /// ours. Only the fixed key's tokens (what `tally token` mints) name a users.id, unless
    /// the operator made every subject external.
    fn subject(
        &self,
        claims: &Map<String, Value>,
        from_provider: bool,
    ) -> Result<Subject, ApiError> {
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or_else(|| refused("sub is not a string"))?;
        if !from_provider
            && !self.external_only
            && let Some(id) = parse_id(sub)
        {
            return Ok(Subject::Id(id));
        }
        let fits = (1..=255).contains(&sub.len()) && !sub.chars().any(char::is_control);
        if !fits {
            return Err(refused(
                "an external subject must be 1 to 255 bytes, no control characters",
            ));
        }
        Ok(Subject::External(sub.to_owned()))
    }

    /// The user an external subject names: from this process's memory, or from
    /// `user_for_subject`, which creates it on first sight when provisioning is on. That runs
    /// in a read-write transaction, so the read-only role's GET can provision too.
    async fn user_for(&self, subject: &str, pool: &Pool) -> Result<i64, ApiError> {
        if let Some((id, at)) = self.known().get(subject)
            && at.elapsed() < KNOWN_FOR
        {
            return Ok(*id);
        }
        let mut conn = pool.get().await?;
        let find: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] =
            [(&subject, Type::TEXT)];
        let found: Option<i64> = conn
            .query_typed("SELECT user_for_subject($1, false)", &find)
            .await?
            .first()
            .and_then(|row| row.get(0));
        let id = match found {
            Some(id) => id,
            None if self.provision => {
                let tx = conn.build_transaction().read_only(false).start().await?;
                let made: Option<i64> = tx
                    .query_typed("SELECT user_for_subject($1, true)", &find)
                    .await?
                    .first()
                    .and_then(|row| row.get(0));
                tx.commit().await?;
                counter!("tally_users_provisioned_total").increment(1);
                made.ok_or_else(|| ApiError::Internal("user_for_subject made no user".into()))?
            }
            // Like any other refused token: this identity is not one of ours here.
            None => return Err(refused("an unknown subject, and provisioning is off")),
        };
        let mut known = self.known();
        if known.len() >= KNOWN_SUBJECTS {
            known.clear();
        }
        known.insert(subject.to_owned(), (id, Instant::now()));
        Ok(id)
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, (i64, Instant)>> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The token of `Authorization: Bearer <token>`, or of `ce-authorization`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .or_else(|| headers.get(CE_AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// A claim by name, or by dotted path into nested objects (`realm_access.roles`); a name that
/// itself holds dots (`https://example.com/role`) is found as it is first.
fn claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(name) {
        return Some(value);
    }
    let mut parts = name.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

/// The one 401, with why it was refused in the debug log.
fn refused(why: &'static str) -> ApiError {
    tracing::debug!(reason = why, "token refused");
    ApiError::Unauthorized
}
