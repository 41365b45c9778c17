//! The AWS Lambda adapter: the same router and handlers, driven by `lambda_http` instead of
//! hyper when the process runs inside Lambda (`AWS_LAMBDA_RUNTIME_API` is set). API Gateway
//! REST (payload v1), HTTP API (v2) and Function URL events all arrive as `http::Request`s;
//! base64 bodies are decoded by `lambda_http`. The pool lives as long as the execution
//! environment, across invocations.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use lambda_http::Body;
use lambda_http::request::RequestContext;

use crate::error::ApiError;
use crate::router::{AppState, Router};
use crate::service::{BODY_LIMIT, respond};

/// Answers invocations until the runtime stops. Call only when [`crate::Config::on_lambda`].
pub async fn serve(router: Router, state: AppState) -> Result<(), lambda_http::Error> {
    let router = Arc::new(router);
    lambda_http::run(lambda_http::service_fn(
        move |event: lambda_http::Request| {
            let (router, state) = (router.clone(), state.clone());
            async move { Ok::<_, Infallible>(answer(event, &router, state).await) }
        },
    ))
    .await
}

/// One invocation: the event's request through the same path as an HTTP request, and the
/// response back as text when it is UTF-8 (so API Gateway does not base64 JSON), else binary.
pub async fn answer(
    event: lambda_http::Request,
    router: &Router,
    state: AppState,
) -> http::Response<Body> {
    let (mut parts, body) = event.into_parts();
    strip_stage(&mut parts);
    let bytes = body_bytes(body);
    let response = respond(parts, std::future::ready(bytes), router, state).await;
    let (parts, body) = response.into_parts();
    let body = if body.is_empty() {
        Body::Empty
    } else {
        match String::from_utf8(body.to_vec()) {
            Ok(text) => Body::Text(text),
            Err(e) => Body::Binary(e.into_bytes()),
        }
    };
    http::Response::from_parts(parts, body)
}

/// lambda_http puts a REST API's (or a named HTTP API stage's) stage in front of the path
/// (`/prod/orders/1`); the routes are the same with or without one, so take it off again.
fn strip_stage(parts: &mut http::request::Parts) {
    let stage = match parts.extensions.get::<RequestContext>() {
        Some(RequestContext::ApiGatewayV1(ctx)) => ctx.stage.clone(),
        Some(RequestContext::ApiGatewayV2(ctx)) => ctx.stage.clone(),
        _ => None,
    };
    let Some(stage) = stage.filter(|s| s != "$default" && !s.is_empty()) else {
        return;
    };
    let prefix = format!("/{stage}");
    let path = parts.uri.path();
    let Some(rest) = path
        .strip_prefix(&prefix)
        .filter(|r| r.is_empty() || r.starts_with('/'))
    else {
        return;
    };
    let rest = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_owned(),
    };
    let mut uri = http::uri::Builder::new().path_and_query(path_and_query);
    if let Some(scheme) = parts.uri.scheme() {
        uri = uri.scheme(scheme.clone());
    }
    if let Some(authority) = parts.uri.authority() {
        uri = uri.authority(authority.clone());
    }
    if let Ok(uri) = uri.build() {
        parts.uri = uri;
    }
}

fn body_bytes(body: Body) -> Result<Bytes, ApiError> {
    let bytes: &[u8] = body.as_ref();
    if bytes.len() > BODY_LIMIT {
        return Err(ApiError::PayloadTooLarge { limit: BODY_LIMIT });
    }
    Ok(Bytes::copy_from_slice(bytes))
}
