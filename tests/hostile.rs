//! The bridge as a public service under attack, with the settings an operator gets by default:
//! a hostile full-access homeserver (slow answers, an endless OpenID body, absurd `Retry-After`,
//! hundreds of jobs on the shortest delay accepted) next to 50 connected members of a legitimate
//! homeserver (a real Synapse), and slowloris clients holding thousands of half-open connections
//! while LiveKit's webhooks come in. Judged from outside: at the legitimate homeserver (every
//! restart, through the recording proxy), in Synapse's room state, in the bridge's resident
//! memory, and by the webhook sender's clock.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::bridge::{Bridge, SLOT};
use common::hs_proxy::HsProxy;
use common::livekit::{API_SECRET, LiveKit};
use common::synapse::{MatrixUser, SERVER_NAME, Synapse, SynapseOptions};
use futures::StreamExt as _;
use rtc_leave_bridge::identity;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const EVIL: &str = "evil.test";
const LEGIT_MEMBERS: usize = 50;
/// Element Call's delay.
const LEGIT_DELAY_MS: u64 = 10_000;
/// More jobs than the bridge once had restart slots in all.
const HOSTILE_JOBS: usize = 600;
/// The shortest delay the bridge accepts by default.
const HOSTILE_DELAY_MS: u64 = 5_000;
/// How long the hostile homeserver takes to answer a delayed-event call (or `/versions`).
const HOSTILE_ANSWER: Duration = Duration::from_secs(10);

/// The two tests measure latencies and memory: not at the same time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A homeserver written to hurt: vouches for any OpenID token (`@<token>:evil.test`), except
/// tokens starting `endless`, answered with a body that never ends; answers `/versions` and
/// delayed-event calls after [`HOSTILE_ANSWER`], except delay ids starting `syd_429`, answered
/// at once with `429` and a `Retry-After` of `u64::MAX` seconds.
struct Hostile {
    url: String,
    calls: Arc<AtomicUsize>,
    endless_bytes: Arc<AtomicU64>,
}

async fn hostile_homeserver() -> Hostile {
    let calls = Arc::new(AtomicUsize::new(0));
    let endless_bytes = Arc::new(AtomicU64::new(0));
    let (counted, streamed) = (calls.clone(), endless_bytes.clone());
    let app = axum::Router::new()
        .route(
            "/_matrix/federation/v1/openid/userinfo",
            get(move |Query(q): Query<std::collections::HashMap<String, String>>| {
                let streamed = streamed.clone();
                async move {
                    let token = q.get("access_token").cloned().unwrap_or_default();
                    if !token.starts_with("endless") {
                        return axum::Json(json!({ "sub": format!("@{token}:{EVIL}") })).into_response();
                    }
                    let chunk = Bytes::from(vec![b' '; 64 << 10]);
                    let body = futures::stream::repeat_with(move || {
                        streamed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        Ok::<_, std::io::Error>(chunk.clone())
                    });
                    let mut r = Response::new(Body::from_stream(body));
                    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    r
                }
            }),
        )
        .route(
            "/_matrix/client/versions",
            get(|| async {
                tokio::time::sleep(HOSTILE_ANSWER).await;
                axum::Json(json!({"versions": ["v1.11"]}))
            }),
        )
        .route(
            "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{id}/{action}",
            post(move |Path((id, _action)): Path<(String, String)>| {
                counted.fetch_add(1, Ordering::Relaxed);
                async move {
                    if id.starts_with("syd_429") {
                        let mut r = (
                            StatusCode::TOO_MANY_REQUESTS,
                            axum::Json(json!({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": u64::MAX})),
                        )
                            .into_response();
                        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(u64::MAX));
                        return r;
                    }
                    tokio::time::sleep(HOSTILE_ANSWER).await;
                    axum::Json(json!({})).into_response()
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Hostile { url, calls, endless_bytes }
}

/// The bridge's settings as an operator gets them, but for where the parties are (and quick
/// reconciliation): every limit an attacker meets at its default.
fn default_limits_env(
    homeserver: &str,
    livekit: &LiveKit,
    hostile: Option<&str>,
) -> std::collections::HashMap<String, String> {
    let mut env = Bridge::env_for(homeserver, livekit);
    for setting in [
        "RTC_LEAVE_BRIDGE_MIN_DELAY",
        "RTC_LEAVE_BRIDGE_USER_RATE",
        "RTC_LEAVE_BRIDGE_HOMESERVER_RATE",
        "RTC_LEAVE_BRIDGE_REQUEST_TIMEOUT",
    ] {
        env.remove(setting);
    }
    env.insert("LIVEKIT_LOG_LEVEL".into(), "info".into());
    if let Some(hostile) = hostile {
        let overrides = format!("{SERVER_NAME}={homeserver},{EVIL}={hostile}");
        env.insert("LIVEKIT_FULL_ACCESS_HOMESERVERS".into(), format!("{SERVER_NAME},{EVIL}"));
        env.insert("LIVEKIT_CS_API_URL_OVERRIDES".into(), overrides.clone());
        env.insert("LIVEKIT_FEDERATION_URL_OVERRIDES".into(), overrides);
    }
    env
}

/// 50 members of a legitimate homeserver sit connected in a call while a hostile full-access
/// homeserver hands the bridge 600 jobs on 5 s delays (answering each call after 10 s, or with
/// an absurd 429) and streams endless OpenID answers: not one legitimate member is removed, each
/// is restarted within its delay every time (judged at Synapse), and the bridge's memory stays
/// bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_homeserver_delays_only_its_own_members() {
    let _one = ONE_AT_A_TIME.lock().await;
    let synapse = Synapse::start(SynapseOptions::default()).await;
    let proxy = HsProxy::start(&synapse.url).await;
    let livekit = LiveKit::start().await;
    let hostile = hostile_homeserver().await;
    let bridge = Bridge::start(default_limits_env(&proxy.url, &livekit, Some(&hostile.url))).await;

    // The legitimate call: 50 members, each connected and delegated.
    let owner = synapse.register("owner").await;
    let room = synapse.create_room(&owner).await;
    let lk_room = identity::livekit_room(&room, SLOT);
    let mut members: Vec<(MatrixUser, String, Instant)> = Vec::new();
    for i in 0..LEGIT_MEMBERS {
        let user = synapse.register(&format!("m{i}")).await;
        synapse.join_room(&user, &room).await;
        let delay_id = synapse.join_call(&user, &room, LEGIT_DELAY_MS).await;
        let delegated = Instant::now();
        bridge.delegate(&synapse, &user, &room, "m", &delay_id, LEGIT_DELAY_MS).await;
        let identity = identity::identity_three_part(&user.user_id, &user.device_id, "m");
        livekit.join(&bridge.url, &lk_room, &identity).await;
        members.push((user, delay_id, delegated));
    }
    let rss_before = common::rss_kib(bridge.pid().unwrap());

    // The attack: 600 hostile jobs in a room of their own, all "connected".
    let http = reqwest::Client::new();
    let hostile_room = format!("!hostile:{EVIL}");
    let lk_hostile = identity::livekit_room(&hostile_room, SLOT);
    let statuses: Vec<u16> = futures::stream::iter(0..HOSTILE_JOBS)
        .map(|i| {
            let (http, url, room) = (http.clone(), bridge.url.clone(), hostile_room.clone());
            async move {
                let delay_id = if i < 20 { format!("syd_429_{i}") } else { format!("syd_h{i}") };
                let body = json!({
                    "room_id": room, "slot_id": SLOT,
                    "openid_token": {"access_token": format!("h{i}"), "token_type": "Bearer", "matrix_server_name": EVIL, "expires_in": 3600},
                    "member": {"id": "m", "claimed_user_id": format!("@h{i}:{EVIL}"), "claimed_device_id": "D"},
                    "delay_id": delay_id, "delay_timeout": HOSTILE_DELAY_MS,
                });
                let resp = http.post(format!("{url}/delegate_delayed_leave")).json(&body).send().await.unwrap();
                resp.status().as_u16()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200), "hostile delegations refused: {statuses:?}");
    for i in 0..HOSTILE_JOBS {
        livekit.connect(&lk_hostile, &identity::identity_three_part(&format!("@h{i}:{EVIL}"), "D", "m"));
    }
    // And endless OpenID answers, eight at once.
    let endless = futures::future::join_all((0..8).map(|i| {
        let (http, url) = (http.clone(), bridge.url.clone());
        async move {
            let body = json!({
                "room": format!("!r{i}:{EVIL}"), "device_id": "D",
                "openid_token": {"access_token": format!("endless{i}"), "matrix_server_name": EVIL},
            });
            let started = Instant::now();
            let resp = http.post(format!("{url}/sfu/get")).json(&body).send().await.unwrap();
            (resp.status().as_u16(), started.elapsed())
        }
    }));
    let endless = endless.await;
    for (status, took) in &endless {
        assert_eq!(*status, 502, "an endless OpenID answer is a homeserver that cannot be asked");
        assert!(*took < Duration::from_secs(11), "{took:?}");
    }

    // Forty seconds of it.
    let attack_started = Instant::now();
    let mut peak_rss = rss_before;
    let mut peak_waiting = 0.0f64;
    while attack_started.elapsed() < Duration::from_secs(40) {
        peak_rss = peak_rss.max(common::rss_kib(bridge.pid().unwrap()));
        peak_waiting = peak_waiting.max(bridge.metric(r#"rtc_leave_bridge_calls_waiting{action="restart"}"#).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ended = Instant::now();

    // The attack was real: the hostile homeserver's calls backed up behind its own cap.
    assert!(hostile.calls.load(Ordering::Relaxed) >= 128, "the hostile homeserver was hardly called");
    assert!(peak_waiting > 0.0, "no restart ever waited: the attack did not load the bridge");
    let timeouts = bridge
        .metric(
            r#"rtc_leave_bridge_homeserver_requests_total{action="restart",homeserver="evil.test",outcome="timeout"}"#,
        )
        .await;
    assert!(timeouts > 0.0, "no hostile call timed out");

    // Every legitimate member: still in the call, and restarted well within its delay, always.
    let slowest_allowed = Duration::from_millis(LEGIT_DELAY_MS * 9 / 10);
    let mut worst = Duration::ZERO;
    for (user, delay_id, delegated) in &members {
        assert!(synapse.is_member(user, &room).await, "{} removed while connected\n{}", user.user_id, bridge.logs());
        let restarts: Vec<Instant> = proxy
            .calls_of(delay_id, "restart")
            .into_iter()
            .filter(|c| c.status == Some(200))
            .map(|c| c.received)
            .collect();
        let mut times = vec![*delegated];
        times.extend(restarts);
        times.push(ended);
        for w in times.windows(2) {
            let gap = w[1].saturating_duration_since(w[0]);
            worst = worst.max(gap);
            assert!(gap < slowest_allowed, "{}: {gap:?} without a restart (delay {LEGIT_DELAY_MS} ms)", user.user_id);
        }
    }
    assert_eq!(proxy.count("send", Some(200)), 0, "a legitimate member's leave was sent");
    let grown_mib = peak_rss.saturating_sub(rss_before) / 1024;
    let endless_mib = hostile.endless_bytes.load(Ordering::Relaxed) >> 20;
    println!(
        "hostile homeserver: {HOSTILE_JOBS} jobs, {} calls to it, peak restarts waiting {peak_waiting}; \
         {LEGIT_MEMBERS} legitimate members: worst time between restarts {worst:?}; \
         RSS {} MiB → peak +{grown_mib} MiB while the hostile homeserver streamed {endless_mib} MiB",
        hostile.calls.load(Ordering::Relaxed),
        rss_before / 1024,
    );
    assert!(grown_mib < 150, "the bridge grew by {grown_mib} MiB under attack");
}

/// Thousands of clients open connections and never finish their headers: LiveKit's webhooks
/// still get `200` within 100 ms, the half-open connections are closed after the header timeout,
/// memory stays bounded, and a SIGTERM still drains and exits in bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_clients_starve_neither_webhooks_nor_shutdown() {
    let _one = ONE_AT_A_TIME.lock().await;
    const HALF_OPEN: usize = 3_000;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(8);
    let livekit = LiveKit::start().await;
    let mut env = default_limits_env("http://127.0.0.1:9", &livekit, None);
    env.insert("RTC_LEAVE_BRIDGE_HEADER_TIMEOUT".into(), format!("{}s", HEADER_TIMEOUT.as_secs()));
    let mut bridge = Bridge::start(env).await;
    let pid = bridge.pid().unwrap();
    let rss_before = common::rss_kib(pid);
    let addr = bridge.url.trim_start_matches("http://").to_owned();

    let mut slow = Vec::with_capacity(HALF_OPEN);
    for _ in 0..HALF_OPEN {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /sfu_webhook HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/webhook+json\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    let opened = Instant::now();
    // Connected as far as the client knows once the kernel has them; the bridge accepts them
    // from its backlog moments later (seconds on a loaded machine).
    let held = bridge.metric_reaches("rtc_leave_bridge_http_connections", HALF_OPEN as f64).await;
    assert!(held >= HALF_OPEN as f64, "{held} of {HALF_OPEN} half-open connections held");

    // LiveKit's webhooks meanwhile, each on a connection of its own as a retry would be.
    let mut latencies = Vec::new();
    for i in 0..50 {
        let p = livekit.connect("lk-room", &format!("@u{i}:hs1.test:DEV"));
        let body = livekit.participant_event("participant_joined", "lk-room", &p, None);
        let auth = LiveKit::sign(&body, API_SECRET);
        let started = Instant::now();
        let status = reqwest::Client::new()
            .post(format!("{}/sfu_webhook", bridge.url))
            .header(header::CONTENT_TYPE, "application/webhook+json")
            .header(header::AUTHORIZATION, auth)
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        latencies.push(started.elapsed());
        assert_eq!(status, 200);
    }
    latencies.sort();
    let worst = *latencies.last().unwrap();
    assert!(opened.elapsed() < HEADER_TIMEOUT, "the webhooks came after the header timeout");
    assert!(worst < Duration::from_millis(100), "a webhook took {worst:?} with {HALF_OPEN} half-open connections");
    let rss_peak = common::rss_kib(pid);

    // The header timeout closes every half-open connection.
    tokio::time::sleep((HEADER_TIMEOUT + Duration::from_secs(1)).saturating_sub(opened.elapsed())).await;
    let mut closed = 0;
    for s in &mut slow {
        let mut buf = [0u8; 256];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, HALF_OPEN, "half-open connections left open past the header timeout");
    assert!(
        common::eventually(Duration::from_secs(2), || async {
            bridge.metric("rtc_leave_bridge_http_connections").await < 10.0
        })
        .await
    );

    // Half-open again, then SIGTERM: the drain is bounded, whatever they do.
    drop(slow);
    let mut slow = Vec::new();
    for _ in 0..500 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /sfu_webhook HTTP/1.1\r\nHost: bridge\r\n").await.unwrap();
        slow.push(s);
    }
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = bridge.terminate();
        (status, bridge)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "{status:?}");
    let took = started.elapsed();
    println!(
        "slowloris: {HALF_OPEN} half-open connections; webhooks p50 {:?}, worst {worst:?}; RSS {} MiB → {} MiB; SIGTERM with 500 half-open: exit after {took:?}",
        latencies[latencies.len() / 2],
        rss_before / 1024,
        rss_peak / 1024
    );
    assert!(took < Duration::from_secs(12), "shutdown took {took:?}");
    assert!(rss_peak.saturating_sub(rss_before) < 100 * 1024, "RSS {rss_before} KiB → {rss_peak} KiB");
    drop(slow);
}

/// A proxy from the environment (`HTTPS_PROXY`, `HTTP_PROXY`) would resolve discovered names
/// itself, past the SSRF guard: the bridge never sends a discovered homeserver's requests
/// through it. A client naming a server that resolves to loopback is refused, and the proxy
/// sees no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_from_the_environment_does_not_get_around_the_ssrf_guard() {
    let livekit = LiveKit::start().await;
    // The "proxy": counts the connections it is offered.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let offered = Arc::new(AtomicUsize::new(0));
    let counted = offered.clone();
    tokio::spawn(async move {
        while let Ok((_conn, _)) = proxy.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    // An internal service on loopback, named by the client as its homeserver.
    let internal = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let internal_port = internal.local_addr().unwrap().port();
    let mut env = default_limits_env("http://127.0.0.1:9", &livekit, None);
    env.insert("LIVEKIT_FULL_ACCESS_HOMESERVERS".into(), "*".into());
    for name in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY"] {
        env.insert(name.into(), proxy_url.clone());
    }
    let bridge = Bridge::start(env).await;
    let body = json!({
        "room": "!r:example.org", "device_id": "D",
        "openid_token": {"access_token": "t", "matrix_server_name": format!("localhost:{internal_port}")},
    });
    let resp = reqwest::Client::new().post(format!("{}/sfu/get", bridge.url)).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    assert!(status == 502 || status == 403, "{status}: {}", resp.text().await.unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(offered.load(Ordering::SeqCst), 0, "the request went through the environment's proxy");
    let reached = tokio::time::timeout(Duration::from_millis(100), internal.accept()).await;
    assert!(reached.is_err(), "the internal service was reached");
}
