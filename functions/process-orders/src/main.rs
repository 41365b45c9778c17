//! The order processor: `process-orders` serves POST / (one sweep per request, for a Knative
//! PingSource); `process-orders --every 1s` sweeps in a loop until SIGTERM.

fn main() -> std::process::ExitCode {
    process_orders::main(std::env::args().skip(1))
}
