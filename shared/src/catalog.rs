//! A product as the API shows it, shared by the functions that read (`list-products`) and
//! write (`admin-products`) the catalog, so both answer with the same shape.

use serde::Serialize;
use tokio_postgres::Row;

/// The columns, in the order [`Product::from`] reads them, of `products` or of the `catalog`
/// view (whose `inventory` is the whole stock, however many shards hold it).
pub const PRODUCT_COLUMNS: &str = "id, sku, name, price_cents, inventory, stock_shards";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Product {
    pub id: i64,
    pub sku: String,
    pub name: String,
    pub price_cents: i64,
    pub inventory: i64,
    /// How many rows the stock is spread over; shown only for a sharded product, so the
    /// common shape stays the original's.
    #[serde(skip_serializing_if = "is_unsharded")]
    pub stock_shards: i16,
}

fn is_unsharded(shards: &i16) -> bool {
    *shards == 1
}

impl From<&Row> for Product {
    fn from(row: &Row) -> Self {
        Self {
            id: row.get(0),
            sku: row.get(1),
            name: row.get(2),
            price_cents: row.get(3),
            inventory: row.get(4),
            stock_shards: row.get(5),
        }
    }
}
