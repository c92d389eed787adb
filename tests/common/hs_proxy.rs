//! The bridge's view of the homeserver: a recording proxy in front of the real Synapse.
//!
//! Every request the bridge makes to its homeserver (OpenID checks, delayed-event lookups,
//! restarts, sends) goes through here, is forwarded to Synapse unchanged and recorded with its
//! answer and the instants it arrived and was answered. That is what lets a test tell *who*
//! removed a member: a `send` of a delay id that Synapse answered `200` was the bridge's, made
//! while the delayed event was still pending — had Synapse's own timer fired first, the send would
//! have been answered `404`. A membership that disappears without such a send was removed by the
//! homeserver's timer, which is exactly what a broken bridge would leave behind.
//!
//! It can also stall calls of one kind (to catch them in flight), and fake an outage of the
//! homeserver as the bridge would see it — connections dropped without an answer, or requests
//! held unanswered until the outage ends — while Synapse itself, and its timers, run on. When
//! Synapse is down, it closes the bridge's connection without an answer, as a dead homeserver
//! would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// One request of the bridge to its homeserver.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    /// For delayed-event management: the delay id and `restart` / `send` / `cancel` / `lookup`.
    pub delay_id: Option<String>,
    pub action: Option<String>,
    /// Synapse's status; `None` when Synapse could not be reached (the bridge saw the connection
    /// closed).
    pub status: Option<u16>,
    pub received: Instant,
    pub answered: Instant,
}

impl Call {
    /// How long after `departure` the homeserver answered this send. Panics if the send reached
    /// the homeserver before the departure: a leave sent on a guess is never fast, it is wrong.
    pub fn after(&self, departure: Instant) -> std::time::Duration {
        assert!(
            self.received >= departure,
            "the send reached the homeserver {:?} before the departure",
            departure - self.received
        );
        self.answered - departure
    }
}

#[derive(Default)]
struct Inner {
    upstream: String,
    calls: Mutex<Vec<Call>>,
    /// Calls of this action are held this long before being forwarded.
    stall: Mutex<Option<(String, Duration)>>,
    outage: Mutex<Option<Outage>>,
    http: reqwest::Client,
}

/// How the homeserver fails while it is "down" (for the bridge only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outage {
    /// Connections are closed without an answer.
    Drop,
    /// Requests are held unanswered until the outage ends, then dropped.
    Stall,
}

#[derive(Clone)]
pub struct HsProxy {
    inner: Arc<Inner>,
    pub url: String,
}

impl HsProxy {
    /// Starts a proxy forwarding to `upstream` (Synapse's base URL).
    pub async fn start(upstream: &str) -> HsProxy {
        let inner = Arc::new(Inner {
            upstream: upstream.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
            ..Inner::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let serving = inner.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let inner = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| forward(inner.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HsProxy { inner, url: format!("http://{addr}") }
    }

    /// Holds every call of `action` (`restart`, `send`, …) for `wait` before forwarding it;
    /// `None` stops stalling.
    pub fn stall(&self, stall: Option<(&str, Duration)>) {
        *self.inner.stall.lock().unwrap() = stall.map(|(a, d)| (a.to_owned(), d));
    }

    /// Starts (or changes, or with `None` ends) an outage: no call reaches Synapse meanwhile.
    pub fn outage(&self, outage: Option<Outage>) {
        *self.inner.outage.lock().unwrap() = outage;
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.calls.lock().unwrap().clone()
    }

    /// The calls of `action` on `delay_id`, in arrival order.
    pub fn calls_of(&self, delay_id: &str, action: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.delay_id.as_deref() == Some(delay_id) && c.action.as_deref() == Some(action))
            .collect()
    }

    /// The bridge's send of `delay_id` that Synapse accepted (200), if there was one.
    pub fn accepted_send(&self, delay_id: &str) -> Option<Call> {
        self.calls_of(delay_id, "send").into_iter().find(|c| c.status == Some(200))
    }

    /// Waits up to `within` for the bridge's accepted send of `delay_id`.
    pub async fn wait_accepted_send(&self, delay_id: &str, within: Duration) -> Option<Call> {
        let until = Instant::now() + within;
        loop {
            if let Some(c) = self.accepted_send(delay_id) {
                return Some(c);
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Calls of `action` (on any delay id) answered with `status`.
    pub fn count(&self, action: &str, status: Option<u16>) -> usize {
        self.calls().iter().filter(|c| c.action.as_deref() == Some(action) && c.status == status).count()
    }
}

/// `(delay id, action)` of a delayed-event management request (MSC4140, unstable or stable path,
/// action in the path or, in the older form, in the body).
fn delayed_event_call(method: &hyper::Method, path: &str, body: &[u8]) -> (Option<String>, Option<String>) {
    let Some((_, rest)) = path.split_once("/delayed_events/") else { return (None, None) };
    let mut parts = rest.split('/');
    // Synapse's delay ids (`syd_` + letters) need no percent-decoding.
    let id = parts.next().map(str::to_owned);
    let action = match parts.next() {
        Some(a) => Some(a.to_owned()),
        None if method == hyper::Method::GET => Some("lookup".to_owned()),
        None => {
            serde_json::from_slice::<serde_json::Value>(body).ok().and_then(|v| v["action"].as_str().map(str::to_owned))
        }
    };
    (id, action)
}

async fn forward(inner: Arc<Inner>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let received = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(std::io::Error::other)?.to_bytes();
    let path = parts.uri.path().to_owned();
    let (delay_id, action) = delayed_event_call(&parts.method, &path, &body);
    let stall = inner.stall.lock().unwrap().clone();
    let stall = stall.filter(|(stalled, _)| action.as_deref() == Some(stalled.as_str())).map(|(_, wait)| wait);
    let method = parts.method.to_string();
    let record = move |status: Option<u16>| Call {
        method,
        path: path.clone(),
        delay_id: delay_id.clone(),
        action: action.clone(),
        status,
        received,
        answered: Instant::now(),
    };
    let outage = *inner.outage.lock().unwrap();
    if let Some(outage) = outage {
        if outage == Outage::Stall {
            while inner.outage.lock().unwrap().is_some() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        inner.calls.lock().unwrap().push(record(None));
        return Err(std::io::Error::other("homeserver unreachable (outage)"));
    }
    if let Some(wait) = stall {
        tokio::time::sleep(wait).await;
    }
    let target = format!("{}{}", inner.upstream, parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let mut upstream = inner.http.request(parts.method.clone(), target).body(body);
    for (name, value) in &parts.headers {
        if name != hyper::header::HOST && name != hyper::header::CONTENT_LENGTH {
            upstream = upstream.header(name, value);
        }
    }
    // Forwarded and recorded by a task of its own: a bridge that gives up on the call (its
    // timeout, or kill -9) drops this handler, but Synapse may still carry the call out, and the
    // record must say so.
    let recorder = inner.clone();
    let exchange = tokio::spawn(async move {
        let answer = match upstream.send().await {
            Ok(resp) => {
                let status = resp.status();
                let headers = resp.headers().clone();
                match resp.bytes().await {
                    Ok(bytes) => Some((status, headers, bytes)),
                    Err(_) => None,
                }
            }
            Err(_) => None,
        };
        recorder.calls.lock().unwrap().push(record(answer.as_ref().map(|(status, ..)| status.as_u16())));
        answer
    });
    let Some((status, headers, bytes)) = exchange.await.map_err(std::io::Error::other)? else {
        // Homeserver down: hyper closes the bridge's connection without an answer.
        return Err(std::io::Error::other("homeserver unreachable"));
    };
    let mut resp = Response::builder().status(status);
    for (name, value) in &headers {
        if name != hyper::header::CONTENT_LENGTH && name != hyper::header::TRANSFER_ENCODING {
            resp = resp.header(name, value);
        }
    }
    Ok(resp.body(Full::new(bytes)).unwrap())
}
