//! `list-products`: the catalog. `GET /products` (keyset-paginated, ordered by id) and
//! `GET /products/{id}`.

use http::{HeaderValue, Method, StatusCode, header};
use tally_shared::catalog::Product;
use tally_shared::http::{conditional_json, json_response, path_id, query_pairs};
use tally_shared::{ApiError, AppState, Request, Route, sql};
use tokio_postgres::types::Type;

pub fn routes() -> Vec<Route> {
    vec![
        Route::public(Method::GET, "/products", list_products),
        Route::public(Method::GET, "/products/{id}", get_product),
    ]
}

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

/// `?limit=&after_id=`, checked.
#[derive(Debug, PartialEq)]
struct Page {
    limit: i64,
    after_id: i64,
}

impl Page {
    fn from_request(request: &Request) -> Result<Self, ApiError> {
        let mut page = Page {
            limit: DEFAULT_LIMIT,
            after_id: 0,
        };
        for (name, value) in query_pairs(request) {
            let number = value.parse::<i64>().ok();
            match name {
                "limit" => {
                    page.limit =
                        number
                            .filter(|n| (1..=MAX_LIMIT).contains(n))
                            .ok_or_else(|| {
                                ApiError::InvalidRequest(format!(
                                    "limit must be an integer from 1 to {MAX_LIMIT}"
                                ))
                            })?
                }
                "after_id" => {
                    page.after_id = number.filter(|n| *n >= 0).ok_or_else(|| {
                        ApiError::InvalidRequest(
                            "after_id must be a non-negative 64-bit integer".into(),
                        )
                    })?
                }
                other => {
                    return Err(ApiError::InvalidRequest(format!(
                        "unknown query parameter {:?} (known: limit, after_id)",
                        other.chars().take(64).collect::<String>()
                    )));
                }
            }
        }
        Ok(page)
    }
}

// `catalog` is `products` with the whole stock of a sharded product summed.
const LIST_SQL: &str = "SELECT id, sku, name, price_cents, inventory, stock_shards FROM catalog \
                        WHERE id > $1 ORDER BY id LIMIT $2";
const GET_SQL: &str =
    "SELECT id, sku, name, price_cents, inventory, stock_shards FROM catalog WHERE id = $1";

pub async fn list_products(
    request: Request,
    state: AppState,
) -> tally_shared::router::HandlerResult {
    let page = Page::from_request(&request)?;
    // One row more than asked tells whether there is a next page.
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] = [
        (&page.after_id, Type::INT8),
        (&(page.limit + 1), Type::INT8),
    ];
    let rows = sql::read(&state, &request, "list_products", LIST_SQL, &params).await?;
    let has_more = rows.len() as i64 > page.limit;
    let products: Vec<Product> = rows
        .iter()
        .take(page.limit as usize)
        .map(Product::from)
        .collect();
    let mut response = json_response(StatusCode::OK, &products)?;
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CATALOG_CACHE),
    );
    if let (true, Some(last)) = (has_more, products.last()) {
        let link = format!(
            "</products?limit={}&after_id={}>; rel=\"next\"",
            page.limit, last.id
        );
        if let Ok(value) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    Ok(response)
}

pub async fn get_product(request: Request, state: AppState) -> tally_shared::router::HandlerResult {
    let id = path_id(&request, "id")?;
    let rows = sql::read(
        &state,
        &request,
        "get_product",
        GET_SQL,
        &[(&id, Type::INT8)],
    )
    .await?;
    let product = rows.first().map(Product::from).ok_or(ApiError::NotFound)?;
    let body = serde_json::to_vec(&product)
        .map_err(|e| ApiError::Internal(format!("serialising a product: {e}")))?;
    Ok(conditional_json(&request, body.into(), CATALOG_CACHE))
}

/// The catalog may be cached briefly, by anyone: stock changes, so not for long. A client
/// revalidates with `If-None-Match` (`304` when nothing changed).
const CATALOG_CACHE: &str = "public, max-age=5";

#[cfg(test)]
mod tests {
    use super::*;

    fn page(query: &str) -> Result<Page, ApiError> {
        let request = http::Request::builder()
            .uri(format!("/products{query}"))
            .body(bytes::Bytes::new())
            .unwrap();
        Page::from_request(&request)
    }

    #[test]
    fn paging_defaults_and_bounds() {
        assert_eq!(
            page("").unwrap(),
            Page {
                limit: 100,
                after_id: 0
            }
        );
        assert_eq!(
            page("?limit=2&after_id=7").unwrap(),
            Page {
                limit: 2,
                after_id: 7
            }
        );
        for bad in [
            "?limit=0",
            "?limit=1001",
            "?limit=x",
            "?after_id=-1",
            "?after_id=1.5",
            "?page=2",
        ] {
            assert_eq!(page(bad).unwrap_err().code(), "invalid_request", "{bad}");
        }
    }
}
