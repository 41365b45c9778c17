//! A per-product admission gate for one-line orders: at most [`IN_FLIGHT`] orders for one
//! unsharded product are inside PostgreSQL at once from this process; the rest wait here, in
//! arrival order, without holding a pooled connection.
//!
//! Why: orders for one product queue on its row lock, and PostgreSQL's row-lock queue is not
//! fair. When the holder commits, a newly arriving order can take the row before the woken
//! waiter runs, so some orders wait many turns: pgbench alone on one hot row at 8 clients
//! measured p50 2.4 ms but p99 13.7 ms. Worse, every waiter holds one of the pool's few
//! connections, so a flash sale on one product starves orders for every other product. Here
//! the waiters queue on a fair semaphore instead, and the row still never idles: one order
//! holds its lock while the next has already written its rows and waits just behind it.
//!
//! A sharded product is not gated: its orders are meant to run side by side. Whether a product
//! is sharded is learned from `place_order_one`'s answers (its `stock_shards` column), so a
//! product's first order after a reshard is judged by the previous answer; either way it is
//! only a matter of queueing here or in PostgreSQL, never of correctness.
//!
//! Products map onto a fixed number of stripes (bounded memory whatever ids callers send). Two
//! products on one stripe share its permits, which only slows them when both are busy at once;
//! each stripe remembers one sharded product by id, so a neighbour cannot switch its gate off.
//! A turn is waited for at most the pool's timeout, then the order is answered 503 like any
//! order that cannot get a connection, so a queue here cannot grow without bound.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tally_shared::ApiError;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Orders per product inside PostgreSQL at once: the lock holder and the one next in line.
pub const IN_FLIGHT: usize = 2;
const STRIPES: usize = 4096;
/// No product: ids are positive.
const NONE: i64 = 0;

struct Stripe {
    permits: Semaphore,
    /// The product on this stripe that the last answer for it said is sharded, or NONE.
    sharded: AtomicI64,
}

static GATE: LazyLock<Box<[Stripe]>> = LazyLock::new(|| {
    (0..STRIPES)
        .map(|_| Stripe {
            permits: Semaphore::new(IN_FLIGHT),
            sharded: AtomicI64::new(NONE),
        })
        .collect()
});

fn stripe(product_id: i64) -> &'static Stripe {
    &GATE[product_id.rem_euclid(STRIPES as i64) as usize]
}

/// Waits up to `patience` for a turn to order `product_id`, unless it is known to be sharded.
/// The turn ends when the returned permit is dropped.
pub async fn enter(
    product_id: i64,
    patience: Duration,
) -> Result<Option<SemaphorePermit<'static>>, ApiError> {
    let stripe = stripe(product_id);
    if stripe.sharded.load(Ordering::Relaxed) == product_id {
        return Ok(None);
    }
    match tokio::time::timeout(patience, stripe.permits.acquire()).await {
        // The semaphore is never closed, so acquiring cannot fail.
        Ok(permit) => Ok(permit.ok()),
        Err(_) => Err(ApiError::Unavailable(format!(
            "no turn to order product {product_id} within the pool timeout"
        ))),
    }
}

/// Records what an answer said of `product_id`'s shards.
pub fn learn(product_id: i64, stock_shards: i16) {
    let sharded = &stripe(product_id).sharded;
    if stock_shards > 1 {
        sharded.store(product_id, Ordering::Relaxed);
    } else {
        // Only this product's own mark is taken back.
        let _ = sharded.compare_exchange(product_id, NONE, Ordering::Relaxed, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(20);

    #[tokio::test]
    async fn a_product_admits_two_orders_at_once_until_it_is_known_to_be_sharded() {
        let (a, b) = (enter(7, WAIT).await.unwrap(), enter(7, WAIT).await.unwrap());
        assert!(a.is_some() && b.is_some());
        let third = enter(7, WAIT).await.unwrap_err();
        assert_eq!(
            third.code(),
            "unavailable",
            "a third order waits, then is refused"
        );
        drop(a);
        assert!(
            enter(7, WAIT).await.unwrap().is_some(),
            "one goes in when one leaves"
        );
        learn(7, 16);
        assert!(
            enter(7, WAIT).await.unwrap().is_none(),
            "a sharded product is not gated"
        );
        // A neighbour on the same stripe neither clears the mark nor is let through by it.
        let neighbour = 7 + STRIPES as i64;
        learn(neighbour, 1);
        assert!(enter(7, WAIT).await.unwrap().is_none());
        assert!(
            enter(neighbour, WAIT).await.unwrap().is_some(),
            "the neighbour is still gated"
        );
        learn(7, 1);
        drop(b);
        // Ids of any sign land on a stripe.
        assert!(enter(-5, WAIT).await.unwrap().is_some());
    }
}
