//! A catalog of malformed requests: each gets a 4xx with a JSON body, nothing is sold, and the
//! server keeps serving.

use bytes::Bytes;
use http::Method;

use crate::helpers::TestApp;

const JSON: &str = "application/json";

fn case(
    name: &'static str,
    content_type: Option<&'static str>,
    body: impl Into<Bytes>,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        name,
        content_type,
        body: body.into(),
        status,
        code,
    }
}

struct Case {
    name: &'static str,
    content_type: Option<&'static str>,
    body: Bytes,
    status: u16,
    code: &'static str,
}

fn catalog() -> Vec<Case> {
    let line = |p: &str, q: &str| {
        format!(r#"{{"user_id":1,"items":[{{"product_id":{p},"quantity":{q}}}]}}"#)
    };
    let many_lines = format!(
        r#"{{"user_id":1,"items":[{}]}}"#,
        vec![r#"{"product_id":1,"quantity":1}"#; 101].join(",")
    );
    let deep = format!(
        r#"{{"user_id":1,"items":{}{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let deep_object = format!("{}{}", "{\"a\":".repeat(3000), "}".repeat(3000));
    let huge = format!(
        r#"{{"user_id":1,"items":[],"pad":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    vec![
        case("empty body", Some(JSON), "", 400, "invalid_json"),
        case(
            "truncated",
            Some(JSON),
            r#"{"user_id":1,"items":["#,
            400,
            "invalid_json",
        ),
        case(
            "trailing garbage",
            Some(JSON),
            r#"{"user_id":1,"items":[]} x"#,
            400,
            "invalid_json",
        ),
        case(
            "not an object",
            Some(JSON),
            "[1,2,3]",
            400,
            "invalid_request",
        ),
        case("a string", Some(JSON), r#""order""#, 400, "invalid_request"),
        case("null body", Some(JSON), "null", 400, "invalid_request"),
        case(
            "invalid utf-8",
            Some(JSON),
            Bytes::from_static(b"{\"user_id\":1,\"items\":[\xff\xfe]}"),
            400,
            "invalid_json",
        ),
        case(
            "user_id of another user",
            Some(JSON),
            r#"{"user_id":2,"items":[{"product_id":1,"quantity":1}]}"#,
            403,
            "forbidden",
        ),
        case(
            "missing items",
            Some(JSON),
            r#"{"user_id":1}"#,
            400,
            "invalid_request",
        ),
        case(
            "user_id an array",
            Some(JSON),
            r#"{"user_id":[1],"items":[{"product_id":1,"quantity":1}]}"#,
            400,
            "invalid_request",
        ),
        case(
            "user_id string",
            Some(JSON),
            r#"{"user_id":"1","items":[{"product_id":1,"quantity":1}]}"#,
            400,
            "invalid_request",
        ),
        case(
            "user_id zero",
            Some(JSON),
            r#"{"user_id":0,"items":[{"product_id":1,"quantity":1}]}"#,
            400,
            "invalid_request",
        ),
        case(
            "user_id negative",
            Some(JSON),
            r#"{"user_id":-5,"items":[{"product_id":1,"quantity":1}]}"#,
            400,
            "invalid_request",
        ),
        case(
            "user_id 2^63",
            Some(JSON),
            r#"{"user_id":9223372036854775808,"items":[{"product_id":1,"quantity":1}]}"#,
            400,
            "invalid_request",
        ),
        case(
            "user_id 1e30",
            Some(JSON),
            r#"{"user_id":1e30,"items":[{"product_id":1,"quantity":1}]}"#,
            400,
            "invalid_request",
        ),
        case(
            "items not an array",
            Some(JSON),
            r#"{"user_id":1,"items":{"product_id":1}}"#,
            400,
            "invalid_request",
        ),
        case(
            "items empty",
            Some(JSON),
            r#"{"user_id":1,"items":[]}"#,
            400,
            "invalid_request",
        ),
        case(
            "null inside items",
            Some(JSON),
            r#"{"user_id":1,"items":[null]}"#,
            400,
            "invalid_request",
        ),
        case(
            "number inside items",
            Some(JSON),
            r#"{"user_id":1,"items":[7]}"#,
            400,
            "invalid_request",
        ),
        case("101 lines", Some(JSON), many_lines, 400, "invalid_request"),
        case(
            "quantity zero",
            Some(JSON),
            line("1", "0"),
            400,
            "invalid_request",
        ),
        case(
            "quantity negative",
            Some(JSON),
            line("1", "-3"),
            400,
            "invalid_request",
        ),
        case(
            "quantity fractional",
            Some(JSON),
            line("1", "1.5"),
            400,
            "invalid_request",
        ),
        case(
            "quantity above a million",
            Some(JSON),
            line("1", "1000001"),
            400,
            "invalid_request",
        ),
        case(
            "quantity 2^64",
            Some(JSON),
            line("1", "18446744073709551616"),
            400,
            "invalid_request",
        ),
        case(
            "quantity string",
            Some(JSON),
            line("1", r#""2""#),
            400,
            "invalid_request",
        ),
        case(
            "quantity null",
            Some(JSON),
            line("1", "null"),
            400,
            "invalid_request",
        ),
        case(
            "product_id zero",
            Some(JSON),
            line("0", "1"),
            400,
            "invalid_request",
        ),
        case(
            "product_id huge",
            Some(JSON),
            line("99999999999999999999999", "1"),
            400,
            "invalid_request",
        ),
        case(
            "product_id boolean",
            Some(JSON),
            line("true", "1"),
            400,
            "invalid_request",
        ),
        case(
            "unknown field",
            Some(JSON),
            r#"{"user_id":1,"items":[{"product_id":1,"quantity":1}],"coupon":"FREE"}"#,
            400,
            "invalid_request",
        ),
        case(
            "unknown line field",
            Some(JSON),
            r#"{"user_id":1,"items":[{"product_id":1,"quantity":1,"price":0}]}"#,
            400,
            "invalid_request",
        ),
        case(
            "deeply nested arrays",
            Some(JSON),
            deep,
            400,
            "invalid_request",
        ),
        case(
            "deeply nested objects",
            Some(JSON),
            deep_object,
            400,
            "invalid_request",
        ),
        case(
            "body over 64 KiB",
            Some(JSON),
            huge,
            413,
            "payload_too_large",
        ),
        case(
            "no content type",
            None,
            line("1", "1"),
            415,
            "unsupported_media_type",
        ),
        case(
            "text/plain",
            Some("text/plain"),
            line("1", "1"),
            415,
            "unsupported_media_type",
        ),
        case(
            "form encoded",
            Some("application/x-www-form-urlencoded"),
            "user_id=1",
            415,
            "unsupported_media_type",
        ),
    ]
}

#[tokio::test]
async fn every_malformed_order_gets_a_clear_4xx_and_sells_nothing() {
    let app = TestApp::spawn().await;
    let before = app.get("/products").await.body;
    let cases = catalog();
    assert!(cases.len() >= 30);
    for c in &cases {
        // As customer 1: the catalog is about input, not privileges.
        let customer = app.customer(1);
        let mut headers = vec![("authorization", customer.as_str())];
        if let Some(ct) = c.content_type {
            headers.push(("content-type", ct));
        }
        let r = app
            .request(Method::POST, "/orders", &headers, c.body.clone())
            .await;
        assert_eq!(
            r.status.as_u16(),
            c.status,
            "{}: {:?}",
            c.name,
            String::from_utf8_lossy(&r.body)
        );
        let body = r.json();
        assert_eq!(body["error"], c.code, "{}: {body}", c.name);
        assert!(
            !body["detail"].as_str().unwrap_or("").is_empty(),
            "{}: {body}",
            c.name
        );
    }
    assert_eq!(
        app.get("/healthz").await.status,
        200,
        "the server is still up"
    );
    assert_eq!(
        app.get("/products").await.body,
        before,
        "inventory unchanged"
    );
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 0);
    app.assert_books_balance().await;
}

#[tokio::test]
async fn field_errors_name_the_field() {
    let app = TestApp::spawn().await;
    let r = app
        .request(Method::POST, "/orders", &[("content-type", JSON)], r#"{"user_id":1,"items":[{"product_id":1,"quantity":1},{"product_id":2,"quantity":null}]}"#)
        .await;
    let body = r.assert_problem(400, "invalid_request");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .starts_with("items[1].quantity"),
        "{body}"
    );
}

#[tokio::test]
async fn a_declared_body_over_the_cap_is_refused_before_it_is_read() {
    let app = TestApp::spawn().await;
    let r = app
        .request(
            Method::POST,
            "/orders",
            &[("content-type", JSON)],
            vec![b' '; 65 * 1024],
        )
        .await;
    r.assert_problem(413, "payload_too_large");
}

#[tokio::test]
async fn a_chunked_body_is_cut_off_at_the_cap_without_a_declared_length() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn().await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        app.customer(1)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // 80 chunks of 1 KiB: past the 64 KiB cap, with no length announced up front.
    let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
    for _ in 0..80 {
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            break; // the server may answer and close before the rest is sent
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("\"error\":\"payload_too_large\""), "{text}");
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 0);
}

#[tokio::test]
async fn control_characters_in_any_text_field_are_a_400_not_a_500() {
    let app = TestApp::spawn().await;
    let json = [("content-type", JSON)];
    for (method, path, body) in [
        // NUL: PostgreSQL text cannot hold it, and this once reached the database (500).
        (
            Method::POST,
            "/products/1/inventory",
            r#"{"delta":1,"reason":"restock","note":"a\u0000b"}"#,
        ),
        (
            Method::POST,
            "/products/1/inventory",
            r#"{"delta":1,"reason":"restock","note":"line\u001bbreak"}"#,
        ),
        (
            Method::POST,
            "/products/1/inventory",
            r#"{"delta":1,"reason":"restock\u0000","note":"x"}"#,
        ),
        (
            Method::POST,
            "/products",
            r#"{"sku":"A\u0000B","name":"x","price_cents":1}"#,
        ),
        (
            Method::POST,
            "/products",
            r#"{"sku":"OK-1","name":"x\u0000y","price_cents":1}"#,
        ),
        (Method::PATCH, "/products/1", r#"{"name":"tab\there"}"#),
    ] {
        let r = app.request(method.clone(), path, &json, body).await;
        r.assert_problem(400, "invalid_request");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM inventory_movements WHERE reason <> 'initial'")
            .await,
        0
    );
    app.assert_books_balance().await;
}

#[tokio::test]
async fn invented_methods_and_paths_cannot_grow_the_metrics() {
    let port = crate::faults::free_port().to_string();
    let app = TestApp::spawn_on(crate::helpers::admin_url(), &[("METRICS_PORT", &port)]).await;
    for i in 0..40 {
        let method = Method::from_bytes(format!("INVENTED{i}").as_bytes()).unwrap();
        let r = app
            .request(method, &format!("/nowhere-{i}/x"), &[], "")
            .await;
        assert!(r.status.is_client_error(), "{}", r.status);
    }
    // Not on the public port: on METRICS_PORT, which serves nothing else.
    app.get("/metrics").await.assert_problem(404, "not_found");
    let scraper = TestApp::attach(port.parse().unwrap(), &app.db_url).await;
    scraper
        .get("/orders/1")
        .await
        .assert_problem(404, "not_found");
    scraper
        .request(Method::POST, "/metrics", &[], "")
        .await
        .assert_problem(405, "method_not_allowed");
    let metrics = String::from_utf8(scraper.get("/metrics").await.body.to_vec()).unwrap();
    assert!(metrics.contains("tally_http_requests_total"), "{metrics}");
    assert!(!metrics.contains("INVENTED"), "a raw method became a label");
    assert!(!metrics.contains("/nowhere-"), "a raw path became a label");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tally_http_requests_total")
                && l.contains("method=\"other\"")
                && l.contains("route=\"unmatched\"")),
        "invented methods are counted as other"
    );
}
