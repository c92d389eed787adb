//! Chaos with the real thing: three bridge instances on Redis, a real LiveKit server, a real
//! Synapse, and 20 real participant processes (LiveKit's client library) living call after call —
//! joining as Element Call does, some frozen (SIGSTOP) for a few seconds mid-call, then hanging up
//! or being killed -9 — while bridge instances are killed -9 and restarted, LiveKit itself is
//! killed -9 and restarted, and a share of LiveKit's webhooks is lost. Judged from outside, by
//! LiveKit's own account of each life's sessions: a session runs from its join until LiveKit
//! reports it gone (webhooks as the proxy saw them, delivered or lost) or LiveKit dies; a client
//! that reconnects after LiveKit's restart opens a new session of the same life.
//!
//! * premature: a leave sent while its life was still connected — before the client hung up or
//!   died, inside one of its sessions — never (a session that LiveKit timed out, or that died
//!   with LiveKit, is gone for the SFU, the source of truth: such sends are counted apart);
//! * superseded sent: a life's leave sent after the same member's next call was delegated (its
//!   old delay id must never be sent) — never, but for a send already on its way when the next
//!   delegation was stored (reaching the homeserver within [`CROSSING`] of its answer: the
//!   bridge holds each send until its shard's inbox is known to hold no newer delegation, and
//!   cannot recall one it started before the newer delegation was there): counted apart;
//! * late: a life's leave (accepted) sent more than 10 s after the bridge could know it was over: its
//!   end, LiveKit's report of its last session gone, or, for a session that died with LiveKit,
//!   LiveKit's restart (failover and reconciliation of lost webhooks included);
//! * left to the homeserver's timer: a life that ended, was not superseded in time, and left room
//!   state without the bridge's send — never, unless its client handed the leave over too late for
//!   any restart (its delay all but run out while it got its token, or less of it left than a
//!   failover takes while an instance was being killed: counted apart); if the timer's leave
//!   (Synapse's timestamp) came before the client hung up or died, the member was removed while
//!   connected, and is reported so;
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
/// How long the bridge waits for a delegated member to connect before it may give up on it: its
/// join timeout (`Bridge::env_for`: 3 s; 30 s by default) and then three listings 1.5 s apart
/// that do not list it. Both run from the delegation's creation by the bridge, which is after the
/// client first asked for its token, but may be well before the answer reached it (an answer
/// slow on a loaded machine, or lost with an instance killed after storing the delegation).
const JOIN_PATIENCE: Duration = Duration::from_secs(6);
/// How long after the next call's delegation was answered a send of the older delay id may still
/// reach the homeserver without having been started after it: the look at the inbox before the
/// send, the send's start and its way to the homeserver.
const CROSSING: Duration = Duration::from_millis(100);
/// How long a client goes on asking for a token before the run fails: every fault here (an
/// instance killed for 2 s, LiveKit for 2 s and its restart) is over well within it, so an
/// instance still unable to answer past it is a bridge that does not recover.
const TOKEN_PATIENCE: Duration = Duration::from_secs(60);
/// How long a life may take past the end of the run before the run fails as stuck (a token
/// asked for at the last moment, a 30 s join, a 15 s hang-up, with room to spare).
const LIFE_OVERRUN: Duration = Duration::from_secs(150);

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One call of one member, from its token to its end.
#[derive(Debug, Clone)]
struct Life {
    user: String,
    /// Its LiveKit identity (the same for every call of the member).
    identity: String,
    /// Its membership's state key.
    key: String,
    delay_id: String,
    /// When its delayed leave was scheduled at Synapse (its delay runs from then).
    scheduled: Instant,
    /// When the client first asked for its token (the bridge cannot have stored the delegation
    /// before).
    asked: Instant,
    /// When the bridge took its delegation (the token answered).
    delegated: Instant,
    /// Its first LiveKit session (empty: the client never connected, LiveKit being down).
    sid: String,
    /// When its client hung up, was killed or gave up connecting; `None`: still running at the
    /// end.
    ended: Option<Instant>,
    killed: bool,
    /// Frozen (SIGSTOP) for a few seconds mid-call.
    frozen: bool,
}

/// What one client knows: who it is, its room, its homeserver, the bridge instances' addresses.
struct Client {
    user: MatrixUser,
    room: String,
    synapse: Arc<Synapse>,
    bridges: Vec<String>,
}

/// One client living call after call until `until`, each call recorded in `lives`, what it is
/// doing in `step`; the participant still connected at the end, if any.
async fn live(
    Client { user, room, synapse, bridges }: Client,
    seed: u64,
    until: Instant,
    lives: Arc<Mutex<Vec<Life>>>,
    step: Arc<Mutex<String>>,
) -> Option<Participant> {
    let at = |what: String| *step.lock().unwrap() = what;
    let mut rng = StdRng::seed_from_u64(seed);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let identity = format!("{}:{}", user.user_id, user.device_id);
    let mut n = 0;
    while Instant::now() + Duration::from_secs(4) < until {
        n += 1;
        let key = format!("{}_{n}", user.state_key());
        let scheduled = Instant::now();
        at(format!("call {n}: scheduling its leave and asking for an OpenID token"));
        let delay_id = synapse.join_call_as(&user, &room, &key, DELAY_MS).await;
        let body = json!({
            "room": room, "openid_token": synapse.openid_token(&user).await, "device_id": user.device_id,
            "delay_id": delay_id, "delay_timeout": DELAY_MS,
        });
        // As a client: any instance, retried on 502/503/429, refused connections, and 500 (the
        // room could not be opened: LiveKit down).
        let asked = Instant::now();
        let mut refusals = Vec::new();
        let answer = loop {
            let url = &bridges[rng.random_range(0..bridges.len())];
            at(format!("call {n}: asking {url} for a token ({:?} so far: {:?})", asked.elapsed(), refusals.last()));
            match http.post(format!("{url}/sfu/get")).json(&body).send().await {
                Ok(r) => match r.status().as_u16() {
                    200 => break r.json::<Value>().await.unwrap(),
                    status @ (429 | 500 | 502 | 503) => {
                        refusals.push(format!("{url}: {status} {}", r.text().await.unwrap_or_default()))
                    }
                    other => panic!("token refused with {other}: {}", r.text().await.unwrap_or_default()),
                },
                Err(e) => refusals.push(format!("{url}: {e}")),
            }
            assert!(
                asked.elapsed() < TOKEN_PATIENCE,
                "{}: no token within {TOKEN_PATIENCE:?}: {refusals:#?}",
                user.user_id
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let delegated = Instant::now();
        at(format!("call {n}: joining LiveKit"));
        let joined = Participant::try_join_as(answer["url"].as_str().unwrap(), answer["jwt"].as_str().unwrap(), None);
        let mut life = Life {
            user: user.user_id.clone(),
            identity: identity.clone(),
            key,
            delay_id,
            scheduled,
            asked,
            delegated,
            sid: String::new(),
            ended: None,
            killed: false,
            frozen: false,
        };
        let mut p = match joined.await {
            Ok(p) => p,
            Err(_) => {
                // LiveKit died under the join: a call that never started.
                life.ended = Some(Instant::now());
                lives.lock().unwrap().push(life);
                continue;
            }
        };
        life.sid = p.sid.clone();
        let index = {
            let mut l = lives.lock().unwrap();
            l.push(life);
            l.len() - 1
        };
        at(format!("call {n}: in the call"));
        let stay = Duration::from_millis(rng.random_range(3_000..10_000));
        let end = (Instant::now() + stay).min(until);
        // A quarter of the calls freeze for 2–8 s (well inside LiveKit's ~20 s timeout).
        if rng.random_bool(0.25) {
            let at = Instant::now() + stay.mul_f64(rng.random_range(0.2..0.6));
            let length = Duration::from_millis(rng.random_range(2_000..8_000));
            tokio::time::sleep_until(at.min(end).into()).await;
            if Instant::now() < end {
                p.freeze(true);
                tokio::time::sleep(length).await;
                p.freeze(false);
                lives.lock().unwrap()[index].frozen = true;
            }
        }
        tokio::time::sleep_until(end.into()).await;
        if Instant::now() >= until {
            return Some(p); // connected at the end: kept so until the checks are done
        }
        let mut killed = rng.random_bool(0.4);
        let ended = Instant::now();
        at(format!("call {n}: ending it (killed: {killed})"));
        if killed {
            p.kill9();
        } else {
            killed = !p.leave().await;
        }
        {
            let mut l = lives.lock().unwrap();
            l[index].ended = Some(ended);
            l[index].killed = killed;
        }
        at(format!("call {n}: over"));
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
    let mut livekit = LiveKitServer::start(std::slice::from_ref(&webhooks.url)).await;
    let mut bridges = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let mut env = Bridge::env_for_cluster_url(&hs.url, &livekit.url, &redis.url(), LEASE, &format!("rc{i}"));
        env.insert("LIVEKIT_LOG_LEVEL".into(), "debug".into());
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
    // The same moment by the wall clock, to compare with Synapse's event timestamps.
    let begin_wall = std::time::SystemTime::now();
    let until = begin + Duration::from_secs(seconds);
    let lives = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (user, room) in &users {
        let step = Arc::new(Mutex::new(String::from("starting")));
        let client = Client { user: user.clone(), room: room.clone(), synapse: synapse.clone(), bridges: urls.clone() };
        let task = live(client, rng.random(), until, lives.clone(), step.clone());
        tasks.push((user.user_id.clone(), step, tokio::spawn(task)));
        tokio::time::sleep(Duration::from_millis(150)).await; // not every client at once
    }
    // Faults: every few seconds a bridge instance killed -9 and restarted two seconds later; now
    // and then (first after 12–20 s, then every 25–40 s) LiveKit itself instead.
    let (mut kills, mut outages) = (Vec::new(), Vec::new());
    let mut livekit_next = begin + Duration::from_millis(rng.random_range(12_000..20_000));
    while Instant::now() + Duration::from_secs(6) < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(4_000..8_000))).await;
        if Instant::now() >= livekit_next {
            let down = Instant::now();
            livekit.kill9();
            tokio::time::sleep(Duration::from_secs(2)).await;
            livekit.restart().await;
            outages.push((down, Instant::now()));
            livekit_next = Instant::now() + Duration::from_millis(rng.random_range(25_000..40_000));
            continue;
        }
        let i = rng.random_range(0..bridges.len());
        bridges[i].kill9();
        kills.push(Instant::now());
        tokio::time::sleep(Duration::from_secs(2)).await;
        bridges[i].restart().await;
    }
    // Every life over within its bound, or the run fails saying where each stuck one is.
    let mut connected = Vec::new();
    let mut stuck = Vec::new();
    for (user, step, mut task) in tasks {
        match tokio::time::timeout_at((until + LIFE_OVERRUN).into(), &mut task).await {
            Ok(done) => connected.extend(done.unwrap()),
            Err(_) => {
                task.abort();
                stuck.push(format!("{user}: {}", step.lock().unwrap()));
            }
        }
    }
    assert!(stuck.is_empty(), "lives still running {LIFE_OVERRUN:?} after the run's end: {stuck:#?}");
    // Every leave has had its time to land (a kill: LiveKit's ~21 s, then ours).
    tokio::time::sleep(Duration::from_secs(45)).await;

    let lives = lives.lock().unwrap().clone();
    let users_by_id: std::collections::HashMap<&str, (&MatrixUser, &str)> =
        users.iter().map(|(u, r)| (u.user_id.as_str(), (u, r.as_str()))).collect();
    let (mut premature, mut superseded_sent, mut late, mut by_timer) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut superseded, mut worst, mut crossed) = (0, Duration::ZERO, 0);
    let deliveries = webhooks.deliveries();
    // When LiveKit first said a session was gone (delivered or lost on the way).
    let reported = |sid: &str| {
        deliveries
            .iter()
            .filter(|d| d.event == "participant_left" || d.event == "participant_connection_aborted")
            .find(|d| d.sid.as_deref() == Some(sid))
            .map(|d| d.received)
    };
    // The end of a session that began at `start`: LiveKit's report, or LiveKit's death.
    let session_end = |sid: &str, start: Instant| {
        let died = outages.iter().map(|(down, _)| *down).find(|down| *down >= start);
        [reported(sid), died].into_iter().flatten().min()
    };
    // When the bridge could first ask LiveKit again about a moment `t` inside an outage.
    let asked_again = |t: Instant| outages.iter().find(|(down, up)| *down <= t && t < *up).map_or(t, |(_, up)| *up);
    // When LiveKit first said a session had joined (delivered or lost on the way).
    let joined = |sid: &str| {
        deliveries
            .iter()
            .filter(|d| d.event == "participant_joined")
            .find(|d| d.sid.as_deref() == Some(sid))
            .map(|d| d.received)
    };
    // A client that took longer than the bridge's patience to connect (a loaded machine starting
    // 20 WebRTC clients at once) may have been given up on before it did: the join timeout is
    // the operator's setting. Its first session then counts from LiveKit's report of its join.
    let slow_to_join = |life: &Life| joined(&life.sid).is_some_and(|j| j > life.asked + JOIN_PATIENCE);
    // A life's sessions by LiveKit's account, each (from, until): its first (from its
    // scheduling: a member about to connect counts as connected, unless it was slower than the
    // bridge's patience), then any its client opened by reconnecting after LiveKit's restart
    // (counted from a second after LiveKit said so).
    let sessions = |life: &Life, next: Option<Instant>| -> Vec<(Instant, Option<Instant>)> {
        let mut out = Vec::new();
        if !life.sid.is_empty() {
            let from = if slow_to_join(life) { joined(&life.sid).unwrap() } else { life.scheduled };
            out.push((from, session_end(&life.sid, life.delegated)));
        }
        let stop = [life.ended, next].into_iter().flatten().min();
        for d in &deliveries {
            let Some(sid) = d.sid.as_deref() else { continue };
            if d.event == "participant_joined"
                && d.identity.as_deref() == Some(life.identity.as_str())
                && sid != life.sid
                && d.received > life.delegated
                && stop.is_none_or(|s| d.received < s)
            {
                out.push((d.received + Duration::from_secs(1), session_end(sid, d.received)));
            }
        }
        out
    };
    let connected_at = |s: &[(Instant, Option<Instant>)], t: Instant| {
        s.iter().any(|(from, until)| *from <= t && until.is_none_or(|u| t < u))
    };
    // A client that handed its leave over too late for any restart (its delay all but gone
    // while it was still getting its token: a loaded homeserver, or retries through the faults):
    // the homeserver's timer may fire before the bridge can act, whatever it does. So may one
    // that handed over less than a failover takes (the bridge's minimum delay, lease × 1.25 +
    // 2 s: why it refuses shorter delays) around the time an instance was killed: its shard's
    // holder may be the one that died, and its first restart then waits for the takeover.
    let failover = Bridge::shortest_delay(LEASE);
    let too_late = |life: &Life| {
        let left =
            Duration::from_millis(DELAY_MS).saturating_sub(life.delegated.saturating_duration_since(life.scheduled));
        left <= Duration::from_secs(1)
            || (left < failover && kills.iter().any(|k| *k + failover >= life.delegated && *k <= life.delegated + left))
    };
    let mut handed_too_late = 0;
    let mut slowest_report = Duration::ZERO;
    // Sends for lives LiveKit itself no longer had (timed out, or died with it), and for clients
    // given up on before their slow join: right.
    let (mut dropped_by_livekit, mut given_up) = (0, 0);
    let mut rejoined = 0;
    for (i, life) in lives.iter().enumerate() {
        // The same member's next call, if any.
        let next = lives[i + 1..].iter().find(|l| l.user == life.user).map(|l| l.delegated);
        let sessions = sessions(life, next);
        rejoined += sessions.len().saturating_sub(1);
        let send = hs.accepted_send(&life.delay_id);
        let bound = Duration::from_secs(10);
        if let Some(send) = &send {
            if life.ended.is_none_or(|ended| send.received < ended) {
                if connected_at(&sessions, send.received) {
                    premature.push(format!("{life:?}: sent at {:?} while connected {sessions:?}", send.received));
                } else if slow_to_join(life) && joined(&life.sid).is_some_and(|j| send.received < j) {
                    given_up += 1;
                } else {
                    dropped_by_livekit += 1;
                }
            }
            if let Some(n) = next.filter(|n| send.received > *n) {
                let after = send.received - n;
                if after <= CROSSING {
                    crossed += 1;
                } else {
                    superseded_sent.push(format!("{life:?}: {after:?} after the next call's delegation was answered"));
                }
            }
        }
        let Some(ended) = life.ended else { continue };
        // When the bridge could know the life was over.
        let last_gone = sessions.iter().filter_map(|(_, until)| *until).max();
        if let Some(r) = reported(&life.sid) {
            slowest_report = slowest_report.max(r.saturating_duration_since(ended));
        }
        let known = asked_again(last_gone.map_or(ended, |g| g.max(ended)));
        match &send {
            Some(send) => {
                // To the send reaching the homeserver: a loaded Synapse takes up to seconds to
                // answer, which is not the bridge's part.
                let took = send.received.saturating_duration_since(known);
                worst = worst.max(took);
                if took > bound {
                    late.push(format!("{life:?}: {took:?} after it could be known ({sessions:?})"));
                }
            }
            None if next.is_some_and(|n| n < known + bound) => superseded += 1, // never to be sent
            None if too_late(life) => handed_too_late += 1,
            None => by_timer.push((life, ended)),
        }
    }
    let mut gone_while_connected = Vec::new();
    // A life left to the homeserver's timer whose membership the timer removed before the client
    // hung up or died was removed while connected: the sacred rule broken, not lateness.
    let mut left_late = Vec::new();
    for (life, ended) in by_timer {
        let (user, room) = users_by_id[life.user.as_str()];
        let removed_at = synapse
            .room_state(user, room)
            .await
            .into_iter()
            .find(|e| e["type"] == "org.matrix.msc3401.call.member" && e["state_key"] == life.key.as_str())
            .filter(|e| e["content"].as_object().is_some_and(|c| c.is_empty()))
            .and_then(|e| e["origin_server_ts"].as_u64());
        let ended = begin_wall + ended.saturating_duration_since(begin);
        let ended = ended.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        match removed_at {
            Some(removed) if removed + 50 < ended => {
                let before = Duration::from_millis(ended - removed);
                gone_while_connected.push(format!(
                    "{}: removed by the homeserver's timer {before:?} before its client ended",
                    life.user
                ));
            }
            _ => left_late.push(format!("{life:?}")),
        }
    }
    let by_timer = left_late;
    // Those still connected at the end are still in room state, under their own key — unless the
    // client handed its leave over too late (above): the homeserver's timer had it first.
    // (A life whose leave was sent is judged above.)
    for life in lives.iter().filter(|l| l.ended.is_none() && hs.accepted_send(&l.delay_id).is_none()) {
        let (user, room) = users_by_id[life.user.as_str()];
        if synapse.membership(user, room, &life.key).await != Some(true) {
            let handover = life.delegated.saturating_duration_since(life.scheduled);
            if too_late(life) {
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
    let frozen = lives.iter().filter(|l| l.frozen).count();
    let never = lives.iter().filter(|l| l.sid.is_empty()).count();
    let slow = lives.iter().filter(|l| slow_to_join(l)).count();
    let lost = webhooks.deliveries().iter().filter(|d| d.status.is_none()).count();
    println!(
        "real chaos: {} lives ({ended} ended, {killed} by kill -9, {frozen} frozen a while, {never} never connected, {slow} slower to connect than the bridge's patience, \
         {rejoined} sessions reopened after LiveKit's restart, {superseded} superseded before their leave), \
         {} bridge kills, {} LiveKit kills, {lost} webhooks lost of {}; premature {} ({dropped_by_livekit} dropped by LiveKit first, {given_up} given up on before a slow join), superseded sent {} ({crossed} crossing the next delegation on their way), late {}, \
         left to the homeserver's timer {}, gone while connected {} ({handed_too_late} handed over too late, not counted); \
         LiveKit's slowest report of a departure {slowest_report:?}, worst leave after it {worst:?}",
        lives.len(),
        kills.len(),
        outages.len(),
        webhooks.deliveries().len(),
        premature.len(),
        superseded_sent.len(),
        late.len(),
        by_timer.len(),
        gone_while_connected.len(),
    );
    let logs = || bridges.iter().map(|b| b.logs()).collect::<Vec<_>>().join("\n----\n");
    if !gone_while_connected.is_empty() {
        // The whole story, from every instance, in a file; what the bridge said of the members
        // lost (but their successful restarts) in the failure itself.
        let all = logs();
        let path = std::env::temp_dir().join(format!("real_chaos-{seed}.log"));
        std::fs::write(&path, &all).unwrap();
        let mut story: Vec<&str> = all
            .lines()
            .filter(|l| gone_while_connected.iter().any(|g| g.split(": ").next().is_some_and(|user| l.contains(user))))
            .filter(|l| !l.contains("outcome=\"ok\"") && !l.contains("listing applied"))
            .collect();
        story.sort(); // by their timestamps, across instances
        panic!(
            "gone from room state while connected: {gone_while_connected:#?}\n{}\n(every instance's log: {})",
            story[story.len().saturating_sub(40)..].join("\n"),
            path.display()
        );
    }
    assert!(premature.is_empty(), "premature leaves: {premature:#?}\n{}", logs());
    assert!(superseded_sent.is_empty(), "superseded leaves sent: {superseded_sent:#?}");
    assert!(late.is_empty(), "late leaves: {late:?}");
    assert!(by_timer.is_empty(), "left to the homeserver's timer: {by_timer:?}");
    assert!(lives.len() >= members, "fewer lives than members");
    drop(connected);
}
