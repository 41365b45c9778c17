//! The same functions under AWS Lambda: API Gateway HTTP API (payload v2), REST API (v1) and
//! Function URL events through lambda_http's conversion and the shared router give the same
//! statuses, headers and bodies as HTTP through hyper; and a function binary in Lambda mode
//! serves invocations from a Lambda Runtime API on loopback.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tally_shared::{AppState, db};

use crate::faults::free_port;
use crate::helpers::{TestApp, admin_url, fresh_database, jwt_env, test_config};

/// Who calls: nobody, customer 1, customer 2, or the admin.
#[derive(Clone, Copy)]
enum Who {
    Anonymous,
    Customer(i64),
    Admin,
}

struct Case {
    method: Method,
    path: &'static str,
    who: Who,
    content_type: Option<&'static str>,
    body: Option<&'static str>,
}

fn case(method: Method, path: &'static str, who: Who, body: Option<&'static str>) -> Case {
    Case {
        method,
        path,
        who,
        content_type: body.map(|_| "application/json"),
        body,
    }
}

/// Every route, happy and unhappy, in an order that makes sense from an empty order book.
fn cases() -> Vec<Case> {
    use Who::*;
    let order = Some(r#"{"items":[{"product_id":1,"quantity":2}]}"#);
    vec![
        case(Method::GET, "/healthz", Anonymous, None),
        case(Method::GET, "/products", Anonymous, None),
        case(Method::GET, "/products?limit=2", Anonymous, None),
        case(Method::GET, "/products/2", Anonymous, None),
        case(Method::GET, "/products/abc", Anonymous, None),
        case(Method::POST, "/orders", Customer(1), order),
        case(
            Method::POST,
            "/orders",
            Customer(1),
            Some(r#"{"items":[{"product_id":2,"quantity":1},{"product_id":2,"quantity":1}]}"#),
        ),
        case(
            Method::POST,
            "/orders",
            Customer(1),
            Some(r#"{"items":[{"product_id":3,"quantity":5}]}"#),
        ),
        case(
            Method::POST,
            "/orders",
            Customer(1),
            Some(r#"{"items":[{"product_id":1,"quantity":"#),
        ),
        case(Method::POST, "/orders", Anonymous, order),
        Case {
            method: Method::POST,
            path: "/orders",
            who: Customer(1),
            content_type: Some("text/plain"),
            body: order,
        },
        case(Method::GET, "/orders/1", Customer(1), None),
        case(Method::GET, "/orders/1", Customer(2), None),
        case(Method::GET, "/orders/99", Customer(1), None),
        case(Method::POST, "/orders/1/cancel", Customer(1), None),
        case(Method::POST, "/orders/1/cancel", Customer(1), None),
        case(Method::DELETE, "/orders/1", Customer(1), None),
        case(
            Method::POST,
            "/products",
            Admin,
            Some(r#"{"sku":"LAMBDA-1","name":"Lambda lamp","price_cents":1234,"inventory":3}"#),
        ),
        case(
            Method::POST,
            "/products",
            Customer(1),
            Some(r#"{"sku":"NOPE","name":"x","price_cents":1}"#),
        ),
        case(
            Method::PATCH,
            "/products/1",
            Admin,
            Some(r#"{"price_cents":5999}"#),
        ),
        case(
            Method::POST,
            "/products/1/inventory",
            Admin,
            Some(r#"{"delta":-1000,"reason":"adjustment"}"#),
        ),
        case(
            Method::POST,
            "/products/1/inventory",
            Admin,
            Some(r#"{"delta":7,"reason":"restock"}"#),
        ),
        case(Method::GET, "/nowhere", Anonymous, None),
    ]
}

/// What a response must agree on across adapters: status, the headers clients read, and the
/// body with timestamps masked (each run has its own clock).
#[derive(Debug, PartialEq)]
struct Outcome {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

fn outcome(status: u16, headers: &http::HeaderMap, body: &[u8]) -> Outcome {
    let keep = [
        "content-type",
        "location",
        "allow",
        "www-authenticate",
        "link",
        "retry-after",
        "idempotent-replayed",
    ];
    let headers = keep
        .iter()
        .filter_map(|k| {
            headers
                .get(*k)
                .map(|v| (k.to_string(), v.to_str().unwrap().to_owned()))
        })
        .collect();
    let mut body = serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    mask_times(&mut body);
    Outcome {
        status,
        headers,
        body,
    }
}

fn mask_times(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if k.ends_with("_at") {
                    *v = json!("<time>");
                } else {
                    mask_times(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mask_times),
        _ => {}
    }
}

fn authorization(app: &TestApp, who: Who) -> Option<String> {
    match who {
        Who::Anonymous => None,
        Who::Customer(id) => Some(app.customer(id)),
        Who::Admin => Some(app.admin()),
    }
}

/// The three event shapes Lambda delivers HTTP requests in.
#[derive(Clone, Copy, Debug)]
enum Shape {
    HttpApiV2,
    RestApiV1,
    FunctionUrl,
}

/// A realistic event for one request. Bodies are base64-encoded when `base64` (as API Gateway
/// does for binary media types).
fn event(
    shape: Shape,
    method: &Method,
    path_and_query: &str,
    headers: &[(&str, String)],
    body: Option<&str>,
    base64: bool,
) -> String {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let query_map: serde_json::Map<String, Value> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .map(|(k, v)| (k.to_owned(), json!(v)))
        .collect();
    let mut header_map: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let (body, is_b64) = match body {
        Some(b) if base64 => (json!(STANDARD.encode(b)), true),
        Some(b) => (json!(b), false),
        None => (Value::Null, false),
    };
    match shape {
        Shape::HttpApiV2 | Shape::FunctionUrl => {
            let domain = match shape {
                Shape::FunctionUrl => {
                    "abcdefghijklmnopqrstuvwxyz012345.lambda-url.us-east-1.on.aws"
                }
                _ => "r4nd0m1d.execute-api.us-east-1.amazonaws.com",
            };
            header_map.insert("host".into(), json!(domain));
            json!({
                "version": "2.0",
                "routeKey": "$default",
                "rawPath": path,
                "rawQueryString": query,
                "headers": header_map,
                "queryStringParameters": if query_map.is_empty() { Value::Null } else { Value::Object(query_map) },
                "requestContext": {
                    "accountId": "123456789012",
                    "apiId": domain.split('.').next().unwrap(),
                    "domainName": domain,
                    "domainPrefix": domain.split('.').next().unwrap(),
                    "http": {"method": method.as_str(), "path": path, "protocol": "HTTP/1.1", "sourceIp": "203.0.113.7", "userAgent": "curl/8.5.0"},
                    "requestId": "JKJaXmPLvHcESHA=",
                    "routeKey": "$default",
                    "stage": "$default",
                    "time": "25/Nov/2026:19:00:00 +0000",
                    "timeEpoch": 1_795_633_200_000_u64
                },
                "body": body,
                "isBase64Encoded": is_b64
            })
            .to_string()
        }
        Shape::RestApiV1 => {
            header_map.insert(
                "Host".into(),
                json!("r4nd0m1d.execute-api.us-east-1.amazonaws.com"),
            );
            let multi_headers: serde_json::Map<String, Value> = header_map
                .iter()
                .map(|(k, v)| (k.clone(), json!([v])))
                .collect();
            let multi_query: serde_json::Map<String, Value> = query_map
                .iter()
                .map(|(k, v)| (k.clone(), json!([v])))
                .collect();
            json!({
                "resource": "/{proxy+}",
                "path": path,
                "httpMethod": method.as_str(),
                "headers": header_map,
                "multiValueHeaders": multi_headers,
                "queryStringParameters": if query_map.is_empty() { Value::Null } else { Value::Object(query_map) },
                "multiValueQueryStringParameters": if multi_query.is_empty() { Value::Null } else { Value::Object(multi_query) },
                "pathParameters": {"proxy": path.trim_start_matches('/')},
                "stageVariables": null,
                "requestContext": {
                    "accountId": "123456789012",
                    "resourceId": "us4z18",
                    "stage": "prod",
                    "requestId": "41b45ea3-70b5-11e6-b7bd-69b5aaebc7d9",
                    "identity": {"sourceIp": "203.0.113.7", "userAgent": "curl/8.5.0"},
                    "resourcePath": "/{proxy+}",
                    "httpMethod": method.as_str(),
                    "apiId": "r4nd0m1d",
                    "path": format!("/prod{path}"),
                    "protocol": "HTTP/1.1",
                    "requestTimeEpoch": 1_795_633_200_000_u64,
                    "domainName": "r4nd0m1d.execute-api.us-east-1.amazonaws.com"
                },
                "body": body,
                "isBase64Encoded": is_b64
            })
            .to_string()
        }
    }
}

fn request_headers(app: &TestApp, c: &Case) -> Vec<(&'static str, String)> {
    let mut headers = Vec::new();
    if let Some(ct) = c.content_type {
        headers.push(("content-type", ct.to_owned()));
    }
    if let Some(auth) = authorization(app, c.who) {
        headers.push(("authorization", auth));
    }
    headers
}

async fn through_hyper() -> Vec<Outcome> {
    let app = TestApp::spawn().await;
    let mut out = Vec::new();
    for c in cases() {
        let mut headers: Vec<(&str, String)> = request_headers(&app, &c);
        if matches!(c.who, Who::Anonymous) {
            headers.push(("authorization", crate::helpers::NO_AUTH.to_owned()));
        }
        let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = app
            .request(
                c.method.clone(),
                c.path,
                &refs,
                c.body.unwrap_or("").to_owned(),
            )
            .await;
        out.push(outcome(r.status.as_u16(), &r.headers, &r.body));
    }
    out
}

async fn through_lambda(shape: Shape) -> Vec<Outcome> {
    let app = TestApp::spawn().await;
    let config = test_config(&app.db_url, &[]);
    let state = AppState::new(db::lazy_pool(&config, "lambda-test").unwrap(), config).unwrap();
    let router = tally::app().router();
    let mut out = Vec::new();
    for (i, c) in cases().into_iter().enumerate() {
        let headers = request_headers(&app, &c);
        // Every other body arrives base64-encoded, as API Gateway sends binary media types.
        let json = event(shape, &c.method, c.path, &headers, c.body, i % 2 == 1);
        let request = lambda_http::request::from_str(&json)
            .unwrap_or_else(|e| panic!("{shape:?} event: {e}"));
        let response = tally_shared::lambda::answer(request, &router, state.clone()).await;
        let body: &[u8] = response.body().as_ref();
        out.push(outcome(
            response.status().as_u16(),
            response.headers(),
            body,
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_adapters_answer_every_case_the_same() {
    let expected = through_hyper().await;
    let statuses: Vec<u16> = expected.iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        vec![
            200, 200, 200, 200, 400, 201, 201, 409, 400, 401, 415, 200, 404, 404, 200, 409, 405,
            201, 403, 200, 409, 200, 404
        ]
    );
    for shape in [Shape::HttpApiV2, Shape::RestApiV1, Shape::FunctionUrl] {
        let got = through_lambda(shape).await;
        for (i, (want, got)) in expected.iter().zip(&got).enumerate() {
            let c = &cases()[i];
            assert_eq!(got, want, "{shape:?}: case {i} {} {}", c.method, c.path);
        }
    }
}

/// A Lambda Runtime API on loopback: hands out queued events on `/next`, collects what the
/// function posts to `/response` and `/error`.
#[derive(Default)]
struct RuntimeApi {
    events: Mutex<VecDeque<(String, String)>>,
    responses: Mutex<Vec<(String, String, Value)>>,
}

async fn runtime_api(api: Arc<RuntimeApi>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let api = api.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(runtime_api_answer(request, &api).await) }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

async fn runtime_api_answer(
    request: hyper::Request<hyper::body::Incoming>,
    api: &RuntimeApi,
) -> hyper::Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    if path == "/2018-06-01/runtime/invocation/next" {
        loop {
            let next = api.events.lock().unwrap().pop_front();
            if let Some((id, event)) = next {
                return hyper::Response::builder()
                    .header("lambda-runtime-aws-request-id", id)
                    .header("lambda-runtime-deadline-ms", "9999999999999")
                    .header("lambda-runtime-invoked-function-arn", "arn:aws:lambda:us-east-1:123456789012:function:create-order")
                    .header("lambda-runtime-trace-id", "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(event)))
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let body = request.into_body().collect().await.unwrap().to_bytes();
    if let ["2018-06-01", "runtime", "invocation", id, kind] = parts.as_slice() {
        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        api.responses
            .lock()
            .unwrap()
            .push((id.to_string(), kind.to_string(), value));
    }
    hyper::Response::builder()
        .status(202)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_binary_in_lambda_mode_serves_runtime_api_invocations() {
    let db_url = fresh_database(admin_url()).await;
    let app = TestApp::attach(free_port(), &db_url).await;
    tally_shared::migrate::seed_if_empty(&app.db).await.unwrap();
    let api = Arc::new(RuntimeApi::default());
    let customer = app.customer(1);
    let json = ("content-type", "application/json".to_owned());
    let auth = ("authorization", customer.clone());
    let order = r#"{"items":[{"product_id":1,"quantity":3}]}"#;
    api.events.lock().unwrap().extend([
        (
            "inv-1".to_owned(),
            event(
                Shape::HttpApiV2,
                &Method::POST,
                "/orders",
                &[json.clone(), auth.clone()],
                Some(order),
                false,
            ),
        ),
        (
            "inv-2".to_owned(),
            event(
                Shape::FunctionUrl,
                &Method::POST,
                "/orders",
                &[json.clone(), auth.clone()],
                Some(order),
                true,
            ),
        ),
        (
            "inv-3".to_owned(),
            event(
                Shape::RestApiV1,
                &Method::POST,
                "/orders",
                &[json.clone(), auth.clone()],
                Some("{oops"),
                false,
            ),
        ),
        (
            "inv-4".to_owned(),
            event(
                Shape::HttpApiV2,
                &Method::POST,
                "/orders",
                &[json],
                Some(order),
                false,
            ),
        ),
        (
            "inv-5".to_owned(),
            event(Shape::HttpApiV2, &Method::GET, "/healthz", &[], None, false),
        ),
    ]);
    let port = runtime_api(api.clone()).await;
    let mut child = tokio::process::Command::new(
        env!("CARGO_BIN_EXE_tally").replace("/tally", "/fn-create-order"),
    )
    .env("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{port}"))
    .env("AWS_LAMBDA_FUNCTION_NAME", "create-order")
    .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
    .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
    .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/create-order")
    .env("AWS_LAMBDA_LOG_STREAM_NAME", "2026/11/25/[$LATEST]abc")
    .env("DATABASE_URL", crate::helpers::as_app(&db_url))
    .env("LOG_LEVEL", "warn")
    .envs(jwt_env())
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while api.responses.lock().unwrap().len() < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "responses: {:?}",
            api.responses.lock().unwrap()
        );
        assert!(child.try_wait().unwrap().is_none(), "the function exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.start_kill();
    let responses = api.responses.lock().unwrap().clone();
    let by_id = |id: &str| responses.iter().find(|(i, _, _)| i == id).cloned().unwrap();
    let status_and_body = |id: &str| {
        let (_, kind, v) = by_id(id);
        assert_eq!(kind, "response", "{id}: {v}");
        let body: Value =
            serde_json::from_str(v["body"].as_str().unwrap_or("null")).unwrap_or(Value::Null);
        (v["statusCode"].as_u64().unwrap(), body, v)
    };
    let (status, body, raw) = status_and_body("inv-1");
    assert_eq!(status, 201, "{raw}");
    assert_eq!(body["total_cents"], 3 * 4999);
    assert_eq!(raw["isBase64Encoded"], false, "JSON goes back as text");
    assert_eq!(status_and_body("inv-2").0, 201, "a base64 body is decoded");
    let (status, body, _) = status_and_body("inv-3");
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_json"))
    );
    let (status, body, raw) = status_and_body("inv-4");
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    assert!(raw.to_string().contains("Bearer realm"), "{raw}");
    let (_, _, raw) = by_id("inv-5");
    assert_eq!(raw["statusCode"], 200);
    assert_eq!(raw["body"], "ok");
    assert_eq!(
        app.inventory(1).await,
        44,
        "two orders of 3 placed through Lambda"
    );
    app.assert_books_balance().await;
}
