//! `tally`: runs every function on one port (see the README's Quick start).

fn main() -> std::process::ExitCode {
    tally::run()
}
