//! The contract: `GET /openapi.json` is served, and it documents exactly the routes the
//! runner mounts (plus `/healthz` and itself), with the security each route has.

use std::collections::BTreeSet;

use tally_shared::router::{Access, OPENAPI};

use crate::helpers::TestApp;

#[tokio::test]
async fn the_document_is_served_and_matches_every_mounted_route() {
    let app = TestApp::spawn().await;
    let r = app.get("/openapi.json").await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(
        doc,
        serde_json::from_str::<serde_json::Value>(OPENAPI).unwrap()
    );
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));

    let mut documented = BTreeSet::new();
    let mut public = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if !["get", "post", "patch", "put", "delete"].contains(&method.as_str()) {
                continue;
            }
            let key = format!("{} {path}", method.to_uppercase());
            let security = &operation["security"];
            if security.as_array().is_some_and(|s| s.is_empty()) {
                public.insert(key.clone());
            }
            documented.insert(key);
        }
    }
    let mut mounted = BTreeSet::from([
        "GET /healthz".to_owned(),
        "GET /livez".to_owned(),
        "GET /openapi.json".to_owned(),
    ]);
    let mut mounted_public = mounted.clone();
    for (_, routes) in tally::functions() {
        for route in routes {
            let key = format!("{} {}", route.method, route.pattern);
            if route.access == Access::Public {
                mounted_public.insert(key.clone());
            }
            mounted.insert(key);
        }
    }
    assert_eq!(
        documented, mounted,
        "documented operations = mounted routes"
    );
    assert_eq!(
        public, mounted_public,
        "the public ones are exactly the documented security: []"
    );
}

/// Every operation of the document that lists a status, with a concrete path (ids are 1).
fn operations_documenting(doc: &serde_json::Value, status: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if operation["responses"].get(status).is_some() {
                found.push((method.to_uppercase(), path.replace("{id}", "1")));
            }
        }
    }
    found
}

/// The transport's own 4xx, which no generated request provokes: 413 for a declared body over
/// the cap and 408 for a body that stalls, on every operation that documents them (the
/// contract run, contract/run.sh, counts these as observed here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_413_to_an_oversized_body_and_408_to_a_stalled_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_on(
        crate::helpers::admin_url(),
        &[("BODY_READ_TIMEOUT_MS", "300")],
    )
    .await;
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
    let too_large = operations_documenting(&doc, "413");
    assert!(too_large.len() >= 10, "{too_large:?}");
    for (method, path) in &too_large {
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        let r = app
            .request(
                method.clone(),
                path,
                // A connection of its own each: the server answers 413 and closes without
                // reading the body, so a kept-alive connection would not serve the next one.
                &[
                    ("content-type", "application/json"),
                    ("connection", "close"),
                ],
                vec![b' '; 65 * 1024],
            )
            .await;
        r.assert_problem(413, "payload_too_large");
    }
    let stalled = operations_documenting(&doc, "408");
    assert!(stalled.len() >= 10, "{stalled:?}");
    let token = app.admin();
    let mut answers = tokio::task::JoinSet::new();
    for (method, path) in stalled {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
        );
        let addr = app.addr;
        answers.spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                stream.read_to_end(&mut out),
            )
            .await;
            assert!(read.is_ok(), "{method} {path}: still open");
            let text = String::from_utf8_lossy(&out).into_owned();
            assert!(text.starts_with("HTTP/1.1 408"), "{method} {path}: {text}");
            assert!(
                text.contains("\"error\":\"request_timeout\""),
                "{method} {path}"
            );
        });
    }
    while let Some(answer) = answers.join_next().await {
        answer.unwrap();
    }
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 0);
}
