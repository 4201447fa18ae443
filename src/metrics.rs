//! One Prometheus registry and typed handles to everything cachegate counts.
//!
//! Handles that carry a rule label are resolved once per rule at start, so the request path
//! increments a counter without hashing label values or formatting strings. Labels are rule
//! names and static strings only: never paths, user ids or tokens.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::cache::Outcome;
use crate::cache::store::Op;

/// Per-rule handles, resolved at start.
pub struct RuleMetrics {
    outcomes: Vec<IntCounter>,
    auth: Vec<IntCounter>,
    purges: Vec<IntCounter>,
    pub upstream: Histogram,
}

/// Every metric cachegate exports.
pub struct Metrics {
    registry: Registry,
    rules: Vec<RuleMetrics>,
    store_errors: Vec<IntCounter>,
    store_duration: Vec<Histogram>,
    pub stale_generation_misses: IntCounter,
    pub purge_queue_depth: IntGauge,
    pub store_up: IntGauge,
    pub connections: IntGauge,
    /// Time requests waited on another request's fill (in-process or across instances).
    pub lock_wait: Histogram,
    /// Requests waiting on another request's fill right now.
    pub fill_waiters: IntGauge,
    /// Admin requests refused for a missing or wrong token (or rate-limited after those).
    pub admin_auth_failures: IntCounter,
    /// 1 when the JWT secret is shorter than 16 bytes (`allow_weak_jwt_secret`).
    pub auth_weak_secret: IntGauge,
    /// Bytes and items the embedded store holds (weighed with their overhead).
    pub store_bytes: IntGauge,
    pub store_entries: IntGauge,
    refreshes: Vec<IntCounter>,
}

/// Results of a background refresh.
pub const REFRESH_RESULTS: [&str; 4] = ["refreshed", "not_modified", "uncacheable", "error"];

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are static and registered once");
    c
}

impl Metrics {
    /// Build the registry for these rule names (the unmatched label is added last).
    pub fn new(rule_names: &[&str]) -> Metrics {
        let registry = Registry::new();
        let requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "cachegate_requests_total",
                    "Requests by rule and cache outcome.",
                ),
                &["rule", "outcome"],
            )
            .expect("valid metric"),
        );
        let upstream = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "cachegate_upstream_duration_seconds",
                    "Time from sending a request upstream to its response head.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["rule"],
            )
            .expect("valid metric"),
        );
        let purges = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "cachegate_purges_total",
                    "Purges (tag generation bumps) by rule and trigger.",
                ),
                &["rule", "trigger"],
            )
            .expect("valid metric"),
        );
        let auth = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "cachegate_auth_total",
                    "Session gate decisions by rule and result.",
                ),
                &["rule", "result"],
            )
            .expect("valid metric"),
        );
        let store_errors = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "cachegate_store_errors_total",
                    "Store calls that failed, timed out or were refused by the breaker.",
                ),
                &["op"],
            )
            .expect("valid metric"),
        );
        let store_duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "cachegate_store_duration_seconds",
                    "Store round-trip time by operation.",
                )
                .buckets(STORE_BUCKETS.to_vec()),
                &["op"],
            )
            .expect("valid metric"),
        );
        let stale_generation_misses = register(
            &registry,
            IntCounter::new(
                "cachegate_stale_generation_misses_total",
                "Entries found but dead because a tag was purged after they were filled.",
            )
            .expect("valid metric"),
        );
        let purge_queue_depth = register(
            &registry,
            IntGauge::new(
                "cachegate_purge_queue_depth",
                "Tag bumps waiting for the store to come back.",
            )
            .expect("valid metric"),
        );
        let store_up = register(
            &registry,
            IntGauge::new(
                "cachegate_store_up",
                "1 when the last store probe succeeded.",
            )
            .expect("valid metric"),
        );
        let connections = register(
            &registry,
            IntGauge::new(
                "cachegate_open_connections",
                "Client connections currently open.",
            )
            .expect("valid metric"),
        );
        let admin_auth_failures = register(
            &registry,
            IntCounter::new(
                "cachegate_admin_auth_failures_total",
                "Admin API requests refused for a missing or wrong token, or rate-limited after repeated failures.",
            )
            .expect("valid metric"),
        );
        let auth_weak_secret = register(
            &registry,
            IntGauge::new(
                "cachegate_auth_weak_secret",
                "1 when the JWT HMAC secret is shorter than 16 bytes (auth.allow_weak_jwt_secret).",
            )
            .expect("valid metric"),
        );
        let store_bytes = register(
            &registry,
            IntGauge::new(
                "cachegate_store_bytes",
                "Bytes held by the embedded store, each item weighed with its bookkeeping overhead.",
            )
            .expect("valid metric"),
        );
        let store_entries = register(
            &registry,
            IntGauge::new(
                "cachegate_store_entries",
                "Items held by the embedded store (entries, generations, sessions).",
            )
            .expect("valid metric"),
        );
        let fill_waiters = register(
            &registry,
            IntGauge::new(
                "cachegate_fill_waiters",
                "Requests waiting right now for another request's fill of the same key.",
            )
            .expect("valid metric"),
        );
        let lock_wait = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "cachegate_lock_wait_seconds",
                    "Time a request waited for another request's fill of the same key.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
        );
        let refreshes_vec = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "cachegate_background_refreshes_total",
                    "Background refreshes of stale entries (stale-while-revalidate) by result.",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        let refreshes = REFRESH_RESULTS
            .iter()
            .map(|r| refreshes_vec.with_label_values(&[r]))
            .collect();
        let rules = rule_names
            .iter()
            .copied()
            .chain(std::iter::once(crate::rules::UNMATCHED))
            .map(|name| RuleMetrics {
                outcomes: Outcome::ALL
                    .iter()
                    .map(|o| requests.with_label_values(&[name, o.as_str()]))
                    .collect(),
                auth: crate::auth::RESULTS
                    .iter()
                    .map(|r| auth.with_label_values(&[name, r]))
                    .collect(),
                purges: crate::purge::Trigger::ALL
                    .iter()
                    .map(|t| purges.with_label_values(&[name, t.as_str()]))
                    .collect(),
                upstream: upstream.with_label_values(&[name]),
            })
            .collect();
        let store_errors_h = Op::ALL
            .iter()
            .map(|op| store_errors.with_label_values(&[op.as_str()]))
            .collect();
        let store_duration_h = Op::ALL
            .iter()
            .map(|op| store_duration.with_label_values(&[op.as_str()]))
            .collect();
        Metrics {
            registry,
            rules,
            store_errors: store_errors_h,
            store_duration: store_duration_h,
            stale_generation_misses,
            purge_queue_depth,
            store_up,
            connections,
            lock_wait,
            fill_waiters,
            admin_auth_failures,
            auth_weak_secret,
            store_bytes,
            store_entries,
            refreshes,
        }
    }

    /// Handles of a rule; `None` selects the unmatched label.
    pub fn rule(&self, index: Option<usize>) -> &RuleMetrics {
        let i = index
            .unwrap_or(self.rules.len() - 1)
            .min(self.rules.len() - 1);
        &self.rules[i]
    }

    pub fn store_error(&self, op: Op, _why: &'static str) {
        self.store_errors[op as usize].inc();
    }

    pub fn store_duration(&self, op: Op, d: Duration) {
        self.store_duration[op as usize].observe(d.as_secs_f64());
    }

    /// Count a background refresh (`result` is one of `REFRESH_RESULTS`).
    pub fn refresh(&self, result: &str) {
        if let Some(i) = REFRESH_RESULTS.iter().position(|r| *r == result) {
            self.refreshes[i].inc();
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl RuleMetrics {
    pub fn outcome(&self, o: Outcome) {
        self.outcomes[o as usize].inc();
    }

    /// Count a purge.
    pub fn purge(&self, trigger: crate::purge::Trigger) {
        self.purges[trigger as usize].inc();
    }

    /// Count a session gate decision (`result` is one of `auth::RESULTS`).
    pub fn auth(&self, result: &str) {
        if let Some(i) = crate::auth::RESULTS.iter().position(|r| *r == result) {
            self.auth[i].inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_with_rule_labels() {
        let m = Metrics::new(&["user"]);
        m.rule(Some(0)).outcome(Outcome::Hit);
        m.rule(None).outcome(Outcome::Bypass);
        m.store_error(Op::Lookup, "timeout");
        let text = m.render();
        assert!(
            text.contains("cachegate_requests_total{outcome=\"hit\",rule=\"user\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("cachegate_requests_total{outcome=\"bypass\",rule=\"none\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("cachegate_store_errors_total{op=\"lookup\"} 1"),
            "{text}"
        );
    }
}
