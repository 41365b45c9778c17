//! `create-order`: `POST /orders`. Parses and checks the order, then places it with one call
//! to SQL: one round trip, one transaction, never an oversell. A one-line order goes to
//! `place_order_one`, which writes its rows first and takes the stock last (so a hot product's
//! row lock is held only from its decrement to commit); any other order, and a one-line order
//! that function hands back, goes to `place_order_lean`. The response is built here from the
//! columns they return (cheaper than JSON in Postgres). One-line orders for one product pass
//! a fair per-product gate first (`gate`), so they queue here rather than on its row lock. With an `Idempotency-Key` the call is
//! `place_order_keyed`, which builds the same JSON in SQL and stores it with the order, and
//! replays it for a repeat of the same request.

use std::collections::BTreeMap;

use http::{HeaderValue, Method, StatusCode, header};
use metrics::counter;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tally_shared::auth::{self, Principal};
use tally_shared::http::{json_body, raw_json_response};
use tally_shared::router::HandlerResult;
use tally_shared::{
    ApiError, AppState, Request, Response, Route, idempotency, meters, outcomes, sql,
};
use tokio_postgres::types::Type;

mod error;
mod gate;

use error::OrderError;

pub fn routes() -> Vec<Route> {
    vec![Route::new(Method::POST, "/orders", create_order)]
}

pub const MAX_LINES: usize = 100;
pub const MAX_QUANTITY: i64 = 1_000_000;

/// The body as sent. Unknown fields are refused so that a typo cannot silently be ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderBody {
    /// Optional: the caller's own id. An admin may name another user to order on their behalf.
    user_id: Option<i64>,
    items: Vec<LineBody>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineBody {
    product_id: i64,
    quantity: i64,
}

/// A checked order: the user it is for, and 1..=100 lines, merged per product and sorted by
/// product id (the order the rows will be locked in). Only [`OrderRequest::new`] makes one.
#[derive(Debug, PartialEq)]
pub struct OrderRequest {
    user_id: i64,
    product_ids: Vec<i64>,
    quantities: Vec<i32>,
}

impl OrderRequest {
    /// Checks the body, then who it may be for: the caller, or anyone when an admin calls.
    fn new(body: OrderBody, caller: Principal) -> Result<Self, ApiError> {
        let invalid = |detail: String| ApiError::InvalidRequest(detail);
        if body.user_id.is_some_and(|id| id <= 0) {
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
        let user_id = match body.user_id {
            None => caller.user_id,
            Some(id) if id == caller.user_id || caller.is_admin() => id,
            Some(_) => {
                return Err(ApiError::Forbidden(
                    "user_id must be your own (only admins order for others)".into(),
                ));
            }
        };
        Ok(Self {
            user_id,
            product_ids,
            quantities,
        })
    }
}

impl OrderRequest {
    /// The three parameters every placing call starts with: user, product ids, quantities.
    fn params(&self) -> [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] {
        [
            (&self.user_id, Type::INT8),
            (&self.product_ids, Type::INT8_ARRAY),
            (&self.quantities, Type::INT4_ARRAY),
        ]
    }

    /// A hash of the request as the API understands it: method, path and the canonical body
    /// (lines merged and sorted), so reformatted JSON or reordered lines are the same request.
    fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(b"POST /orders\n");
        hash.update(format!("user_id={}", self.user_id));
        for (product_id, quantity) in self.product_ids.iter().zip(&self.quantities) {
            hash.update(format!(";{product_id}x{quantity}"));
        }
        tally_shared::encode::hex(&hash.finalize())
    }
}

pub use tally_shared::idempotency::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};

/// What an unkeyed one-line order sends first (the bench's own-SQL ceiling sends the same text).
pub const PLACE_ONE_SQL: &str = "SELECT order_id, created_at, total_cents, unit_price_cents, \
     stock_shards FROM place_order_one($1, $2, $3)";
/// SQLSTATEs with which `place_order_one` hands an order back, its writes rolled back: TS002
/// (a missing product, short or busy stock, a price changed since it was read) and
/// foreign_key_violation (an unknown user). `place_order_lean` then answers it exactly.
const HANDED_BACK: [&str; 2] = ["TS002", "23503"];

/// What an unkeyed order sends (the bench's own-SQL ceiling sends the same text).
pub const PLACE_ORDER_SQL: &str = "SELECT outcome, order_id, created_at, total_cents, product_ids, \
     quantities, unit_prices, details FROM place_order_lean($1, $2, $3)";
const PLACE_ORDER_KEYED_SQL: &str =
    "SELECT outcome, order_id, body FROM place_order_keyed($1, $2, $3, $4, $5, $6)";

outcomes! {
    /// What `place_order_lean` and `place_order_keyed` answer.
    enum Outcome {
        Created = "created",
        Replayed = "replayed",
        InsufficientInventory = "insufficient_inventory",
        UnknownUser = "unknown_user",
        UnknownProduct = "unknown_product",
        IdempotencyKeyReused = "idempotency_key_reused",
        IdempotencyKeyInFlight = "idempotency_key_in_flight",
    }
}

pub async fn create_order(request: Request, state: AppState) -> HandlerResult {
    let caller = auth::principal(&request)?;
    let order = OrderRequest::new(json_body::<OrderBody>(&request)?, caller)?;
    match idempotency::key(&request)? {
        // Keys belong to the caller, who may be an admin ordering for someone else.
        Some(key) => place_keyed(&state, &order, caller.user_id, &key).await,
        None => {
            if let [product_id] = order.product_ids[..]
                && let Some(response) = place_one(&state, &order, product_id).await?
            {
                return Ok(response);
            }
            place_lean(&state, &order).await
        }
    }
}

/// A one-line order through `place_order_one`, after its turn at the product's gate; None when
/// the function hands it back (its writes rolled back) for `place_order_lean` to answer.
async fn place_one(
    state: &AppState,
    order: &OrderRequest,
    product_id: i64,
) -> Result<Option<Response>, ApiError> {
    let turn = gate::enter(product_id, state.config.pool_timeout()).await?;
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] = [
        (&order.user_id, Type::INT8),
        (&product_id, Type::INT8),
        (&order.quantities[0], Type::INT4),
    ];
    // Not sql::query: a hand-back is an error code this path must see.
    let conn = state.db().await?;
    match meters::timed("place_order_one", conn.query_typed(PLACE_ONE_SQL, &params)).await {
        Ok(rows) => {
            drop((conn, turn));
            let row = rows
                .first()
                .ok_or_else(|| ApiError::Internal("place_order_one returned no row".into()))?;
            gate::learn(product_id, row.get(4));
            count(Outcome::Created);
            let placed = Placed::one(row, order);
            announce(state, placed.order_id);
            Ok(Some(created(placed.order_id, placed.to_json()?, false)))
        }
        Err(e) if e.code().is_some_and(|c| HANDED_BACK.contains(&c.code())) => {
            counter!("tally_orders_handed_back_total").increment(1);
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Any unkeyed order through `place_order_lean`; the 201 body is built here from its columns.
async fn place_lean(state: &AppState, order: &OrderRequest) -> HandlerResult {
    let row = sql::query_one(state, "place_order", PLACE_ORDER_SQL, &order.params()).await?;
    let outcome = sql::outcome(&row, 0, "place_order")?;
    count(outcome);
    match outcome {
        Outcome::Created => {
            let body = Placed::from_row(&row, order.user_id)?.to_json()?;
            announce(state, row.get(1));
            Ok(created(row.get(1), body, false))
        }
        refused => Err(OrderError::from_outcome(refused, row.get(7))),
    }
}

/// A keyed order through `place_order_keyed`, which stores the response for replays.
async fn place_keyed(
    state: &AppState,
    order: &OrderRequest,
    caller: i64,
    key: &str,
) -> HandlerResult {
    let fingerprint = order.fingerprint();
    let mut params = vec![(&caller as _, Type::INT8)];
    params.extend(order.params());
    params.push((&key, Type::TEXT));
    params.push((&fingerprint, Type::TEXT));
    let row = sql::query_one(state, "place_order_keyed", PLACE_ORDER_KEYED_SQL, &params).await?;
    let outcome = sql::outcome(&row, 0, "place_order_keyed")?;
    count(outcome);
    match outcome {
        Outcome::Created | Outcome::Replayed => {
            if outcome == Outcome::Created {
                announce(state, row.get(1));
            }
            let body: Option<String> = row.get(2);
            Ok(created(
                row.get(1),
                body.unwrap_or_default(),
                outcome == Outcome::Replayed,
            ))
        }
        refused => Err(OrderError::from_outcome(refused, row.get(2))),
    }
}

/// Publishes the new order's `placed` event (its outbox row, written by the trigger in the
/// order's transaction) after the response, never before it: the 201 does not wait.
fn announce(state: &AppState, order_id: i64) {
    state
        .events
        .spawn_deliver(&state.pool, order_id, tally_shared::events::PLACED);
}

/// 201 with the order's `Location`, and `Idempotent-Replayed` on a replay.
fn created(order_id: i64, body: String, replayed: bool) -> Response {
    let mut response = raw_json_response(StatusCode::CREATED, body);
    let headers = response.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&format!("/orders/{order_id}"))
            .expect("a path of digits is a valid header"),
    );
    if replayed {
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

fn count(outcome: Outcome) {
    match outcome {
        Outcome::Created => counter!("tally_orders_placed_total").increment(1),
        Outcome::Replayed => counter!("tally_orders_replayed_total").increment(1),
        refused => {
            if refused == Outcome::InsufficientInventory {
                counter!("tally_inventory_conflicts_total").increment(1);
            }
            counter!("tally_orders_rejected_total", "reason" => refused.as_str()).increment(1);
        }
    }
}

/// The 201 body, field for field and in the same order as the JSON `place_order` builds in SQL
/// for keyed orders (V5's wrapper), so every client sees one shape, byte for byte.
#[derive(Serialize)]
struct Placed {
    order_id: i64,
    status: &'static str,
    user_id: i64,
    total_cents: i64,
    items: Vec<PlacedLine>,
    created_at: String,
}

#[derive(Serialize)]
struct PlacedLine {
    product_id: i64,
    quantity: i64,
    unit_price_cents: i64,
}

impl Placed {
    fn from_row(row: &tokio_postgres::Row, user_id: i64) -> Result<Self, ApiError> {
        let created_at: std::time::SystemTime = row.get(2);
        let (ids, quantities, prices): (Vec<i64>, Vec<i64>, Vec<i64>) =
            (row.get(4), row.get(5), row.get(6));
        if ids.len() != quantities.len() || ids.len() != prices.len() {
            return Err(ApiError::Internal("place_order_lean: ragged lines".into()));
        }
        let items = ids
            .into_iter()
            .zip(quantities)
            .zip(prices)
            .map(|((product_id, quantity), unit_price_cents)| PlacedLine {
                product_id,
                quantity,
                unit_price_cents,
            })
            .collect();
        Ok(Self {
            order_id: row.get(1),
            // A new order is always PENDING (the column's default).
            status: "PENDING",
            user_id,
            total_cents: row.get(3),
            items,
            // As SQL's api_time(): UTC, always six fractional digits, a Z.
            created_at: humantime::format_rfc3339_micros(created_at).to_string(),
        })
    }

    /// From `place_order_one`'s row: (order_id, created_at, total_cents, unit_price_cents).
    fn one(row: &tokio_postgres::Row, order: &OrderRequest) -> Self {
        let created_at: std::time::SystemTime = row.get(1);
        Self {
            order_id: row.get(0),
            status: "PENDING",
            user_id: order.user_id,
            total_cents: row.get(2),
            items: vec![PlacedLine {
                product_id: order.product_ids[0],
                quantity: order.quantities[0].into(),
                unit_price_cents: row.get(3),
            }],
            created_at: humantime::format_rfc3339_micros(created_at).to_string(),
        }
    }

    fn to_json(&self) -> Result<String, ApiError> {
        serde_json::to_string(self).map_err(|e| ApiError::Internal(format!("encoding: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tally_shared::auth::Role;

    const CUSTOMER_1: Principal = Principal {
        user_id: 1,
        role: Role::Customer,
    };

    fn parse(json: &str) -> Result<OrderRequest, ApiError> {
        OrderRequest::new(serde_json::from_str::<OrderBody>(json).unwrap(), CUSTOMER_1)
    }

    #[test]
    fn the_user_is_the_caller_unless_an_admin_names_another() {
        let items = r#""items":[{"product_id":1,"quantity":1}]"#;
        assert_eq!(parse(&format!("{{{items}}}")).unwrap().user_id, 1);
        assert_eq!(
            parse(&format!(r#"{{"user_id":1,{items}}}"#))
                .unwrap()
                .user_id,
            1
        );
        let e = parse(&format!(r#"{{"user_id":2,{items}}}"#)).unwrap_err();
        assert_eq!(e.code(), "forbidden");
        let admin = Principal {
            user_id: 9,
            role: Role::Admin,
        };
        let body = serde_json::from_str(&format!(r#"{{"user_id":2,{items}}}"#)).unwrap();
        assert_eq!(OrderRequest::new(body, admin).unwrap().user_id, 2);
    }

    #[test]
    fn lines_for_one_product_are_merged_and_sorted() {
        let o = parse(r#"{"user_id":1,"items":[{"product_id":3,"quantity":2},{"product_id":1,"quantity":1},{"product_id":3,"quantity":5}]}"#).unwrap();
        assert_eq!(o.product_ids, vec![1, 3]);
        assert_eq!(o.quantities, vec![1, 7]);
    }

    #[test]
    fn the_fingerprint_ignores_line_order_and_formatting_but_not_content() {
        let a = parse(r#"{"user_id":1,"items":[{"product_id":1,"quantity":1},{"product_id":2,"quantity":2}]}"#).unwrap();
        let b = parse(r#"{ "items": [{"quantity":2,"product_id":2}, {"product_id":1,"quantity":1}], "user_id": 1 }"#).unwrap();
        let c = parse(r#"{"user_id":1,"items":[{"product_id":1,"quantity":1},{"product_id":2,"quantity":3}]}"#).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_eq!(a.fingerprint().len(), 64);
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
