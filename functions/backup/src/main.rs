//! `backup`: `backup` serves POST / (one backup per request); `backup run`, `backup restore`,
//! `backup drill` and `backup list` are the commands (see `backup help`).

fn main() -> std::process::ExitCode {
    backup::main(std::env::args().skip(1))
}
