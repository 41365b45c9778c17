//! Minting bearer tokens with the configured key, as an identity provider would: the claims
//! `tally_shared::auth` verifies (`sub`, `role`, `exp`, `iat`, and `iss`/`aud` when configured).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use tally_shared::auth::Role;
use tally_shared::config::{Config, ConfigError, KeyConfig};

#[derive(Serialize)]
struct Claims {
    sub: String,
    role: Role,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
}

/// Mints a token with the configured key: HS256 with the secret, RS256/ES256 with
/// `JWT_PRIVATE_KEY_PEM`. Issuer and audience are set when configured.
pub fn mint(
    config: &Config,
    user_id: i64,
    role: Role,
    ttl: Duration,
) -> Result<String, ConfigError> {
    let keys = KeyConfig::from_config(config)?.ok_or_else(|| {
        ConfigError::new("no signing key: set JWT_HS256_SECRET (or JWT_PRIVATE_KEY_PEM)")
    })?;
    let encoding = match &keys {
        KeyConfig::Hs256(secret) => EncodingKey::from_secret(secret),
        KeyConfig::Pem { algorithm, .. } => {
            let pem = config
                .jwt_private_key_pem
                .as_ref()
                .ok_or_else(|| {
                    ConfigError::new("minting with a public key needs JWT_PRIVATE_KEY_PEM")
                })?
                .0
                .replace("\\n", "\n");
            match algorithm {
                Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()),
                _ => EncodingKey::from_rsa_pem(pem.as_bytes()),
            }
            .map_err(|e| {
                ConfigError::new(format!("JWT_PRIVATE_KEY_PEM is not a usable key: {e}"))
            })?
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = Claims {
        sub: user_id.to_string(),
        role,
        exp: now + ttl.as_secs(),
        iat: now,
        iss: config.jwt_issuer.clone(),
        aud: config.jwt_audience.clone(),
    };
    jsonwebtoken::encode(&Header::new(keys.algorithm()), &claims, &encoding)
        .map_err(|e| ConfigError::new(format!("signing a token: {e}")))
}
