//! `get-order`: `GET /orders/{id}`, an order and its lines as one JSON document, for its owner
//! or an admin, with an `ETag` (`If-None-Match` gets `304`).

use http::Method;
use tally_shared::auth;
use tally_shared::http::{conditional_json, path_id};
use tally_shared::router::HandlerResult;
use tally_shared::{ApiError, AppState, Request, Route, sql};
use tokio_postgres::types::Type;

pub fn routes() -> Vec<Route> {
    vec![Route::new(Method::GET, "/orders/{id}", get_order)]
}

/// `order_document` (a migration) builds the body in Postgres: one round trip, no re-encoding.
const ORDER_SQL: &str = "SELECT user_id, body FROM order_document($1)";

pub async fn get_order(request: Request, state: AppState) -> HandlerResult {
    let caller = auth::principal(&request)?;
    let id = path_id(&request, "id")?;
    // From the replica when there is one, caught up to the caller's last write if it says so.
    // An order the replica does not have yet is asked of the primary: a client following the
    // Location of the order it just placed never gets 404 for want of Tally-Min-Lsn.
    let params = [(&id as _, Type::INT8)];
    let (mut rows, on_replica) =
        sql::read_where(&state, &request, "order_document", ORDER_SQL, &params).await?;
    // Someone else's order takes the same path as a missing one, so timing tells nothing.
    let usable = rows.first().is_some_and(|r| caller.may_access(r.get(0)));
    if !usable && on_replica {
        rows = sql::query(&state, "order_document", ORDER_SQL, &params).await?;
    }
    let row = rows.first().ok_or(ApiError::NotFound)?;
    // Someone else's order is answered exactly as a missing one: its existence is not revealed.
    if !caller.may_access(row.get(0)) {
        return Err(ApiError::NotFound);
    }
    let body: String = row.get(1);
    // Private to its owner, and revalidated on every use: an order changes as it is processed.
    Ok(conditional_json(&request, body.into(), "private, no-cache"))
}
