//! Wall-clock time as the cache reasons about it: unix milliseconds and seconds.
//!
//! A leaf: it imports nothing from the crate, so every module can use it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix time in seconds.
pub fn now_s() -> u64 {
    now_ms() / 1000
}
