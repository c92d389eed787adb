//! Managing delayed events (MSC4140) on the member's homeserver: restarting and sending them,
//! looking one up as its owner, and classifying the answers for the lifecycle: 200 → done;
//! 404 `M_NOT_FOUND` / 409 → the event no longer exists; 429 → wait as told; anything else → retry
//! later (401/403 and an unknown endpoint are logged as configuration errors, since retrying will
//! not fix them by itself).
//!
//! Requests go to the stable paths (`/_matrix/client/v1/delayed_events/…`) when the homeserver
//! advertises them (`org.matrix.msc4140.stable` in `/versions`), else to the unstable ones; the
//! answer is cached per homeserver for an hour.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use url::Url;

use super::{Discovery, api_url};
use crate::delegation::{DelayRef, Delegation, Mode};
use crate::lifecycle::{HsAnswer, Millis};
use crate::metrics::{ActionLabels, CallLabels, Metrics};
pub use crate::ports::DelayedAction;

const UNSTABLE_PREFIX: &str = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events";
const STABLE_PREFIX: &str = "/_matrix/client/v1/delayed_events";
const STYLE_TTL: Duration = Duration::from_secs(3600);
const STYLE_CACHE_MAX: usize = 1_000;

/// Which management paths a homeserver serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathStyle {
    Unstable,
    Stable,
}

impl PathStyle {
    fn prefix(self) -> &'static str {
        match self {
            PathStyle::Unstable => UNSTABLE_PREFIX,
            PathStyle::Stable => STABLE_PREFIX,
        }
    }
}

/// Who the request is made as.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// No access token: the delay id is the capability (OpenID mode).
    Anonymous,
    /// The appservice, masquerading as the event's owner.
    Appservice { as_token: &'a str, user_id: &'a str },
}

/// Remembers, per homeserver, which paths it serves.
#[derive(Default)]
pub struct PathStyles {
    cache: Mutex<HashMap<String, (Instant, PathStyle)>>,
}

impl PathStyles {
    /// The paths `base` serves, asking its `/versions` when not known (unstable if that fails).
    pub async fn get(&self, http: &reqwest::Client, base: &Url, timeout: Duration) -> PathStyle {
        let key = base.as_str().to_owned();
        if let Some((at, style)) = self.cache.lock().unwrap().get(&key).copied() {
            if at.elapsed() < STYLE_TTL {
                return style;
            }
        }
        let url = api_url(base, "/_matrix/client/versions");
        let versions: Option<serde_json::Value> = match http.get(url).timeout(timeout).send().await {
            Ok(r) if r.status().is_success() => super::read_json(r).await.ok(),
            _ => None,
        };
        let Some(versions) = versions else {
            return PathStyle::Unstable; // not cached: ask again next time
        };
        let stable = versions.pointer("/unstable_features/org.matrix.msc4140.stable").and_then(|v| v.as_bool());
        let style = if stable == Some(true) { PathStyle::Stable } else { PathStyle::Unstable };
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= STYLE_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, (Instant::now(), style));
        style
    }
}

/// How a call went, for the `outcome` label of its metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    /// 404 / 409: the event no longer exists.
    Gone,
    RateLimited,
    ServerError,
    Network,
    Timeout,
    /// 401 / 403: the homeserver refused us.
    Auth,
    /// 404 `M_UNRECOGNIZED`: delayed events are off on this homeserver.
    Unrecognized,
    ClientError,
    /// The stored address of the homeserver is no longer acceptable.
    Unreachable,
    /// 403: the member is no longer in the room (left, kicked, banned), so its delayed leave
    /// cannot be sent as them; Synapse discards it.
    NotInRoom,
}

impl CallOutcome {
    pub const ALL: [CallOutcome; 11] = [
        CallOutcome::Ok,
        CallOutcome::Gone,
        CallOutcome::RateLimited,
        CallOutcome::ServerError,
        CallOutcome::Network,
        CallOutcome::Timeout,
        CallOutcome::Auth,
        CallOutcome::Unrecognized,
        CallOutcome::ClientError,
        CallOutcome::Unreachable,
        CallOutcome::NotInRoom,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Gone => "gone",
            CallOutcome::RateLimited => "rate_limited",
            CallOutcome::ServerError => "server_error",
            CallOutcome::Network => "network",
            CallOutcome::Timeout => "timeout",
            CallOutcome::Auth => "auth",
            CallOutcome::Unrecognized => "unrecognized",
            CallOutcome::ClientError => "client_error",
            CallOutcome::Unreachable => "unreachable",
            CallOutcome::NotInRoom => "not_in_room",
        }
    }

    /// Retrying will not fix it by itself: the operator has to.
    pub fn is_configuration_error(self) -> bool {
        matches!(self, CallOutcome::Auth | CallOutcome::Unrecognized | CallOutcome::Unreachable)
    }
}

/// What the homeserver said, classified, plus what to log about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub answer: HsAnswer,
    pub outcome: CallOutcome,
    /// Details for the log when it is not a plain success.
    pub detail: Option<String>,
}

/// The URL of `delay_id` (and `action` on it, if any) under `base`, the client-server API base.
pub fn event_url(base: &Url, style: PathStyle, delay_id: &str, action: Option<DelayedAction>, caller: Caller) -> Url {
    let mut url = api_url(base, style.prefix());
    {
        let mut segments = url.path_segments_mut().expect("http(s) base URLs have paths");
        segments.push(delay_id); // percent-encoded: a delay id cannot change the path
        if let Some(action) = action {
            segments.push(action.as_str());
        }
    }
    if let Caller::Appservice { user_id, .. } = caller {
        url.query_pairs_mut().append_pair("user_id", user_id);
    }
    url
}

fn authorize(req: reqwest::RequestBuilder, caller: Caller) -> reqwest::RequestBuilder {
    match caller {
        Caller::Anonymous => req,
        Caller::Appservice { as_token, .. } => req.bearer_auth(as_token),
    }
}

/// Issues `action` on `delay_id` as `caller`.
pub async fn call(
    http: &reqwest::Client,
    base: &Url,
    style: PathStyle,
    delay_id: &str,
    action: DelayedAction,
    caller: Caller<'_>,
    timeout: Duration,
) -> Answer {
    let url = event_url(base, style, delay_id, Some(action), caller);
    let resp = authorize(http.post(url), caller).json(&serde_json::json!({})).timeout(timeout).send().await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            let outcome = if e.is_timeout() { CallOutcome::Timeout } else { CallOutcome::Network };
            return Answer { answer: HsAnswer::Failed, outcome, detail: Some(super::describe(e)) };
        }
    };
    let status = resp.status().as_u16();
    let retry_after_header = resp.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok());
    let retry_after_header = retry_after_header.and_then(retry_after_ms);
    // Only the status matters for most answers; a body too large or not JSON reads as empty.
    let body: serde_json::Value = super::read_json(resp).await.unwrap_or_default();
    classify(status, retry_after_header, &body)
}

/// The [`crate::ports::DelayedEvents`] port over HTTP: finds the member's homeserver (its stored
/// address, checked again on every call, or the operator's override), picks the paths it serves,
/// calls it as the delegation's mode requires, and records the call's metrics and log lines (in
/// the caller's span, which names the job, room and identity).
pub struct HomeserverCalls {
    pub discovery: Arc<Discovery>,
    pub path_styles: Arc<PathStyles>,
    /// The appservice, for jobs delegated through the homeserver.
    pub appservice: Option<AppserviceCaller>,
    pub timeout: Duration,
    pub metrics: Arc<Metrics>,
}

/// The appservice's token, and the one homeserver it may ever be shown to.
pub struct AppserviceCaller {
    pub as_token: Arc<str>,
    pub server_name: String,
}

impl HomeserverCalls {
    async fn answer(&self, d: &Delegation, action: DelayedAction) -> Answer {
        let unreachable = |detail: String| Answer {
            answer: HsAnswer::Failed,
            outcome: CallOutcome::Unreachable,
            detail: Some(format!("{detail}; the delayed leave is left to the homeserver's timer")),
        };
        let server = d.server_name();
        let (endpoint, caller) = match (d.mode, &self.appservice) {
            // Resolved per call rather than cached per job: one URL parse, and nothing to prune.
            (Mode::OpenId, _) => match self.discovery.cs_endpoint_for_stored(server, &d.cs_api_url) {
                Ok(e) => (e, Caller::Anonymous),
                Err(e) => return unreachable(e.to_string()),
            },
            // The as_token acts as any local user: it goes to the configured homeserver only, at
            // its configured or discovered address — never at an address a stored job names.
            (Mode::Appservice, Some(a)) if a.server_name == server => {
                match self.discovery.client_server_api(server).await {
                    Ok(e) => (e, Caller::Appservice { as_token: &a.as_token, user_id: &d.user_id }),
                    Err(e) => return unreachable(e.to_string()),
                }
            }
            (Mode::Appservice, Some(a)) => {
                tracing::error!(user = %d.user_id, server, appservice_server = %a.server_name,
                    "a job delegated through the appservice names another homeserver; the as_token is not sent there");
                return unreachable(format!("appservice job of {server}, not of {}", a.server_name));
            }
            (Mode::Appservice, None) => {
                tracing::error!(user = %d.user_id, "delegated through the appservice, but no appservice is configured now");
                match self.discovery.cs_endpoint_for_stored(server, &d.cs_api_url) {
                    Ok(e) => (e, Caller::Anonymous),
                    Err(e) => return unreachable(e.to_string()),
                }
            }
        };
        let http = endpoint.client(self.discovery.clients());
        let style = self.path_styles.get(http, &endpoint.base, self.timeout).await;
        call(http, &endpoint.base, style, &d.delay_id, action, caller, self.timeout).await
    }
}

#[async_trait::async_trait]
impl crate::ports::DelayedEvents for HomeserverCalls {
    async fn call(&self, d: &Delegation, action: DelayedAction) -> HsAnswer {
        let started = Instant::now();
        let a = self.answer(d, action).await;
        let homeserver = d.server_name().to_owned();
        self.metrics
            .homeserver_request_duration
            .get_or_create(&ActionLabels { action: action.as_str(), homeserver: homeserver.clone() })
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .homeserver_requests
            .get_or_create(&CallLabels { action: action.as_str(), homeserver, outcome: a.outcome.as_str() })
            .inc();
        let (action, outcome, delay_id) = (action.as_str(), a.outcome.as_str(), DelayRef(&d.delay_id));
        match &a.detail {
            Some(detail) if a.outcome.is_configuration_error() => tracing::error!(
                user = %d.user_id, %delay_id, action, outcome, %detail,
                "homeserver call did not succeed: configuration error (delayed events disabled, access refused, or address no longer allowed)"
            ),
            Some(detail) => tracing::warn!(user = %d.user_id, %delay_id, action, outcome, %detail,
                "homeserver call did not succeed"),
            None => tracing::debug!(action, outcome, "homeserver call done"),
        }
        a.answer
    }
}

/// A delayed event as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayedEvent {
    pub room_id: String,
    pub delay_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The homeserver knows no such delayed event of this user (or it was sent or cancelled).
    #[error("no such delayed event")]
    NotFound,
    /// The homeserver refused us (401/403: the as_token or the user namespace is wrong).
    #[error("homeserver refused the appservice: {0}")]
    Refused(String),
    #[error("homeserver unavailable: {0}")]
    Unavailable(String),
}

/// Looks `delay_id` up as its owner, through the appservice.
pub async fn lookup(
    http: &reqwest::Client,
    base: &Url,
    style: PathStyle,
    delay_id: &str,
    caller: Caller<'_>,
    timeout: Duration,
) -> Result<DelayedEvent, LookupError> {
    let url = event_url(base, style, delay_id, None, caller);
    let resp = authorize(http.get(url), caller)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| LookupError::Unavailable(super::describe(e)))?;
    let status = resp.status().as_u16();
    let body: serde_json::Value = super::read_json(resp).await.unwrap_or_default();
    match status {
        200 => {
            let room_id = body.get("room_id").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            // `delay` is the field's name in earlier revisions of MSC4140.
            let delay_ms = body.get("delay_ms").or_else(|| body.get("delay")).and_then(|v| v.as_i64()).unwrap_or(0);
            Ok(DelayedEvent { room_id, delay_ms })
        }
        404 if body.get("errcode").and_then(|e| e.as_str()) != Some("M_UNRECOGNIZED") => Err(LookupError::NotFound),
        401 | 403 => Err(LookupError::Refused(format!("{status} {body}"))),
        _ => Err(LookupError::Unavailable(format!("{status} {body}"))),
    }
}

/// A `Retry-After` header in seconds, as milliseconds; a hostile homeserver's absurd value
/// saturates (the classification then clamps it) rather than overflowing.
fn retry_after_ms(header: &str) -> Option<Millis> {
    header.trim().parse::<u64>().ok().map(|secs| secs.saturating_mul(1000))
}

fn error_text(body: &serde_json::Value) -> &str {
    body.get("error").and_then(|e| e.as_str()).unwrap_or_default()
}

/// Classifies a homeserver answer (pure, for tests).
pub fn classify(status: u16, retry_after_header_ms: Option<Millis>, body: &serde_json::Value) -> Answer {
    let errcode = body.get("errcode").and_then(|e| e.as_str()).unwrap_or_default().to_owned();
    let detail = || Some(format!("{status} {body}"));
    match status {
        200..=299 => Answer { answer: HsAnswer::Ok, outcome: CallOutcome::Ok, detail: None },
        404 if errcode == "M_UNRECOGNIZED" => {
            // The endpoint, not the event, is unknown: delayed events are off on this homeserver.
            Answer { answer: HsAnswer::Failed, outcome: CallOutcome::Unrecognized, detail: detail() }
        }
        404 | 409 => Answer { answer: HsAnswer::Gone, outcome: CallOutcome::Gone, detail: None },
        // Synapse's words when the event's sender has left the room (the event is then
        // discarded): not the bridge's access being refused. Told apart by the message, the
        // only thing that differs from a refusal.
        403 if errcode == "M_FORBIDDEN" && error_text(body).contains("not in room") => {
            Answer { answer: HsAnswer::Gone, outcome: CallOutcome::NotInRoom, detail: detail() }
        }
        429 => {
            let body_ms = body.get("retry_after_ms").and_then(|v| v.as_u64());
            let wait = retry_after_header_ms.or(body_ms).unwrap_or(1_000).clamp(100, 300_000);
            Answer { answer: HsAnswer::RetryAfter(wait), outcome: CallOutcome::RateLimited, detail: detail() }
        }
        401 | 403 => Answer { answer: HsAnswer::Failed, outcome: CallOutcome::Auth, detail: detail() },
        500..=599 => Answer { answer: HsAnswer::Failed, outcome: CallOutcome::ServerError, detail: detail() },
        _ => Answer { answer: HsAnswer::Failed, outcome: CallOutcome::ClientError, detail: detail() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builds_escaped_urls_under_the_base_path() {
        let base = Url::parse("https://hs.example/prefix/").unwrap();
        assert_eq!(
            event_url(&base, PathStyle::Unstable, "syd_a/../b?c", Some(DelayedAction::Restart), Caller::Anonymous)
                .as_str(),
            "https://hs.example/prefix/_matrix/client/unstable/org.matrix.msc4140/delayed_events/syd_a%2F..%2Fb%3Fc/restart"
        );
        let owner = Caller::Appservice { as_token: "secret", user_id: "@a:hs.example" };
        assert_eq!(
            event_url(&base, PathStyle::Stable, "syd_1", Some(DelayedAction::Send), owner).as_str(),
            "https://hs.example/prefix/_matrix/client/v1/delayed_events/syd_1/send?user_id=%40a%3Ahs.example"
        );
        assert_eq!(
            event_url(&base, PathStyle::Unstable, "syd_1", None, owner).as_str(),
            "https://hs.example/prefix/_matrix/client/unstable/org.matrix.msc4140/delayed_events/syd_1?user_id=%40a%3Ahs.example"
        );
    }

    #[tokio::test]
    async fn stable_paths_are_used_only_when_advertised_and_the_answer_is_cached() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let asked = Arc::new(AtomicUsize::new(0));
        let serve = |stable: bool, asked: Arc<AtomicUsize>| async move {
            let app = axum::Router::new().route(
                "/_matrix/client/versions",
                axum::routing::get(move || {
                    asked.fetch_add(1, Ordering::SeqCst);
                    async move {
                        axum::Json(
                            json!({"versions": ["v1.11"], "unstable_features": {"org.matrix.msc4140.stable": stable}}),
                        )
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            url
        };
        crate::homeserver::install_crypto_provider();
        let http = reqwest::Client::new();
        let styles = PathStyles::default();
        let t = Duration::from_secs(2);
        let stable = serve(true, asked.clone()).await;
        let unstable = serve(false, asked.clone()).await;
        assert_eq!(styles.get(&http, &stable, t).await, PathStyle::Stable);
        assert_eq!(styles.get(&http, &stable, t).await, PathStyle::Stable);
        assert_eq!(styles.get(&http, &unstable, t).await, PathStyle::Unstable);
        assert_eq!(asked.load(Ordering::SeqCst), 2, "one /versions per homeserver");
        let nowhere = Url::parse("http://127.0.0.1:9/").unwrap();
        assert_eq!(styles.get(&http, &nowhere, t).await, PathStyle::Unstable, "unknown: unstable");
    }

    /// The HTTP adapter checks the member's stored address on every call (there is no cache of
    /// endpoints to outlive a homeserver's last job), records each call in the metrics, and calls
    /// an operator's override as given.
    #[tokio::test]
    async fn the_adapter_checks_the_stored_address_on_every_call_and_counts_each_outcome() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        use crate::delegation::{Delegation, Mode};
        use crate::homeserver::{Clients, Overrides};
        use crate::ports::DelayedEvents as _;

        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let app = axum::Router::new().route(
            "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{id}/{action}",
            axum::routing::post(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { axum::Json(json!({})) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let d = Delegation {
            room_id: "!r:hs.test".into(),
            slot_id: "m.call#ROOM".into(),
            user_id: "@a:hs.test".into(),
            device_id: "DEV".into(),
            member_id: "m".into(),
            delay_id: "syd_1".into(),
            delay_ms: 10_000,
            // A loopback address, as a discovered (untrusted) one.
            cs_api_url: local.as_str().into(),
            created_at_ms: 0,
            mode: Mode::OpenId,
            identity: None,
        };
        let metrics = Arc::new(Metrics::new());
        let adapter = |overrides: Overrides| {
            let clients = Clients::new(Duration::from_secs(2), false, false).unwrap();
            HomeserverCalls {
                discovery: Arc::new(Discovery::new(clients, overrides, Overrides::new(), false)),
                path_styles: Arc::default(),
                appservice: None,
                timeout: Duration::from_secs(2),
                metrics: metrics.clone(),
            }
        };
        // Discovered and private: refused, every time, without a request.
        let guarded = adapter(Overrides::new());
        for _ in 0..2 {
            assert_eq!(guarded.call(&d, DelayedAction::Restart).await, HsAnswer::Failed);
        }
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        // The operator's override for the member's server: trusted, called.
        let trusted = adapter([("hs.test".to_owned(), local.clone())].into());
        assert_eq!(trusted.call(&d, DelayedAction::Restart).await, HsAnswer::Ok);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        let text = metrics.encode();
        for sample in [
            r#"homeserver_requests_total{action="restart",homeserver="hs.test",outcome="unreachable"} 2"#,
            r#"homeserver_requests_total{action="restart",homeserver="hs.test",outcome="ok"} 1"#,
        ] {
            assert!(text.contains(sample), "{sample} missing in\n{text}");
        }
    }

    /// The as_token acts as any user of its homeserver: it is sent to that homeserver's
    /// configured address only, never to the address a stored job names, nor for a job naming
    /// another homeserver.
    #[tokio::test]
    async fn the_as_token_only_ever_goes_to_the_configured_homeserver() {
        use std::sync::{Arc, Mutex};

        use crate::delegation::{Delegation, Mode};
        use crate::homeserver::{Clients, Overrides};
        use crate::ports::DelayedEvents as _;

        // Two servers: ours (configured), and one a tampered job names. Each records the
        // Authorization headers it is shown.
        let serve = || async {
            let seen: Arc<Mutex<Vec<String>>> = Arc::default();
            let recorded = seen.clone();
            let app = axum::Router::new().route(
                "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{id}/{action}",
                axum::routing::post(move |headers: axum::http::HeaderMap| {
                    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                    recorded.lock().unwrap().push(auth);
                    async { axum::Json(json!({})) }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            (url, seen)
        };
        let (ours, ours_seen) = serve().await;
        let (elsewhere, elsewhere_seen) = serve().await;
        let clients = Clients::new(Duration::from_secs(2), false, true).unwrap();
        let overrides: Overrides = [("hs.test".to_owned(), ours.clone())].into();
        let calls = HomeserverCalls {
            discovery: Arc::new(Discovery::new(clients, overrides, Overrides::new(), true)),
            path_styles: Arc::default(),
            appservice: Some(AppserviceCaller {
                as_token: Arc::from("secret-as-token"),
                server_name: "hs.test".into(),
            }),
            timeout: Duration::from_secs(2),
            metrics: Arc::new(Metrics::new()),
        };
        let job = |user: &str, cs_api_url: &Url| Delegation {
            room_id: "!r:hs.test".into(),
            slot_id: "m.call#ROOM".into(),
            user_id: user.into(),
            device_id: "DEV".into(),
            member_id: "m".into(),
            delay_id: "syd_1".into(),
            delay_ms: 10_000,
            cs_api_url: cs_api_url.as_str().into(),
            created_at_ms: 0,
            mode: Mode::Appservice,
            identity: None,
        };
        // Our user, but a stored address elsewhere: called at our address.
        assert_eq!(calls.call(&job("@a:hs.test", &elsewhere), DelayedAction::Restart).await, HsAnswer::Ok);
        // A user of another server (a job written into a shared store): not called at all.
        assert_eq!(calls.call(&job("@a:evil.test", &elsewhere), DelayedAction::Send).await, HsAnswer::Failed);
        assert_eq!(*ours_seen.lock().unwrap(), ["Bearer secret-as-token"]);
        assert!(elsewhere_seen.lock().unwrap().is_empty(), "the as_token was shown to another server");
    }

    #[test]
    fn an_absurd_retry_after_is_clamped_not_overflowed() {
        assert_eq!(retry_after_ms(" 3 "), Some(3_000));
        assert_eq!(retry_after_ms("18446744073709551615"), Some(u64::MAX));
        assert_eq!(retry_after_ms("Fri, 04 Dec 2026 20:00:00 GMT"), None);
        let a = classify(429, retry_after_ms("18446744073709551615"), &json!({"retry_after_ms": u64::MAX}));
        assert_eq!(a.answer, HsAnswer::RetryAfter(300_000));
    }

    #[test]
    fn classifies_answers() {
        assert_eq!(classify(200, None, &json!({})).answer, HsAnswer::Ok);
        assert_eq!(classify(404, None, &json!({"errcode": "M_NOT_FOUND"})).answer, HsAnswer::Gone);
        assert_eq!(classify(409, None, &json!({})).answer, HsAnswer::Gone);
        // The sender left the room: Synapse refuses the send and discards the event.
        let left = json!({"errcode": "M_FORBIDDEN", "error": "User @a:hs not in room !r:hs"});
        let a = classify(403, None, &left);
        assert_eq!((a.answer, a.outcome), (HsAnswer::Gone, CallOutcome::NotInRoom));
        assert!(!a.outcome.is_configuration_error());
        let refused = json!({"errcode": "M_FORBIDDEN", "error": "Application service cannot masquerade as this user"});
        assert_eq!(classify(403, None, &refused).outcome, CallOutcome::Auth);
        assert_eq!(classify(404, None, &json!({"errcode": "M_UNRECOGNIZED"})).answer, HsAnswer::Failed);
        assert_eq!(classify(429, Some(3_000), &json!({"retry_after_ms": 10})).answer, HsAnswer::RetryAfter(3_000));
        assert_eq!(classify(429, None, &json!({"retry_after_ms": 1_500})).answer, HsAnswer::RetryAfter(1_500));
        assert_eq!(classify(502, None, &json!({})).answer, HsAnswer::Failed);
        assert_eq!(classify(401, None, &json!({})).outcome, CallOutcome::Auth);
    }
}
