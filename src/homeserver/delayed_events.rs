//! Restarting and sending delayed events (MSC4140) on the member's homeserver, and classifying the
//! answers for the lifecycle: 200 → done; 404 `M_NOT_FOUND` / 409 → the event no longer exists;
//! 429 → wait as told; anything else → retry later (401/403 and an unknown endpoint are logged as
//! configuration errors, since retrying will not fix them by itself).

use std::time::Duration;

use url::Url;

use crate::lifecycle::{HsAnswer, Millis};

const UNSTABLE_PREFIX: &str = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelayedAction {
    Restart,
    Send,
}

impl DelayedAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DelayedAction::Restart => "restart",
            DelayedAction::Send => "send",
        }
    }
}

/// What the homeserver said, classified, plus what to log about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub answer: HsAnswer,
    /// Label for metrics: ok, gone, rate_limited, server_error, network, timeout, auth, unrecognized, client_error.
    pub outcome: &'static str,
    /// Details for the log when it is not a plain success.
    pub detail: Option<String>,
}

/// The URL of `action` on `delay_id` under `base` (the client-server API base URL).
pub fn action_url(base: &Url, delay_id: &str, action: DelayedAction) -> Url {
    let mut url = base.clone();
    {
        let mut segments = url.path_segments_mut().expect("http(s) base URLs have paths");
        segments.pop_if_empty();
        for s in UNSTABLE_PREFIX.trim_start_matches('/').split('/') {
            segments.push(s);
        }
        segments.push(delay_id); // percent-encoded: a delay id cannot change the path
        segments.push(action.as_str());
    }
    url
}

/// Issues `action` on `delay_id` (unauthenticated: the delay id is the capability).
pub async fn call(
    http: &reqwest::Client,
    base: &Url,
    delay_id: &str,
    action: DelayedAction,
    timeout: Duration,
) -> Answer {
    let url = action_url(base, delay_id, action);
    let resp = http.post(url).json(&serde_json::json!({})).timeout(timeout).send().await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            let outcome = if e.is_timeout() { "timeout" } else { "network" };
            return Answer { answer: HsAnswer::Failed, outcome, detail: Some(e.without_url().to_string()) };
        }
    };
    let status = resp.status().as_u16();
    let retry_after_header = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| secs * 1000);
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    classify(status, retry_after_header, &body)
}

/// Classifies a homeserver answer (pure, for tests).
pub fn classify(status: u16, retry_after_header_ms: Option<Millis>, body: &serde_json::Value) -> Answer {
    let errcode = body.get("errcode").and_then(|e| e.as_str()).unwrap_or_default().to_owned();
    let detail = || Some(format!("{status} {body}"));
    match status {
        200..=299 => Answer { answer: HsAnswer::Ok, outcome: "ok", detail: None },
        404 if errcode == "M_UNRECOGNIZED" => {
            // The endpoint, not the event, is unknown: delayed events are off on this homeserver.
            Answer { answer: HsAnswer::Failed, outcome: "unrecognized", detail: detail() }
        }
        404 | 409 => Answer { answer: HsAnswer::Gone, outcome: "gone", detail: None },
        429 => {
            let body_ms = body.get("retry_after_ms").and_then(|v| v.as_u64());
            let wait = retry_after_header_ms.or(body_ms).unwrap_or(1_000).clamp(100, 300_000);
            Answer { answer: HsAnswer::RetryAfter(wait), outcome: "rate_limited", detail: detail() }
        }
        401 | 403 => Answer { answer: HsAnswer::Failed, outcome: "auth", detail: detail() },
        500..=599 => Answer { answer: HsAnswer::Failed, outcome: "server_error", detail: detail() },
        _ => Answer { answer: HsAnswer::Failed, outcome: "client_error", detail: detail() },
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
            action_url(&base, "syd_a/../b?c", DelayedAction::Restart).as_str(),
            "https://hs.example/prefix/_matrix/client/unstable/org.matrix.msc4140/delayed_events/syd_a%2F..%2Fb%3Fc/restart"
        );
    }

    #[test]
    fn classifies_answers() {
        assert_eq!(classify(200, None, &json!({})).answer, HsAnswer::Ok);
        assert_eq!(classify(404, None, &json!({"errcode": "M_NOT_FOUND"})).answer, HsAnswer::Gone);
        assert_eq!(classify(409, None, &json!({})).answer, HsAnswer::Gone);
        assert_eq!(classify(404, None, &json!({"errcode": "M_UNRECOGNIZED"})).answer, HsAnswer::Failed);
        assert_eq!(classify(429, Some(3_000), &json!({"retry_after_ms": 10})).answer, HsAnswer::RetryAfter(3_000));
        assert_eq!(classify(429, None, &json!({"retry_after_ms": 1_500})).answer, HsAnswer::RetryAfter(1_500));
        assert_eq!(classify(502, None, &json!({})).answer, HsAnswer::Failed);
        assert_eq!(classify(401, None, &json!({})).outcome, "auth");
    }
}
