//! `list-orders`: `GET /orders`, the caller's orders, newest first, keyset-paginated with a
//! `Link` header (`before_id`), optionally of one `status`. An admin may pass `user_id`, or
//! leave it out to see everyone's. One query, served by the `(user_id, id)` index (built by
//! `migrate`, concurrently: see `tally_shared::migrate`).

use http::{HeaderValue, Method, StatusCode, header};
use serde::Serialize;
use tally_shared::auth::{self, Principal};
use tally_shared::http::{json_response, query_pairs};
use tally_shared::router::HandlerResult;
use tally_shared::{ApiError, AppState, Request, Route, sql};
use tokio_postgres::types::Type;

pub fn routes() -> Vec<Route> {
    vec![Route::new(Method::GET, "/orders", list_orders)]
}

const DEFAULT_LIMIT: i64 = 20;
const MAX_LIMIT: i64 = 100;
const STATUSES: [&str; 4] = ["PENDING", "CONFIRMED", "CANCELLED", "FAILED"];

/// The query, checked: `?limit=&before_id=&status=&user_id=`.
#[derive(Debug, Default, PartialEq)]
struct Query {
    limit: i64,
    /// Orders with a smaller id than this (the last one of the page before); none: the newest.
    before_id: Option<i64>,
    status: Option<&'static str>,
    user_id: Option<i64>,
}

impl Query {
    fn from_request(request: &Request) -> Result<Self, ApiError> {
        let mut query = Query {
            limit: DEFAULT_LIMIT,
            ..Query::default()
        };
        for (name, value) in query_pairs(request) {
            let id = || {
                tally_shared::http::parse_id(value).ok_or_else(|| {
                    ApiError::InvalidRequest(format!("{name} must be a positive 64-bit integer"))
                })
            };
            match name {
                "limit" => {
                    query.limit = value
                        .parse::<i64>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            ApiError::InvalidRequest(format!(
                                "limit must be an integer from 1 to {MAX_LIMIT}"
                            ))
                        })?
                }
                "before_id" => query.before_id = Some(id()?),
                "user_id" => query.user_id = Some(id()?),
                "status" => {
                    query.status =
                        Some(STATUSES.into_iter().find(|s| *s == value).ok_or_else(|| {
                            ApiError::InvalidRequest(format!(
                                "status must be one of {}",
                                STATUSES.join(", ")
                            ))
                        })?)
                }
                other => {
                    return Err(ApiError::InvalidRequest(format!(
                        "unknown query parameter {:?} (known: limit, before_id, status, user_id)",
                        other.chars().take(64).collect::<String>()
                    )));
                }
            }
        }
        Ok(query)
    }

    /// Whose orders: a customer's own (asking for another user's is refused), or for an
    /// admin the `user_id` given, or everyone's.
    fn owner(&self, caller: &Principal) -> Result<Option<i64>, ApiError> {
        match (caller.is_admin(), self.user_id) {
            (true, user) => Ok(user),
            (false, None) => Ok(Some(caller.user_id)),
            (false, Some(user)) if user == caller.user_id => Ok(Some(user)),
            (false, Some(_)) => Err(ApiError::Forbidden(
                "customers list their own orders only".into(),
            )),
        }
    }

    /// The `Link` to the page after one ending at `last_id`, with the same filters.
    fn next_link(&self, owner: Option<i64>, last_id: i64, admin: bool) -> String {
        let mut link = format!("</orders?limit={}&before_id={last_id}", self.limit);
        if let Some(status) = self.status {
            link.push_str(&format!("&status={status}"));
        }
        if let (true, Some(user)) = (admin, owner) {
            link.push_str(&format!("&user_id={user}"));
        }
        link.push_str(">; rel=\"next\"");
        link
    }
}

/// An order as the list shows it; `GET /orders/{id}` has its lines.
#[derive(Debug, Serialize)]
struct OrderSummary {
    id: i64,
    user_id: i64,
    status: String,
    total_cents: i64,
    created_at: String,
    updated_at: String,
}

/// NULL parameters switch their filter off, so one statement (one plan) serves every query:
/// newest first by id, which the `(user_id, id)` index and the primary key both give in order.
pub const LIST_SQL: &str = "SELECT id, user_id, status, total_cents, \
         api_time(created_at), api_time(updated_at) \
     FROM orders \
     WHERE ($1::bigint IS NULL OR user_id = $1) \
       AND ($2::bigint IS NULL OR id < $2) \
       AND ($3::text IS NULL OR status = $3) \
     ORDER BY id DESC LIMIT $4";

pub async fn list_orders(request: Request, state: AppState) -> HandlerResult {
    let caller = auth::principal(&request)?;
    let query = Query::from_request(&request)?;
    let owner = query.owner(&caller)?;
    // One row more than asked tells whether there is a next page.
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 4] = [
        (&owner, Type::INT8),
        (&query.before_id, Type::INT8),
        (&query.status, Type::TEXT),
        (&(query.limit + 1), Type::INT8),
    ];
    let rows = sql::query(&state, "list_orders", LIST_SQL, &params).await?;
    let has_more = rows.len() as i64 > query.limit;
    let orders: Vec<OrderSummary> = rows
        .iter()
        .take(query.limit as usize)
        .map(|r| OrderSummary {
            id: r.get(0),
            user_id: r.get(1),
            status: r.get(2),
            total_cents: r.get(3),
            created_at: r.get(4),
            updated_at: r.get(5),
        })
        .collect();
    let mut response = json_response(StatusCode::OK, &orders)?;
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    if let (true, Some(last)) = (has_more, orders.last()) {
        let link = query.next_link(owner, last.id, caller.is_admin());
        if let Ok(value) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    Ok(response)
}
