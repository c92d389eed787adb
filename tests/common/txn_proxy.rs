//! Between Synapse and the bridge's appservice transaction endpoint: forwards each transaction
//! (and records when each arrived and what it held), or loses it — answered `200 {}`, never
//! forwarded: Synapse never sends it again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::IntoResponse;
use serde_json::Value;

/// An appservice registration for the bridge on `bridge_port` (MSC4512 proxying) whose
/// transactions go to `txn_port`, with a users namespace of the local users matching
/// `localparts` (a regex).
pub fn registration(bridge_port: u16, txn_port: u16, as_token: &str, hs_token: &str, localparts: &str) -> String {
    format!(
        r#"id: rtc-leave-bridge
url: "http://127.0.0.1:{txn_port}"
as_token: "{as_token}"
hs_token: "{hs_token}"
sender_localpart: rtc-leave-bridge
rate_limited: false
namespaces:
  users:
    - exclusive: false
      regex: "@{localparts}:{server}"
  aliases: []
  rooms: []
io.element.msc4512.proxy_prefix: "rtc/livekit"
io.element.msc4512.proxy_url: "http://127.0.0.1:{bridge_port}"
"#,
        server = super::synapse::SERVER_NAME.replace('.', "\\\\.")
    )
}

/// One transaction that reached the proxy.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    pub events: Vec<Value>,
}

#[derive(Clone)]
pub struct TxnProxy {
    lose: Arc<AtomicBool>,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
}

type Shared = (TxnProxy, String, reqwest::Client);

impl TxnProxy {
    /// Listens on `port`, forwarding to the bridge at `bridge`.
    pub async fn start(port: u16, bridge: String) -> TxnProxy {
        let proxy = TxnProxy { lose: Arc::default(), arrivals: Arc::default() };
        let app = axum::Router::new().fallback(forward).with_state((proxy.clone(), bridge, reqwest::Client::new()));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        proxy
    }

    /// Loses every transaction from now on, or none.
    pub fn lose(&self, lose: bool) {
        self.lose.store(lose, Ordering::SeqCst);
    }

    /// When the first transaction holding `user`'s membership change to `membership` arrived,
    /// at or after `since`.
    pub fn membership_arrival(&self, user: &str, membership: &str, since: Instant) -> Option<Instant> {
        self.arrivals.lock().unwrap().iter().filter(|a| a.at >= since).find_map(|a| {
            a.events
                .iter()
                .any(|e| {
                    e["type"] == "m.room.member" && e["state_key"] == user && e["content"]["membership"] == membership
                })
                .then_some(a.at)
        })
    }
}

async fn forward(State((proxy, bridge, http)): State<Shared>, req: axum::extract::Request) -> axum::response::Response {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    if parts.uri.path().contains("/transactions/") {
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        let events = v["events"].as_array().cloned().unwrap_or_default();
        proxy.arrivals.lock().unwrap().push(Arrival { at, events });
        if proxy.lose.load(Ordering::SeqCst) {
            return (axum::http::StatusCode::OK, "{}").into_response();
        }
    }
    // The bridge may not listen yet (Synapse starts first): tried until it does, as Synapse's
    // own backoff would only slow the test down.
    let until = Instant::now() + Duration::from_secs(20);
    let resp = loop {
        let mut forward = http.request(parts.method.clone(), format!("{bridge}{}", parts.uri)).body(body.clone());
        if let Some(auth) = parts.headers.get("authorization") {
            forward = forward.header("authorization", auth);
        }
        match forward.send().await {
            Ok(resp) => break resp,
            Err(_) if Instant::now() < until => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return (axum::http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
        }
    };
    let status = axum::http::StatusCode::from_u16(resp.status().as_u16()).unwrap();
    (status, resp.bytes().await.unwrap_or_default()).into_response()
}
