//! create-order's own refusals, and how `place_order`'s details become them.

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tally_shared::ApiError;
use tally_shared::error::{Domain, fields};
use tally_shared::idempotency::KeyError;

use crate::Outcome;

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("product {product_id} has {available} in stock, {requested} requested")]
    InsufficientInventory {
        product_id: i64,
        requested: i64,
        available: i64,
    },
    #[error("user {user_id} does not exist")]
    UnknownUser { user_id: i64 },
    #[error("product {product_id} does not exist")]
    UnknownProduct { product_id: i64 },
}

impl Domain for OrderError {
    fn status(&self) -> StatusCode {
        match self {
            Self::InsufficientInventory { .. } => StatusCode::CONFLICT,
            Self::UnknownUser { .. } | Self::UnknownProduct { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::InsufficientInventory { .. } => "insufficient_inventory",
            Self::UnknownUser { .. } => "unknown_user",
            Self::UnknownProduct { .. } => "unknown_product",
        }
    }

    fn fields(&self) -> Map<String, Value> {
        match self {
            Self::InsufficientInventory {
                product_id,
                requested,
                available,
            } => fields([
                ("product_id", json!(product_id)),
                ("requested", json!(requested)),
                ("available", json!(available)),
            ]),
            Self::UnknownUser { user_id } => fields([("user_id", json!(user_id))]),
            Self::UnknownProduct { product_id } => fields([("product_id", json!(product_id))]),
        }
    }
}

/// The details `place_order` returns with a refusal, as JSON.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Details {
    user_id: i64,
    product_id: i64,
    requested: i64,
    available: i64,
}

impl OrderError {
    /// The error for a refusing outcome and its details (None for the idempotency outcomes).
    pub fn from_outcome(outcome: Outcome, details: Option<String>) -> ApiError {
        let text = details.as_deref().unwrap_or("{}");
        let d: Details = match serde_json::from_str(text) {
            Ok(d) => d,
            Err(e) => return ApiError::Internal(format!("place_order details {text:?}: {e}")),
        };
        match outcome {
            Outcome::InsufficientInventory => Self::InsufficientInventory {
                product_id: d.product_id,
                requested: d.requested,
                available: d.available,
            },
            Outcome::UnknownUser => Self::UnknownUser { user_id: d.user_id },
            Outcome::UnknownProduct => Self::UnknownProduct {
                product_id: d.product_id,
            },
            Outcome::IdempotencyKeyReused => return KeyError::Reused.into(),
            Outcome::IdempotencyKeyInFlight => return KeyError::InFlight.into(),
            Outcome::Created | Outcome::Replayed => {
                return ApiError::Internal(format!("place_order: {outcome:?} is not a refusal"));
            }
        }
        .into()
    }
}
