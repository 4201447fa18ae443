//! Integration tests: one binary, many tests running in parallel, each with its own
//! redis-server, origin and cachegate.

mod auth;
mod cache;
mod caching;
mod cli;
mod hardening;
mod l1;
mod layers;
mod memory;
mod proxy;
mod purge;
mod reload;
mod support;
mod topology;
