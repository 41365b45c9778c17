//! The `admin-products` function as a standalone server (one Knative Service).

fn main() -> std::process::ExitCode {
    tally_shared::app::App::new("admin-products", admin_products::routes()).run()
}
