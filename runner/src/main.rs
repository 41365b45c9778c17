//! `tally`: runs every function on one port (see the README's Quick start), or mints a token.

fn main() -> std::process::ExitCode {
    tally::main(std::env::args().skip(1))
}
