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
    let mut mounted = BTreeSet::from(["GET /healthz".to_owned(), "GET /openapi.json".to_owned()]);
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
