//! A product as the API shows it, shared by the functions that read (`list-products`) and
//! write (`admin-products`) the catalog, so both answer with the same shape.

use serde::Serialize;
use tokio_postgres::Row;

/// The columns, in the order [`Product::from`] reads them.
pub const PRODUCT_COLUMNS: &str = "id, sku, name, price_cents, inventory";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Product {
    pub id: i64,
    pub sku: String,
    pub name: String,
    pub price_cents: i64,
    pub inventory: i64,
}

impl From<&Row> for Product {
    fn from(row: &Row) -> Self {
        Self {
            id: row.get(0),
            sku: row.get(1),
            name: row.get(2),
            price_cents: row.get(3),
            inventory: row.get(4),
        }
    }
}
