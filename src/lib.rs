//! cachegate: a read-through caching reverse proxy with a Redis session gate and purge on write.
//!
//! The engine is a library so tests and benches can start it in-process; `main.rs` is only
//! the command line around it. Modules are layered, each importing only from those below it
//! (a test fails on a cycle):
//!
//! ```text
//! server -> admin -> proxy -> app -> upstream, purge, config -> auth -> routing -> cache
//!        -> metrics -> labels; and the leaves clock, body, fields, normalize
//! ```

pub mod admin;
pub mod app;
pub mod auth;
pub mod body;
pub mod cache;
pub mod clock;
pub mod config;
pub mod fields;
pub mod labels;
pub mod log;
pub mod metrics;
pub mod normalize;
pub mod proxy;
pub mod purge;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod upstream;
