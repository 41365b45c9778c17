//! Concurrent storms over real HTTP: exact counts, no oversell, no deadlock, books balanced.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::helpers::{TestApp, random_u64};

/// Sends `total` orders from `clients` concurrent clients; `make(i)` gives order i's lines.
/// Returns how many responses had each status.
pub(crate) async fn storm(
    app: &Arc<TestApp>,
    clients: usize,
    total: usize,
    make: impl Fn(usize) -> Vec<(i64, i64)> + Send + Sync + 'static,
) -> BTreeMap<u16, usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let make = Arc::new(make);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (app, next, make) = (app.clone(), next.clone(), make.clone());
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return statuses;
                }
                let r = app.order(1, &make(i)).await;
                if r.status != 201 && r.status != 409 {
                    panic!(
                        "order {i}: {} {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    );
                }
                statuses.push(r.status.as_u16());
            }
        }));
    }
    let mut counts = BTreeMap::new();
    for task in tasks {
        for status in task.await.unwrap() {
            *counts.entry(status).or_default() += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_of_400_orders_never_oversells_stock_of_50() {
    let app = Arc::new(TestApp::spawn().await);
    let product = app.add_product("HOT-1", 1000, 50).await;
    let counts = storm(&app, 48, 400, move |_| vec![(product, 1)]).await;
    eprintln!("stock 50, 400 x 1 from 48 clients: {counts:?}");
    assert_eq!(counts.get(&201), Some(&50));
    assert_eq!(counts.get(&409), Some(&350));
    assert_eq!(app.inventory(product).await, 0);
    assert_eq!(app.sold(product).await, 50);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM order_items WHERE product_id = {product}"
        ))
        .await,
        50
    );
    app.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_of_400_orders_of_3_never_oversells_stock_of_100() {
    let app = Arc::new(TestApp::spawn().await);
    let product = app.add_product("HOT-3", 250, 100).await;
    let counts = storm(&app, 48, 400, move |_| vec![(product, 3)]).await;
    eprintln!("stock 100, 400 x 3 from 48 clients: {counts:?}");
    // 33 orders of 3 take 99; the one unit left can never fill an order of 3.
    assert_eq!(counts.get(&201), Some(&33));
    assert_eq!(counts.get(&409), Some(&367));
    assert_eq!(app.inventory(product).await, 1);
    assert_eq!(app.sold(product).await, 99);
    app.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_line_orders_in_random_order_never_deadlock() {
    let app = Arc::new(TestApp::spawn().await);
    let mut products = Vec::new();
    for i in 0..6 {
        products.push(app.add_product(&format!("X-{i}"), 100 + i, 120).await);
    }
    let products = Arc::new(products);
    let seed = random_u64();
    let p = products.clone();
    let counts = storm(&app, 48, 600, move |i| {
        // A cheap deterministic shuffle per order: 2 to 4 distinct products, in random order.
        let mut x = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut picks: Vec<i64> = p.to_vec();
        for j in (1..picks.len()).rev() {
            picks.swap(j, (next() % (j as u64 + 1)) as usize);
        }
        let lines = 2 + (next() % 3) as usize;
        picks
            .into_iter()
            .take(lines)
            .map(|id| (id, 1 + (next() % 3) as i64))
            .collect()
    })
    .await;
    eprintln!("6 products x 120, 600 multi-line orders from 48 clients: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 600);
    assert!(counts.get(&201).copied().unwrap_or(0) > 0, "{counts:?}");
    assert!(
        counts.get(&409).copied().unwrap_or(0) > 0,
        "stock should run out: {counts:?}"
    );
    for id in products.iter() {
        assert_eq!(
            app.inventory(*id).await + app.sold(*id).await,
            120,
            "product {id}"
        );
    }
    app.assert_books_balance().await;
}
