//! Tokens from a real identity provider: keys from a JWKS served on loopback, chosen by `kid`,
//! rotated mid-test (the retired key's tokens are refused), a flood of unknown `kid`s that
//! fetches the keys once, string subjects that become users on first sight (once, under the
//! read-only role too), and the operator's switches: no provisioning, external subjects only,
//! and the role claim's name.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use hyper::service::service_fn;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestResponse, as_readonly, jwt_env};

const RSA_PRIVATE: &str = include_str!("../fixtures/test-rsa-private.pem");
const EC_PRIVATE: &str = include_str!("../fixtures/test-ec-private.pem");

/// A provider's signing key: its `kid`, algorithm and private half.
struct Signer {
    kid: &'static str,
    algorithm: Algorithm,
    key: EncodingKey,
}

fn rsa(kid: &'static str) -> Signer {
    Signer {
        kid,
        algorithm: Algorithm::RS256,
        key: EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    }
}

fn ec(kid: &'static str) -> Signer {
    Signer {
        kid,
        algorithm: Algorithm::ES256,
        key: EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    }
}

impl Signer {
    /// The public JWK the provider publishes for this key.
    fn jwk(&self) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.key, self.algorithm).unwrap();
        jwk.common.key_id = Some(self.kid.to_owned());
        jwk
    }

    /// `Bearer <token>` for `sub` with extra claims, signed with this key and naming `kid`.
    fn bearer(&self, kid: &str, sub: &str, extra: Value) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let mut claims = json!({"sub": sub, "exp": exp});
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        let mut header = Header::new(self.algorithm);
        header.kid = Some(kid.to_owned());
        format!(
            "Bearer {}",
            jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
        )
    }
}

/// A JWKS endpoint on loopback whose keys the test swaps, counting its fetches.
struct Provider {
    addr: SocketAddr,
    keys: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

impl Provider {
    async fn start(signers: &[&Signer]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let provider = Self {
            addr: listener.local_addr().unwrap(),
            keys: Arc::default(),
            fetches: Arc::default(),
        };
        provider.publish(signers);
        let (keys, fetches) = (provider.keys.clone(), provider.fetches.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (keys, fetches) = (keys.clone(), fetches.clone());
                let service = service_fn(move |_request| {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    let body = keys.lock().unwrap().clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        provider
    }

    /// From now on the provider publishes exactly these keys.
    fn publish(&self, signers: &[&Signer]) {
        let set = JwkSet {
            keys: signers.iter().map(|s| s.jwk()).collect(),
        };
        *self.keys.lock().unwrap() = serde_json::to_string(&set).unwrap();
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// The settings for a JWKS provider beside the fixed test secret, with `extra` on top.
fn settings<'a>(url: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut vars = jwt_env().to_vec();
    // The provider's tokens carry no issuer or audience.
    vars.retain(|(k, _)| *k == "JWT_HS256_SECRET");
    vars.push(("JWT_JWKS_URL", url));
    vars.push(("JWT_JWKS_MIN_REFRESH_SECS", "1"));
    vars.extend_from_slice(extra);
    vars
}

async fn get_as(app: &TestApp, path: &str, authorization: &str) -> TestResponse {
    app.request(Method::GET, path, &[("authorization", authorization)], "")
        .await
}

async fn user_of(app: &TestApp, subject: &str) -> Option<i64> {
    app.db
        .query_opt("SELECT id FROM users WHERE external_id = $1", &[&subject])
        .await
        .unwrap()
        .map(|row| row.get(0))
}

#[tokio::test]
async fn keys_are_chosen_by_kid_and_a_rotation_retires_the_old_one() {
    let (old, new) = (rsa("2026-01"), ec("2026-07"));
    let provider = Provider::start(&[&old]).await;
    let url = provider.url();
    let app = TestApp::spawn_on(crate::helpers::admin_url(), &settings(&url, &[])).await;
    let alice = "auth0|64b1f0c2e4a1";

    let r = get_as(&app, "/orders", &old.bearer(old.kid, alice, json!({}))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id = user_of(&app, alice)
        .await
        .expect("provisioned on first sight");
    let order = app
        .post_json_as(
            &old.bearer(old.kid, alice, json!({})),
            "/orders",
            &json!({"items": [{"product_id": 1, "quantity": 1}]}),
        )
        .await;
    assert_eq!(order.status, 201, "{:?}", order.body);
    assert_eq!(order.json()["user_id"], id);
    assert_eq!(provider.fetches(), 1);

    // The provider rotates: only the new key is published. Its first token is an unknown kid,
    // which fetches the keys again (after the refresh floor), and then the old key is gone.
    provider.publish(&[&new]);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let r = get_as(&app, "/orders", &new.bearer(new.kid, alice, json!({}))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json().as_array().unwrap().len(), 1, "the same user");
    assert_eq!(provider.fetches(), 2);
    let retired = get_as(&app, "/orders", &old.bearer(old.kid, alice, json!({}))).await;
    retired.assert_problem(401, "unauthorized");

    // A key used with another kid's name, or HMAC under a published kid: refused.
    let forged = get_as(&app, "/orders", &old.bearer(new.kid, alice, json!({}))).await;
    forged.assert_problem(401, "unauthorized");
    let hmac = jsonwebtoken::encode(
        &Header {
            kid: Some(new.kid.into()),
            ..Header::new(Algorithm::HS256)
        },
        &json!({"sub": alice, "exp": 4_000_000_000u64}),
        &EncodingKey::from_secret(serde_json::to_string(&new.jwk()).unwrap().as_bytes()),
    )
    .unwrap();
    get_as(&app, "/orders", &format!("Bearer {hmac}"))
        .await
        .assert_problem(401, "unauthorized");
    // The fixed key still verifies the tokens `tally token` mints (no kid, numeric sub).
    assert_eq!(get_as(&app, "/orders", &app.customer(1)).await.status, 200);
    assert_eq!(user_of(&app, "1").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_unknown_kids_fetches_the_keys_once_and_a_dead_provider_is_503() {
    let signer = ec("real");
    let provider = Provider::start(&[&signer]).await;
    let url = provider.url();
    let app = Arc::new(
        TestApp::spawn_on(
            crate::helpers::admin_url(),
            &settings(&url, &[("JWT_JWKS_MIN_REFRESH_SECS", "60")]),
        )
        .await,
    );
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (app, bearer) = (
                app.clone(),
                signer.bearer(&format!("forged-{i}"), "x", json!({})),
            );
            tokio::spawn(async move { get_as(&app, "/orders", &bearer).await.status })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 401);
    }
    assert_eq!(provider.fetches(), 1, "one fetch for 200 unknown kids");
    assert_eq!(
        get_as(&app, "/orders", &signer.bearer("real", "x", json!({})))
            .await
            .status,
        200
    );

    // No key set was ever fetched (nothing listens there): 503, not a 401 blaming the token.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}/jwks", closed.local_addr().unwrap());
    drop(closed);
    let orphan = TestApp::serve(app.db_url.clone(), &settings(&dead, &[])).await;
    get_as(&orphan, "/orders", &signer.bearer("real", "x", json!({})))
        .await
        .assert_problem(503, "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_subject_becomes_one_user_even_when_its_first_call_is_a_read() {
    let signer = ec("k1");
    let provider = Provider::start(&[&signer]).await;
    let url = provider.url();
    let app = TestApp::spawn().await;
    // list-orders alone, connected as the read-only role, as it is deployed.
    let readonly = as_readonly(&app.db_url);
    let mut extra = settings(&url, &[]);
    extra.push(("DATABASE_URL", &readonly));
    let reader = Arc::new(
        app.spawn_function("list-orders", list_orders::routes(), &extra)
            .await,
    );
    let subject = "7d3f2c1e-9a4b-4c8d-b1e2-0f6a5d4c3b2a";
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (reader, bearer) = (reader.clone(), signer.bearer("k1", subject, json!({})));
            tokio::spawn(async move { get_as(&reader, "/orders", &bearer).await.status })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM users WHERE external_id = '{subject}'"
        ))
        .await,
        1
    );
    // The role still writes nothing of its own.
    let db = tally_shared::pg::connect(&readonly).await.unwrap();
    let denied = db
        .execute("INSERT INTO users (external_id) VALUES ('sneaky')", &[])
        .await;
    assert!(denied.is_err(), "the read-only role inserted a user");
}

#[tokio::test]
async fn the_operator_chooses_provisioning_numeric_subjects_and_the_role_claim() {
    let signer = ec("k1");
    let provider = Provider::start(&[&signer]).await;
    let url = provider.url();
    let app = TestApp::spawn_on(crate::helpers::admin_url(), &settings(&url, &[])).await;
    let known = "okta|00u1known";
    assert_eq!(
        get_as(&app, "/orders", &signer.bearer("k1", known, json!({})))
            .await
            .status,
        200
    );

    // Provisioning off: a known subject still works, a new one is 401 and gets no row.
    let closed = app
        .spawn_function(
            "list-orders",
            list_orders::routes(),
            &settings(&url, &[("JWT_PROVISION_USERS", "false")]),
        )
        .await;
    let bearer = signer.bearer("k1", known, json!({}));
    assert_eq!(get_as(&closed, "/orders", &bearer).await.status, 200);
    get_as(
        &closed,
        "/orders",
        &signer.bearer("k1", "okta|00u1new", json!({})),
    )
    .await
    .assert_problem(401, "unauthorized");
    assert_eq!(user_of(&app, "okta|00u1new").await, None);

    // A provider's "1" is the provider's user 1, never ours: always an external subject.
    app.order(1, &[(1, 1)]).await;
    let r = get_as(&app, "/orders", &signer.bearer("k1", "1", json!({}))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!([]), "not user 1's orders");
    let provider_one = user_of(&app, "1").await.expect("provisioned");
    assert_ne!(provider_one, 1);
    // The fixed key's "1" is user 1, as `tally token` mints it, unless the operator makes every
    // subject external: then it is the same external subject "1" as the provider's.
    assert_eq!(
        get_as(&app, "/orders", &app.customer(1))
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let strict = app
        .spawn_function(
            "list-orders",
            list_orders::routes(),
            &settings(&url, &[("JWT_EXTERNAL_SUBJECTS_ONLY", "true")]),
        )
        .await;
    let r = get_as(&strict, "/orders", &app.customer(1)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!([]),
        "the external subject's orders, not user 1's"
    );

    // The role from a nested array claim, as Keycloak puts it.
    let admins = app
        .spawn_function(
            "admin-products",
            admin_products::routes(),
            &settings(&url, &[("JWT_ROLE_CLAIM", "realm_access.roles")]),
        )
        .await;
    let restock = json!({"delta": 1, "reason": "restock"});
    let as_admin = signer.bearer(
        "k1",
        known,
        json!({"realm_access": {"roles": ["offline_access", "admin"]}}),
    );
    let r = admins
        .post_json_as(&as_admin, "/products/1/inventory", &restock)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let as_user = signer.bearer(
        "k1",
        known,
        json!({"realm_access": {"roles": ["offline_access"]}, "role": "admin"}),
    );
    admins
        .post_json_as(&as_user, "/products/1/inventory", &restock)
        .await
        .assert_problem(403, "forbidden");
}

#[tokio::test]
async fn a_provider_that_breaks_delays_nobody_whose_key_is_held() {
    let signer = ec("held");
    let provider = Provider::start(&[&signer]).await;
    let url = provider.url();
    let app = TestApp::spawn_on(
        crate::helpers::admin_url(),
        &settings(&url, &[("JWT_JWKS_MAX_AGE_SECS", "1")]),
    )
    .await;
    let bearer = signer.bearer("held", "okta|held", json!({}));
    assert_eq!(get_as(&app, "/orders", &bearer).await.status, 200);
    // The provider now answers garbage, and the keys we hold grow old.
    *provider.keys.lock().unwrap() = "<html>maintenance</html>".into();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    for _ in 0..5 {
        let started = std::time::Instant::now();
        assert_eq!(get_as(&app, "/orders", &bearer).await.status, 200);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }
    // A refresh was tried beside the requests (one: the floor is a second), and failed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(provider.fetches(), 2);
}
