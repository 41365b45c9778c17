//! The modules of `shared` form layers, top to bottom, and a module uses only modules of layers
//! below its own. Read from the sources: every `crate::` path outside comments and test modules
//! (groups and nested groups included, across lines), and the crate root's re-exports
//! (`crate::AppState` is the router's). A new module must be given a layer here.

use std::collections::{BTreeMap, BTreeSet};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// Top to bottom; README's Layout and `lib.rs` describe the same order.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["app"],
    &["runtime", "lambda"],
    &["idempotency"],
    &["service", "sql"],
    &["router"],
    &["replica"],
    &["auth", "meters", "events"],
    &["http", "db", "jwks"],
    &["config", "error", "migrate", "catalog", "telemetry"],
    &["pg", "encode", "roles"],
];

/// The code of a file without comments and without its test module.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first segment of every item a `crate::` path names: `crate::a::b`, `crate::{a, b::{C, d}}`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if rest.starts_with('{') {
            let mut depth = 0;
            let mut end = rest.len();
            for (i, c) in rest.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            found.extend(top_level_items(&rest[1..end]));
        } else {
            found.push(ident(rest));
        }
    }
    found
}

/// The first segment of each item of a group, nested groups skipped over.
fn top_level_items(group: &str) -> Vec<String> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(ident(group[start..i].trim_start()));
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(ident(group[start..].trim_start()));
    items.retain(|s| !s.is_empty());
    items
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// `pub use module::{A, B}` in lib.rs: the module each re-exported name comes from.
fn re_exports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for statement in code(lib).split(';') {
        let Some(path) = statement.trim().strip_prefix("pub use ") else {
            continue;
        };
        let module = ident(path);
        let names = match path.find('{') {
            Some(i) => top_level_items(path[i + 1..].trim_end_matches('}')),
            None => vec![path.rsplit("::").next().unwrap_or("").trim().to_owned()],
        };
        for name in names {
            map.insert(name, module.clone());
        }
    }
    map
}

/// Each module and the modules it uses.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let lib = std::fs::read_to_string(format!("{SRC}/lib.rs")).unwrap();
    let exports = re_exports(&lib);
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(SRC).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path
            .extension()
            .filter(|e| *e == "rs")
            .and(path.file_stem())
            .and_then(|s| s.to_str())
        else {
            continue;
        };
        if name == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut uses = BTreeSet::new();
        for item in crate_paths(&code(&text)) {
            if path.with_file_name(format!("{item}.rs")).is_file() {
                uses.insert(item);
            } else if let Some(module) = exports.get(&item) {
                uses.insert(module.clone());
            }
        }
        uses.remove(name);
        graph.insert(name.to_owned(), uses);
    }
    graph
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

#[test]
fn every_module_uses_only_layers_below_its_own() {
    let graph = graph();
    assert!(graph.len() >= 10, "read the modules: {graph:?}");
    for (module, uses) in &graph {
        let own = layer_of(module)
            .unwrap_or_else(|| panic!("shared/src/{module}.rs has no layer in tests/layers.rs"));
        for used in uses {
            let below = layer_of(used).is_some_and(|l| l > own);
            assert!(
                below,
                "{module} uses {used}, which is not in a layer below it"
            );
        }
    }
}

#[test]
fn the_check_reads_groups_nested_groups_re_exports_and_lines() {
    assert_eq!(
        crate_paths("use crate::{\n    db::{Pool, Connection},\n    lambda::serve, meters,\n};"),
        ["db", "lambda", "meters"]
    );
    assert_eq!(
        crate_paths("fn f() -> crate::Response { crate::x::y() }"),
        ["Response", "x"]
    );
    let exports = re_exports("pub use router::{AppState, Request};\npub use config::Config;");
    assert_eq!(exports["AppState"], "router");
    assert_eq!(exports["Config"], "config");
    assert_eq!(layer_of("cli"), Some(0));
    assert_eq!(layer_of("app"), Some(1));
    assert!(layer_of("router") < layer_of("http"));
}
