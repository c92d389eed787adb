//! Chaos with the real thing: three bridge instances on Redis, a real LiveKit server, a real
//! Synapse, and 20 real participant processes (LiveKit's client library) living call after call —
//! joining as Element Call does, then hanging up or being killed -9 — while bridge instances are
//! killed -9 and restarted and a share of LiveKit's webhooks is lost. Judged from outside:
//!
//! * premature: a leave sent while its member's client was still connected by LiveKit's account —
//!   before the client hung up or died, and before LiveKit reported its session gone — never (a
//!   client starved of CPU long enough for LiveKit to time it out is gone for the SFU, the source
//!   of truth; such lives are counted apart);
//! * superseded sent: a life's leave sent after the same member's next call was delegated (its
//!   old delay id must never be sent) — never;
//! * late: a life's leave accepted more than 10 s after both its end and LiveKit's first report of
//!   its session gone (as the webhook proxy saw it, delivered or lost), failover and
//!   reconciliation of lost webhooks included;
//! * left to the homeserver's timer: a life that ended, was not superseded in time, and left room
//!   state without the bridge's send — never;
//! * still connected at the end: membership present.
//!
//! Each call has its own state key, as in the emulator's chaos suite: a killed client's old
//! delayed leave (never sent by the bridge once superseded) then fires on its own key, as the
//! client's recovery would have it, rather than over the member's next membership.
//!
//! `REAL_CHAOS_SECONDS` (default 45) sets how long lives and faults go on; `REAL_CHAOS_MEMBERS`
//! (default 20) how many participants live at once; `REAL_CHAOS_SEED` replays the choices.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::bridge::Bridge;
use common::hs_proxy::HsProxy;
use common::livekit_server::LiveKitServer;
use common::participant::Participant;
use common::synapse::{MatrixUser, Synapse, SynapseOptions};
use common::webhook_proxy::WebhookProxy;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};

const LEASE: Duration = Duration::from_secs(1);
const DELAY_MS: u64 = 6_000;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One call of one member, from its token to its end.
#[derive(Debug, Clone)]
struct Life {
    user: String,
    /// Its membership's state key.
    key: String,
    delay_id: String,
    /// When its delayed leave was scheduled at Synapse (its delay runs from then).
    scheduled: Instant,
    /// When the bridge took its delegation (the token answered).
    delegated: Instant,
    /// Its LiveKit session.
    sid: String,
    /// When its client hung up or was killed; `None`: still connected at the end.
    ended: Option<Instant>,
    killed: bool,
}

async fn live(
    user: MatrixUser,
    room: String,
    synapse: Arc<Synapse>,
    bridges: Vec<String>,
    seed: u64,
    until: Instant,
    lives: Arc<Mutex<Vec<Life>>>,
) -> Option<Participant> {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let mut n = 0;
    while Instant::now() + Duration::from_secs(4) < until {
        n += 1;
        let key = format!("{}_{n}", user.state_key());
        let scheduled = Instant::now();
        let delay_id = synapse.join_call_as(&user, &room, &key, DELAY_MS).await;
        let body = json!({
            "room": room, "openid_token": synapse.openid_token(&user).await, "device_id": user.device_id,
            "delay_id": delay_id, "delay_timeout": DELAY_MS,
        });
        // As a client: any instance, retried on 502/503/429 and refused connections.
        let answer = loop {
            let url = &bridges[rng.random_range(0..bridges.len())];
            if let Ok(r) = http.post(format!("{url}/sfu/get")).json(&body).send().await {
                match r.status().as_u16() {
                    200 => break r.json::<Value>().await.unwrap(),
                    429 | 502 | 503 => {}
                    other => panic!("token refused with {other}: {}", r.text().await.unwrap_or_default()),
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let delegated = Instant::now();
        let mut p = Participant::join(answer["url"].as_str().unwrap(), answer["jwt"].as_str().unwrap()).await;
        let index = {
            let mut l = lives.lock().unwrap();
            l.push(Life {
                sid: p.sid.clone(),
                user: user.user_id.clone(),
                key,
                delay_id,
                scheduled,
                delegated,
                ended: None,
                killed: false,
            });
            l.len() - 1
        };
        let stay = Duration::from_millis(rng.random_range(3_000..10_000));
        tokio::time::sleep(stay.min(until.saturating_duration_since(Instant::now()))).await;
        if Instant::now() >= until {
            return Some(p); // connected at the end: kept so until the checks are done
        }
        let killed = rng.random_bool(0.4);
        let ended = Instant::now();
        if killed {
            p.kill9();
        } else {
            p.hang_up().await;
        }
        {
            let mut l = lives.lock().unwrap();
            l[index].ended = Some(ended);
            l[index].killed = killed;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2_000))).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_livekit_chaos_three_instances_on_redis() {
    let seconds = setting("REAL_CHAOS_SECONDS", 45);
    let members = setting("REAL_CHAOS_MEMBERS", 20) as usize;
    let seed = setting("REAL_CHAOS_SEED", rand::random());
    println!("real chaos: {members} participants, {seconds} s, seed {seed} (replay: REAL_CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    let synapse = Arc::new(Synapse::start(SynapseOptions::default()).await);
    let hs = HsProxy::start(&synapse.url).await;
    let redis = common::redis::Redis::start().await;
    let ports: Vec<u16> = (0..3).map(|_| common::free_port()).collect();
    let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let webhooks = WebhookProxy::start_many(&urls).await;
    webhooks.lose_every(7); // one webhook in seven lost (LiveKit never retries it)
    let livekit = LiveKitServer::start(std::slice::from_ref(&webhooks.url)).await;
    let mut bridges = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let mut env = Bridge::env_for_cluster_url(&hs.url, &livekit.url, &redis.url(), LEASE, &format!("rc{i}"));
        env.insert("LIVEKIT_LOG_LEVEL".into(), "info".into());
        bridges.push(Bridge::start_on(*port, env).await);
    }
    let owner = synapse.register("owner").await;
    let rooms = [synapse.create_room(&owner).await, synapse.create_room(&owner).await];
    let mut users = Vec::new();
    for i in 0..members {
        let user = synapse.register(&format!("p{i}")).await;
        let room = rooms[i % 2].clone();
        synapse.join_room(&user, &room).await;
        users.push((user, room));
    }

    let begin = Instant::now();
    let until = begin + Duration::from_secs(seconds);
    let lives = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (user, room) in &users {
        let task = live(user.clone(), room.clone(), synapse.clone(), urls.clone(), rng.random(), until, lives.clone());
        tasks.push(tokio::spawn(task));
        tokio::time::sleep(Duration::from_millis(150)).await; // not every client at once
    }
    // Faults: a bridge instance killed -9 every few seconds, restarted two seconds later.
    let mut kills = 0;
    while Instant::now() + Duration::from_secs(6) < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(4_000..8_000))).await;
        let i = rng.random_range(0..bridges.len());
        bridges[i].kill9();
        kills += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
        bridges[i].restart().await;
    }
    let mut connected = Vec::new();
    for t in tasks {
        connected.extend(t.await.unwrap());
    }
    // Every leave has had its time to land (a kill: LiveKit's ~21 s, then ours).
    tokio::time::sleep(Duration::from_secs(45)).await;

    let lives = lives.lock().unwrap().clone();
    let users_by_id: std::collections::HashMap<&str, (&MatrixUser, &str)> =
        users.iter().map(|(u, r)| (u.user_id.as_str(), (u, r.as_str()))).collect();
    let (mut premature, mut superseded_sent, mut late, mut by_timer) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut superseded, mut worst) = (0, Duration::ZERO);
    let deliveries = webhooks.deliveries();
    // When LiveKit first said a session was gone (delivered or lost on the way).
    let reported = |sid: &str| {
        deliveries
            .iter()
            .filter(|d| d.event == "participant_left" || d.event == "participant_connection_aborted")
            .find(|d| d.body.pointer("/participant/sid").and_then(Value::as_str) == Some(sid))
            .map(|d| d.received)
    };
    let mut slowest_report = Duration::ZERO;
    // Lives whose live client LiveKit itself gave up on (then sent, rightly).
    let mut dropped_by_livekit = 0;
    for (i, life) in lives.iter().enumerate() {
        // The same member's next call, if any.
        let next = lives[i + 1..].iter().find(|l| l.user == life.user).map(|l| l.delegated);
        let send = hs.accepted_send(&life.delay_id);
        let bound = Duration::from_secs(10);
        match (life.ended, &send) {
            (None, Some(send)) => match reported(&life.sid) {
                Some(r) if r <= send.received => dropped_by_livekit += 1,
                _ => premature.push(format!("{life:?}: sent while connected at the end")),
            },
            (None, None) => {}
            (Some(ended), Some(send)) => {
                if send.received < ended {
                    match reported(&life.sid) {
                        Some(r) if r <= send.received => dropped_by_livekit += 1,
                        _ => premature.push(format!("{life:?}: sent {:?} before its end", ended - send.received)),
                    }
                }
                if next.is_some_and(|n| send.received > n) {
                    superseded_sent.push(format!("{life:?}"));
                }
                let report = reported(&life.sid);
                if let Some(r) = report {
                    slowest_report = slowest_report.max(r.saturating_duration_since(ended));
                }
                let known = report.map_or(ended, |r| r.max(ended));
                let took = send.answered.saturating_duration_since(known);
                worst = worst.max(took);
                if took > bound {
                    late.push(format!("{life:?}: {took:?} after LiveKit's report ({report:?})"));
                }
            }
            (Some(ended), None) => {
                let known = reported(&life.sid).map_or(ended, |r| r.max(ended));
                if next.is_some_and(|n| n < known + bound) {
                    superseded += 1; // its successor came first: never to be sent
                } else {
                    by_timer.push(format!("{life:?}"));
                }
            }
        }
    }
    // Those still connected at the end are still in room state, under their own key — unless the
    // client handed its leave over too late for any restart (its delay all but gone while its
    // token request was retried through the faults): the homeserver's timer had it first.
    let mut gone_while_connected = Vec::new();
    let mut handed_too_late = 0;
    for life in lives.iter().filter(|l| l.ended.is_none()) {
        let (user, room) = users_by_id[life.user.as_str()];
        if synapse.membership(user, room, &life.key).await != Some(true) {
            let handover = life.delegated.saturating_duration_since(life.scheduled);
            if handover + Duration::from_secs(1) >= Duration::from_millis(DELAY_MS) {
                handed_too_late += 1;
                continue;
            }
            let calls: Vec<String> = hs
                .calls()
                .into_iter()
                .filter(|c| c.delay_id.as_deref() == Some(life.delay_id.as_str()))
                .map(|c| format!("{:?} {:?} at {:?}", c.action, c.status, c.received.saturating_duration_since(begin)))
                .collect();
            gone_while_connected.push(format!("{}: handed over {handover:?} after scheduling; {calls:?}", life.user));
        }
    }
    let ended = lives.iter().filter(|l| l.ended.is_some()).count();
    let killed = lives.iter().filter(|l| l.killed).count();
    let lost = webhooks.deliveries().iter().filter(|d| d.status.is_none()).count();
    println!(
        "real chaos: {} lives ({ended} ended, {killed} by kill -9, {superseded} superseded before their leave), \
         {kills} bridge kills, {lost} webhooks lost of {}; premature {} ({dropped_by_livekit} dropped by LiveKit first), superseded sent {}, late {}, \
         left to the homeserver's timer {}, gone while connected {} (and {handed_too_late} handed over too late); \
         LiveKit's slowest report of a departure {slowest_report:?}, worst leave after it {worst:?}",
        lives.len(),
        webhooks.deliveries().len(),
        premature.len(),
        superseded_sent.len(),
        late.len(),
        by_timer.len(),
        gone_while_connected.len(),
    );
    let logs = || bridges.iter().map(|b| b.logs()).collect::<Vec<_>>().join("\n----\n");
    assert!(gone_while_connected.is_empty(), "gone from room state while connected: {gone_while_connected:#?}");
    assert!(premature.is_empty(), "premature leaves: {premature:#?}\n{}", logs());
    assert!(superseded_sent.is_empty(), "superseded leaves sent: {superseded_sent:#?}");
    assert!(late.is_empty(), "late leaves: {late:?}");
    assert!(by_timer.is_empty(), "left to the homeserver's timer: {by_timer:?}");
    assert!(lives.len() >= members, "fewer lives than members");
    drop(connected);
}
