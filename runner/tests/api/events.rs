//! Order events through the outbox: a placed order's event confirms it at once; a redelivered
//! event changes nothing; an event whose publish failed is published by the sweep; both
//! CloudEvents content modes are read; and 1,000 orders, each event delivered three times at
//! once, are confirmed exactly once each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::json;
use tally_shared::app::App;
use tally_shared::events::{self, Publisher};
use tally_shared::runtime;

use crate::helpers::{TestApp, TestResponse, admin_url, test_config};

/// The processor's event routes, served as its own cluster-local service is, on the API's
/// database; `sink` is where its own events go.
async fn processor_on(listener: tokio::net::TcpListener, db_url: &str, sink: Option<&str>) {
    let function = App::new("process-orders", process_orders::event_routes())
        .settings::<process_orders::ProcessorConfig>();
    let extra: Vec<(&str, &str)> = sink.map(|s| ("K_SINK", s)).into_iter().collect();
    let state = function.state(test_config(db_url, &extra)).unwrap();
    tokio::spawn(runtime::serve(
        listener,
        function.router(),
        state,
        std::future::pending(),
    ));
}

/// The API publishing to a processor on `events` (its URL), both on one fresh database.
async fn api_and_processor() -> (TestApp, TestApp, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sink = format!("http://127.0.0.1:{port}/events");
    let api = TestApp::spawn_on(admin_url(), &[("K_SINK", sink.as_str())]).await;
    processor_on(listener, &api.db_url, Some(&sink)).await;
    let processor = TestApp::attach(port, &api.db_url).await;
    (api, processor, sink)
}

/// A processor with no sink of its own, on `api`'s database.
async fn processor_for(api: &TestApp) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    processor_on(listener, &api.db_url, None).await;
    TestApp::attach(port, &api.db_url).await
}

/// POSTs an order's placed event in binary content mode (`ce-*` headers, the data as body).
async fn deliver_binary(processor: &TestApp, order_id: i64) -> TestResponse {
    let subject = order_id.to_string();
    let id = format!("{order_id}:{}", events::PLACED);
    processor
        .request(
            Method::POST,
            "/events",
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", &id),
                ("ce-source", "/tally/orders"),
                ("ce-type", events::PLACED),
                ("ce-subject", &subject),
                ("content-type", "application/json"),
            ],
            json!({ "order_id": order_id }).to_string(),
        )
        .await
}

async fn status_of(app: &TestApp, order_id: i64) -> (String, i32) {
    let row = app
        .db
        .query_one(
            "SELECT status, attempts FROM orders WHERE id = $1",
            &[&order_id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn wait_for(app: &TestApp, sql: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = app.count(sql).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: {got}, waiting for {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_published_event_confirms_its_order_at_once() {
    let (api, _processor, _) = api_and_processor().await;
    let started = Instant::now();
    let r = api.order(1, &[(1, 2)]).await;
    assert_eq!(r.status, 201);
    let id = r.json()["order_id"].as_i64().unwrap();
    wait_for(
        &api,
        &format!("SELECT count(*) FROM orders WHERE id = {id} AND status = 'CONFIRMED'"),
        1,
    )
    .await;
    eprintln!("placed to CONFIRMED by event in {:?}", started.elapsed());
    assert_eq!(status_of(&api, id).await, ("CONFIRMED".into(), 1));
    // Both events (placed, then the processor's confirmed) were published and forgotten.
    wait_for(&api, "SELECT count(*) FROM outbox", 0).await;
    api.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redelivered_event_changes_nothing() {
    let api = TestApp::spawn().await;
    let processor = processor_for(&api).await;
    let id = api.order(1, &[(1, 1)]).await.json()["order_id"]
        .as_i64()
        .unwrap();
    assert_eq!(status_of(&api, id).await, ("PENDING".into(), 0));
    let processor = Arc::new(processor);
    let deliveries: Vec<_> = (0..8)
        .map(|_| {
            let processor = processor.clone();
            tokio::spawn(async move { deliver_binary(&processor, id).await })
        })
        .collect();
    let mut claimed = 0;
    for delivery in deliveries {
        let r = delivery.await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        claimed += r.json()["claimed"].as_i64().unwrap();
    }
    assert_eq!(claimed, 1, "8 concurrent deliveries, one claim");
    let again = deliver_binary(&processor, id).await;
    assert_eq!(
        (again.status.as_u16(), &again.json()["claimed"]),
        (200, &json!(0))
    );
    assert_eq!(status_of(&api, id).await, ("CONFIRMED".into(), 1));
    // One confirmed event, however often the order's placed event came.
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE event_type = 'dev.tally.order.confirmed'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_publish_that_fails_is_picked_up_by_the_sweep() {
    // Nothing listens at the API's sink: its publish fails and the row stays.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}/events", closed.local_addr().unwrap());
    drop(closed);
    let api = TestApp::spawn_on(admin_url(), &[("K_SINK", dead.as_str())]).await;
    let id = api.order(1, &[(1, 1)]).await.json()["order_id"]
        .as_i64()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let placed = format!(
        "SELECT count(*) FROM outbox WHERE order_id = {id} AND event_type = 'dev.tally.order.placed'"
    );
    assert_eq!(api.count(&placed).await, 1, "left behind");
    assert_eq!(status_of(&api, id).await.0, "PENDING");

    // The sweep, with a sink that answers: the event goes out, the processor confirms.
    let processor = processor_for(&api).await;
    let sink = format!("http://{}/events", processor.addr);
    let config = test_config(&api.db_url, &[("K_SINK", sink.as_str())]);
    let pool = tally_shared::db::lazy_pool(&config, "sweep").unwrap();
    let publisher = Publisher::from_config(&config);
    let sent = events::publish_left_behind(&pool, &publisher, Duration::ZERO, 100)
        .await
        .unwrap();
    assert_eq!(sent, 1);
    assert_eq!(api.count(&placed).await, 0, "published and forgotten");
    assert_eq!(status_of(&api, id).await, ("CONFIRMED".into(), 1));
}

#[tokio::test]
async fn both_content_modes_are_read_and_anything_else_is_a_400() {
    let api = TestApp::spawn().await;
    let processor = processor_for(&api).await;
    let place = || async {
        api.order(1, &[(2, 1)]).await.json()["order_id"]
            .as_i64()
            .unwrap()
    };
    let binary = place().await;
    assert_eq!(deliver_binary(&processor, binary).await.status, 200);
    let structured = place().await;
    let event = json!({
        "specversion": "1.0", "id": format!("{structured}:placed"), "source": "/tally/orders",
        "type": events::PLACED, "subject": structured.to_string(),
        "datacontenttype": "application/json", "data": {"order_id": structured}
    });
    let r = processor
        .request(
            Method::POST,
            "/events",
            &[("content-type", "application/cloudevents+json")],
            event.to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    for id in [binary, structured] {
        assert_eq!(status_of(&api, id).await, ("CONFIRMED".into(), 1));
    }
    // A ping sweeps; a type the processor does not handle is acknowledged and left alone.
    let ping = processor
        .request(
            Method::POST,
            "/events",
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "p1"),
                ("ce-source", "/apis/v1/namespaces/tally/pingsources/p"),
                ("ce-type", events::PING),
            ],
            "",
        )
        .await;
    assert_eq!(ping.status, 200, "{:?}", ping.body);
    assert!(ping.json().get("claimed").is_some(), "a sweep's summary");
    let other = processor
        .request(
            Method::POST,
            "/events",
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "x"),
                ("ce-source", "/elsewhere"),
                ("ce-type", "com.example.unrelated"),
            ],
            "",
        )
        .await;
    assert_eq!(other.json(), json!({"ignored": "com.example.unrelated"}));
    for (headers, body) in [
        (vec![("content-type", "application/json")], "{}"),
        (
            vec![("content-type", "application/cloudevents+json")],
            "{\"id\":1",
        ),
        (
            vec![
                ("ce-specversion", "9.9"),
                ("ce-id", "x"),
                ("ce-type", "t"),
                ("ce-source", "/s"),
            ],
            "",
        ),
    ] {
        processor
            .request(Method::POST, "/events", &headers, body)
            .await
            .assert_problem(400, "invalid_request");
    }
    // A placed event that names no order is refused, not guessed at.
    let r = processor
        .request(
            Method::POST,
            "/events",
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "y"),
                ("ce-source", "/tally/orders"),
                ("ce-type", events::PLACED),
            ],
            "",
        )
        .await;
    r.assert_problem(400, "invalid_request");
    let dead = processor
        .request(
            Method::POST,
            "/dead-letter",
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "z"),
                ("ce-source", "/tally/orders"),
                ("ce-type", events::PLACED),
            ],
            "",
        )
        .await;
    assert_eq!(dead.json(), json!({"dead_lettered": "z"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_orders_under_redelivery_are_confirmed_exactly_once() {
    let api = TestApp::spawn().await;
    let processor = Arc::new(processor_for(&api).await);
    // 1,000 PENDING orders; the trigger writes their placed events.
    api.db
        .batch_execute(
            "INSERT INTO orders (user_id, total_cents) SELECT 1, 0 FROM generate_series(1, 1000)",
        )
        .await
        .unwrap();
    let ids: Vec<i64> = api
        .db
        .query(
            "SELECT order_id FROM outbox WHERE event_type = 'dev.tally.order.placed'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 1000);
    // Every event three times, shuffled across 32 clients.
    let mut deliveries: Vec<i64> = ids.iter().flat_map(|&id| [id, id, id]).collect();
    deliveries.sort_unstable_by_key(|id| (id * 7919) % 1009);
    let queue = Arc::new(std::sync::Mutex::new(deliveries));
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let (processor, queue) = (processor.clone(), queue.clone());
            tokio::spawn(async move {
                let mut claimed = 0;
                loop {
                    let next = queue.lock().unwrap().pop();
                    let Some(id) = next else { break claimed };
                    let r = deliver_binary(&processor, id).await;
                    assert_eq!(r.status, 200, "{:?}", r.body);
                    claimed += r.json()["claimed"].as_i64().unwrap();
                }
            })
        })
        .collect();
    let mut claimed = 0;
    for client in clients {
        claimed += client.await.unwrap();
    }
    assert_eq!(claimed, 1000, "3,000 deliveries, 1,000 claims");
    let by_state: Vec<(String, i32, i64)> = api
        .db
        .query(
            "SELECT status, attempts, count(*) FROM orders GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        by_state,
        [("CONFIRMED".to_owned(), 1, 1000)],
        "each confirmed once"
    );
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE event_type = 'dev.tally.order.confirmed'")
            .await,
        1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_delivers_events_itself_and_can_hold_fulfilment_back() {
    let db_url = crate::helpers::fresh_database(admin_url()).await;
    let port = crate::faults::free_port();
    let _runner = crate::helpers::runner_command(&db_url, port)
        .env("LOCAL_EVENTS", "true")
        .env("FULFILMENT_DELAY_MS", "1500")
        .spawn()
        .unwrap();
    let app = TestApp::attach(port, &db_url).await;
    app.wait_until_up().await;
    let place = || async {
        app.order(1, &[(1, 1)]).await.json()["order_id"]
            .as_i64()
            .unwrap()
    };
    // Within the delay the order is PENDING, so its customer may still cancel it.
    let cancelled = place().await;
    let r = app
        .request(
            Method::POST,
            &format!("/orders/{cancelled}/cancel"),
            &[("authorization", &app.customer(1))],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // Past it, the runner's own delivery confirms the next order, no sweep running.
    let started = Instant::now();
    let confirmed = place().await;
    wait_for(
        &app,
        &format!("SELECT count(*) FROM orders WHERE id = {confirmed} AND status = 'CONFIRMED'"),
        1,
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(status_of(&app, cancelled).await.0, "CANCELLED");
    // Every event was delivered and the outbox drained (the cancelled order's event too).
    wait_for(&app, "SELECT count(*) FROM outbox", 0).await;
    app.assert_books_balance().await;
}
