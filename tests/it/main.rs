//! Integration tests: one binary, many tests running in parallel, each with its own
//! redis-server, origin and cachegate.

mod auth;
mod cache;
mod caching;
mod cli;
mod hardening;
mod harness;
mod memory;
mod proxy;
mod purge;
