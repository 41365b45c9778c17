//! `cancel-order`: `POST /orders/{id}/cancel`. A PENDING order becomes CANCELLED and its stock
//! goes back, atomically and exactly once (the `release_order` SQL function). Its owner or an
//! admin may cancel it. A CONFIRMED order has been fulfilled: only an admin may cancel it, as a
//! return, and the body must say whether the goods came back (`{"restock": true|false}`).
//! Cancelling again answers 409 `invalid_transition`: the caller learns the order was already
//! cancelled (or failed) and that nothing was restocked by this call. With an `Idempotency-Key`
//! a retried cancel replays its 200 instead.

use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tally_shared::auth;
use tally_shared::error::{Domain, fields};
use tally_shared::http::{json_body, path_id};
use tally_shared::idempotency::{self, Answer, Keyed};
use tally_shared::router::HandlerResult;
use tally_shared::{ApiError, AppState, Request, Route, outcomes, sql};
use tokio_postgres::types::Type;

pub fn routes() -> Vec<Route> {
    vec![Route::new(
        Method::POST,
        "/orders/{id}/cancel",
        cancel_order,
    )]
}

const CANCEL_SQL: &str = "SELECT outcome, status, user_id, body FROM cancel_order_as($1, $2, $3)";

outcomes! {
    /// What `cancel_order_as` answers.
    enum Outcome {
        Released = "released",
        NotFound = "not_found",
        InvalidTransition = "invalid_transition",
        NothingShipped = "nothing_shipped",
        RestockRequired = "restock_required",
    }
}

/// The order is not in a state it can be cancelled from (already cancelled, or failed).
#[derive(Debug, thiserror::Error)]
#[error("order {order_id} is {status} and cannot become CANCELLED")]
pub struct InvalidTransition {
    order_id: i64,
    status: String,
}

impl Domain for InvalidTransition {
    fn status(&self) -> StatusCode {
        StatusCode::CONFLICT
    }
    fn code(&self) -> &'static str {
        "invalid_transition"
    }
    fn fields(&self) -> Map<String, Value> {
        fields([
            ("order_id", json!(self.order_id)),
            ("order_status", json!(self.status)),
        ])
    }
}

/// What the order's state makes of the body's `restock`: 409, since the same body is right for
/// an order in another state.
#[derive(Debug, thiserror::Error)]
pub enum ReturnError {
    #[error(
        "the order is PENDING and not in fulfilment: nothing has left, so its stock returns; send no restock, or restock: true"
    )]
    NothingShipped,
    #[error(
        "the order is in fulfilment (CONFIRMED, or claimed by the processor): cancelling it is a return, so say whether the goods came back with {{\"restock\": true}} or {{\"restock\": false}}"
    )]
    RestockRequired,
}

impl Domain for ReturnError {
    fn status(&self) -> StatusCode {
        StatusCode::CONFLICT
    }
    fn code(&self) -> &'static str {
        match self {
            Self::NothingShipped => "nothing_shipped",
            Self::RestockRequired => "restock_required",
        }
    }
    fn fields(&self) -> Map<String, Value> {
        Map::new()
    }
}

/// The optional body. Unknown fields are refused so that a typo cannot silently restock.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    restock: Option<bool>,
}

pub async fn cancel_order(request: Request, state: AppState) -> HandlerResult {
    let caller = auth::principal(&request)?;
    let id = path_id(&request, "id")?;
    // The owner, or (None) an admin; someone else's order is answered as a missing one.
    let actor = (!caller.is_admin()).then_some(caller.user_id);
    let body = if request.body().is_empty() {
        CancelBody::default()
    } else {
        json_body::<CancelBody>(&request)?
    };
    let keyed = Keyed::from_request(&request, caller.user_id, "cancel_order", &(id, &body))?;
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] = [
        (&id, Type::INT8),
        (&actor, Type::INT8),
        (&body.restock, Type::BOOL),
    ];
    let answer = idempotency::once(
        &state,
        keyed.as_ref(),
        ("cancel_order", CANCEL_SQL, &params),
        |rows| cancelled(id, &rows),
    )
    .await?;
    if !answer.replayed {
        state
            .events
            .spawn_deliver(&state.pool, id, tally_shared::events::CANCELLED);
    }
    Ok(answer.into_response())
}

/// `cancel_order_as`'s row as the answer: the cancelled order, or the refusal.
fn cancelled(id: i64, rows: &[tokio_postgres::Row]) -> Result<Answer, ApiError> {
    let row = rows
        .first()
        .ok_or_else(|| ApiError::Internal("cancel_order returned no row".into()))?;
    match sql::outcome(row, 0, "cancel_order")? {
        Outcome::Released => Ok(Answer::new(StatusCode::OK, row.get::<_, String>(3))),
        Outcome::NotFound => Err(ApiError::NotFound),
        Outcome::InvalidTransition => Err(InvalidTransition {
            order_id: id,
            status: row.get(1),
        }
        .into()),
        Outcome::NothingShipped => Err(ReturnError::NothingShipped.into()),
        Outcome::RestockRequired => Err(ReturnError::RestockRequired.into()),
    }
}
