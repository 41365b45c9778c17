//! The `list-products` function as a standalone server (one Knative Service).

fn main() -> std::process::ExitCode {
    tally_shared::app::run("list-products", list_products::routes())
}
