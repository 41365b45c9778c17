//! The `list-products` function as a standalone server (one Knative Service).

fn main() -> std::process::ExitCode {
    tally_shared::app::App::new("list-products", list_products::routes()).run()
}
