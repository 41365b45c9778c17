//! The `create-order` function as a standalone server (one Knative Service).

fn main() -> std::process::ExitCode {
    tally_shared::app::App::new("create-order", create_order::routes()).run()
}
