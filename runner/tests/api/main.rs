//! The API tests: one binary (linked once), every test against its own fresh database on a
//! real PostgreSQL, through real HTTP to the same router the local runner serves.

mod access;
mod admin;
mod backups;
mod bad_input;
mod conditional;
mod connections;
mod cors;
mod deploy;
mod events;
mod faults;
mod helpers;
mod identity;
mod keyed_writes;
mod lambda;
mod lifecycle;
mod list_orders;
mod openapi;
mod orders;
mod privileges;
mod processor;
mod products;
mod replica;
mod schema_compat;
mod shards;
mod storms;
mod tls;
