//! The `cancel-order` function as a standalone server (one Knative Service).

fn main() -> std::process::ExitCode {
    tally_shared::app::run("cancel-order", cancel_order::routes())
}
