//! Between a real LiveKit server and the bridge: forwards every webhook as it came (headers and
//! body untouched, so the signature still holds) and records what it was and when it arrived, so
//! that a test can tell LiveKit's detection time from the bridge's own. It can lose a share of
//! the webhooks: answered 200 and never forwarded, so LiveKit takes them as delivered and never
//! retries (the worst loss: only reconciliation can find what they said). With several bridge
//! instances it spreads the webhooks over them in turn, trying the next when one cannot be
//! reached (as the compose stack's proxy does).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

/// One webhook as LiveKit sent it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event: String,
    pub identity: Option<String>,
    /// The participant's session (`PA_…`).
    pub sid: Option<String>,
    pub reason: Option<String>,
    pub body: Value,
    pub received: Instant,
    /// The bridge's answer (`None`: lost here).
    pub status: Option<u16>,
}

#[derive(Default)]
struct Inner {
    targets: Vec<String>,
    next: std::sync::atomic::AtomicUsize,
    deliveries: Mutex<Vec<Delivery>>,
    /// Every n-th webhook is lost (0: none).
    lose_every: Mutex<usize>,
    http: reqwest::Client,
}

#[derive(Clone)]
pub struct WebhookProxy {
    inner: Arc<Inner>,
    /// What LiveKit is told to post to.
    pub url: String,
}

impl WebhookProxy {
    /// Forwards to `bridge`'s `/sfu_webhook`.
    pub async fn start(bridge: &str) -> WebhookProxy {
        WebhookProxy::start_many(&[bridge.to_owned()]).await
    }

    /// Forwards to the `/sfu_webhook` of each of `bridges` in turn.
    pub async fn start_many(bridges: &[String]) -> WebhookProxy {
        let targets = bridges.iter().map(|b| format!("{b}/sfu_webhook")).collect();
        let inner = Arc::new(Inner { targets, http: reqwest::Client::new(), ..Inner::default() });
        let app = axum::Router::new().route("/sfu_webhook", axum::routing::post(forward)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/sfu_webhook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        WebhookProxy { inner, url }
    }

    /// Loses every `n`-th webhook from now on (0: none).
    pub fn lose_every(&self, n: usize) {
        *self.inner.lose_every.lock().unwrap() = n;
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.inner.deliveries.lock().unwrap().clone()
    }

    /// The first delivery of `event` about `identity` (any identity if `None`).
    pub fn first(&self, event: &str, identity: Option<&str>) -> Option<Delivery> {
        self.deliveries()
            .into_iter()
            .find(|d| d.event == event && (identity.is_none() || d.identity.as_deref() == identity))
    }

    /// Waits up to `within` for [`WebhookProxy::first`].
    pub async fn wait_for(&self, event: &str, identity: Option<&str>, within: std::time::Duration) -> Option<Delivery> {
        let until = Instant::now() + within;
        loop {
            if let Some(d) = self.first(event, identity) {
                return Some(d);
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

async fn forward(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let received = Instant::now();
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    let text = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
    let mut delivery = Delivery {
        event: text("/event").unwrap_or_default(),
        identity: text("/participant/identity"),
        sid: text("/participant/sid"),
        reason: text("/participant/disconnectReason"),
        body: v.clone(),
        received,
        status: None,
    };
    let lost = {
        let n = *inner.lose_every.lock().unwrap();
        n > 0 && (inner.deliveries.lock().unwrap().len() + 1) % n == 0
    };
    if lost {
        inner.deliveries.lock().unwrap().push(delivery);
        return StatusCode::OK;
    }
    let first = inner.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut status = 502;
    for i in 0..inner.targets.len() {
        let target = &inner.targets[(first + i) % inner.targets.len()];
        let mut req = inner.http.post(target).body(body.clone());
        for (name, value) in &headers {
            if name != "host" && name != "content-length" {
                req = req.header(name, value);
            }
        }
        if let Ok(r) = req.send().await {
            status = r.status().as_u16();
            break;
        }
    }
    delivery.status = Some(status);
    inner.deliveries.lock().unwrap().push(delivery);
    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY)
}
