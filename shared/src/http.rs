//! Request parsing and response building shared by the handlers: JSON bodies, path ids,
//! query parameters. Bad input stops here, as a 4xx that names what was wrong.

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ApiError;

/// A request whose body has already been read (and capped) by the server.
pub type Request = http::Request<Bytes>;
pub type Response = http::Response<Bytes>;

/// Placeholders captured from the path, put in the request's extensions for the handler.
#[derive(Debug, Clone, Default)]
pub struct PathParams(Vec<(&'static str, String)>);

impl PathParams {
    pub fn new(params: Vec<(&'static str, String)>) -> Self {
        Self(params)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a JSON body into `T`, naming the offending field on a shape error.
///
/// Syntax errors (including invalid UTF-8 and nesting past serde_json's depth limit) are
/// `invalid_json`; well-formed JSON of the wrong shape is `invalid_request`. A number with a
/// zero fraction (`5.0`) is an integer, as JSON Schema and the OpenAPI contract count it, and
/// as a JavaScript client may write it; that is tried only after a first parse fails, so a
/// well-formed body is parsed once.
pub fn json_body<T: DeserializeOwned>(request: &Request) -> Result<T, ApiError> {
    require_json_content_type(request)?;
    let body = request.body();
    let mut de = serde_json::Deserializer::from_slice(body);
    let first = serde_path_to_error::deserialize(&mut de).map_err(shape_error);
    let value: T = match first {
        Ok(value) => value,
        Err(e) => {
            let Ok(mut parsed) = serde_json::from_slice::<Value>(body) else {
                return Err(e);
            };
            if !integral_floats_to_integers(&mut parsed) {
                return Err(e);
            }
            return serde_path_to_error::deserialize(parsed).map_err(shape_error);
        }
    };
    de.end()
        .map_err(|e| ApiError::InvalidJson(strip_position(&e)))?;
    Ok(value)
}

fn shape_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    match inner.classify() {
        serde_json::error::Category::Data => {
            let field = if path == "." { "body".to_owned() } else { path };
            ApiError::InvalidRequest(format!("{field}: {}", strip_position(&inner)))
        }
        _ => ApiError::InvalidJson(strip_position(&inner)),
    }
}

/// Rewrites every float with a zero fraction that an f64 holds exactly (|x| <= 2^53) as an
/// integer; says whether it rewrote any. Beyond 2^53 the text may not be what the client meant.
fn integral_floats_to_integers(value: &mut Value) -> bool {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match value {
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if x.fract() == 0.0 && x.abs() <= EXACT {
                // In range by the check above, so the cast is exact.
                *value = Value::from(x as i64);
                true
            } else {
                false
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |any, v| integral_floats_to_integers(v) | any),
        Value::Object(fields) => fields
            .values_mut()
            .fold(false, |any, v| integral_floats_to_integers(v) | any),
        _ => false,
    }
}

/// serde_json appends "at line 1 column 12"; the message reads better without it for shape
/// errors, and the position is kept for syntax errors where it helps.
fn strip_position(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    if e.classify() == serde_json::error::Category::Data
        && let Some((head, _)) = msg.rsplit_once(" at line ")
    {
        return head.to_owned();
    }
    msg
}

fn require_json_content_type(request: &Request) -> Result<(), ApiError> {
    let Some(value) = request.headers().get(header::CONTENT_TYPE) else {
        return Err(ApiError::UnsupportedMediaType);
    };
    let mime = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// A positive 64-bit id from the path placeholder `name`.
pub fn path_id(request: &Request, name: &str) -> Result<i64, ApiError> {
    let raw = request
        .extensions()
        .get::<PathParams>()
        .and_then(|p| p.get(name))
        .unwrap_or("");
    parse_id(raw)
        .ok_or_else(|| ApiError::InvalidId(format!("{name} must be a positive 64-bit integer")))
}

/// Digits only (no sign, no exponent, no fraction), greater than zero, fits in an i64.
pub fn parse_id(raw: &str) -> Option<i64> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse::<i64>().ok().filter(|id| *id > 0)
}

/// The query string as `(name, value)` pairs. Values are taken as they are: every parameter
/// this API reads is an integer, so percent-decoding would only hide bad input.
pub fn query_pairs(request: &Request) -> impl Iterator<Item = (&str, &str)> {
    request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// A JSON response from a serialisable value.
pub fn json_response(status: StatusCode, body: &impl Serialize) -> Result<Response, ApiError> {
    let bytes = serde_json::to_vec(body)
        .map_err(|e| ApiError::Internal(format!("serialising a response: {e}")))?;
    Ok(raw_json_response(status, Bytes::from(bytes)))
}

/// A JSON response whose body is already JSON text (built by Postgres, or stored for a replay).
pub fn raw_json_response(status: StatusCode, body: impl Into<Bytes>) -> Response {
    let mut response = http::Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A strong ETag for a representation: the first 128 bits of its SHA-256, quoted. Any change
/// to the bytes (a sale changing the stock included) changes it.
pub fn etag_of(body: &[u8]) -> HeaderValue {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(body);
    HeaderValue::from_str(&format!("\"{}\"", crate::encode::hex(&digest[..16])))
        .expect("hex in quotes is a valid header value")
}

/// Whether a conditional header names `etag`, or is `*` (RFC 9110, 13.1): `If-None-Match`
/// compares weakly (`W/"x"` names `"x"`), `If-Match` strongly (a weak tag names nothing). A
/// header that is not a list of quoted tags names nothing.
pub fn etag_listed(request: &Request, name: header::HeaderName, etag: &HeaderValue) -> bool {
    let (wanted, weak_ok) = (etag.as_bytes(), name == header::IF_NONE_MATCH);
    request.headers().get_all(name).iter().any(|value| {
        value.as_bytes().split(|&b| b == b',').any(|tag| {
            let tag = tag.trim_ascii();
            let tag = match tag.strip_prefix(b"W/") {
                Some(opaque) if weak_ok => opaque,
                Some(_) => return false,
                None => tag,
            };
            tag == b"*" || tag == wanted
        })
    })
}

/// A JSON representation with its `ETag` and `Cache-Control`: `304 Not Modified` (no body)
/// when the request's `If-None-Match` already names it, else `200` with the body.
pub fn conditional_json(request: &Request, body: Bytes, cache_control: &'static str) -> Response {
    let etag = etag_of(&body);
    let mut response = if etag_listed(request, header::IF_NONE_MATCH, &etag) {
        let mut response = http::Response::new(Bytes::new());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        raw_json_response(StatusCode::OK, body)
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag);
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_fraction_is_an_integer_and_nothing_else_is() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct Line {
            id: i64,
            n: Option<i64>,
        }
        let parse = |body: &str| {
            let request = http::Request::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Bytes::from(body.to_owned()))
                .unwrap();
            json_body::<Vec<Line>>(&request)
        };
        let lines =
            parse(r#"[{"id": 5.0, "n": -2.0}, {"id": 9007199254740992.0, "n": null}]"#).unwrap();
        assert_eq!(
            (lines[0].id, lines[0].n, lines[1].id),
            (5, Some(-2), 1 << 53)
        );
        for bad in [
            r#"[{"id": 1.5}]"#,
            r#"[{"id": 1e300}]"#,
            r#"[{"id": 18014398509481984.0}]"#,
            r#"[{"id": 5.0, "extra": 1}]"#,
            r#"[{"id": "5"}]"#,
        ] {
            assert!(
                matches!(parse(bad), Err(ApiError::InvalidRequest(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse(r#"[{"id": 5}] x"#),
            Err(ApiError::InvalidJson(_))
        ));
    }

    #[test]
    fn etags_are_matched_in_lists_weak_or_strong_and_by_star() {
        let etag = etag_of(b"{}");
        let with = |value: &str| {
            http::Request::builder()
                .header(header::IF_NONE_MATCH, value)
                .body(Bytes::new())
                .unwrap()
        };
        let tag = etag.to_str().unwrap().to_owned();
        for yes in [
            tag.clone(),
            format!("W/{tag}"),
            format!("\"x\", {tag}"),
            "*".into(),
        ] {
            assert!(
                etag_listed(&with(&yes), header::IF_NONE_MATCH, &etag),
                "{yes}"
            );
        }
        for no in ["\"x\"", "", "garbage", &tag[1..]] {
            assert!(
                !etag_listed(&with(no), header::IF_NONE_MATCH, &etag),
                "{no}"
            );
        }
        assert_ne!(etag_of(b"{\"a\":1}"), etag_of(b"{\"a\":2}"));
        // If-Match compares strongly: a weak tag never matches.
        let if_match = |value: &str| {
            http::Request::builder()
                .header(header::IF_MATCH, value)
                .body(Bytes::new())
                .unwrap()
        };
        assert!(etag_listed(&if_match(&tag), header::IF_MATCH, &etag));
        assert!(!etag_listed(
            &if_match(&format!("W/{tag}")),
            header::IF_MATCH,
            &etag
        ));
    }

    #[test]
    fn ids_are_positive_decimal_i64() {
        assert_eq!(parse_id("17"), Some(17));
        assert_eq!(parse_id("9223372036854775807"), Some(i64::MAX));
        for bad in [
            "",
            "0",
            "-1",
            "+1",
            "1.5",
            "abc",
            "1e3",
            "9223372036854775808",
            " 1",
        ] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }

    fn post(content_type: Option<&str>, body: &'static str) -> Request {
        let mut b = http::Request::builder().method("POST").uri("/x");
        if let Some(ct) = content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        b.body(Bytes::from_static(body.as_bytes())).unwrap()
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Shape {
        items: Vec<Line>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Line {
        quantity: i64,
    }

    #[test]
    fn shape_errors_name_the_field() {
        let e = json_body::<Shape>(&post(
            Some("application/json"),
            r#"{"items":[{"quantity":null}]}"#,
        ))
        .unwrap_err();
        assert_eq!(e.code(), "invalid_request");
        assert!(e.to_string().starts_with("items[0].quantity:"), "{e}");
    }

    #[test]
    fn syntax_errors_are_invalid_json() {
        let e = json_body::<Shape>(&post(Some("application/json"), r#"{"items":"#)).unwrap_err();
        assert_eq!(e.code(), "invalid_json");
        let e =
            json_body::<Shape>(&post(Some("application/json"), r#"{"items":[]} x"#)).unwrap_err();
        assert_eq!(e.code(), "invalid_json");
    }

    #[test]
    fn content_type_must_be_json() {
        assert_eq!(
            json_body::<Shape>(&post(None, "{}")).unwrap_err().code(),
            "unsupported_media_type"
        );
        assert_eq!(
            json_body::<Shape>(&post(Some("text/plain"), "{}"))
                .unwrap_err()
                .code(),
            "unsupported_media_type"
        );
        assert!(
            json_body::<Shape>(&post(
                Some("application/json; charset=utf-8"),
                r#"{"items":[]}"#
            ))
            .is_ok()
        );
    }
}
