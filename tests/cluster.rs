//! Three instances on one real Redis in front of one real Synapse, each instance with its own
//! recording proxy to the homeserver (so every call is counted per instance): webhooks and
//! delegations reach random instances; the owner of live members is killed, paused past its
//! lease, stopped gracefully (while another crashes); Redis itself crashes, or stalls. Connected
//! members stay in room state throughout, and a departure still yields a leave within a second.

mod common;

use std::time::{Duration, Instant};

use common::bridge::{Bridge, SLOT};
use common::hs_proxy::HsProxy;
use common::livekit::{LiveKit, Participant};
use common::redis::Redis;
use common::synapse::{MatrixUser, Synapse, SynapseOptions};
use rand::{Rng, SeedableRng};
use rtc_leave_bridge::identity;

const DELAY_MS: u64 = 4_000;
const LEASE: Duration = Duration::from_secs(1);
const MEMBERS: usize = 4;

/// One instance and the proxy it reaches the homeserver through.
struct Instance {
    bridge: Bridge,
    hs: HsProxy,
}

struct Member {
    user: MatrixUser,
    delay_id: String,
    p: Participant,
}

struct World {
    synapse: Synapse,
    livekit: LiveKit,
    redis: Redis,
    instances: Vec<Instance>,
    room: String,
    lk_room: String,
    members: Vec<Member>,
    rng: rand::rngs::StdRng,
    /// When every member was delegated and connected.
    started: Instant,
}

impl World {
    /// Three instances sharing one Redis; `MEMBERS` members of one call (one LiveKit room, so one
    /// shard and one owner), each delegated through and announced to a random instance.
    async fn start(seed: u64) -> World {
        World::with_members(seed, MEMBERS, DELAY_MS, &[]).await
    }

    /// As [`World::start`], with `members` members whose delayed leaves are `delay_ms` long, and
    /// the instances' settings changed by `settings`.
    async fn with_members(seed: u64, members: usize, delay_ms: u64, settings: &[(&str, &str)]) -> World {
        let synapse = Synapse::start(SynapseOptions::default()).await;
        let livekit = LiveKit::start().await;
        let redis = Redis::start().await;
        let mut instances = Vec::new();
        for i in 0..3 {
            let hs = HsProxy::start(&synapse.url).await;
            let mut env = Bridge::env_for_cluster(&hs.url, &livekit, &redis.url(), LEASE, &format!("bridge{i}"));
            env.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            instances.push(Instance { bridge: Bridge::start(env).await, hs });
        }
        let owner = synapse.register("owner").await;
        let room = synapse.create_room(&owner).await;
        let lk_room = identity::livekit_room(&room, SLOT);
        let mut w = World {
            synapse,
            livekit,
            redis,
            instances,
            room,
            lk_room,
            members: Vec::new(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            started: Instant::now(),
        };
        w.wait_balanced().await;
        for i in 0..members {
            let user = w.synapse.register(&format!("member{i}")).await;
            w.synapse.join_room(&user, &w.room).await;
            let delay_id = w.synapse.join_call(&user, &w.room, delay_ms).await;
            let at = w.random_live();
            w.instances[at].bridge.delegate(&w.synapse, &user, &w.room, "m1", &delay_id, delay_ms).await;
            let ident = identity::identity_three_part(&user.user_id, &user.device_id, "m1");
            let at = w.random_live();
            let p = w.livekit.join(&w.instances[at].bridge.url, &w.lk_room, &ident).await;
            w.members.push(Member { user, delay_id, p });
        }
        w.started = Instant::now();
        w
    }

    fn live(&self) -> Vec<usize> {
        (0..self.instances.len()).filter(|i| self.instances[*i].bridge.pid().is_some()).collect()
    }

    fn random_live(&mut self) -> usize {
        let live = self.live();
        live[self.rng.random_range(0..live.len())]
    }

    /// Waits until the live instances hold every shard, evenly (±1).
    async fn wait_balanced(&self) {
        let until = Instant::now() + Duration::from_secs(10);
        let mut owned = Vec::new();
        while Instant::now() < until {
            owned.clear();
            for i in self.live() {
                owned.push(self.instances[i].bridge.metric("rtc_leave_bridge_shards_owned").await as i64);
            }
            let (min, max) = (owned.iter().min().unwrap(), owned.iter().max().unwrap());
            if owned.iter().sum::<i64>() == 64 && max - min <= 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("shards not spread evenly: {owned:?}");
    }

    /// The instance driving the call's jobs (all of them: one room, one shard), once one does.
    async fn owner(&self, within: Duration) -> usize {
        let until = Instant::now() + within;
        let jobs = self.members.len() as f64;
        loop {
            for i in self.live() {
                if self.instances[i].bridge.jobs_tracked().await == jobs {
                    return i;
                }
            }
            assert!(Instant::now() < until, "no instance drives the {jobs} jobs");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Asserts every member stays in room state for `how_long`.
    async fn all_stay(&self, how_long: Duration, why: &str) {
        let until = Instant::now() + how_long;
        while Instant::now() < until {
            for m in &self.members {
                assert!(
                    self.synapse.is_member(&m.user, &self.room).await,
                    "{} removed while connected: {why}",
                    m.user.user_id
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Member `i` leaves LiveKit (the webhook to a random live instance); returns how long after
    /// the departure some instance's send of its delay id was accepted. It is no longer a member.
    async fn leave(&mut self, i: usize) -> Duration {
        let at = self.random_live();
        let since = Instant::now();
        let m = &self.members[i];
        self.livekit.leave(&self.instances[at].bridge.url, &self.lk_room, &m.p, "CLIENT_INITIATED").await;
        let until = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(send) = self.instances.iter().find_map(|x| x.hs.accepted_send(&m.delay_id)) {
                self.members.remove(i);
                return send.after(since);
            }
            assert!(Instant::now() < until, "no leave sent for a departed member");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Calls instance `i` made to its homeserver after `since`.
    fn calls_since(&self, i: usize, since: Instant) -> usize {
        self.instances[i].hs.calls().iter().filter(|c| c.received > since).count()
    }
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_is_taken_over_within_a_lease_and_nobody_connected_is_removed() {
    let mut w = World::start(1).await;
    let owner = w.owner(Duration::from_secs(5)).await;
    w.all_stay(Duration::from_millis(DELAY_MS), "before any fault").await;
    assert_eq!(
        w.calls_since((owner + 1) % 3, w.started) + w.calls_since((owner + 2) % 3, w.started),
        0,
        "only the owner calls the homeserver for its jobs"
    );

    // kill -9 of the owner: another instance drives the jobs within a lease (and a look).
    w.instances[owner].bridge.kill9();
    let killed = Instant::now();
    let next = w.owner(LEASE * 3).await;
    let failover = killed.elapsed();
    assert_ne!(next, owner);
    assert!(failover <= LEASE + Duration::from_secs(1), "failover took {failover:?}");
    eprintln!("failover after kill -9: {failover:?} (lease {LEASE:?})");
    w.all_stay(Duration::from_millis(2 * DELAY_MS), "after the owner's kill -9").await;
    assert!(w.instances[next].hs.count("restart", Some(200)) >= MEMBERS, "the new owner restarts them");
    let latency = w.leave(0).await;
    assert!(latency < Duration::from_secs(1), "leave after {latency:?}");

    // Redis crashes (AOF) for 30 s: requests are refused (503: LiveKit and clients retry), the
    // members are restarted from memory, nobody is removed; then it returns and nothing is lost.
    w.redis.kill9();
    let at = w.random_live();
    let m = &w.members[0];
    let body = w.livekit.participant_event("participant_joined", &w.lk_room, &m.p, None);
    let auth = LiveKit::sign(&body, common::livekit::API_SECRET);
    assert_eq!(w.livekit.post_webhook(&w.instances[at].bridge.url, &body, Some(&auth)).await, 503);
    w.all_stay(Duration::from_secs(30), "while Redis was down").await;
    w.redis.restart().await;
    w.owner(Duration::from_secs(5)).await;
    w.all_stay(Duration::from_millis(DELAY_MS), "after Redis crashed and came back").await;
    let latency = w.leave(0).await;
    assert!(latency < Duration::from_secs(1), "leave after {latency:?}");

    // The killed instance comes back: the shards spread over three again.
    let dead = w.instances.iter().position(|i| i.bridge.pid().is_none()).unwrap();
    w.instances[dead].bridge.restart().await;
    w.wait_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_paused_past_its_lease_makes_no_call_once_it_resumes_and_never_sends_a_superseded_delay_id() {
    let mut w = World::start(2).await;
    let owner = w.owner(Duration::from_secs(5)).await;
    let pid = w.instances[owner].bridge.pid().unwrap();

    signal(pid, "-STOP");
    let paused = Instant::now();
    // Its leases run out; another instance takes the jobs over.
    let others: Vec<usize> = w.live().into_iter().filter(|i| *i != owner).collect();
    let until = Instant::now() + LEASE * 4;
    let next = 'found: loop {
        for &i in &others {
            if w.instances[i].bridge.jobs_tracked().await == MEMBERS as f64 {
                break 'found i;
            }
        }
        assert!(Instant::now() < until, "nobody took over from the paused owner");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    // Meanwhile member 0 rejoins: the client cancels its delayed leave, schedules a new one and
    // delegates it (to an instance that is not paused).
    let old = w.members[0].delay_id.clone();
    let user = w.members[0].user.clone();
    w.synapse.cancel_delayed(&user, &old).await;
    let new = w.synapse.join_call(&user, &w.room, DELAY_MS).await;
    let at = others[w.rng.random_range(0..others.len())];
    w.instances[at].bridge.delegate(&w.synapse, &user, &w.room, "m1", &new, DELAY_MS).await;
    w.members[0].delay_id = new.clone();
    tokio::time::sleep((LEASE * 3).saturating_sub(paused.elapsed())).await;

    signal(pid, "-CONT");
    let resumed = Instant::now();
    w.all_stay(Duration::from_millis(DELAY_MS), "after the ex-owner resumed").await;
    // Its timers were overdue when it resumed: the gate refused those calls. It may drive the
    // call's shard again only after a look at Redis shows its lease lost and, one look (a quarter
    // lease) later, the others have handed shards back: nothing can be legitimate before.
    let fenced = w.instances[owner].bridge.metric(r#"rtc_leave_bridge_calls_fenced_total{action="restart"}"#).await;
    assert!(fenced >= 1.0, "the resumed ex-owner's overdue restarts were not stopped by its gate");
    let early: Vec<_> = w.instances[owner]
        .hs
        .calls()
        .into_iter()
        .filter(|c| c.received > resumed && c.received < resumed + LEASE / 5)
        .collect();
    assert!(early.is_empty(), "the ex-owner called before it could hold the shard again: {early:?}");
    for c in w.instances[owner].hs.calls().into_iter().filter(|c| c.received > resumed) {
        assert_ne!(c.delay_id.as_deref(), Some(old.as_str()), "the ex-owner called with the superseded delay id");
    }
    assert!(w.instances[next].hs.count("restart", Some(200)) >= MEMBERS);
    let latency = w.leave(0).await;
    assert!(latency < Duration::from_secs(1), "leave after {latency:?}");
    for (i, x) in w.instances.iter().enumerate() {
        assert!(x.hs.calls_of(&old, "send").is_empty(), "instance {i} sent the superseded delay id");
    }
    // The ex-owner takes its share again.
    w.wait_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_hands_the_shards_over_in_under_a_second() {
    let mut w = World::start(3).await;
    let owner = w.owner(Duration::from_secs(5)).await;
    let stopping = Instant::now();
    signal(w.instances[owner].bridge.pid().unwrap(), "-TERM");
    let until = Instant::now() + Duration::from_secs(5);
    let next = 'found: loop {
        for i in w.live() {
            if i != owner && w.instances[i].bridge.jobs_tracked().await == MEMBERS as f64 {
                break 'found i;
            }
        }
        assert!(Instant::now() < until, "nobody took over from the stopped owner");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let handover = stopping.elapsed();
    eprintln!("handover after SIGTERM: {handover:?}");
    assert!(handover < Duration::from_secs(1), "handover took {handover:?}");
    w.instances[owner].bridge.kill9(); // reaps it
    assert!(w.instances[owner].bridge.logs().contains("left the cluster"), "{}", w.instances[owner].bridge.logs());
    w.all_stay(Duration::from_millis(2 * DELAY_MS), "after a graceful stop").await;
    assert!(w.instances[next].hs.count("restart", Some(200)) >= MEMBERS);
    let latency = w.leave(1).await;
    assert!(latency < Duration::from_secs(1), "leave after {latency:?}");
    w.wait_balanced().await;
}

/// A stopping instance drains its calls in flight; meanwhile it takes no shard and no longer
/// counts as an instance, so that the shards of another one crashing meanwhile are all taken by
/// the survivors at once, not only once the stopping one is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_instance_takes_nothing_and_the_others_take_every_shard_freed_meanwhile() {
    // One member with a long delay: its send, held 6 s by the homeserver's proxy (inside the
    // request timeout), keeps its owner draining.
    let mut w = World::with_members(4, 1, 60_000, &[("RTC_LEAVE_BRIDGE_REQUEST_TIMEOUT", "8s")]).await;
    let owner = w.owner(Duration::from_secs(5)).await;
    let (crashing, surviving) = ((owner + 1) % 3, (owner + 2) % 3);
    let owned = "rtc_leave_bridge_shards_owned";
    let held = w.instances[owner].bridge.metric(owned).await;
    w.instances[owner].hs.stall(Some(("send", Duration::from_secs(6))));
    let m = &w.members[0];
    w.livekit.leave(&w.instances[owner].bridge.url, &w.lk_room, &m.p, "CLIENT_INITIATED").await;
    tokio::time::sleep(Duration::from_millis(300)).await; // its send under way, held
    signal(w.instances[owner].bridge.pid().unwrap(), "-TERM");
    w.instances[crashing].bridge.kill9();
    let crashed = Instant::now();
    // Once the crashed instance's leases run out, the survivor holds every shard but the
    // stopping instance's, while that one still drains.
    let until = crashed + LEASE * 3 + Duration::from_millis(500);
    loop {
        let survivor = w.instances[surviving].bridge.metric(owned).await;
        if survivor + held == 64.0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "{:?} after the crash the survivor holds {survivor} shards, the stopping instance {held}",
            crashed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!("every freed shard taken {:?} after the crash, while the other instance drained", crashed.elapsed());
    let logs = w.instances[owner].bridge.logs();
    assert!(!logs.contains("left the cluster"), "the stopping instance was gone already:\n{logs}");
    // Its drain ends with its send; then it leaves, and the survivor takes its shards too.
    let send = w.instances[owner].hs.wait_accepted_send(&m.delay_id, Duration::from_secs(8)).await;
    assert!(send.is_some(), "the send in flight at SIGTERM was not carried out");
    let left = common::eventually(Duration::from_secs(3), || async {
        w.instances[owner].bridge.logs().contains("left the cluster")
    })
    .await;
    assert!(left, "{}", w.instances[owner].bridge.logs());
    w.instances[owner].bridge.kill9(); // reaps it
    w.wait_balanced().await;
    assert_eq!(w.instances[surviving].bridge.metric(owned).await, 64.0);
}

/// A Redis that stalls for less than two renewal intervals (busy, swapping, paused by its host)
/// is waited for: no look fails, no lease is lost, nobody is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_stalling_for_less_than_two_renewals_costs_no_lease() {
    let mut w = World::start(6).await;
    w.owner(Duration::from_secs(5)).await;
    for _ in 0..6 {
        w.redis.freeze(true);
        tokio::time::sleep(Duration::from_millis(250)).await;
        w.redis.freeze(false);
        tokio::time::sleep(Duration::from_millis(750)).await;
    }
    w.all_stay(Duration::from_millis(DELAY_MS), "after Redis stalled").await;
    for (i, instance) in w.instances.iter().enumerate() {
        for outcome in ["failed", "lost"] {
            let sample = format!("rtc_leave_bridge_lease_renewals_total{{outcome=\"{outcome}\"}}");
            assert_eq!(instance.bridge.metric(&sample).await, 0.0, "instance {i}: renewals {outcome}");
        }
        let logs = instance.bridge.logs();
        assert!(!logs.contains("Redis unreachable"), "instance {i}:\n{logs}");
    }
    let latency = w.leave(0).await;
    assert!(latency < Duration::from_secs(1), "leave after {latency:?}");
}

/// Retries `request` every 25 ms until it is answered 200 (`Ok`); fails if that is not within a
/// second of `back`, with what it last answered (`Err`).
async fn answered_within_a_second_of<F, Fut>(back: Instant, what: &str, mut request: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    loop {
        let last = match request().await {
            Ok(()) => return,
            Err(last) => last,
        };
        assert!(
            back.elapsed() < Duration::from_secs(1),
            "{what} still answered with {last} {:?} after Redis came back",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Redis killed -9 and started again (on its own AOF) under three instances: within a second of
/// its return every instance takes webhooks and delegations again (none left answering 503 on a
/// broken connection: LiveKit retries a webhook for about 15 s only), and a departure is applied
/// by the shard's holder and sent at once (inbox reads and leases reconnected too). Nobody
/// connected is removed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_is_back_within_a_second_of_redis() {
    let mut w = World::start(4).await;
    w.owner(Duration::from_secs(5)).await;
    // One delegation per instance, to hand over once Redis is back (their members never join:
    // their delayed leaves are long and nobody checks them).
    let mut delegations = Vec::new();
    for i in 0..w.instances.len() {
        let user = w.synapse.register(&format!("late{i}")).await;
        w.synapse.join_room(&user, &w.room).await;
        let delay_id = w.synapse.join_call(&user, &w.room, 60_000).await;
        let openid = w.synapse.openid_token(&user).await;
        delegations.push(common::bridge::delegation_body(&openid, &user, &w.room, "m1", &delay_id, 60_000));
    }
    w.redis.kill9();
    // Long enough for every path (webhooks, inbox reads, lease renewals) to fail on it.
    w.all_stay(Duration::from_secs(5), "while Redis was down").await;
    w.redis.restart().await;
    let back = Instant::now();
    let probe = w.livekit.connect(&w.lk_room, "@nobody:hs1.test:PROBE");
    let joined = w.livekit.participant_event("participant_joined", &w.lk_room, &probe, None);
    let auth = LiveKit::sign(&joined, common::livekit::API_SECRET);
    for i in 0..w.instances.len() {
        answered_within_a_second_of(back, &format!("instance {i}'s webhooks"), || async {
            let status = w.livekit.post_webhook(&w.instances[i].bridge.url, &joined, Some(&auth)).await;
            (status == 200).then_some(()).ok_or_else(|| format!("{status}\n{}", w.instances[i].bridge.logs()))
        })
        .await;
    }
    println!("every instance took webhooks again {:?} after Redis came back", back.elapsed());
    for (i, body) in delegations.iter().enumerate() {
        answered_within_a_second_of(back, &format!("instance {i}'s delegations"), || async {
            let (status, answer) = w.instances[i].bridge.delegate_raw(body).await;
            (status == 200).then_some(()).ok_or_else(|| format!("{status} {answer}"))
        })
        .await;
    }
    println!("every instance took delegations again {:?} after Redis came back", back.elapsed());
    let latency = w.leave(0).await;
    let since_back = back.elapsed();
    println!("a departure then sent after {latency:?} ({since_back:?} after Redis came back)");
    assert!(latency < Duration::from_secs(1), "leave after {latency:?}");
    w.all_stay(Duration::from_millis(2 * DELAY_MS), "after Redis came back").await;
    // What operators saw: each instance said once that Redis was unreachable (not at every
    // failed look) and once that it was back, after several failed looks; looks are timed.
    for (i, instance) in w.instances.iter().enumerate() {
        let logs = instance.bridge.logs();
        let down = logs.matches("Redis unreachable: leases not renewed").count();
        let back_lines: Vec<&str> = logs.lines().filter(|l| l.contains("Redis reachable again")).collect();
        assert_eq!((down, back_lines.len()), (1, 1), "instance {i}: {down} down, {back_lines:?}");
        let failed: u32 = back_lines[0]
            .split("failed_looks=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("instance {i}: {}", back_lines[0]));
        assert!(failed > 1, "instance {i}: {failed} failed looks over 5 s of outage");
        // The same for reads of the inboxes.
        let down = logs.matches("cannot read the inboxes").count();
        let back = logs.matches("inbox reads work again").count();
        assert_eq!((down, back), (1, 1), "instance {i}: inbox reads failing told {down} times, their end {back}");
        let failed_renewals = "rtc_leave_bridge_lease_renewals_total{outcome=\"failed\"}";
        assert!(instance.bridge.metric(failed_renewals).await > 0.0, "instance {i}: failed renewals not counted");
        let ticks = "rtc_leave_bridge_redis_duration_seconds_count{op=\"tick\"}";
        assert!(instance.bridge.metric(ticks).await > 0.0, "instance {i}: looks not timed");
    }
    // An event nothing acts on is answered without a round trip to Redis: ignored, not queued.
    let other = w.livekit.participant_event("track_published", &w.lk_room, &probe, None);
    let auth = LiveKit::sign(&other, common::livekit::API_SECRET);
    assert_eq!(w.livekit.post_webhook(&w.instances[0].bridge.url, &other, Some(&auth)).await, 200);
    let counted = |outcome: &str| format!("rtc_leave_bridge_webhooks_total{{event=\"other\",outcome=\"{outcome}\"}}");
    assert_eq!(w.instances[0].bridge.metric(&counted("ignored")).await, 1.0);
    assert_eq!(w.instances[0].bridge.metric(&counted("queued")).await, 0.0);
}
