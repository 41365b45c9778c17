//! `cancel-order`: `POST /orders/{id}/cancel`. A PENDING or CONFIRMED order becomes CANCELLED
//! and its stock goes back, atomically and exactly once (the `release_order` SQL function).
//! Only its owner or an admin may cancel it.
//! Cancelling again answers 409 `invalid_transition`: the caller learns the order was already
//! cancelled (or failed) and that nothing was restocked by this call.

use http::{Method, StatusCode};
use tally_shared::auth;
use tally_shared::http::{path_id, raw_json_response};
use tally_shared::router::HandlerResult;
use tally_shared::{ApiError, AppState, Request, Route, meters};
use tokio_postgres::types::Type;

pub fn routes() -> Vec<Route> {
    vec![Route::new(Method::POST, "/orders/{id}/cancel", |r, s| {
        Box::pin(cancel_order(r, s))
    })]
}

const CANCEL_SQL: &str = "SELECT outcome, status, user_id, body FROM cancel_order($1, $2)";

pub async fn cancel_order(request: Request, state: AppState) -> HandlerResult {
    let caller = auth::principal(&request)?;
    let id = path_id(&request, "id")?;
    // The owner, or (None) an admin; someone else's order is answered as a missing one.
    let actor = (!caller.is_admin()).then_some(caller.user_id);
    let conn = state.db().await?;
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
        [(&id, Type::INT8), (&actor, Type::INT8)];
    let rows = meters::timed("cancel_order", conn.query_typed(CANCEL_SQL, &params)).await?;
    drop(conn);
    let row = rows
        .first()
        .ok_or_else(|| ApiError::Internal("cancel_order returned no row".into()))?;
    let outcome: &str = row.get(0);
    match outcome {
        "released" => Ok(raw_json_response(StatusCode::OK, row.get::<_, String>(3))),
        "not_found" => Err(ApiError::NotFound),
        "invalid_transition" => Err(ApiError::InvalidTransition {
            order_id: id,
            status: row.get(1),
            target: "CANCELLED",
        }),
        other => Err(ApiError::Internal(format!(
            "cancel_order outcome {other:?}"
        ))),
    }
}
