//! The `cancel-order` function as a standalone server (one Knative Service).

fn main() -> std::process::ExitCode {
    tally_shared::app::App::new("cancel-order", cancel_order::routes()).run()
}
