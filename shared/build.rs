//! Rebuilds the crate when a migration or the seed changes: `embed_migrations!` and
//! `include_str!` read them at compile time, and cargo would not notice a new file otherwise.

fn main() {
    println!("cargo:rerun-if-changed=../sql/migrations");
    println!("cargo:rerun-if-changed=../sql/seed.sql");
}
