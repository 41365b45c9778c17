//! Hostile connections: a client that sends nothing, stalls inside an HTTP/2 preface or in
//! its headers, sends a huge header, or opens more connections than the server takes.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::TestApp;

/// Connects, sends `request`, and returns the connection with the status line's first 12
/// bytes (`HTTP/1.1 200`), or None when the server closed it first.
async fn send(app: &TestApp, request: &str) -> (TcpStream, Option<[u8; 12]>) {
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let _ = stream.write_all(request.as_bytes()).await;
    let mut first = [0u8; 12];
    let read = stream.read_exact(&mut first).await.ok().map(|_| first);
    (stream, read)
}

/// Reads until the server closes the connection; returns what it sent and how long that took.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the connection was still open after {limit:?}"
    );
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn silent_and_stalling_clients_are_cut_off_after_the_header_timeout() {
    let app = TestApp::spawn_on(
        crate::helpers::admin_url(),
        &[("HEADER_READ_TIMEOUT_MS", "300")],
    )
    .await;
    for (case, sent) in [
        ("sends nothing", ""),
        ("half an HTTP/2 preface", "PRI * HTTP/2.0\r\n"),
        (
            "headers that never end",
            "GET /products HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n",
        ),
    ] {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        stream.write_all(sent.as_bytes()).await.unwrap();
        let (_, took) = until_closed(&mut stream, Duration::from_secs(5)).await;
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{case}: closed after {took:?}"
        );
    }
    // A client that is quick enough is served as before.
    assert_eq!(app.get("/products").await.status, 200);
}

#[tokio::test]
async fn a_request_head_over_64_kib_is_refused() {
    let app = TestApp::spawn().await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let big = "a".repeat(200 * 1024);
    let request = format!("GET /products HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    // The server may stop reading before all of it is sent.
    let _ = stream.write_all(request.as_bytes()).await;
    let (answer, _) = until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{}",
        answer.lines().next().unwrap_or("")
    );
    // 60 KiB of headers is still fine.
    let fine = "a".repeat(60 * 1024);
    let r = app
        .request(
            http::Method::GET,
            "/products",
            &[("x-fine", fine.as_str())],
            "",
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let app = TestApp::spawn_on(crate::helpers::admin_url(), &[("MAX_CONNECTIONS", "2")]).await;
    let request = "GET /products HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let (stream, first) = send(&app, request).await;
        assert_eq!(first.as_ref(), Some(b"HTTP/1.1 200"));
        held.push(stream);
    }
    // Both slots are taken by kept-alive connections: a third is closed, not queued.
    let mut third = TcpStream::connect(app.addr).await.unwrap();
    let _ = third.write_all(request.as_bytes()).await;
    let (answer, took) = until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(answer.is_empty(), "{answer}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // A slot frees when a connection goes.
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let (_, Some(first)) = send(&app, request).await {
            assert_eq!(&first, b"HTTP/1.1 200");
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was not reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() {
    let app = TestApp::spawn_on(
        crate::helpers::admin_url(),
        &[("HEADER_READ_TIMEOUT_MS", "300")],
    )
    .await;
    let (mut stream, first) = send(&app, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(first.as_ref(), Some(b"HTTP/1.1 200"));
    // Kept alive, then silent: the wait for the next request head is bounded too.
    let (_, took) = until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn a_body_that_stalls_is_answered_408_and_its_connection_closed() {
    let app = TestApp::spawn_on(
        crate::helpers::admin_url(),
        &[("BODY_READ_TIMEOUT_MS", "300")],
    )
    .await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let token = app.customer(1);
    // 1 byte of a declared 100, then nothing.
    let head = format!(
        "POST /orders HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (answer, took) = until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\":\"request_timeout\""), "{answer}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 0);
}
