//! Authentication and authorisation: every refused token, who may see and do what, and the
//! operators' `tally token` command.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::Method;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::helpers::{
    NO_AUTH, TEST_AUDIENCE, TEST_ISSUER, TEST_SECRET, TestApp, jwt_env, order_body,
};

const RSA_PRIVATE: &str = include_str!("../fixtures/test-rsa-private.pem");
const RSA_PUBLIC: &str = include_str!("../fixtures/test-rsa-public.pem");
const EC_PRIVATE: &str = include_str!("../fixtures/test-ec-private.pem");
const EC_PUBLIC: &str = include_str!("../fixtures/test-ec-public.pem");

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims that pass every check; tests change one thing at a time.
fn good_claims() -> Value {
    json!({"sub": "1", "role": "customer", "exp": now() + 600, "iss": TEST_ISSUER, "aud": TEST_AUDIENCE})
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn with(changes: Value) -> Value {
    let mut claims = good_claims();
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

/// Sends `POST /orders` for user 1 with `Authorization: <authorization>`.
async fn order_with(app: &TestApp, authorization: &str) -> crate::helpers::TestResponse {
    app.post_json_as(authorization, "/orders", &order_body(1, &[(1, 1)]))
        .await
}

fn assert_unauthorized(r: &crate::helpers::TestResponse, case: &str) {
    assert_eq!(
        r.status,
        401,
        "{case}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        r.header("www-authenticate"),
        "Bearer realm=\"tally\"",
        "{case}"
    );
    let body = r.json();
    assert_eq!(body["error"], "unauthorized", "{case}");
    // The same words whatever was wrong: nothing to probe.
    assert_eq!(body["detail"], "a valid bearer token is required", "{case}");
}

#[tokio::test]
async fn protected_endpoints_need_a_token_and_the_catalog_does_not() {
    let app = TestApp::spawn().await;
    let protected = [
        (Method::POST, "/orders"),
        (Method::GET, "/orders/1"),
        (Method::POST, "/orders/1/cancel"),
        (Method::POST, "/products"),
        (Method::PATCH, "/products/1"),
        (Method::POST, "/products/1/inventory"),
    ];
    for (method, path) in protected {
        let r = app
            .request(
                method.clone(),
                path,
                &[
                    ("authorization", NO_AUTH),
                    ("content-type", "application/json"),
                ],
                "{}",
            )
            .await;
        assert_unauthorized(&r, &format!("{method} {path}"));
    }
    for path in ["/products", "/products/1", "/healthz"] {
        let r = app
            .request(Method::GET, path, &[("authorization", NO_AUTH)], "")
            .await;
        assert_eq!(r.status, 200, "{path}");
    }
}

#[tokio::test]
async fn every_bad_token_is_the_same_401() {
    let app = TestApp::spawn().await;
    let secret = TEST_SECRET.as_bytes();
    let good = hs256(&good_claims(), secret);
    assert_eq!(
        order_with(&app, &format!("Bearer {good}")).await.status,
        201,
        "the baseline token works"
    );

    let (head, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let forged_payload =
        URL_SAFE_NO_PAD.encode(with(json!({"sub": "2", "role": "admin"})).to_string());
    let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let none_payload = URL_SAFE_NO_PAD.encode(good_claims().to_string());
    let cases: Vec<(&str, String)> = vec![
        ("empty bearer", "Bearer ".into()),
        ("not a jwt", "Bearer abc".into()),
        ("basic auth", "Basic dXNlcjpwYXNz".into()),
        ("no scheme", good.clone()),
        (
            "expired one second ago",
            format!("Bearer {}", hs256(&with(json!({"exp": now() - 1})), secret)),
        ),
        (
            "not yet valid",
            format!(
                "Bearer {}",
                hs256(&with(json!({"nbf": now() + 60})), secret)
            ),
        ),
        (
            "wrong audience",
            format!(
                "Bearer {}",
                hs256(&with(json!({"aud": "someone-else"})), secret)
            ),
        ),
        (
            "no audience",
            format!("Bearer {}", hs256(&with(json!({"aud": null})), secret)),
        ),
        (
            "wrong issuer",
            format!("Bearer {}", hs256(&with(json!({"iss": "evil"})), secret)),
        ),
        (
            "no exp",
            format!("Bearer {}", hs256(&with(json!({"exp": null})), secret)),
        ),
        (
            "no sub",
            format!("Bearer {}", hs256(&with(json!({"sub": null})), secret)),
        ),
        // A string that is not an id is an external subject (see `identity`); these are not.
        (
            "sub not a string",
            format!("Bearer {}", hs256(&with(json!({"sub": 1})), secret)),
        ),
        (
            "sub over 255 bytes",
            format!(
                "Bearer {}",
                hs256(&with(json!({"sub": "a".repeat(256)})), secret)
            ),
        ),
        (
            "sub with a control character",
            format!(
                "Bearer {}",
                hs256(&with(json!({"sub": "al\u{7}ice"})), secret)
            ),
        ),
        (
            "unknown role",
            format!("Bearer {}", hs256(&with(json!({"role": "root"})), secret)),
        ),
        (
            "another secret",
            format!(
                "Bearer {}",
                hs256(&good_claims(), b"another-secret-another-secret-12345")
            ),
        ),
        (
            "tampered payload",
            format!("Bearer {head}.{forged_payload}.{signature}"),
        ),
        ("alg none", format!("Bearer {none_header}.{none_payload}.")),
        (
            "RS256 where HS256 is configured",
            format!(
                "Bearer {}",
                jsonwebtoken::encode(
                    &Header::new(Algorithm::RS256),
                    &good_claims(),
                    &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap()
                )
                .unwrap()
            ),
        ),
    ];
    for (case, authorization) in &cases {
        assert_unauthorized(&order_with(&app, authorization).await, case);
    }
    assert_eq!(
        app.count("SELECT count(*) FROM orders").await,
        1,
        "only the baseline order"
    );
}

#[tokio::test]
async fn with_an_rsa_public_key_the_hmac_algorithm_confusion_fails() {
    let app = TestApp::spawn_on(
        crate::helpers::admin_url(),
        &[
            ("JWT_PUBLIC_KEY_PEM", RSA_PUBLIC),
            ("JWT_ALGORITHM", "RS256"),
            ("JWT_AUDIENCE", TEST_AUDIENCE),
        ],
    )
    .await;
    let claims = good_claims();
    let rs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        order_with(&app, &format!("Bearer {rs256}")).await.status,
        201
    );
    // The classic attack: HMAC-sign with the public key, hoping it is used as the secret.
    let confused = hs256(&claims, RSA_PUBLIC.as_bytes());
    assert_unauthorized(
        &order_with(&app, &format!("Bearer {confused}")).await,
        "HS256 keyed with the public key",
    );
    let es256 = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_unauthorized(
        &order_with(&app, &format!("Bearer {es256}")).await,
        "ES256 where RS256 is configured",
    );
}

#[tokio::test]
async fn an_es256_identity_provider_works_too() {
    let app = TestApp::spawn_on(
        crate::helpers::admin_url(),
        &[
            ("JWT_PUBLIC_KEY_PEM", EC_PUBLIC),
            ("JWT_ALGORITHM", "ES256"),
        ],
    )
    .await;
    let es256 = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &good_claims(),
        &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        order_with(&app, &format!("Bearer {es256}")).await.status,
        201
    );
}

#[tokio::test]
async fn customers_order_for_themselves_and_admins_for_anyone() {
    let app = TestApp::spawn().await;
    let r = app
        .post_json_as(
            &app.customer(1),
            "/orders",
            &json!({"items": [{"product_id": 1, "quantity": 1}]}),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["user_id"], 1, "the user is the token's sub");
    app.post_json_as(&app.customer(1), "/orders", &order_body(2, &[(1, 1)]))
        .await
        .assert_problem(403, "forbidden");
    let r = app
        .post_json_as(&app.admin(), "/orders", &order_body(1, &[(1, 1)]))
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        r.json()["user_id"],
        1,
        "an admin orders on behalf of user 1"
    );
    assert_eq!(app.inventory(1).await, 48);
}

#[tokio::test]
async fn one_user_cannot_see_cancel_or_replay_another_users_order() {
    let app = TestApp::spawn().await;
    let a = app.order_keyed(1, &[(1, 2)], "same-key").await;
    assert_eq!(a.status, 201);
    let id = a.json()["order_id"].as_i64().unwrap();
    let (owner, other) = (app.customer(1), app.customer(2));

    let mine = app
        .request(
            Method::GET,
            &format!("/orders/{id}"),
            &[("authorization", &owner)],
            "",
        )
        .await;
    assert_eq!(mine.status, 200);
    let theirs = app
        .request(
            Method::GET,
            &format!("/orders/{id}"),
            &[("authorization", &other)],
            "",
        )
        .await;
    let missing = app
        .request(
            Method::GET,
            "/orders/999999",
            &[("authorization", &other)],
            "",
        )
        .await;
    theirs.assert_problem(404, "not_found");
    assert_eq!(
        theirs.json(),
        missing.json(),
        "indistinguishable from a missing order"
    );

    let cancel = app
        .request(
            Method::POST,
            &format!("/orders/{id}/cancel"),
            &[("authorization", &other)],
            "",
        )
        .await;
    cancel.assert_problem(404, "not_found");
    assert_eq!(app.inventory(1).await, 48, "not cancelled");

    // User 2 with user 1's key and body gets an order of its own, not user 1's response.
    let b = app.order_keyed(2, &[(1, 2)], "same-key").await;
    assert_eq!(b.status, 201);
    assert_eq!(b.header("idempotent-replayed"), "");
    assert_ne!(b.json()["order_id"], a.json()["order_id"]);
    assert_eq!(b.json()["user_id"], 2);

    let own_cancel = app
        .request(
            Method::POST,
            &format!("/orders/{id}/cancel"),
            &[("authorization", &owner)],
            "",
        )
        .await;
    assert_eq!(own_cancel.status, 200);
    let admin_read = app.get(&format!("/orders/{id}")).await;
    assert_eq!(
        admin_read.json()["order"]["status"],
        "CANCELLED",
        "admins read every order"
    );
    app.assert_books_balance().await;
}

#[tokio::test]
async fn customers_cannot_administer_inventory() {
    let app = TestApp::spawn().await;
    let customer = app.customer(1);
    let attempts = [
        (
            Method::POST,
            "/products",
            json!({"sku": "NEW-1", "name": "New", "price_cents": 1}),
        ),
        (Method::PATCH, "/products/1", json!({"price_cents": 1})),
        (
            Method::POST,
            "/products/1/inventory",
            json!({"delta": 100, "reason": "restock"}),
        ),
    ];
    for (method, path, body) in attempts {
        let r = app
            .request(
                method.clone(),
                path,
                &[
                    ("authorization", &customer),
                    ("content-type", "application/json"),
                ],
                body.to_string(),
            )
            .await;
        r.assert_problem(403, "forbidden");
    }
    assert_eq!(app.count("SELECT count(*) FROM products").await, 3);
    assert_eq!(app.inventory(1).await, 50);
}

#[tokio::test]
async fn the_token_command_mints_tokens_the_api_accepts() {
    let app = TestApp::spawn().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["token", "--sub", "2", "--role", "admin", "--ttl", "1h"])
        .envs(jwt_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let r = app
        .post_json_as(
            &format!("Bearer {token}"),
            "/products",
            &json!({"sku": "MINTED", "name": "Minted", "price_cents": 5}),
        )
        .await;
    assert_eq!(r.status, 201, "an admin token: {:?}", r.body);

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["token", "--sub", "2", "--role", "root"])
        .envs(jwt_env())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let no_key = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["token", "--sub", "2"])
        .env_remove("JWT_HS256_SECRET")
        .output()
        .unwrap();
    assert!(!no_key.status.success());
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("JWT_HS256_SECRET"));
}

#[tokio::test]
async fn a_short_hmac_secret_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("token")
        .args(["--sub", "1"])
        .env("JWT_HS256_SECRET", "short")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32 bytes"));
}

#[tokio::test]
async fn an_audience_array_that_holds_ours_is_accepted_and_one_that_does_not_is_refused() {
    let app = TestApp::spawn().await;
    // RFC 7519 allows an array; identity providers send one.
    let ours = hs256(
        &with(json!({"aud": ["https://other.example", TEST_AUDIENCE]})),
        TEST_SECRET.as_bytes(),
    );
    let r = order_with(&app, &format!("Bearer {ours}")).await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let theirs = hs256(
        &with(json!({"aud": ["https://other.example", "another-api"]})),
        TEST_SECRET.as_bytes(),
    );
    assert_unauthorized(
        &order_with(&app, &format!("Bearer {theirs}")).await,
        "audience array without ours",
    );
    let empty = hs256(&with(json!({"aud": []})), TEST_SECRET.as_bytes());
    assert_unauthorized(
        &order_with(&app, &format!("Bearer {empty}")).await,
        "empty audience array",
    );
}
