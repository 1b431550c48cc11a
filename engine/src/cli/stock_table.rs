//! The stock table as `evaluate` and `inspect` print it, so the two can be compared
//! field for field (the crash tests do).

use serde::Serialize;
use tribunal_shards::inventory::StockKey;

#[derive(Clone, Serialize)]
pub struct StockRow {
    pub warehouse: String,
    pub sku: String,
    pub qty: u64,
}

/// Rows in (SKU, warehouse) order, the order of `StockKey`.
pub fn rows(entities: impl IntoIterator<Item = (StockKey, u64)>) -> Vec<StockRow> {
    let mut entities: Vec<_> = entities.into_iter().collect();
    entities.sort_by(|a, b| a.0.cmp(&b.0));
    entities
        .into_iter()
        .map(|(key, qty)| StockRow { warehouse: key.warehouse.to_string(), sku: key.sku.to_string(), qty })
        .collect()
}

/// A one-line summary and the first ten rows.
pub fn print(label: &str, stock: &[StockRow]) {
    let total: u128 = stock.iter().map(|r| u128::from(r.qty)).sum();
    println!("{label:<17} {} (warehouse, sku) levels, {total} units in all", stock.len());
    for row in stock.iter().take(10) {
        println!("  {:<10} {:<12} {}", row.warehouse, row.sku, row.qty);
    }
    if stock.len() > 10 {
        println!("  ... ({} more; --json prints them all)", stock.len() - 10);
    }
}
