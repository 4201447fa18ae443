//! One Prometheus registry and typed handles to everything cachegate counts.
//!
//! Labels are the fixed vocabularies of `labels` (resolved to handles once, so the request
//! path increments a counter without hashing label values or formatting strings) and rule
//! names. Per-rule handles are looked up by rule *name*, so they survive a reload that
//! keeps the rule, and the series of a rule a reload removes disappear. Labels are never
//! paths, user ids or tokens. This module counts; it decides nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::labels::{AuthResult, Label, Outcome, RefreshResult, ReloadResult, StoreOp, Trigger};

/// The rule label of requests no rule matched.
pub const UNMATCHED: &str = "none";

/// One counter per value of a label vocabulary, resolved at start.
pub struct Counters<L: Label> {
    handles: Vec<IntCounter>,
    _label: std::marker::PhantomData<L>,
}

impl<L: Label> Counters<L> {
    fn new(vec: &IntCounterVec, prefix: &[&str]) -> Self {
        let handles = L::ALL
            .iter()
            .map(|l| {
                let mut values: Vec<&str> = prefix.to_vec();
                values.push(l.as_str());
                vec.with_label_values(&values)
            })
            .collect();
        Counters {
            handles,
            _label: std::marker::PhantomData,
        }
    }

    pub fn inc(&self, label: L) {
        self.handles[label.index()].inc();
    }
}

/// Per-rule handles.
pub struct RuleMetrics {
    outcomes: Counters<Outcome>,
    auth: Counters<AuthResult>,
    purges: Counters<Trigger>,
    pub upstream: Histogram,
}

impl RuleMetrics {
    pub fn outcome(&self, o: Outcome) {
        self.outcomes.inc(o);
    }

    /// Count a purge.
    pub fn purge(&self, trigger: Trigger) {
        self.purges.inc(trigger);
    }

    /// Count a session gate decision.
    pub fn auth(&self, result: AuthResult) {
        self.auth.inc(result);
    }
}

/// Every metric cachegate exports.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    auth: IntCounterVec,
    purges: IntCounterVec,
    upstream: HistogramVec,
    rules: Mutex<HashMap<String, Arc<RuleMetrics>>>,
    store_errors: Counters<StoreOp>,
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
    /// The in-process tier: hits, lookups it could not answer, evictions to stay in bound.
    pub l1_hits: IntCounter,
    pub l1_misses: IntCounter,
    pub l1_evictions: IntCounter,
    pub l1_bytes: IntGauge,
    pub l1_entries: IntGauge,
    /// 1 while the Redis tracking connection is subscribed and acknowledged.
    pub tracking_state: IntGauge,
    /// Invalidations (keys, and flushes) the tracking connection delivered.
    pub invalidations: IntCounter,
    /// Times the acknowledged tracking connection was lost.
    pub tracking_losses: IntCounter,
    /// Times tracking was acknowledged (the coherence table then starts empty).
    pub tracking_acks: IntCounter,
    refreshes: Counters<RefreshResult>,
    reloads: Counters<ReloadResult>,
    /// When the configuration was last loaded successfully (start or reload).
    pub last_reload_success: IntGauge,
}

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

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help).expect("valid metric"))
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid metric"))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Build the registry; per-rule series appear as rules are looked up (`rule`).
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = counter_vec(
            &registry,
            "cachegate_requests_total",
            "Requests by rule and cache outcome.",
            &["rule", "outcome"],
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
        let purges = counter_vec(
            &registry,
            "cachegate_purges_total",
            "Purges (tag generation bumps) by rule and trigger.",
            &["rule", "trigger"],
        );
        let auth = counter_vec(
            &registry,
            "cachegate_auth_total",
            "Session gate decisions by rule and result.",
            &["rule", "result"],
        );
        let store_errors = counter_vec(
            &registry,
            "cachegate_store_errors_total",
            "Store calls that failed, timed out or were refused by the breaker.",
            &["op"],
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
        let refreshes = counter_vec(
            &registry,
            "cachegate_background_refreshes_total",
            "Background refreshes of stale entries (stale-while-revalidate) by result.",
            &["result"],
        );
        let reloads = counter_vec(
            &registry,
            "cachegate_config_reloads_total",
            "Configuration reloads (SIGHUP or admin POST /reload) by result.",
            &["result"],
        );
        let metrics = Metrics {
            store_errors: Counters::new(&store_errors, &[]),
            store_duration: StoreOp::ALL
                .iter()
                .map(|op| store_duration.with_label_values(&[op.as_str()]))
                .collect(),
            stale_generation_misses: counter(
                &registry,
                "cachegate_stale_generation_misses_total",
                "Entries found but dead because a tag was purged after they were filled.",
            ),
            purge_queue_depth: gauge(
                &registry,
                "cachegate_purge_queue_depth",
                "Tag bumps waiting for the store to come back.",
            ),
            store_up: gauge(
                &registry,
                "cachegate_store_up",
                "1 when the last store probe succeeded.",
            ),
            connections: gauge(
                &registry,
                "cachegate_open_connections",
                "Client connections currently open.",
            ),
            lock_wait: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "cachegate_lock_wait_seconds",
                        "Time a request waited for another request's fill of the same key.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .expect("valid metric"),
            ),
            fill_waiters: gauge(
                &registry,
                "cachegate_fill_waiters",
                "Requests waiting right now for another request's fill of the same key.",
            ),
            admin_auth_failures: counter(
                &registry,
                "cachegate_admin_auth_failures_total",
                "Admin API requests refused for a missing or wrong token, or rate-limited after repeated failures.",
            ),
            auth_weak_secret: gauge(
                &registry,
                "cachegate_auth_weak_secret",
                "1 when the JWT HMAC secret is shorter than 16 bytes (auth.allow_weak_jwt_secret).",
            ),
            store_bytes: gauge(
                &registry,
                "cachegate_store_bytes",
                "Bytes held by the embedded store, each item weighed with its bookkeeping overhead.",
            ),
            store_entries: gauge(
                &registry,
                "cachegate_store_entries",
                "Items held by the embedded store (entries, generations, sessions).",
            ),
            l1_hits: counter(
                &registry,
                "cachegate_l1_hits_total",
                "Hits answered from the in-process tier without reading the store's entry.",
            ),
            l1_misses: counter(
                &registry,
                "cachegate_l1_misses_total",
                "Lookups the in-process tier could not answer (absent, stale, not known to be current, or tracking down).",
            ),
            l1_evictions: counter(
                &registry,
                "cachegate_l1_evictions_total",
                "Entries evicted from the in-process tier to stay within its byte bound.",
            ),
            l1_bytes: gauge(
                &registry,
                "cachegate_l1_bytes",
                "Bytes held by the in-process tier, each entry weighed with its overhead.",
            ),
            l1_entries: gauge(
                &registry,
                "cachegate_l1_entries",
                "Entries held by the in-process tier.",
            ),
            tracking_state: gauge(
                &registry,
                "cachegate_tracking_state",
                "1 while the Redis tracking connection keeping the in-process tier coherent is subscribed, else 0.",
            ),
            invalidations: counter(
                &registry,
                "cachegate_invalidations_total",
                "Key invalidations and flushes delivered by Redis to the tracking connection (and this instance's own writes).",
            ),
            tracking_losses: counter(
                &registry,
                "cachegate_tracking_losses_total",
                "Times the Redis tracking connection was lost after it had been acknowledged (the in-process tier then waits for it).",
            ),
            tracking_acks: counter(
                &registry,
                "cachegate_tracking_acks_total",
                "Times the Redis tracking connection was subscribed and acknowledged (the coherence table then starts empty).",
            ),
            refreshes: Counters::new(&refreshes, &[]),
            reloads: Counters::new(&reloads, &[]),
            last_reload_success: gauge(
                &registry,
                "cachegate_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful configuration load (start or reload).",
            ),
            rules: Mutex::new(HashMap::new()),
            requests,
            auth,
            purges,
            upstream,
            registry,
        };
        metrics.rule(UNMATCHED);
        metrics
    }

    fn rules(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<RuleMetrics>>> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handles of a rule (`UNMATCHED` for requests no rule matched), created on first
    /// use and kept while the rule exists.
    pub fn rule(&self, name: &str) -> Arc<RuleMetrics> {
        let mut rules = self.rules();
        if let Some(r) = rules.get(name) {
            return r.clone();
        }
        let r = Arc::new(RuleMetrics {
            outcomes: Counters::new(&self.requests, &[name]),
            auth: Counters::new(&self.auth, &[name]),
            purges: Counters::new(&self.purges, &[name]),
            upstream: self.upstream.with_label_values(&[name]),
        });
        rules.insert(name.to_string(), r.clone());
        r
    }

    /// Drop the series of every rule not in `names` (a reload removed them).
    pub fn retain_rules(&self, names: &[&str]) {
        let mut rules = self.rules();
        let gone: Vec<String> = rules
            .keys()
            .filter(|n| n.as_str() != UNMATCHED && !names.contains(&n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            rules.remove(&name);
            for o in Outcome::ALL {
                let _ = self.requests.remove_label_values(&[&name, o.as_str()]);
            }
            for r in AuthResult::ALL {
                let _ = self.auth.remove_label_values(&[&name, r.as_str()]);
            }
            for t in Trigger::ALL {
                let _ = self.purges.remove_label_values(&[&name, t.as_str()]);
            }
            let _ = self.upstream.remove_label_values(&[&name]);
        }
    }

    pub fn store_error(&self, op: StoreOp) {
        self.store_errors.inc(op);
    }

    pub fn store_duration(&self, op: StoreOp, d: Duration) {
        self.store_duration[op.index()].observe(d.as_secs_f64());
    }

    /// Count a background refresh.
    pub fn refresh(&self, result: RefreshResult) {
        self.refreshes.inc(result);
    }

    /// Count a configuration reload; a success also stamps the time.
    pub fn reload(&self, result: ReloadResult) {
        self.reloads.inc(result);
        if result == ReloadResult::Success {
            self.loaded();
        }
    }

    /// Stamp a successful configuration load.
    pub fn loaded(&self) {
        self.last_reload_success
            .set(crate::clock::now_s().min(i64::MAX as u64) as i64);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_with_rule_labels() {
        let m = Metrics::new();
        m.rule("user").outcome(Outcome::Hit);
        m.rule(UNMATCHED).outcome(Outcome::Bypass);
        m.store_error(StoreOp::Lookup);
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

    #[test]
    fn a_removed_rule_takes_its_series_with_it() {
        let m = Metrics::new();
        m.rule("old").outcome(Outcome::Hit);
        m.rule("kept").outcome(Outcome::Miss);
        m.retain_rules(&["kept"]);
        let text = m.render();
        assert!(!text.contains("rule=\"old\""), "{text}");
        assert!(text.contains("rule=\"kept\""), "{text}");
        assert!(text.contains("rule=\"none\""), "{text}");
    }
}
