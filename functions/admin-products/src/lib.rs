//! `admin-products`: inventory administration, for the admin role only.
//! - `POST /products` creates a product (its starting stock becomes its first ledger row);
//! - `PATCH /products/{id}` changes name, price (orders keep the price they were placed at) or
//!   `stock_shards`: how many rows the stock is spread over, so that a flash sale's orders do
//!   not all queue on one row lock (1 to 64; 1 gathers it back). With `If-Match` it applies
//!   only to the version the caller read (else 412), so two admins cannot overwrite each other;
//! - `POST /products/{id}/inventory` adjusts stock by a delta, never below zero, with its
//!   ledger row in the same transaction.

use http::{HeaderValue, Method, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tally_shared::auth;
use tally_shared::catalog::{PRODUCT_COLUMNS, Product};
use tally_shared::error::{Domain, fields};
use tally_shared::http::{etag_listed, etag_of, json_body, path_id, raw_json_response};
use tally_shared::idempotency::{self, Answer, Keyed};
use tally_shared::router::HandlerResult;
use tally_shared::{ApiError, AppState, Request, Route, meters, outcomes, sql};
use tokio_postgres::types::Type;

pub fn routes() -> Vec<Route> {
    vec![
        Route::new(Method::POST, "/products", create_product),
        Route::new(Method::PATCH, "/products/{id}", update_product),
        Route::new(Method::POST, "/products/{id}/inventory", adjust_inventory),
    ]
}

/// admin-products' own refusals.
#[derive(Debug, thiserror::Error)]
pub enum ProductError {
    #[error("a product with sku {sku:?} already exists")]
    DuplicateSku { sku: String },
    #[error(
        "the product changed since the version named in If-Match (a sale changes it too): read it again, then retry with its new ETag"
    )]
    Changed,
    #[error("product {product_id} has {available} in stock, {requested} requested")]
    InsufficientInventory {
        product_id: i64,
        requested: i64,
        available: i64,
    },
}

impl Domain for ProductError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Changed => StatusCode::PRECONDITION_FAILED,
            _ => StatusCode::CONFLICT,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Changed => "precondition_failed",
            Self::DuplicateSku { .. } => "duplicate_sku",
            Self::InsufficientInventory { .. } => "insufficient_inventory",
        }
    }

    fn fields(&self) -> Map<String, Value> {
        match self {
            Self::Changed => Map::new(),
            Self::DuplicateSku { sku } => fields([("sku", json!(sku))]),
            Self::InsufficientInventory {
                product_id,
                requested,
                available,
            } => fields([
                ("product_id", json!(product_id)),
                ("requested", json!(requested)),
                ("available", json!(available)),
            ]),
        }
    }
}

outcomes! {
    /// What `adjust_inventory` answers.
    enum Adjusted {
        Done = "adjusted",
        NotFound = "not_found",
        InsufficientInventory = "insufficient_inventory",
    }
}

/// Mirrors the `products.price_cents` CHECK constraint.
const MAX_PRICE_CENTS: i64 = 10_000_000_000;
const MAX_INVENTORY: i64 = 1_000_000_000_000;
const MAX_DELTA: i64 = 1_000_000_000;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NewProduct {
    sku: String,
    name: String,
    price_cents: i64,
    #[serde(default)]
    inventory: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductChanges {
    name: Option<String>,
    price_cents: Option<i64>,
    stock_shards: Option<i64>,
}

pub const MAX_STOCK_SHARDS: i64 = 64;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Adjustment {
    delta: i64,
    reason: AdjustmentReason,
    note: Option<String>,
}

#[derive(Debug, Deserialize, Serialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum AdjustmentReason {
    Restock,
    Adjustment,
}

impl AdjustmentReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Restock => "restock",
            Self::Adjustment => "adjustment",
        }
    }
}

fn check_sku(sku: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&sku.len())
        && sku
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then_some(())
        .ok_or_else(|| ApiError::InvalidRequest("sku must be 1 to 64 of A-Z a-z 0-9 - _ .".into()))
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let chars = name.trim().chars().count();
    ((1..=200).contains(&chars) && !name.chars().any(char::is_control))
        .then_some(())
        .ok_or_else(|| {
            ApiError::InvalidRequest(
                "name must be 1 to 200 characters, no control characters".into(),
            )
        })
}

fn check_price(price: i64) -> Result<(), ApiError> {
    (0..=MAX_PRICE_CENTS)
        .contains(&price)
        .then_some(())
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!("price_cents must be from 0 to {MAX_PRICE_CENTS}"))
        })
}

async fn create_product(request: Request, state: AppState) -> HandlerResult {
    let caller = auth::principal(&request)?;
    caller.require_admin()?;
    let mut new: NewProduct = json_body(&request)?;
    check_sku(&new.sku)?;
    check_name(&new.name)?;
    check_price(new.price_cents)?;
    if !(0..=MAX_INVENTORY).contains(&new.inventory) {
        return Err(ApiError::InvalidRequest(format!(
            "inventory must be from 0 to {MAX_INVENTORY}"
        )));
    }
    new.name = new.name.trim().to_owned();
    let keyed = Keyed::from_request(&request, caller.user_id, "create_product", &new)?;
    // ON CONFLICT rather than catching the unique violation: a duplicate is an answer, not an
    // error, and leaves nothing in the server log.
    let statement = format!(
        "INSERT INTO products (sku, name, price_cents, inventory) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (sku) DO NOTHING RETURNING {PRODUCT_COLUMNS}"
    );
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 4] = [
        (&new.sku, Type::TEXT),
        (&new.name, Type::TEXT),
        (&new.price_cents, Type::INT8),
        (&new.inventory, Type::INT8),
    ];
    let answer = idempotency::once(
        &state,
        keyed.as_ref(),
        ("create_product", &statement, &params),
        |rows| {
            let product =
                rows.first()
                    .map(Product::from)
                    .ok_or_else(|| ProductError::DuplicateSku {
                        sku: new.sku.clone(),
                    })?;
            Ok(Answer::new(StatusCode::CREATED, to_json(&product)?))
        },
    )
    .await?;
    // The id comes from the answer, so a replay names the product the first call created.
    let id = serde_json::from_slice::<Created>(&answer.body)
        .map_err(|e| ApiError::Internal(format!("a created product's id: {e}")))?
        .id;
    let mut response = answer.into_response();
    response.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&format!("/products/{id}"))
            .expect("a path of digits is a valid header"),
    );
    Ok(response)
}

/// The one field of a created product that its `Location` needs.
#[derive(Deserialize)]
struct Created {
    id: i64,
}

fn to_json(product: &Product) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(product)
        .map_err(|e| ApiError::Internal(format!("serialising a product: {e}")))
}

async fn update_product(request: Request, state: AppState) -> HandlerResult {
    auth::principal(&request)?.require_admin()?;
    let id = path_id(&request, "id")?;
    let changes: ProductChanges = json_body(&request)?;
    if changes.name.is_none() && changes.price_cents.is_none() && changes.stock_shards.is_none() {
        return Err(ApiError::InvalidRequest(
            "nothing to change: give name, price_cents and/or stock_shards".into(),
        ));
    }
    if changes
        .stock_shards
        .is_some_and(|n| !(1..=MAX_STOCK_SHARDS).contains(&n))
    {
        return Err(ApiError::InvalidRequest(format!(
            "stock_shards must be from 1 to {MAX_STOCK_SHARDS}"
        )));
    }
    if let Some(name) = &changes.name {
        check_name(name)?;
    }
    if let Some(price) = changes.price_cents {
        check_price(price)?;
    }
    let name = changes.name.as_deref().map(str::trim);
    let shards = changes.stock_shards.map(|n| n as i32);
    let statement = format!("SELECT {PRODUCT_COLUMNS} FROM update_product($1, $2, $3, $4)");
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 4] = [
        (&id, Type::INT8),
        (&name, Type::TEXT),
        (&changes.price_cents, Type::INT8),
        (&shards, Type::INT4),
    ];
    let rows = if request.headers().contains_key(header::IF_MATCH) {
        update_if_unchanged(&request, &state, id, (&statement, &params)).await?
    } else {
        sql::query(&state, "update_product", &statement, &params).await?
    };
    let product = rows.first().map(Product::from).ok_or(ApiError::NotFound)?;
    let body = to_json(&product)?;
    let etag = etag_of(&body);
    let mut response = raw_json_response(StatusCode::OK, body);
    response.headers_mut().insert(header::ETAG, etag);
    Ok(response)
}

/// With `If-Match`: the product's row is locked, its representation as it is now compared with
/// the tags the client read, and the change made only if one matches, in one transaction. Of
/// two admins who read the same version, exactly one wins; the other gets 412 and re-reads.
async fn update_if_unchanged(
    request: &Request,
    state: &AppState,
    id: i64,
    (statement, params): (&str, &[(&(dyn tokio_postgres::types::ToSql + Sync), Type)]),
) -> Result<Vec<tokio_postgres::Row>, ApiError> {
    let mut conn = state.db().await?;
    let tx = conn.transaction().await?;
    let this: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] = [(&id, Type::INT8)];
    // Two statements, not one: the read must see what a concurrent edit it waited for wrote,
    // and in READ COMMITTED only a statement that starts after the lock is taken does.
    let lock = "SELECT 1 FROM products WHERE id = $1 FOR NO KEY UPDATE";
    meters::timed("lock_product", tx.query_typed(lock, &this)).await?;
    let read = format!("SELECT {PRODUCT_COLUMNS} FROM catalog WHERE id = $1");
    let current = meters::timed("read_product", tx.query_typed(&read, &this))
        .await?
        .into_iter()
        .next()
        .ok_or(ApiError::NotFound)?;
    let body = to_json(&Product::from(&current))?;
    if !etag_listed(request, header::IF_MATCH, &etag_of(&body)) {
        // Dropping the transaction rolls it back.
        return Err(ProductError::Changed.into());
    }
    let rows = meters::timed("update_product", tx.query_typed(statement, params)).await?;
    tx.commit().await?;
    Ok(rows)
}

async fn adjust_inventory(request: Request, state: AppState) -> HandlerResult {
    let caller = auth::principal(&request)?;
    caller.require_admin()?;
    let id = path_id(&request, "id")?;
    let adjustment: Adjustment = json_body(&request)?;
    if adjustment.delta == 0 || !(-MAX_DELTA..=MAX_DELTA).contains(&adjustment.delta) {
        return Err(ApiError::InvalidRequest(format!(
            "delta must be non-zero and at most {MAX_DELTA} either way"
        )));
    }
    if adjustment
        .note
        .as_ref()
        .is_some_and(|n| n.chars().count() > 500 || n.chars().any(char::is_control))
    {
        // PostgreSQL text cannot hold NUL at all, and no control character belongs in a note.
        return Err(ApiError::InvalidRequest(
            "note must be at most 500 characters, no control characters".into(),
        ));
    }
    let statement = format!(
        "SELECT a.outcome, a.inventory, p.sku, p.name, p.price_cents, p.stock_shards \
         FROM adjust_inventory($1, $2, $3, $4) a \
         LEFT JOIN LATERAL (SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1) p ON true"
    );
    let keyed = Keyed::from_request(
        &request,
        caller.user_id,
        "adjust_inventory",
        &(id, &adjustment),
    )?;
    let reason = adjustment.reason.as_str();
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 4] = [
        (&id, Type::INT8),
        (&adjustment.delta, Type::INT8),
        (&reason, Type::TEXT),
        (&adjustment.note, Type::TEXT),
    ];
    let answer = idempotency::once(
        &state,
        keyed.as_ref(),
        ("adjust_inventory", &statement, &params),
        |rows| adjusted(id, adjustment.delta, &rows),
    )
    .await?;
    Ok(answer.into_response())
}

/// `adjust_inventory`'s row as the answer: the product with its new stock, or the refusal.
fn adjusted(id: i64, delta: i64, rows: &[tokio_postgres::Row]) -> Result<Answer, ApiError> {
    let row = rows
        .first()
        .ok_or_else(|| ApiError::Internal("adjust_inventory returned no row".into()))?;
    match sql::outcome(row, 0, "adjust_inventory")? {
        Adjusted::Done => {
            // The new stock comes from the function: the joined row was read under the
            // statement's snapshot, before the update.
            let product = Product {
                id,
                sku: row.get(2),
                name: row.get(3),
                price_cents: row.get(4),
                inventory: row.get(1),
                stock_shards: row.get(5),
            };
            Ok(Answer::new(StatusCode::OK, to_json(&product)?))
        }
        Adjusted::NotFound => Err(ApiError::NotFound),
        Adjusted::InsufficientInventory => Err(ProductError::InsufficientInventory {
            product_id: id,
            requested: -delta,
            available: row.get(1),
        }
        .into()),
    }
}
