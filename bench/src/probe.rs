//! What an order costs, measured rather than guessed: WAL bytes (`pg_current_wal_lsn` deltas),
//! CPU time of the PostgreSQL processes and of the Tally server (from `/proc`), and how much of
//! the time backends spend waiting on locks (`pg_stat_activity`, sampled during the run).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

/// Clock ticks per second in `/proc/*/stat` (USER_HZ), 100 on Linux.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (user + system) of the processes whose command name is `comm`, or of `pid`.
pub fn cpu_seconds(comm: Option<&str>, pid: Option<u32>) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(p) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid.is_some_and(|want| want != p) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..." - comm may hold spaces, so split at the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let this_comm = head.split_once('(').map_or("", |(_, c)| c);
        if comm.is_some_and(|want| want != this_comm) {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line; 12 and 13 after "state".
        ticks += fields
            .get(11)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        ticks += fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ticks as f64 / TICKS_PER_SECOND
}

/// The current WAL position, in bytes.
pub async fn wal_lsn(db: &Client) -> i64 {
    db.query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await
        .expect("reading the WAL position")
        .get(0)
}

/// Counters taken before a run; [`Probe::finish`] turns them into per-order costs.
pub struct Probe {
    wal: i64,
    pg_cpu: f64,
    server_cpu: f64,
    server_pid: u32,
    stop: Arc<AtomicBool>,
    sampler: tokio::task::JoinHandle<(u64, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    pub wal_bytes_per_order: f64,
    pub pg_cpu_us_per_order: f64,
    pub server_cpu_us_per_order: f64,
    /// The mean number of backends of the bench database waiting on a heavyweight lock
    /// (row locks show up as `Lock`/`transactionid` or `tuple`), over the run.
    pub lock_waiters_mean: f64,
    /// Lock-wait time per order: mean waiters / orders per second, in microseconds.
    pub lock_wait_us_per_order: f64,
}

impl Probe {
    pub async fn start(db: Client, server_pid: u32) -> Self {
        let db = Arc::new(db);
        let wal = wal_lsn(&db).await;
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = tokio::spawn(sample_lock_waits(db, stop.clone()));
        Self {
            wal,
            pg_cpu: cpu_seconds(Some("postgres"), None),
            server_cpu: cpu_seconds(None, Some(server_pid)),
            server_pid,
            stop,
            sampler,
        }
    }

    pub async fn finish(self, db: &Client, orders: u64, seconds: f64) -> Cost {
        let pg_cpu = cpu_seconds(Some("postgres"), None) - self.pg_cpu;
        let server_cpu = cpu_seconds(None, Some(self.server_pid)) - self.server_cpu;
        self.stop.store(true, Ordering::Relaxed);
        let (samples, waiting) = self.sampler.await.unwrap_or((0, 0));
        let wal = wal_lsn(db).await - self.wal;
        let n = orders.max(1) as f64;
        let lock_waiters_mean = waiting as f64 / samples.max(1) as f64;
        Cost {
            wal_bytes_per_order: wal as f64 / n,
            pg_cpu_us_per_order: pg_cpu * 1e6 / n,
            server_cpu_us_per_order: server_cpu * 1e6 / n,
            lock_waiters_mean,
            lock_wait_us_per_order: lock_waiters_mean * 1e6 / (n / seconds.max(1e-9)),
        }
    }
}

/// Samples pg_stat_activity every 5 ms: (samples, summed lock waiters).
async fn sample_lock_waits(db: Arc<Client>, stop: Arc<AtomicBool>) -> (u64, u64) {
    let (mut samples, mut waiting) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let Ok(row) = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                   AND wait_event_type = 'Lock'",
                &[],
            )
            .await
        else {
            break;
        };
        samples += 1;
        waiting += row.get::<_, i64>(0) as u64;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (samples, waiting)
}
