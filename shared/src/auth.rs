//! Authentication: bearer JWTs verified with `jsonwebtoken`, and the [`Principal`] they name.
//!
//! Keys come from the environment: an HS256 secret, or an RS256/ES256 public key in PEM so an
//! external identity provider can issue tokens. `exp` and `sub` are required, `nbf` honoured,
//! issuer and audience checked when configured. Only the configured algorithm is accepted, so
//! `alg: none` and algorithm confusion (a token HMAC-signed with the public key) fail.

use http::HeaderMap;
use jsonwebtoken::{DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, KeyConfig};
use crate::error::ApiError;
use crate::http::{Request, parse_id};

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

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    role: Role,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<Audience>,
}

/// RFC 7519 allows `aud` to be one string or an array of them, and identity providers send
/// both; jsonwebtoken checks ours is among them. We mint the single-string form.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

const CE_AUTHORIZATION: &str = "ce-authorization";

/// Verifies bearer tokens. Built once at start.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// The verifier for the configured key, or None when no key is configured.
    pub fn from_config(config: &Config) -> Result<Option<Self>, ConfigError> {
        let Some(keys) = KeyConfig::from_config(config)? else {
            return Ok(None);
        };
        let mut validation = Validation::new(keys.algorithm());
        validation.leeway = config.jwt_leeway_secs;
        validation.validate_nbf = true;
        // A configured issuer or audience must also be present, not merely match when present.
        let mut required = vec!["exp", "sub"];
        match &config.jwt_issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &config.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(Self {
            key: keys.decoding_key()?,
            validation,
        }))
    }

    /// The caller named by `Authorization: Bearer <token>`, or by `ce-authorization` (the same
    /// value as a CloudEvents extension: how a Knative PingSource, which cannot set headers,
    /// carries the processor's token). Every failure is the same 401, whatever went wrong: the
    /// reason is nothing a caller should be able to probe.
    pub fn verify(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .or_else(|| headers.get(CE_AUTHORIZATION))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
                tracing::debug!(reason = ?e.kind(), "token refused");
                ApiError::Unauthorized
            })?;
        let user_id = parse_id(&data.claims.sub).ok_or(ApiError::Unauthorized)?;
        Ok(Principal {
            user_id,
            role: data.claims.role,
        })
    }
}
