//! The chaos suite: 200 members of 20 calls join, leave, rejoin with new delegations, refresh
//! their delayed leave (superseding the delegated one), migrate and reconnect under a duplicate
//! identity, against three instances on a real Redis and a real Synapse, while faults are
//! injected at seeded random times: kill -9 of an instance (and its restart) every few seconds,
//! 30 % of webhooks lost, 10 % delivered twice, deliveries delayed and reordered, LiveKit's
//! RoomService down for seconds at a time, Redis crashed and restarted (store errors).
//!
//! The oracle reads the truth from the two sides the bridge sits between: the LiveKit emulator's
//! record of when each member's sessions were connected, and Synapse's room timelines (when each
//! membership was published and when its leave landed, by the homeserver's own clock):
//! (a) no leave while the member was connected (premature) — a migration or a duplicate identity
//!     is a reconnection, not a departure;
//! (b) every departed member's leave within join timeout + 2 reconciliation intervals + the
//!     spacing of the two listings that prove absence + a RoomService outage (+ 2 s), and one
//!     takeover more per kill of an instance meanwhile;
//! (c) no superseded delay id ever sent;
//! (d) no delegation answered 200 lost: every member's last delayed leave sent by the bridge, none
//!     left to the homeserver's own timer.
//!
//! `CHAOS_SEED` replays a run (a failing run prints its seed); `CHAOS_SECONDS` sets how long faults
//! are injected (90 s by default; the README's long run: `CHAOS_SECONDS=1800`).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::bridge::{Bridge, SLOT, delegation_body};
use common::hs_proxy::HsProxy;
use common::livekit::{API_SECRET, LiveKit};
use common::redis::Redis;
use common::synapse::{MatrixUser, Synapse, SynapseOptions, enc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rtc_leave_bridge::identity;
use serde_json::Value;

const ROOMS: usize = 20;
const PER_ROOM: usize = 10;
const INSTANCES: usize = 3;
const DELAY_MS: u64 = 15_000;
const LEASE: Duration = Duration::from_secs(1);
/// `Bridge::env_for`'s join timeout and reconciliation interval.
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);
const RECONCILE: Duration = Duration::from_secs(2);
/// The longest RoomService outage injected.
const LIVEKIT_OUTAGE: Duration = Duration::from_secs(3);
/// A listing that finds a member absent proves nothing alone; the next one counts if it started
/// this long after (the bridge's `absence_spacing`).
const ABSENCE_SPACING: Duration = Duration::from_millis(1_500);
/// How late a departed member's leave may land: (b) — join timeout + 2 reconciliation intervals
/// (+ the spacing of the two listings that prove absence), a RoomService outage, and two seconds
/// for the homeserver under this load; each takeover of the member's shard meanwhile (its owner
/// killed) adds [`takeover`].
fn leave_bound() -> Duration {
    JOIN_TIMEOUT + 2 * RECONCILE + ABSENCE_SPACING + LIVEKIT_OUTAGE + Duration::from_secs(2)
}

/// What a kill of the owner adds: its lease runs out, another instance loads the jobs, and the
/// absence is proven again from the start.
fn takeover() -> Duration {
    LEASE * 5 / 4 + Duration::from_secs(1) + RECONCILE + ABSENCE_SPACING
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// What the run did and saw, for the report.
#[derive(Default)]
struct Tally {
    kills: usize,
    /// When each kill happened.
    kill_times: Vec<SystemTime>,
    webhooks: usize,
    lost: usize,
    duplicated: usize,
    livekit_outages: usize,
    redis_crashes: usize,
    refreshes: usize,
    migrations: usize,
    duplicate_identities: usize,
}

/// The instances as the members see them: addresses, and which are up.
struct Net {
    urls: Vec<String>,
    up: Mutex<Vec<bool>>,
    livekit: LiveKit,
    tally: Mutex<Tally>,
}

impl Net {
    fn pick(&self, rng: &mut StdRng) -> String {
        let up = self.up.lock().unwrap();
        let live: Vec<usize> = (0..up.len()).filter(|i| up[*i]).collect();
        let i = live.get(rng.random_range(0..live.len().max(1))).copied().unwrap_or(0);
        self.urls[i].clone()
    }

    /// Delivers a webhook as an unreliable LiveKit would: lost (30 %), delivered twice (10 %),
    /// after a random delay (so deliveries reorder), each delivery retried on 5xx or a refused
    /// connection (a killed instance) at another instance, as a load balancer would.
    fn webhook(self: &Arc<Self>, body: String, rng: &mut StdRng) {
        let mut tally = self.tally.lock().unwrap();
        tally.webhooks += 1;
        if rng.random_bool(0.3) {
            tally.lost += 1;
            return;
        }
        let copies = if rng.random_bool(0.1) {
            tally.duplicated += 1;
            2
        } else {
            1
        };
        drop(tally);
        for _ in 0..copies {
            let (net, body) = (self.clone(), body.clone());
            let delay = Duration::from_millis(rng.random_range(0..400));
            let mut rng = StdRng::seed_from_u64(rng.random());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let auth = LiveKit::sign(&body, API_SECRET);
                for _ in 0..50 {
                    let url = net.pick(&mut rng);
                    if let Ok(200) = net.livekit.try_post_webhook(&url, &body, Some(&auth)).await {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
    }

    /// Delegates until an instance answers 200 (a client retries 503 and refused connections).
    async fn delegate(&self, body: &Value, rng: &mut StdRng) {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        for _ in 0..200 {
            let url = self.pick(rng);
            if let Ok(r) = http.post(format!("{url}/delegate_delayed_leave")).json(body).send().await {
                match r.status().as_u16() {
                    200 => return,
                    503 => {}
                    other => panic!("delegation refused with {other}: {}", r.text().await.unwrap_or_default()),
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("no instance took a delegation for 40 s");
    }
}

/// One membership of one member, from publishing it to its last session's departure.
#[derive(Debug, Clone)]
struct Life {
    member: usize,
    state_key: String,
    /// Just before the membership was published.
    started: SystemTime,
    /// Every delay id delegated in this life; the last one is the live one.
    delay_ids: Vec<String>,
    /// Connected intervals of the member's sessions as LiveKit saw them, merged: a reconnection
    /// within the grace period (migration, duplicate identity) is no departure.
    disconnected: Option<SystemTime>,
}

struct Member {
    user: MatrixUser,
    room: String,
    lk_room: String,
    ident: String,
}

async fn live_member(
    i: usize,
    m: Arc<Member>,
    synapse: Arc<Synapse>,
    net: Arc<Net>,
    seed: u64,
    until: Instant,
) -> Vec<Life> {
    let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let livekit = net.livekit.clone();
    let mut lives = Vec::new();
    // Members join over the first seconds, not all at once.
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..5_000))).await;
    while Instant::now() < until {
        let started = SystemTime::now();
        let delay_id = synapse.join_call(&m.user, &m.room, DELAY_MS).await;
        let body = delegation_body(&synapse.openid_token(&m.user).await, &m.user, &m.room, "m1", &delay_id, DELAY_MS);
        net.delegate(&body, &mut rng).await;
        let mut life =
            Life { member: i, state_key: m.user.state_key(), started, delay_ids: vec![delay_id], disconnected: None };
        let mut session = livekit.connect(&m.lk_room, &m.ident);
        net.webhook(livekit.participant_event("participant_joined", &m.lk_room, &session, None), &mut rng);
        let stay = Instant::now() + Duration::from_millis(rng.random_range(10_000..40_000));
        while Instant::now() < stay.min(until) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..4_000))).await;
            let roll: f64 = rng.random();
            if roll < 0.05 {
                // The client refreshes its delayed leave: cancels it, schedules a new one (with
                // its membership) and delegates that; the old delay id must never be sent.
                let old = life.delay_ids.last().unwrap().clone();
                if synapse.try_cancel_delayed(&m.user, &old).await.0 != 200 {
                    // Gone already: the leave landed while connected, which the oracle reports.
                    continue;
                }
                let new = synapse.join_call(&m.user, &m.room, DELAY_MS).await;
                let body =
                    delegation_body(&synapse.openid_token(&m.user).await, &m.user, &m.room, "m1", &new, DELAY_MS);
                net.delegate(&body, &mut rng).await;
                life.delay_ids.push(new);
                net.tally.lock().unwrap().refreshes += 1;
            } else if roll < 0.15 {
                // A migration: the session leaves (MIGRATION) and comes back under a new SID.
                livekit.disconnect(&m.lk_room, &session.sid);
                let left = livekit.participant_event("participant_left", &m.lk_room, &session, Some("MIGRATION"));
                net.webhook(left, &mut rng);
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
                session = livekit.connect(&m.lk_room, &m.ident);
                net.webhook(livekit.participant_event("participant_joined", &m.lk_room, &session, None), &mut rng);
                net.tally.lock().unwrap().migrations += 1;
            } else if roll < 0.25 {
                // The client reconnects while its old session is still there: LiveKit keeps the
                // new one and drops the old with DUPLICATE_IDENTITY.
                let new = livekit.connect(&m.lk_room, &m.ident);
                livekit.disconnect(&m.lk_room, &session.sid);
                let left =
                    livekit.participant_event("participant_left", &m.lk_room, &session, Some("DUPLICATE_IDENTITY"));
                let joined = livekit.participant_event("participant_joined", &m.lk_room, &new, None);
                net.webhook(joined, &mut rng);
                net.webhook(left, &mut rng);
                session = new;
                net.tally.lock().unwrap().duplicate_identities += 1;
            }
        }
        // The member hangs up.
        livekit.disconnect(&m.lk_room, &session.sid);
        life.disconnected = Some(SystemTime::now());
        let left = livekit.participant_event("participant_left", &m.lk_room, &session, Some("CLIENT_INITIATED"));
        net.webhook(left, &mut rng);
        lives.push(life);
        // Its leave lands before it calls again, however late (the oracle judges that): a leave
        // landing after the next membership would be taken for that one's.
        let _ = synapse.wait_left(&m.user, &m.room, Duration::from_secs(120)).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..6_000))).await;
    }
    lives
}

/// Kills an instance every few seconds (at least one stays up) and restarts it; takes RoomService
/// down now and then; crashes Redis once.
async fn inject_faults(
    mut bridges: Vec<Bridge>,
    mut redis: Redis,
    net: Arc<Net>,
    seed: u64,
    until: Instant,
) -> (Vec<Bridge>, Redis) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1));
    let redis_crash_at = Instant::now() + (until - Instant::now()) / 2;
    let mut redis_crashed = false;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..3_500))).await;
        let victim = rng.random_range(0..bridges.len());
        bridges[victim].kill9();
        net.up.lock().unwrap()[victim] = false;
        {
            let mut tally = net.tally.lock().unwrap();
            tally.kills += 1;
            tally.kill_times.push(SystemTime::now());
        }
        if rng.random_bool(0.3) {
            net.livekit.set_unavailable(true);
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..LIVEKIT_OUTAGE.as_millis() as u64))).await;
            net.livekit.set_unavailable(false);
            net.tally.lock().unwrap().livekit_outages += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_500))).await;
        }
        if !redis_crashed && Instant::now() > redis_crash_at {
            redis_crashed = true;
            redis.kill9();
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..2_000))).await;
            redis.restart().await;
            net.tally.lock().unwrap().redis_crashes += 1;
        }
        bridges[victim].restart().await;
        net.up.lock().unwrap()[victim] = true;
    }
    // Both live on until the members' last leaves have landed.
    (bridges, redis)
}

/// Every call-membership event of `room`, in timeline order: (state key, is a leave, timestamp).
async fn membership_events(synapse: &Synapse, token: &str, room: &str) -> Vec<(String, bool, i64)> {
    let http = reqwest::Client::new();
    let filter = enc(r#"{"types":["org.matrix.msc3401.call.member"]}"#);
    let mut from = String::new();
    let mut events = Vec::new();
    loop {
        let url = format!(
            "{}/_matrix/client/v3/rooms/{}/messages?dir=f&limit=500&filter={filter}{from}",
            synapse.url,
            enc(room)
        );
        let v: Value = http.get(url).bearer_auth(token).send().await.unwrap().json().await.unwrap();
        let chunk = v["chunk"].as_array().cloned().unwrap_or_default();
        for e in &chunk {
            let Some(key) = e["state_key"].as_str() else { continue };
            let leave = e["content"].as_object().is_none_or(|c| c.is_empty());
            events.push((key.to_owned(), leave, e["origin_server_ts"].as_i64().unwrap()));
        }
        match v["end"].as_str() {
            Some(end) if !chunk.is_empty() => from = format!("&from={}", enc(end)),
            _ => return events,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let seed: u64 = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let seconds: u64 = std::env::var("CHAOS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(90);
    eprintln!("chaos: seed {seed} (replay: CHAOS_SEED={seed}), {seconds} s of faults");
    let synapse = Arc::new(Synapse::start(SynapseOptions::default()).await);
    let livekit = LiveKit::start().await;
    let redis = Redis::start().await;
    let mut proxies = Vec::new();
    let mut bridges = Vec::new();
    for i in 0..INSTANCES {
        let hs = HsProxy::start(&synapse.url).await;
        let mut env = Bridge::env_for_cluster(&hs.url, &livekit, &redis.url(), LEASE, &format!("chaos{i}"));
        env.insert("LIVEKIT_LOG_LEVEL".into(), std::env::var("CHAOS_LOG_LEVEL").unwrap_or_else(|_| "info".into()));
        bridges.push(Bridge::start(env).await);
        proxies.push(hs);
    }
    let owner = synapse.register("chaosowner").await;
    let mut members = Vec::new();
    for r in 0..ROOMS {
        let room = synapse.create_room(&owner).await;
        let lk_room = identity::livekit_room(&room, SLOT);
        for k in 0..PER_ROOM {
            let user = synapse.register(&format!("m{r}x{k}")).await;
            synapse.join_room(&user, &room).await;
            let ident = identity::identity_three_part(&user.user_id, &user.device_id, "m1");
            members.push(Arc::new(Member { user, room: room.clone(), lk_room: lk_room.clone(), ident }));
        }
    }
    let net = Arc::new(Net {
        urls: bridges.iter().map(|b| b.url.clone()).collect(),
        up: Mutex::new(vec![true; INSTANCES]),
        livekit: livekit.clone(),
        tally: Mutex::new(Tally::default()),
    });

    let until = Instant::now() + Duration::from_secs(seconds);
    let faults = tokio::spawn(inject_faults(bridges, redis, net.clone(), seed, until));
    let mut tasks = Vec::new();
    for (i, m) in members.iter().enumerate() {
        tasks.push(tokio::spawn(live_member(i, m.clone(), synapse.clone(), net.clone(), seed, until)));
    }
    let (bridges, _redis) = faults.await.unwrap();
    let mut lives: Vec<Life> = Vec::new();
    for t in tasks {
        lives.extend(t.await.unwrap());
    }
    // Every leave has had its time to land.
    tokio::time::sleep(leave_bound() + Duration::from_secs(2)).await;

    // The oracle.
    let mut timeline: HashMap<String, Vec<(bool, i64)>> = HashMap::new();
    for room in members.iter().map(|m| m.room.clone()).collect::<std::collections::BTreeSet<_>>() {
        for (key, leave, ts) in membership_events(&synapse, &owner.token, &room).await {
            timeline.entry(key).or_default().push((leave, ts));
        }
    }
    let sends: Vec<common::hs_proxy::Call> = proxies.iter().flat_map(|p| p.calls()).collect();
    let sent_ok = |delay_id: &str| {
        sends.iter().any(|c| {
            c.delay_id.as_deref() == Some(delay_id) && c.action.as_deref() == Some("send") && c.status == Some(200)
        })
    };
    let kill_times: Vec<i64> = net.tally.lock().unwrap().kill_times.iter().map(|t| unix_ms(*t)).collect();
    // The bound of a departure at `ended`: each kill within it extends it by a takeover.
    let bound_for = |ended: i64| {
        let mut bound = leave_bound().as_millis() as i64;
        loop {
            let kills = kill_times.iter().filter(|k| **k >= ended && **k <= ended + bound).count() as i64;
            let extended = leave_bound().as_millis() as i64 + kills * takeover().as_millis() as i64;
            if extended == bound {
                return bound;
            }
            bound = extended;
        }
    };
    let bound = leave_bound().as_millis() as i64;
    let (mut premature, mut late, mut missing, mut superseded_sent, mut by_timer) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut worst_ms = 0i64;
    let mut leaves = 0;
    for life in &lives {
        let started = unix_ms(life.started);
        let ended = unix_ms(life.disconnected.expect("every life ends"));
        let first_leave = timeline
            .get(&life.state_key)
            .into_iter()
            .flatten()
            .find(|(leave, ts)| *leave && *ts >= started)
            .map(|(_, ts)| *ts);
        match first_leave {
            None => missing.push(life.clone()),
            Some(ts) if ts < ended => premature.push((life.clone(), ended - ts)),
            Some(ts) => {
                leaves += 1;
                worst_ms = worst_ms.max(ts - ended);
                if ts - ended > bound_for(ended) {
                    late.push((life.clone(), ts - ended));
                }
            }
        }
        for old in &life.delay_ids[..life.delay_ids.len() - 1] {
            if sends.iter().any(|c| c.delay_id.as_deref() == Some(old.as_str()) && c.action.as_deref() == Some("send"))
            {
                superseded_sent.push((life.member, old.clone()));
            }
        }
        if !sent_ok(life.delay_ids.last().unwrap()) {
            by_timer.push(life.clone());
        }
    }
    let tally = net.tally.lock().unwrap();
    eprintln!(
        "chaos report (seed {seed}): {} members, {} lives, {} leaves, worst lateness {} ms (bound {} ms, + {} ms per takeover meanwhile); faults: {} kill -9, {} webhooks of which {} lost and {} duplicated, {} RoomService outages, {} Redis crash(es); {} refreshes, {} migrations, {} duplicate identities; premature {}, late {}, missing {}, superseded sent {}, left to the homeserver's timer {}",
        members.len(),
        lives.len(),
        leaves,
        worst_ms,
        bound,
        takeover().as_millis(),
        tally.kills,
        tally.webhooks,
        tally.lost,
        tally.duplicated,
        tally.livekit_outages,
        tally.redis_crashes,
        tally.refreshes,
        tally.migrations,
        tally.duplicate_identities,
        premature.len(),
        late.len(),
        missing.len(),
        superseded_sent.len(),
        by_timer.len(),
    );
    let fail = !(premature.is_empty()
        && late.is_empty()
        && missing.is_empty()
        && superseded_sent.is_empty()
        && by_timer.is_empty());
    if fail {
        // What happened to the first few: every call made for their delay ids, and their
        // memberships' timeline, relative to the life's start.
        let now_ms = unix_ms(SystemTime::now());
        let show = |what: &str, life: &Life| {
            let started = unix_ms(life.started);
            eprintln!(
                "{what}: member {} started at +0, disconnected at +{} ms",
                life.member,
                unix_ms(life.disconnected.unwrap()) - started
            );
            for (i, id) in life.delay_ids.iter().enumerate() {
                for c in sends.iter().filter(|c| c.delay_id.as_deref() == Some(id.as_str())) {
                    let at = now_ms - c.received.elapsed().as_millis() as i64 - started;
                    eprintln!("    delay id #{i}: {:?} → {:?} at +{at} ms", c.action, c.status);
                }
            }
            for (leave, ts) in timeline.get(&life.state_key).into_iter().flatten() {
                eprintln!("    timeline: {} at +{} ms", if *leave { "leave" } else { "join" }, ts - started);
            }
        };
        for (life, _) in premature.iter().take(3) {
            show("premature", life);
        }
        for life in by_timer.iter().take(3) {
            show("not sent by the bridge", life);
        }
        for (life, _) in late.iter().take(3) {
            show("late", life);
        }
        for (member, _) in superseded_sent.iter().take(3) {
            for life in lives.iter().filter(|l| l.member == *member) {
                show("superseded delay id sent (each life of the member)", life);
            }
        }
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{seed}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, b) in bridges.iter().enumerate() {
            std::fs::write(dir.join(format!("instance{i}.log")), b.logs()).unwrap();
        }
        eprintln!("the instances' logs: {}", dir.display());
        for b in &bridges {
            let logs = b.logs();
            let tail: Vec<&str> = logs.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(60).collect();
            eprintln!("---- {} warnings ----\n{}", b.url, tail.join("\n"));
        }
    }
    let mut failures = Vec::new();
    if !premature.is_empty() {
        failures.push(format!("(a) premature leaves: {premature:?}"));
    }
    if !late.is_empty() {
        failures.push(format!("(b) late leaves: {late:?}"));
    }
    if !missing.is_empty() {
        failures.push(format!("(b) leaves that never landed: {missing:?}"));
    }
    if !superseded_sent.is_empty() {
        failures.push(format!("(c) superseded delay ids sent: {superseded_sent:?}"));
    }
    if !by_timer.is_empty() {
        failures.push(format!("(d) leaves the bridge did not send: {by_timer:?}"));
    }
    assert!(failures.is_empty(), "chaos run failed (replay: CHAOS_SEED={seed}):\n{}", failures.join("\n"));
    assert!(tally.kills >= 20 || seconds < 60, "at least 20 kills in a run: {}", tally.kills);
    assert!(members.len() >= 200);
}
