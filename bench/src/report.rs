//! The bench's report: a line per round while it runs, and the Markdown table for the README.

use serde_json::Value;

use crate::Round;

pub fn round_line(r: &Round) -> String {
    let tps = |c: &Option<crate::pgbench::Ceiling>| {
        c.as_ref()
            .map_or("-".to_owned(), |c| format!("{:.0}", c.best_tps))
    };
    format!(
        "{:.0}/s p50 {:.2} ms p99 {:.2} ms {:?}; ceilings minimal {} own {}; {:.0} WAL B, {:.0} us pg CPU, {:.0} us server CPU, {:.0} us lock wait per order",
        r.load.throughput,
        r.load.p50_ms,
        r.load.p99_ms,
        r.load.statuses,
        tps(&r.minimal_ceiling),
        tps(&r.own_ceiling),
        r.cost.wal_bytes_per_order,
        r.cost.pg_cpu_us_per_order,
        r.cost.server_cpu_us_per_order,
        r.cost.lock_wait_us_per_order,
    )
}

fn num(v: &Value, fmt: &dyn Fn(f64) -> String) -> String {
    v.as_f64().map_or("-".to_owned(), fmt)
}

fn header(result: &Value) -> String {
    let m = &result["machine"];
    format!(
        "Measured {} on {} ({} cores), {} connections, {} s per API run, pgbench {} s per client count (4/8/16/32, best kept), median of {} interleaved rounds, POOL_SIZE {}, {} stock shards; API, load generator and PostgreSQL on the same machine.\n\n",
        m["date"].as_str().unwrap_or(""),
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        result["connections"],
        result["seconds_per_run"],
        result["pgbench_seconds_per_client_count"],
        result["rounds"],
        result["pool_size"],
        result["stock_shards"],
    )
}

pub fn markdown(result: &Value) -> String {
    let mut t = header(result);
    t.push_str(&scenario_table(result));
    t.push_str(&every_round(result));
    t.push_str(&reads_table(result));
    t.push_str(&function_and_books(result));
    t
}

fn f0(x: f64) -> String {
    format!("{x:.0}")
}

fn f2(x: f64) -> String {
    format!("{x:.2}")
}

/// The median of one ceiling's best tps over a scenario's rounds.
fn median_ceiling(s: &Value, key: &str) -> Value {
    let mut v: Vec<f64> = s["rounds"]
        .as_array()
        .unwrap_or(&vec![])
        .iter()
        .filter_map(|r| r[key]["best_tps"].as_f64())
        .collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().map_or(Value::Null, Value::from)
}

fn scenario_table(result: &Value) -> String {
    let mut t = String::from(
        "| scenario | minimal ceiling (tps) | own SQL ceiling (tps) | API (req/s) | API / minimal | API / own | p50 ms | p99 ms | WAL B/order | pg CPU µs/order | server CPU µs/order | lock wait µs/order |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let ratio = |x: f64| format!("{x:.2}×");
    for s in result["scenarios"].as_array().unwrap_or(&vec![]) {
        let m = &s["median"];
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            s["name"].as_str().unwrap_or(""),
            num(&median_ceiling(s, "minimal_ceiling"), &f0),
            num(&median_ceiling(s, "own_ceiling"), &f0),
            num(&m["throughput"], &f0),
            num(&s["minimal_ratio"], &ratio),
            num(&s["own_ratio"], &ratio),
            num(&m["p50_ms"], &f2),
            num(&m["p99_ms"], &f2),
            num(&m["cost"]["wal_bytes_per_order"], &f0),
            num(&m["cost"]["pg_cpu_us_per_order"], &f0),
            num(&m["cost"]["server_cpu_us_per_order"], &f0),
            num(&m["cost"]["lock_wait_us_per_order"], &f0),
        ));
    }
    t
}

fn every_round(result: &Value) -> String {
    let mut t = String::from("\nEvery round (API req/s; minimal / own ceiling tps):\n\n");
    for s in result["scenarios"].as_array().unwrap_or(&vec![]) {
        let rounds: Vec<String> = s["rounds"]
            .as_array()
            .unwrap_or(&vec![])
            .iter()
            .map(|r| {
                format!(
                    "{} ({} / {})",
                    num(&r["throughput"], &f0),
                    num(&r["minimal_ceiling"]["best_tps"], &f0),
                    num(&r["own_ceiling"]["best_tps"], &f0)
                )
            })
            .collect();
        t.push_str(&format!(
            "- {}: {}\n",
            s["name"].as_str().unwrap_or(""),
            rounds.join("; ")
        ));
    }
    t
}

fn reads_table(result: &Value) -> String {
    let mut t = String::from("\n| read | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|\n");
    for r in result["reads"].as_array().unwrap_or(&vec![]) {
        let l = &r["load"];
        t.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r["name"].as_str().unwrap_or(""),
            num(&l["throughput"], &f0),
            num(&l["p50_ms"], &f2),
            num(&l["p99_ms"], &f2)
        ));
    }
    t
}

fn function_and_books(result: &Value) -> String {
    let c = &result["cold_start_ms"];
    let r = &result["create_order_rss_kb"];
    let mb = |x: f64| format!("{:.1}", x / 1024.0);
    let f1 = |x: f64| format!("{x:.1}");
    format!(
        "\nOne function binary (create-order): cold start (spawn to first 200 on /healthz) median {} ms (min {}, max {}); RSS {} MB idle, {} MB after {} requests of load (peak {} MB).\n\nBooks after all runs: {} products drifted; {} unexpected (non-2xx) responses.\n",
        num(&c["median"], &f1),
        num(&c["min"], &f1),
        num(&c["max"], &f1),
        num(&r["idle"], &mb),
        num(&r["after_load"], &mb),
        r["load_requests"],
        num(&r["peak"], &mb),
        result["books_drift"],
        result["unexpected_responses"],
    )
}
