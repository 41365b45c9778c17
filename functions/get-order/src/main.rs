//! The `get-order` function as a standalone server (one Knative Service).

fn main() -> std::process::ExitCode {
    tally_shared::app::App::new("get-order", get_order::routes()).run()
}
