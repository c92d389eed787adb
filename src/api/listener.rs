//! The HTTP listener: binds with an accept queue as long as its connection cap, accepts
//! connections up to that cap, serves HTTP/1.1 on each with a deadline for a request's headers
//! (slow-header connections and idle ones are closed), and on shutdown stops accepting, lets
//! requests in flight finish for a bounded time, and returns — so that a half-read request never
//! holds up the drain and the shard handover behind it.
//!
//! Each request must also be read and answered within its own deadline ([`Settings::request_timeout`]),
//! or it is answered 503 and its connection closed. (`axum::serve` sets none of these: no header
//! timer, no connection cap, no request deadline, an unbounded graceful wait.) The deadline is
//! kept here rather than as a layer of the routers: a connection's request future lives in the
//! connection's task, where a layer's would be allocated anew for every request.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use compact_str::CompactString;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tower::ServiceExt as _;
use tracing::{info, warn};

use super::MatrixError;
use crate::metrics::Metrics;

/// What a listener lets a connection take.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// A request's headers must arrive within this (from the connection's start, or from the
    /// previous answer on a kept-alive one).
    pub header_timeout: Duration,
    /// Connections open at most; one more is closed at once.
    pub max_connections: usize,
    /// A request must be read and answered within this.
    pub request_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub drain: Duration,
}

/// A listening socket on `addr` whose accept queue holds up to `backlog` connections (the
/// kernel caps it at `net.core.somaxconn`). Tokio's `TcpListener::bind` asks for 128, like the
/// standard library: a burst of clients (everyone reconnecting after a network blip, or a flood
/// of half-open connections) faster than the accept loop would overflow it, and the kernel
/// then drops handshakes, which clients retry only after a second or more.
pub fn bind(addr: std::net::SocketAddr, backlog: usize) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(backlog).unwrap_or(u32::MAX))
}

/// Serves `app` on `listener` until `shutdown` completes, then drains (see the module doc).
/// Connections are counted in `metrics` (the public listener's) if given.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: Settings,
    metrics: Option<Arc<Metrics>>,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let (closing_tx, closing) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut refused_logged = false;
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to be closed.
                    warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if let Some(m) = &metrics {
                m.connections_refused.inc();
            }
            if !refused_logged {
                warn!(
                    max = settings.max_connections,
                    "connection cap reached: new connections are closed at once (logged once)"
                );
                refused_logged = true;
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let limit = settings.request_timeout;
        let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            // Copied (inline up to 24 bytes): a clone of the URI would share hyper's read buffer,
            // which hyper then cannot reuse for the connection's next request.
            let path = CompactString::from(req.uri().path());
            within(limit, path, app.clone().oneshot(req.map(axum::body::Body::new)))
        });
        let mut closing = closing.clone();
        let metrics = metrics.clone();
        connections.spawn(async move {
            if let Some(m) = &metrics {
                m.connections.inc();
            }
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(settings.header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            if let Some(m) = &metrics {
                m.connections.dec();
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let open = connections.len();
    let drained =
        tokio::time::timeout(settings.drain, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(connections = connections.len(), of = open, "drain time is up; closing the connections still open");
    } else {
        info!(connections = open, "listener drained");
    }
    connections.shutdown().await;
}

/// `answer`, or `503 M_UNKNOWN` (and the connection closed) when the request is not read and
/// answered within `limit`: a client trickling its body holds nothing for longer.
async fn within(
    limit: Duration,
    path: CompactString,
    answer: impl Future<Output = Result<Response, Infallible>>,
) -> Result<Response, Infallible> {
    match tokio::time::timeout(limit, answer).await {
        Ok(response) => response,
        Err(_) => {
            warn!(path = %path, limit_ms = limit.as_millis() as u64, "request not read and answered in time; 503");
            let mut r =
                MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "request took too long").into_response();
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            Ok(r)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn start(
        settings: Settings,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/fast", axum::routing::get(|| async { "ok" })).route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "late"
            }),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, app, settings, None, async {
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    /// Whether the server closed `s` (reads end of stream) within `within`.
    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(tokio::time::timeout(within, s.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
    }

    #[tokio::test]
    async fn slow_headers_are_cut_off_and_the_cap_closes_extra_connections() {
        let settings = Settings {
            header_timeout: Duration::from_millis(300),
            max_connections: 3,
            request_timeout: Duration::from_millis(300),
            drain: Duration::from_secs(1),
        };
        let (addr, _stop, _task) = start(settings).await;
        // A client that never finishes its headers is closed after the header timeout.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /fast HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        assert!(closed_within(&mut slow, Duration::from_secs(2)).await, "a slow-header connection stays open");
        // Three idle connections fill the cap: a fourth is closed at once, answered nothing.
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut extra, Duration::from_millis(200)).await, "over the cap, still open");
        // Once the idle ones time out, connections are served again.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(get(addr, "/fast").await.ends_with("ok"));
    }

    #[tokio::test]
    async fn a_request_past_its_deadline_is_answered_503_and_shutdown_waits_a_bounded_time() {
        let settings = Settings {
            header_timeout: Duration::from_secs(5),
            max_connections: 16,
            request_timeout: Duration::from_millis(300),
            drain: Duration::from_millis(500),
        };
        let (addr, stop, task) = start(settings).await;
        let answer = get(addr, "/slow").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("M_UNKNOWN"), "{answer}");
        // A half-read request is in flight when shutdown starts: the listener returns anyway.
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"POST /fast HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(3), task).await.expect("the drain is bounded").unwrap();
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no longer accepting");
    }

    /// A burst of clients larger than the standard library's backlog (128), none accepted yet:
    /// every one is in the accept queue at once, none waits for a retried handshake.
    #[tokio::test]
    async fn the_accept_queue_holds_a_burst_as_large_as_the_backlog() {
        // The kernel caps the backlog at `somaxconn` (4096 since Linux 5.4, 128 before).
        let somaxconn =
            std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|s| s.trim().parse().ok());
        let burst = somaxconn.unwrap_or(128).min(1_000);
        let listener = bind("127.0.0.1:0".parse().unwrap(), burst).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::with_capacity(burst);
        for _ in 0..burst {
            // A full queue drops the handshake: connect would hang until the client gives up.
            let connecting = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr));
            let mut s = connecting.await.expect("a handshake dropped: the accept queue is full").unwrap();
            s.write_all(b"GET /").await.unwrap();
            clients.push(s);
        }
        let mut accepted = 0;
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await {
            accepted += 1;
        }
        assert_eq!(accepted, burst, "connections the kernel dropped from a full accept queue");
    }
}
