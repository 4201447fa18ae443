//! cachegate: a read-through caching reverse proxy with a Redis session gate and purge on write.
//!
//! The engine is a library so tests and benches can start it in-process; `main.rs` is only
//! the command line around it.

pub mod admin;
pub mod auth;
pub mod cache;
pub mod config;
pub mod metrics;
pub mod normalize;
pub mod proxy;
pub mod purge;
pub mod rules;
pub mod server;
