//! The `list-orders` function as a standalone server (one Knative Service).

fn main() -> std::process::ExitCode {
    tally_shared::app::App::new("list-orders", list_orders::routes()).run()
}
