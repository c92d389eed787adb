//! The Prometheus metrics the bridge exports on `/metrics`, all prefixed `rtc_leave_bridge_`.
//! Label values are fixed vocabularies (never ids), so cardinality stays bounded.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub event: &'static str,
    pub outcome: &'static str,
}

/// `homeserver` is a server name: bounded by the homeservers whose users delegate here.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub action: &'static str,
    pub homeserver: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: &'static str,
    pub homeserver: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabel {
    pub trigger: &'static str,
}

/// A homeserver's server name, for metrics of requests made before anyone is authenticated:
/// bounded by [`Metrics::homeserver_label`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HomeserverLabel {
    pub homeserver: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub endpoint: &'static str,
    pub outcome: &'static str,
}

/// Why a user's room membership was checked (`purpose`: `token` — before a token or a
/// delegation —, `call` — a seated user after a departure), how (`via`: `appservice`, `bot`,
/// `none`) and what it found (`joined`, `not_joined`, `unchecked`, `failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MembershipCheckLabels {
    pub purpose: &'static str,
    pub via: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabel {
    pub change: &'static str,
}

/// Distinct homeserver labels at most; later ones are counted as `other`.
const HOMESERVER_LABELS: usize = 100;

/// What the engine task was busy with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InputLabel {
    pub input: &'static str,
}

/// A Redis round trip, by what it was for.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedisOpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: &'static str,
}

/// A request refused by a limit ([`LIMITS`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub endpoint: &'static str,
    pub limit: &'static str,
}

/// The `limit` label of `requests_limited_total`: the user's request rate, its homeserver's, or
/// its homeserver's OpenID checks already in flight.
pub const LIMITS: [&str; 3] = ["user_rate", "homeserver_rate", "homeserver_busy"];

/// What each Redis round trip is for (the `op` label of `redis_duration_seconds`).
pub const REDIS_OPS: [&str; 7] = ["tick", "acquire", "release", "load", "inbox_add", "inbox_read", "inbox_look"];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn engine_histogram() -> Histogram {
    // 10 µs .. ~20 s
    Histogram::new(exponential_buckets(0.000_01, 2.0, 22))
}

pub struct Metrics {
    registry: Registry,
    homeserver_labels: std::sync::Mutex<std::collections::HashSet<String>>,
    pub tokens: Family<TokenLabels, Counter>,
    pub openid_check_duration: HistogramFamily<HomeserverLabel>,
    pub room_creations: Family<OutcomeLabel, Counter>,
    pub membership_checks: Family<MembershipCheckLabels, Counter>,
    pub membership_changes: Family<ChangeLabel, Counter>,
    pub membership_removals: Family<ReasonLabel, Counter>,
    pub membership_rooms_closed: Counter,
    pub engine_busy: HistogramFamily<InputLabel>,
    pub jobs: Family<StateLabel, Gauge>,
    pub jobs_finished: Family<OutcomeLabel, Counter>,
    pub delegations: Family<OutcomeLabel, Counter>,
    pub webhooks: Family<WebhookLabels, Counter>,
    pub homeserver_requests: Family<CallLabels, Counter>,
    pub homeserver_request_duration: HistogramFamily<ActionLabels>,
    pub leave_latency: HistogramFamily<TriggerLabel>,
    pub late_restarts: Counter,
    pub livekit_requests: Family<OutcomeLabel, Counter>,
    pub reconciliations: Counter,
    pub reconciliation_departures: Counter,
    pub store_commit_duration: Histogram,
    pub store_errors: Counter,
    pub shards_owned: Gauge,
    pub instances: Gauge,
    pub lease_renewals: Family<OutcomeLabel, Counter>,
    pub handovers: Family<KindLabel, Counter>,
    pub redis_duration: HistogramFamily<RedisOpLabel>,
    pub calls_fenced: Family<ActionLabel, Counter>,
    pub calls_waiting: Family<ActionLabel, Gauge>,
    pub requests_limited: Family<LimitLabels, Counter>,
    pub connections: Gauge,
    pub connections_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rtc_leave_bridge");
        let m = Metrics {
            engine_busy: Family::new_with_constructor(engine_histogram),
            homeserver_labels: Default::default(),
            tokens: Family::default(),
            openid_check_duration: Family::new_with_constructor(latency_histogram),
            room_creations: Family::default(),
            membership_checks: Family::default(),
            membership_changes: Family::default(),
            membership_removals: Family::default(),
            membership_rooms_closed: Counter::default(),
            jobs: Family::default(),
            jobs_finished: Family::default(),
            delegations: Family::default(),
            webhooks: Family::default(),
            homeserver_requests: Family::default(),
            homeserver_request_duration: Family::new_with_constructor(latency_histogram),
            leave_latency: Family::new_with_constructor(latency_histogram),
            late_restarts: Counter::default(),
            livekit_requests: Family::default(),
            reconciliations: Counter::default(),
            reconciliation_departures: Counter::default(),
            store_commit_duration: latency_histogram(),
            store_errors: Counter::default(),
            shards_owned: Gauge::default(),
            instances: Gauge::default(),
            lease_renewals: Family::default(),
            handovers: Family::default(),
            redis_duration: Family::new_with_constructor(latency_histogram),
            calls_fenced: Family::default(),
            calls_waiting: Family::default(),
            requests_limited: Family::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("jobs", "Tracked delegations by lifecycle state", m.jobs.clone());
        registry.register("jobs_finished", "Delegations ended, by outcome", m.jobs_finished.clone());
        registry.register("delegations", "Delegation requests by outcome", m.delegations.clone());
        registry.register("webhooks", "LiveKit webhooks by event and outcome", m.webhooks.clone());
        registry.register(
            "homeserver_requests",
            "Delayed-event calls to homeservers by action and outcome",
            m.homeserver_requests.clone(),
        );
        registry.register(
            "homeserver_request_duration_seconds",
            "Duration of delayed-event calls to homeservers",
            m.homeserver_request_duration.clone(),
        );
        registry.register(
            "leave_latency_seconds",
            "From knowing a member is gone to the homeserver accepting its leave",
            m.leave_latency.clone(),
        );
        registry.register(
            "late_restarts",
            "Restarts issued after the delayed event's estimated deadline",
            m.late_restarts.clone(),
        );
        registry.register("livekit_requests", "RoomService calls by outcome", m.livekit_requests.clone());
        registry.register("reconciliations", "Reconciliation passes against RoomService", m.reconciliations.clone());
        registry.register(
            "reconciliation_departures",
            "Members found gone only by reconciliation (their departure webhook was lost)",
            m.reconciliation_departures.clone(),
        );
        registry.register(
            "store_commit_duration_seconds",
            "Duration of durable store commits",
            m.store_commit_duration.clone(),
        );
        registry.register("store_errors", "Failed store operations", m.store_errors.clone());
        registry.register("tokens", "LiveKit tokens requested, by endpoint and outcome", m.tokens.clone());
        registry.register(
            "openid_check_duration_seconds",
            "Duration of OpenID token checks with the member's homeserver",
            m.openid_check_duration.clone(),
        );
        registry.register(
            "room_creations",
            "LiveKit rooms opened for full-access users, by outcome",
            m.room_creations.clone(),
        );
        registry.register(
            "membership_checks",
            "Room membership checks (before a token or a delegation, and of seated users after a departure), by how the room was seen and what was found",
            m.membership_checks.clone(),
        );
        registry.register(
            "membership_changes",
            "Room membership changes the homeserver pushed (appservice transactions), by change",
            m.membership_changes.clone(),
        );
        registry.register(
            "membership_removals",
            "LiveKit participants removed because their user is no longer joined to the Matrix room, by why",
            m.membership_removals.clone(),
        );
        registry.register(
            "membership_rooms_closed",
            "LiveKit rooms closed because the homeserver has left their Matrix room (RTC_LEAVE_BRIDGE_CLOSE_ABANDONED_ROOMS)",
            m.membership_rooms_closed.clone(),
        );
        registry.register(
            "engine_busy_seconds",
            "Time the engine task spent on one input, by kind: every job waits meanwhile",
            m.engine_busy.clone(),
        );
        registry.register(
            "shards_owned",
            "Shards of jobs this instance drives (with Redis; 64 in all, spread over the instances)",
            m.shards_owned.clone(),
        );
        registry.register(
            "instances",
            "Live instances sharing the Redis prefix, as this one sees them",
            m.instances.clone(),
        );
        registry.register(
            "lease_renewals",
            "Renewals of this instance's shard leases: renewed, lost (another instance holds it), failed (Redis unreachable)",
            m.lease_renewals.clone(),
        );
        registry.register(
            "handovers",
            "Shards acquired, released (handed over on purpose) and lost (lease ran out) by this instance",
            m.handovers.clone(),
        );
        registry.register(
            "redis_duration_seconds",
            "Duration of Redis round trips, by purpose",
            m.redis_duration.clone(),
        );
        registry.register(
            "calls_fenced",
            "Homeserver calls not made because this instance's lease on the job's shard had too little time left",
            m.calls_fenced.clone(),
        );
        registry.register(
            "calls_waiting",
            "Homeserver calls issued and waiting for a slot (each homeserver has its own cap, homeservers take turns)",
            m.calls_waiting.clone(),
        );
        registry.register(
            "requests_limited",
            "Token and delegation requests refused with 429, by endpoint and the limit they hit",
            m.requests_limited.clone(),
        );
        registry.register("http_connections", "Client connections open on the public listener", m.connections.clone());
        registry.register(
            "http_connections_refused",
            "Client connections closed at once because the listener had RTC_LEAVE_BRIDGE_MAX_CONNECTIONS open",
            m.connections_refused.clone(),
        );
        // Every family from the start, at zero for each of its known label values, so that
        // dashboards show 0 rather than "No data" and rate-based alerts can fire on the first
        // event ("avoid missing metrics").
        for state in crate::lifecycle::PhaseKind::LIVE {
            let _ = m.jobs.get_or_create(&StateLabel { state: state.as_str() });
        }
        for outcome in ["sent", "gone", "expired", "unconfirmed", "superseded"] {
            let _ = m.jobs_finished.get_or_create(&OutcomeLabel { outcome });
        }
        for outcome in [
            "accepted",
            "replaced",
            "repeated",
            "conflict",
            "over_user_limit",
            "limited",
            "invalid",
            "unauthorized",
            "forbidden",
            "unavailable",
        ] {
            let _ = m.delegations.get_or_create(&OutcomeLabel { outcome });
        }
        for event in
            ["participant_joined", "participant_left", "participant_connection_aborted", "room_finished", "other"]
        {
            for outcome in ["accepted", "ignored", "duplicate", "queued", "unavailable"] {
                let _ = m.webhooks.get_or_create(&WebhookLabels { event, outcome });
            }
        }
        for outcome in ["forged", "malformed"] {
            let _ = m.webhooks.get_or_create(&WebhookLabels { event: "unknown", outcome });
        }
        for trigger in ["departed", "reconciled", "never_joined", "grace_expired", "room_finished"] {
            let _ = m.leave_latency.get_or_create(&TriggerLabel { trigger });
        }
        for outcome in ["ok", "error"] {
            let _ = m.livekit_requests.get_or_create(&OutcomeLabel { outcome });
            let _ = m.room_creations.get_or_create(&OutcomeLabel { outcome });
        }
        for (via, outcomes) in [
            ("appservice", &["joined", "not_joined", "failed"][..]),
            ("bot", &["joined", "not_joined", "unchecked", "failed"][..]),
            ("none", &["unchecked"][..]),
        ] {
            for &outcome in outcomes {
                for purpose in ["token", "call"] {
                    let _ = m.membership_checks.get_or_create(&MembershipCheckLabels { purpose, via, outcome });
                }
            }
        }
        for reason in ["left", "kicked", "banned", "gone"] {
            let _ = m.membership_removals.get_or_create(&ReasonLabel { reason });
        }
        for change in ["joined", "left", "kicked", "banned"] {
            let _ = m.membership_changes.get_or_create(&ChangeLabel { change });
        }
        for endpoint in ["get_token", "sfu_get", "proxied_get_token"] {
            for outcome in ["issued", "limited", "invalid", "unauthorized", "forbidden", "unavailable"] {
                let _ = m.tokens.get_or_create(&TokenLabels { endpoint, outcome });
            }
        }
        for input in crate::engine::Input::ALL {
            let _ = m.engine_busy.get_or_create(&InputLabel { input: input.as_str() });
        }
        for outcome in ["renewed", "lost", "failed"] {
            let _ = m.lease_renewals.get_or_create(&OutcomeLabel { outcome });
        }
        for kind in ["acquired", "released", "lost"] {
            let _ = m.handovers.get_or_create(&KindLabel { kind });
        }
        for op in REDIS_OPS {
            let _ = m.redis_duration.get_or_create(&RedisOpLabel { op });
        }
        for action in ["restart", "send"] {
            let _ = m.calls_fenced.get_or_create(&ActionLabel { action });
            let _ = m.calls_waiting.get_or_create(&ActionLabel { action });
        }
        for endpoint in ["get_token", "sfu_get", "delegate", "proxied_get_token", "proxied_delegate"] {
            for limit in LIMITS {
                let _ = m.requests_limited.get_or_create(&LimitLabels { endpoint, limit });
            }
        }
        Metrics { registry, ..m }
    }

    /// Shows the per-homeserver families at zero for homeservers the configuration names (others
    /// appear with their first call).
    pub fn preset_homeservers<'a>(&self, servers: impl IntoIterator<Item = &'a str>) {
        use crate::homeserver::delayed_events::CallOutcome;
        for server in servers {
            let homeserver = self.homeserver_label(server);
            let _ = self.openid_check_duration.get_or_create(&HomeserverLabel { homeserver: homeserver.clone() });
            for action in ["restart", "send"] {
                let labels = ActionLabels { action, homeserver: homeserver.clone() };
                let _ = self.homeserver_request_duration.get_or_create(&labels);
                for outcome in CallOutcome::ALL {
                    let labels = CallLabels { action, homeserver: homeserver.clone(), outcome: outcome.as_str() };
                    let _ = self.homeserver_requests.get_or_create(&labels);
                }
            }
        }
    }

    /// `server` as a label value, or `other` once as many distinct homeservers have been seen
    /// as a label can afford (anyone may name any server before being authenticated).
    pub fn homeserver_label(&self, server: &str) -> String {
        let mut seen = self.homeserver_labels.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(server) {
            return server.to_owned();
        }
        if seen.len() < HOMESERVER_LABELS {
            seen.insert(server.to_owned());
            return server.to_owned();
        }
        "other".to_owned()
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_the_documented_names() {
        let m = Metrics::new();
        m.webhooks.get_or_create(&WebhookLabels { event: "participant_left", outcome: "accepted" }).inc();
        m.leave_latency.get_or_create(&TriggerLabel { trigger: "departed" }).observe(0.05);
        let text = m.encode();
        for name in [
            "rtc_leave_bridge_jobs{state=\"connected\"} 0",
            "rtc_leave_bridge_webhooks_total{event=\"participant_left\",outcome=\"accepted\"} 1",
            "rtc_leave_bridge_leave_latency_seconds_bucket",
            "rtc_leave_bridge_late_restarts_total 0",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }

    /// Each family shows a sample before anything happened.
    #[test]
    fn every_family_has_samples_from_the_start() {
        let m = Metrics::new();
        m.preset_homeservers(["hs.test"]);
        let text = m.encode();
        let families: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        assert!(families.len() >= 17, "{families:?}");
        for family in families {
            assert!(
                text.lines().any(|l| !l.starts_with('#') && l.starts_with(family)),
                "{family} has no sample at start:\n{text}"
            );
        }
        assert!(text.contains(r#"rtc_leave_bridge_webhooks_total{event="participant_left",outcome="accepted"} 0"#));
        assert!(text.contains(
            r#"rtc_leave_bridge_homeserver_requests_total{action="send",homeserver="hs.test",outcome="auth"} 0"#
        ));
    }

    #[test]
    fn homeserver_labels_are_bounded() {
        let m = Metrics::new();
        for i in 0..HOMESERVER_LABELS {
            assert_eq!(m.homeserver_label(&format!("hs{i}.test")), format!("hs{i}.test"));
        }
        assert_eq!(m.homeserver_label("one-too-many.test"), "other");
        assert_eq!(m.homeserver_label("hs7.test"), "hs7.test", "those seen keep their label");
    }
}
