//! `create-order`: `POST /orders`. Parses and checks the order, then places it with one call
//! to the `place_order` SQL function: one round trip, one transaction, never an oversell.

use std::collections::BTreeMap;

use http::{HeaderValue, Method, StatusCode, header};
use serde::Deserialize;
use tally_shared::http::{json_body, raw_json_response};
use tally_shared::router::HandlerResult;
use tally_shared::{ApiError, AppState, Request, Route};
use tokio_postgres::types::Type;

pub fn routes() -> Vec<Route> {
    vec![Route::new(Method::POST, "/orders", |r, s| {
        Box::pin(create_order(r, s))
    })]
}

pub const MAX_LINES: usize = 100;
pub const MAX_QUANTITY: i64 = 1_000_000;

/// The body as sent. Unknown fields are refused so that a typo cannot silently be ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderBody {
    user_id: i64,
    items: Vec<LineBody>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineBody {
    product_id: i64,
    quantity: i64,
}

/// A checked order: a positive user id and 1..=100 lines, merged per product and sorted by
/// product id (the order the rows will be locked in). Only [`OrderRequest::try_from`] makes one.
#[derive(Debug, PartialEq)]
pub struct OrderRequest {
    user_id: i64,
    product_ids: Vec<i64>,
    quantities: Vec<i32>,
}

impl TryFrom<OrderBody> for OrderRequest {
    type Error = ApiError;

    fn try_from(body: OrderBody) -> Result<Self, ApiError> {
        let invalid = |detail: String| ApiError::InvalidRequest(detail);
        if body.user_id <= 0 {
            return Err(invalid("user_id must be a positive integer".into()));
        }
        if body.items.is_empty() || body.items.len() > MAX_LINES {
            return Err(invalid(format!(
                "items must hold from 1 to {MAX_LINES} lines, it holds {}",
                body.items.len()
            )));
        }
        let mut merged: BTreeMap<i64, i64> = BTreeMap::new();
        for (i, line) in body.items.iter().enumerate() {
            if line.product_id <= 0 {
                return Err(invalid(format!(
                    "items[{i}].product_id must be a positive integer"
                )));
            }
            if !(1..=MAX_QUANTITY).contains(&line.quantity) {
                return Err(invalid(format!(
                    "items[{i}].quantity must be from 1 to {MAX_QUANTITY}"
                )));
            }
            // At most 100 lines of at most 1,000,000: the sum fits an i32 with room to spare.
            *merged.entry(line.product_id).or_default() += line.quantity;
        }
        let (product_ids, quantities) = merged
            .into_iter()
            .map(|(id, quantity)| (id, quantity as i32))
            .unzip();
        Ok(Self {
            user_id: body.user_id,
            product_ids,
            quantities,
        })
    }
}

const PLACE_ORDER_SQL: &str = "SELECT outcome, order_id, body FROM place_order($1, $2, $3)";

/// The details `place_order` returns with an error outcome.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Rejection {
    user_id: i64,
    product_id: i64,
    requested: i64,
    available: i64,
}

pub async fn create_order(request: Request, state: AppState) -> HandlerResult {
    let order = OrderRequest::try_from(json_body::<OrderBody>(&request)?)?;
    let conn = state.pool.get().await?;
    // query_typed sends parse, bind and execute together with an unnamed statement: one round
    // trip, and nothing left prepared on the server (safe behind PgBouncer in transaction mode).
    let rows = conn
        .query_typed(
            PLACE_ORDER_SQL,
            &[
                (&order.user_id, Type::INT8),
                (&order.product_ids, Type::INT8_ARRAY),
                (&order.quantities, Type::INT4_ARRAY),
            ],
        )
        .await?;
    drop(conn);
    let row = rows
        .first()
        .ok_or_else(|| ApiError::Internal("place_order returned no row".into()))?;
    let outcome: &str = row.get(0);
    let body: String = row.get(2);
    if outcome == "created" {
        let order_id: i64 = row.get(1);
        let mut response = raw_json_response(StatusCode::CREATED, body);
        response.headers_mut().insert(
            header::LOCATION,
            HeaderValue::from_str(&format!("/orders/{order_id}"))
                .expect("a path of digits is a valid header"),
        );
        return Ok(response);
    }
    let r: Rejection = serde_json::from_str(&body)
        .map_err(|e| ApiError::Internal(format!("place_order details {body:?}: {e}")))?;
    Err(match outcome {
        "insufficient_inventory" => ApiError::InsufficientInventory {
            product_id: r.product_id,
            requested: r.requested,
            available: r.available,
        },
        "unknown_user" => ApiError::UnknownUser { user_id: r.user_id },
        "unknown_product" => ApiError::UnknownProduct {
            product_id: r.product_id,
        },
        other => ApiError::Internal(format!("place_order outcome {other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<OrderRequest, ApiError> {
        OrderRequest::try_from(serde_json::from_str::<OrderBody>(json).unwrap())
    }

    #[test]
    fn lines_for_one_product_are_merged_and_sorted() {
        let o = parse(r#"{"user_id":1,"items":[{"product_id":3,"quantity":2},{"product_id":1,"quantity":1},{"product_id":3,"quantity":5}]}"#).unwrap();
        assert_eq!(o.product_ids, vec![1, 3]);
        assert_eq!(o.quantities, vec![1, 7]);
    }

    #[test]
    fn the_largest_legal_order_does_not_overflow() {
        let lines = vec![r#"{"product_id":1,"quantity":1000000}"#; MAX_LINES].join(",");
        let o = parse(&format!(r#"{{"user_id":1,"items":[{lines}]}}"#)).unwrap();
        assert_eq!(o.quantities, vec![100_000_000]);
    }

    #[test]
    fn each_rule_names_its_field() {
        for (json, field) in [
            (
                r#"{"user_id":0,"items":[{"product_id":1,"quantity":1}]}"#,
                "user_id",
            ),
            (r#"{"user_id":1,"items":[]}"#, "items"),
            (
                r#"{"user_id":1,"items":[{"product_id":-4,"quantity":1}]}"#,
                "items[0].product_id",
            ),
            (
                r#"{"user_id":1,"items":[{"product_id":1,"quantity":0}]}"#,
                "items[0].quantity",
            ),
            (
                r#"{"user_id":1,"items":[{"product_id":1,"quantity":1000001}]}"#,
                "items[0].quantity",
            ),
        ] {
            let e = parse(json).unwrap_err();
            assert_eq!(e.code(), "invalid_request");
            assert!(e.to_string().starts_with(field), "{json}: {e}");
        }
    }
}
