//! End-to-end lifecycle against a real Synapse and the LiveKit emulator: delegations are made with
//! real OpenID tokens, leaves are checked in Synapse's room state, and every leave is proven to be
//! the bridge's own send (seen accepted at the homeserver), never Synapse's timer.

mod common;

use std::time::{Duration, Instant};

use common::bridge::{Bridge, SLOT, delegation_body};
use common::eventually;
use common::hs_proxy::HsProxy;
use common::livekit::Participant;
use common::livekit::{API_SECRET, LiveKit};
use common::synapse::{MatrixUser, Synapse, SynapseOptions};
use rtc_leave_bridge::identity;

const DELAY_MS: u64 = 3_000;

struct World {
    synapse: Synapse,
    /// Between the bridge and Synapse: records every call the bridge makes.
    hs: HsProxy,
    livekit: LiveKit,
    bridge: Bridge,
    alice: MatrixUser,
    room: String,
    lk_room: String,
}

impl World {
    async fn new() -> World {
        World::with(SynapseOptions::default(), &[]).await
    }

    async fn with(options: SynapseOptions, env: &[(&str, &str)]) -> World {
        let synapse = Synapse::start(options).await;
        let hs = HsProxy::start(&synapse.url).await;
        let livekit = LiveKit::start().await;
        let mut bridge_env = Bridge::env_for(&hs.url, &livekit);
        for (k, v) in env {
            bridge_env.insert((*k).into(), (*v).into());
        }
        let bridge = Bridge::start(bridge_env).await;
        let alice = synapse.register("alice").await;
        let room = synapse.create_room(&alice).await;
        let lk_room = identity::livekit_room(&room, SLOT);
        World { synapse, hs, livekit, bridge, alice, room, lk_room }
    }

    fn identity(&self, member_id: &str) -> String {
        identity::identity_three_part(&self.alice.user_id, &self.alice.device_id, member_id)
    }

    /// Alice joins the call (membership + delayed leave) and delegates the leave.
    async fn alice_joins_call(&self, member_id: &str, delay_ms: u64) -> String {
        self.joins_call(&self.alice, member_id, delay_ms).await
    }

    /// `user` joins the call (membership + delayed leave) and delegates the leave.
    async fn joins_call(&self, user: &MatrixUser, member_id: &str, delay_ms: u64) -> String {
        let delay_id = self.synapse.join_call(user, &self.room, delay_ms).await;
        self.bridge.delegate(&self.synapse, user, &self.room, member_id, &delay_id, delay_ms).await;
        delay_id
    }

    /// Another user in the room.
    async fn another(&self, name: &str) -> MatrixUser {
        let u = self.synapse.register(name).await;
        self.synapse.join_room(&u, &self.room).await;
        u
    }

    async fn members_after(&self, users: &[&MatrixUser], wait: Duration) -> bool {
        let until = Instant::now() + wait;
        while Instant::now() < until {
            for u in users {
                if !self.synapse.is_member(u, &self.room).await {
                    return false;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        true
    }

    /// Waits up to `within` for the bridge to send `delay_id` and asserts it did, after `since`
    /// (the departure): the homeserver accepted the bridge's send (so the event was still
    /// pending: its own timer had not fired, and the member was in room state until then) and
    /// `user`'s membership is gone from room state. Returns the time from `since` to the
    /// homeserver's answer.
    async fn left_by_bridge(&self, user: &MatrixUser, delay_id: &str, since: Instant, within: Duration) -> Duration {
        let Some(send) = self.hs.wait_accepted_send(delay_id, within).await else {
            panic!(
                "the bridge did not send the leave within {within:?}; its calls for it: {:?}\n{}",
                self.hs.calls().into_iter().filter(|c| c.delay_id.as_deref() == Some(delay_id)).collect::<Vec<_>>(),
                self.bridge.logs()
            );
        };
        assert!(!self.synapse.is_member(user, &self.room).await, "send accepted, yet still a member");
        send.after(since)
    }

    async fn still_member_after(&self, wait: Duration) -> bool {
        self.synapse.still_member_after(&self.alice, &self.room, wait).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_member_survives_and_leave_lands_within_a_second_of_participant_left() {
    let w = World::new().await;
    let delay_id = w.alice_joins_call("m1", DELAY_MS).await;
    let p = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    assert!(
        w.still_member_after(Duration::from_millis(2 * DELAY_MS + 1_000)).await,
        "connected member removed:\n{}",
        w.bridge.logs()
    );

    assert!(w.hs.calls_of(&delay_id, "send").is_empty(), "sent while connected");
    let left = Instant::now();
    w.livekit.leave(&w.bridge.url, &w.lk_room, &p, "CLIENT_INITIATED").await;
    let took = w.left_by_bridge(&w.alice, &delay_id, left, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(1), "leave sent {took:?} after participant_left");
    assert_eq!(w.bridge.metric_reaches("rtc_leave_bridge_jobs_finished_total{outcome=\"sent\"}", 1.0).await, 1.0);
    assert!(
        w.bridge
            .metric(
                "rtc_leave_bridge_homeserver_requests_total{action=\"restart\",homeserver=\"hs1.test\",outcome=\"ok\"}"
            )
            .await
            >= 3.0
    );
    // The delay id is a capability in OpenID mode: logs (at debug level here) carry a fingerprint.
    assert!(!w.bridge.logs().contains(&delay_id), "delay id in the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_who_never_joins_is_left_after_the_join_timeout() {
    let w = World::new().await;
    // A delay much longer than the test, so only the bridge can have sent the leave.
    let delegated = Instant::now();
    let delay_id = w.alice_joins_call("m1", 60_000).await;
    assert!(w.still_member_after(Duration::from_millis(2_500)).await, "left before the join timeout");
    let took = w.left_by_bridge(&w.alice, &delay_id, delegated, Duration::from_secs(10)).await;
    // Join timeout 3 s, then three listings 1.5 s apart that confirm the absence.
    assert!(took >= Duration::from_secs(6) && took < Duration::from_secs(8), "sent {took:?} after delegating");
    assert_eq!(
        w.bridge.metric_reaches("rtc_leave_bridge_leave_latency_seconds_count{trigger=\"never_joined\"}", 1.0).await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_webhooks_are_refused_and_change_nothing() {
    let w = World::new().await;
    w.alice_joins_call("m1", DELAY_MS).await;
    let p = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    let left = w.livekit.participant_event("participant_left", &w.lk_room, &p, Some("CLIENT_INITIATED"));
    // Wrong secret, no signature, a signature of another body, a garbage token.
    assert_eq!(w.livekit.post_webhook(&w.bridge.url, &left, Some(&LiveKit::sign(&left, "wrong-secret"))).await, 401);
    assert_eq!(w.livekit.post_webhook(&w.bridge.url, &left, None).await, 401);
    let other = w.livekit.participant_event("participant_joined", &w.lk_room, &p, None);
    assert_eq!(w.livekit.post_webhook(&w.bridge.url, &left, Some(&LiveKit::sign(&other, API_SECRET))).await, 401);
    assert_eq!(w.livekit.post_webhook(&w.bridge.url, &left, Some("Bearer not.a.jwt")).await, 401);
    // Oversized bodies are refused from their Content-Length, before anything is read, and the
    // connection is closed: a pooled sender must not reuse it with the body half sent.
    let head = format!(
        "POST /sfu_webhook HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/webhook+json\r\n\
         Authorization: {}\r\nContent-Length: {}\r\n\r\n",
        LiveKit::sign("x", API_SECRET),
        2 << 20
    );
    let answer = raw_exchange(&w.bridge.url, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert!(answer.contains("M_TOO_LARGE"), "{answer}");
    // The same through a pooled client: whatever became of the oversized request, the client's
    // next request must not land on the dead connection.
    let huge = "x".repeat(2 << 20);
    if let Ok(status) = w.livekit.try_post_webhook(&w.bridge.url, &huge, Some(&LiveKit::sign(&huge, API_SECRET))).await
    {
        assert_eq!(status, 413);
    }
    // Signed but not a webhook.
    assert_eq!(w.livekit.post_webhook(&w.bridge.url, "[1,2", Some(&LiveKit::sign("[1,2", API_SECRET))).await, 400);
    assert!(w.still_member_after(Duration::from_millis(2 * DELAY_MS)).await, "a forged webhook removed the member");
    assert_eq!(w.bridge.metric("rtc_leave_bridge_webhooks_total{event=\"unknown\",outcome=\"forged\"}").await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_duplicate_and_reordered_webhooks_do_not_send() {
    let w = World::new().await;
    let delay_id = w.alice_joins_call("m1", DELAY_MS).await;
    let ident = w.identity("m1");
    // An old session of the same identity, seen before the current one.
    let old = w.livekit.connect(&w.lk_room, &ident);
    let old_left = w.livekit.participant_event("participant_left", &w.lk_room, &old, Some("CLIENT_INITIATED"));
    let old_joined = w.livekit.participant_event("participant_joined", &w.lk_room, &old, None);
    w.livekit.disconnect(&w.lk_room, &old.sid);
    let current = w.livekit.join(&w.bridge.url, &w.lk_room, &ident).await;
    let joined = w.livekit.participant_event("participant_joined", &w.lk_room, &current, None);
    // Late departure of the old session, delivered twice; its join arriving after its departure;
    // the current session's join duplicated.
    w.livekit.deliver(&w.bridge.url, &old_left).await;
    w.livekit.deliver(&w.bridge.url, &old_left).await;
    w.livekit.deliver(&w.bridge.url, &old_joined).await;
    w.livekit.deliver(&w.bridge.url, &joined).await;
    w.livekit.deliver(&w.bridge.url, &joined).await;
    // A departure of the current session that is not the member's: a duplicate identity kick.
    assert!(
        w.still_member_after(Duration::from_millis(2 * DELAY_MS + 500)).await,
        "stale webhook sent the leave:\n{}",
        w.bridge.logs()
    );
    assert!(
        w.bridge.metric("rtc_leave_bridge_webhooks_total{event=\"participant_left\",outcome=\"duplicate\"}").await
            >= 1.0
    );
    // The real departure still works.
    let left = Instant::now();
    w.livekit.leave(&w.bridge.url, &w.lk_room, &current, "CLIENT_INITIATED").await;
    assert!(w.left_by_bridge(&w.alice, &delay_id, left, Duration::from_secs(2)).await < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_replaces_the_job_and_the_old_delay_id_is_never_sent() {
    let w = World::new().await;
    // The old delayed leave's own timer must not fire during the test: only a send of it by the
    // bridge could remove the new membership.
    let old_delay = w.alice_joins_call("m1", 60_000).await;
    let first = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    // The client reconnects as a new member: new membership, new delayed leave, new delegation.
    let new_delay = w.alice_joins_call("m2", DELAY_MS).await;
    let second = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m2")).await;
    // The old session's departure arrives after the rejoin: it must not send anything.
    w.livekit.leave(&w.bridge.url, &w.lk_room, &first, "CLIENT_INITIATED").await;
    assert!(
        w.still_member_after(Duration::from_millis(2 * DELAY_MS + 500)).await,
        "old delay id sent:\n{}",
        w.bridge.logs()
    );
    assert_eq!(w.bridge.metric("rtc_leave_bridge_jobs_finished_total{outcome=\"superseded\"}").await, 1.0);
    let old_ref = rtc_leave_bridge::delegation::DelayRef(&old_delay).to_string();
    assert!(w.bridge.logs().contains(&format!("delay_id={old_ref}")), "the old job is in the logs");
    assert!(w.hs.calls_of(&old_delay, "send").is_empty(), "the old delay id was sent");
    let left = Instant::now();
    w.livekit.leave(&w.bridge.url, &w.lk_room, &second, "CLIENT_INITIATED").await;
    assert!(w.left_by_bridge(&w.alice, &new_delay, left, Duration::from_secs(2)).await < Duration::from_secs(1));
    assert!(w.hs.calls_of(&old_delay, "send").is_empty(), "the old delay id was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_answered_404_stops_the_job_without_sending() {
    let w = World::new().await;
    let delay_id = w.alice_joins_call("m1", DELAY_MS).await;
    w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    // The client cancels its own delayed leave (e.g. it left cleanly by itself).
    w.synapse.cancel_delayed(&w.alice, &delay_id).await;
    let done = eventually(Duration::from_secs(6), || async {
        w.bridge.metric("rtc_leave_bridge_jobs_finished_total{outcome=\"gone\"}").await == 1.0
    })
    .await;
    assert!(done, "job not ended on 404:\n{}", w.bridge.logs());
    assert_eq!(w.hs.calls_of(&delay_id, "restart").last().and_then(|c| c.status), Some(404));
    assert!(w.hs.calls_of(&delay_id, "send").is_empty(), "nothing may be sent for a cancelled event");
    assert!(w.synapse.is_member(&w.alice, &w.room).await, "nothing may be sent for a cancelled event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_honoured_and_members_kept_alive() {
    // Synapse's delayed-event management limit at one call per second (burst 2), shared by every
    // unauthenticated caller from this address: three members' restarts hit it.
    let w = World::with(SynapseOptions { delayed_event_rate: Some((1.0, 2)), ..SynapseOptions::default() }, &[]).await;
    let mut others = Vec::new();
    for name in ["bob", "carol"] {
        let u = w.synapse.register(name).await;
        w.synapse.join_room(&u, &w.room).await;
        others.push(u);
    }
    w.alice_joins_call("m1", 6_000).await;
    w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    for u in &others {
        let delay = w.synapse.join_call(u, &w.room, 6_000).await;
        w.bridge.delegate(&w.synapse, u, &w.room, "x1", &delay, 6_000).await;
        w.livekit.join(&w.bridge.url, &w.lk_room, &identity::identity_three_part(&u.user_id, &u.device_id, "x1")).await;
    }
    assert!(w.still_member_after(Duration::from_secs(14)).await, "rate-limited member removed:\n{}", w.bridge.logs());
    for u in &others {
        assert!(w.synapse.is_member(u, &w.room).await, "{} removed:\n{}", u.user_id, w.bridge.logs());
    }
    assert!(
        w.bridge
            .metric("rtc_leave_bridge_homeserver_requests_total{action=\"restart\",homeserver=\"hs1.test\",outcome=\"rate_limited\"}")
            .await
            >= 1.0,
        "the test did not hit the rate limit:\n{}",
        w.bridge.metrics().await
    );
    assert!(w.hs.count("restart", Some(429)) >= 1, "the homeserver never answered 429");
    assert_eq!(w.hs.count("send", Some(200)), 0, "a leave was sent for a connected member");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn homeserver_down_then_back_gets_the_leave_once_it_returns() {
    let mut w = World::new().await;
    // A long delay: the homeserver's own timer cannot be what removes the member here.
    let delay_id = w.alice_joins_call("m1", 60_000).await;
    let p = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    w.synapse.stop();
    w.livekit.leave(&w.bridge.url, &w.lk_room, &p, "CLIENT_INITIATED").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        w.bridge.metric("rtc_leave_bridge_homeserver_requests_total{action=\"send\",homeserver=\"hs1.test\",outcome=\"network\"}").await >= 1.0
    );
    assert!(w.hs.calls_of(&delay_id, "send").iter().all(|c| c.status.is_none()), "the homeserver was down");
    w.synapse.resume().await;
    let back = Instant::now();
    // The back-off is capped at 30 s; with 3 s down it is a few seconds at most.
    w.left_by_bridge(&w.alice, &delay_id, back, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_keeps_every_job() {
    let mut w = World::new().await;
    let bob = w.synapse.register("bob").await;
    w.synapse.join_room(&bob, &w.room).await;
    let delay_id = w.alice_joins_call("m1", DELAY_MS).await;
    let bob_delay = w.synapse.join_call(&bob, &w.room, DELAY_MS).await;
    w.bridge.delegate(&w.synapse, &bob, &w.room, "b1", &bob_delay, DELAY_MS).await;
    let a = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    let bob_identity = identity::identity_three_part(&bob.user_id, &bob.device_id, "b1");
    w.livekit.join(&w.bridge.url, &w.lk_room, &bob_identity).await;

    w.bridge.kill9();
    w.bridge.restart().await;
    assert_eq!(w.bridge.metric("rtc_leave_bridge_jobs{state=\"connected\"}").await, 2.0, "{}", w.bridge.logs());
    assert!(
        w.still_member_after(Duration::from_millis(2 * DELAY_MS)).await,
        "member lost across kill -9:\n{}",
        w.bridge.logs()
    );
    assert!(w.synapse.is_member(&bob, &w.room).await);
    let left = Instant::now();
    w.livekit.leave(&w.bridge.url, &w.lk_room, &a, "CLIENT_INITIATED").await;
    assert!(w.left_by_bridge(&w.alice, &delay_id, left, Duration::from_secs(2)).await < Duration::from_secs(1));
    assert!(w.synapse.is_member(&bob, &w.room).await);
    assert!(w.hs.calls_of(&bob_delay, "send").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_catches_a_lost_participant_left() {
    lost_departure_is_caught_by_reconciliation(false).await;
}

/// LiveKit lists a departing participant for a moment, with state `DISCONNECTED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_listed_as_disconnected_is_not_present() {
    lost_departure_is_caught_by_reconciliation(true).await;
}

/// A departure whose webhook was lost is proven by listings over the grace period (8 s here);
/// the bridge killed -9 and restarted in the middle of that proof carries on with it (stored with
/// the job) instead of starting over: the leave lands when it would have without the restart
/// (about 9–10 s after the departure, not 13 s or more), and never before the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_an_absence_proof_continues_it() {
    let env = [("RTC_LEAVE_BRIDGE_GRACE", "8s"), ("RTC_LEAVE_BRIDGE_RECONCILE_INTERVAL", "1s")];
    let mut w = World::with(SynapseOptions::default(), &env).await;
    let delay_id = w.alice_joins_call("m1", 60_000).await;
    let p = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    assert!(w.still_member_after(Duration::from_secs(2)).await, "removed while connected");
    let gone = Instant::now();
    w.livekit.disconnect(&w.lk_room, &p.sid);
    // Listings have found it absent for a few seconds when the bridge dies (starting over after
    // the restart would take it past 13 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(w.hs.accepted_send(&delay_id).is_none());
    w.bridge.kill9();
    w.bridge.restart().await;
    let took = w.left_by_bridge(&w.alice, &delay_id, gone, Duration::from_secs(25)).await;
    println!("lost departure, the bridge restarted mid-proof: sent {took:?} after the departure");
    assert!(took >= Duration::from_secs(8), "proven in {took:?}, less than the grace period");
    assert!(took < Duration::from_millis(11_500), "the proof started over after the restart: {took:?}");
}

/// The member disconnects (still listed as `DISCONNECTED` if `lingering`) and LiveKit's webhook
/// is lost: two listings 2 s apart prove it gone, within two or three reconciliation intervals.
async fn lost_departure_is_caught_by_reconciliation(lingering: bool) {
    let w = World::new().await;
    let delay_id = w.alice_joins_call("m1", 60_000).await;
    let p = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gone = Instant::now();
    if lingering {
        w.livekit.disconnect_lingering(&w.lk_room, &p.sid);
    } else {
        w.livekit.disconnect(&w.lk_room, &p.sid);
    }
    let took = w.left_by_bridge(&w.alice, &delay_id, gone, Duration::from_secs(10)).await;
    assert!(took <= Duration::from_millis(6_500), "lost departure caught only after {took:?}");
    assert_eq!(
        w.bridge.metric_reaches("rtc_leave_bridge_leave_latency_seconds_count{trigger=\"reconciled\"}", 1.0).await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livekit_unreachable_keeps_members_alive() {
    let w = World::new().await;
    w.livekit.set_unavailable(true);
    let delay_id = w.alice_joins_call("m1", DELAY_MS).await;
    // Never joined as far as webhooks go, and LiveKit cannot be asked: no guessing.
    assert!(w.still_member_after(Duration::from_secs(8)).await, "sent on a guess:\n{}", w.bridge.logs());
    assert!(w.bridge.metric("rtc_leave_bridge_livekit_requests_total{outcome=\"error\"}").await >= 2.0);
    assert!(w.hs.calls_of(&delay_id, "send").is_empty(), "sent on a guess");
    // Once LiveKit answers (nobody there), the leave goes out.
    let back = Instant::now();
    w.livekit.set_unavailable(false);
    w.left_by_bridge(&w.alice, &delay_id, back, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_waits_for_reappearance_and_room_finished_sends() {
    let w = World::new().await;
    let delay_id = w.alice_joins_call("m1", DELAY_MS).await;
    let p = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    // LiveKit says it left for a migration, but the session is still listed: stay.
    let migrated = w.livekit.participant_event("participant_left", &w.lk_room, &p, Some("MIGRATION"));
    w.livekit.deliver(&w.bridge.url, &migrated).await;
    assert!(
        w.still_member_after(Duration::from_millis(2 * DELAY_MS)).await,
        "migration sent the leave:\n{}",
        w.bridge.logs()
    );
    // The room ends: everybody is gone.
    let sid = w.livekit.finish_room(&w.lk_room);
    let finished = Instant::now();
    w.livekit.deliver(&w.bridge.url, &w.livekit.room_finished_event(&w.lk_room, &sid)).await;
    assert!(w.left_by_bridge(&w.alice, &delay_id, finished, Duration::from_secs(2)).await < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_exits_cleanly_and_resumes() {
    let mut w = World::new().await;
    let delay_id = w.alice_joins_call("m1", DELAY_MS).await;
    let p = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    let status = w.bridge.terminate();
    assert!(status.success(), "SIGTERM exit: {status}\n{}", w.bridge.logs());
    assert!(w.bridge.logs().contains("engine stopped"));
    w.bridge.restart().await;
    assert!(w.still_member_after(Duration::from_millis(DELAY_MS + 1_000)).await);
    let left = Instant::now();
    w.livekit.leave(&w.bridge.url, &w.lk_room, &p, "CLIENT_INITIATED").await;
    assert!(w.left_by_bridge(&w.alice, &delay_id, left, Duration::from_secs(2)).await < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegations_are_authenticated() {
    // other.test is allowed too, so that a foreign-server claim is refused for what it is.
    let w = World::with(SynapseOptions::default(), &[("LIVEKIT_FULL_ACCESS_HOMESERVERS", "hs1.test,other.test")]).await;
    let bob = w.synapse.register("bob").await;
    let delay_id = w.synapse.join_call(&w.alice, &w.room, DELAY_MS).await;
    let alice_token = w.synapse.openid_token(&w.alice).await;
    let bob_token = w.synapse.openid_token(&bob).await;

    // Bob's token claiming to be Alice.
    let body = delegation_body(&bob_token, &w.alice, &w.room, "m1", &delay_id, DELAY_MS);
    let (status, v) = w.bridge.delegate_raw(&body).await;
    assert_eq!((status, v["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{v}");

    // A revoked / made-up token.
    let mut fake = alice_token.clone();
    fake["access_token"] = "not-a-token".into();
    let (status, _) =
        w.bridge.delegate_raw(&delegation_body(&fake, &w.alice, &w.room, "m1", &delay_id, DELAY_MS)).await;
    assert_eq!(status, 401);

    // Alice's token presented as coming from a foreign server.
    let mut foreign = alice_token.clone();
    foreign["matrix_server_name"] = "other.test".into();
    let (status, v) =
        w.bridge.delegate_raw(&delegation_body(&foreign, &w.alice, &w.room, "m1", &delay_id, DELAY_MS)).await;
    assert_eq!((status, v["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{v}");

    // Malformed requests.
    let mut bad = delegation_body(&alice_token, &w.alice, &w.room, "m1", &delay_id, DELAY_MS);
    bad["delay_timeout"] = 0.into();
    assert_eq!(w.bridge.delegate_raw(&bad).await.1["errcode"], "M_INVALID_PARAM");
    bad["delay_timeout"] = DELAY_MS.into();
    bad["room_id"] = "not-a-room".into();
    assert_eq!(w.bridge.delegate_raw(&bad).await.1["errcode"], "M_INVALID_PARAM");
    let (status, v) = w.bridge.delegate_raw(&serde_json::json!({"room_id": w.room})).await;
    assert_eq!((status, v["errcode"].as_str()), (400, Some("M_BAD_JSON")));

    // Nothing of the refused requests is tracked, and the member stays (its own timer aside).
    assert_eq!(w.bridge.metric("rtc_leave_bridge_jobs{state=\"waiting\"}").await, 0.0);
    // The genuine request works.
    w.bridge.delegate(&w.synapse, &w.alice, &w.room, "m1", &delay_id, DELAY_MS).await;
    // No OpenID token, genuine or not, ever reaches the logs.
    let logs = w.bridge.logs();
    for token in [&alice_token["access_token"], &bob_token["access_token"]] {
        assert!(!logs.contains(token.as_str().unwrap()), "token in the logs");
    }
    assert_eq!(w.bridge.metric("rtc_leave_bridge_jobs{state=\"waiting\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_homeserver_is_forbidden() {
    let w = World::with(SynapseOptions::default(), &[("LIVEKIT_FULL_ACCESS_HOMESERVERS", "somewhere-else.test")]).await;
    let delay_id = w.synapse.join_call(&w.alice, &w.room, DELAY_MS).await;
    let token = w.synapse.openid_token(&w.alice).await;
    let (status, v) =
        w.bridge.delegate_raw(&delegation_body(&token, &w.alice, &w.room, "m1", &delay_id, DELAY_MS)).await;
    assert_eq!((status, v["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_signed_by_livekits_own_sdk_are_verified_and_applied() {
    let w = World::new().await;
    let delay_id = w.alice_joins_call("m1", DELAY_MS).await;
    let ident = w.identity("m1");
    let p = w.livekit.connect(&w.lk_room, &ident);
    let room_sid = w.livekit.room_sid(&w.lk_room);
    let sdk = |event: &str, reason: Option<&str>| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk_webhook.py");
        let joined = p.joined_at.to_string();
        let mut args =
            vec![script, common::livekit::API_KEY, API_SECRET, event, &w.lk_room, &room_sid, &ident, &p.sid, &joined];
        args.extend(reason);
        let out = std::process::Command::new(common::synapse::python()).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["body"].as_str().unwrap().to_owned(), v["authorization"].as_str().unwrap().to_owned())
    };
    let (body, auth) = sdk("participant_joined", None);
    assert_eq!(w.livekit.post_webhook(&w.bridge.url, &body, Some(&auth)).await, 200);
    assert_eq!(w.bridge.metric("rtc_leave_bridge_jobs{state=\"connected\"}").await, 1.0);
    // The SDK's signature over one body does not verify another.
    let (left, left_auth) = sdk("participant_left", Some("CLIENT_INITIATED"));
    assert_eq!(w.livekit.post_webhook(&w.bridge.url, &left, Some(&auth)).await, 401);
    assert!(w.synapse.is_member(&w.alice, &w.room).await);
    w.livekit.disconnect(&w.lk_room, &p.sid);
    let gone = Instant::now();
    assert_eq!(w.livekit.post_webhook(&w.bridge.url, &left, Some(&left_auth)).await, 200);
    assert!(w.left_by_bridge(&w.alice, &delay_id, gone, Duration::from_secs(2)).await < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_connected_before_delegating_is_found_through_roomservice() {
    let w = World::new().await;
    // The client connects to LiveKit first (its participant_joined went by before any delegation
    // existed), then publishes its membership and delegates.
    let p = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    let delay_id = w.alice_joins_call("m1", DELAY_MS).await;
    assert_eq!(w.bridge.metric_reaches("rtc_leave_bridge_jobs{state=\"connected\"}", 1.0).await, 1.0);
    assert!(w.still_member_after(Duration::from_millis(2 * DELAY_MS)).await, "{}", w.bridge.logs());
    let left = Instant::now();
    w.livekit.leave(&w.bridge.url, &w.lk_room, &p, "CLIENT_INITIATED").await;
    assert!(w.left_by_bridge(&w.alice, &delay_id, left, Duration::from_secs(2)).await < Duration::from_secs(1));
}

/// Writes `request` on a new connection to the bridge and reads until the bridge closes it.
async fn raw_exchange(base: &str, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.strip_prefix("http://").unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the bridge kept the connection open: {}", String::from_utf8_lossy(&answer));
    String::from_utf8_lossy(&answer).into_owned()
}

fn three_part(user: &MatrixUser, member_id: &str) -> String {
    identity::identity_three_part(&user.user_id, &user.device_id, member_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_connection_is_not_a_departure_and_a_never_connected_member_is_removed() {
    let w = World::new().await;
    let bob = w.another("bob").await;
    let delegated = Instant::now();
    let alice_delay = w.alice_joins_call("m1", DELAY_MS).await;
    let bob_delay = w.joins_call(&bob, "b1", 60_000).await;
    // Alice's first attempt never becomes active (LiveKit sends participant_connection_aborted,
    // no participant_joined); her second attempt connects.
    let attempt = w.livekit.connect(&w.lk_room, &w.identity("m1"));
    w.livekit.depart(&w.bridge.url, &w.lk_room, &attempt, "participant_connection_aborted", Some("JOIN_FAILURE")).await;
    let p = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    // Bob's only attempt aborts.
    let b = w.livekit.connect(&w.lk_room, &three_part(&bob, "b1"));
    w.livekit.depart(&w.bridge.url, &w.lk_room, &b, "participant_connection_aborted", Some("JOIN_FAILURE")).await;
    // Bob never connected: removed once the join timeout (3 s) passed and LiveKit confirmed it.
    let took = w.left_by_bridge(&bob, &bob_delay, delegated, Duration::from_secs(8)).await;
    assert!(took >= Duration::from_secs(3), "removed before the join timeout: {took:?}");
    assert!(w.still_member_after(Duration::from_millis(2 * DELAY_MS)).await, "{}", w.bridge.logs());
    let left = Instant::now();
    w.livekit.leave(&w.bridge.url, &w.lk_room, &p, "CLIENT_INITIATED").await;
    assert!(w.left_by_bridge(&w.alice, &alice_delay, left, Duration::from_secs(2)).await < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_waits_for_the_member_to_reappear_and_sends_when_it_does_not() {
    let w = World::new().await;
    let bob = w.another("bob").await;
    let alice_delay = w.alice_joins_call("m1", DELAY_MS).await;
    let bob_delay = w.joins_call(&bob, "b1", 60_000).await;
    let a = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    let b = w.livekit.join(&w.bridge.url, &w.lk_room, &three_part(&bob, "b1")).await;
    // The SFU node shuts down. Alice reconnects to another node as a new session, whose
    // participant_joined is lost; Bob does not come back.
    w.livekit.depart(&w.bridge.url, &w.lk_room, &a, "participant_left", Some("SERVER_SHUTDOWN")).await;
    let shutdown = Instant::now();
    w.livekit.depart(&w.bridge.url, &w.lk_room, &b, "participant_left", Some("SERVER_SHUTDOWN")).await;
    let a2 = w.livekit.connect(&w.lk_room, &w.identity("m1"));
    // Bob: grace (2 s), then a listing that confirms the absence.
    let took = w.left_by_bridge(&bob, &bob_delay, shutdown, Duration::from_secs(6)).await;
    assert!(took >= Duration::from_secs(2), "sent before the grace period ended: {took:?}");
    assert_eq!(
        w.bridge.metric_reaches("rtc_leave_bridge_leave_latency_seconds_count{trigger=\"grace_expired\"}", 1.0).await,
        1.0
    );
    assert!(w.still_member_after(Duration::from_millis(2 * DELAY_MS)).await, "{}", w.bridge.logs());
    assert!(w.hs.calls_of(&alice_delay, "send").is_empty());
    let left = Instant::now();
    w.livekit.leave(&w.bridge.url, &w.lk_room, &a2, "CLIENT_INITIATED").await;
    assert!(w.left_by_bridge(&w.alice, &alice_delay, left, Duration::from_secs(2)).await < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_identity_kick_keeps_the_member_whichever_webhook_comes_first() {
    let w = World::new().await;
    let bob = w.another("bob").await;
    let alice_delay = w.alice_joins_call("m1", DELAY_MS).await;
    let bob_delay = w.joins_call(&bob, "b1", DELAY_MS).await;
    let a1 = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    let b1 = w.livekit.join(&w.bridge.url, &w.lk_room, &three_part(&bob, "b1")).await;
    // Each reconnects under the same identity (a second tab, a network switch): LiveKit admits
    // the new session and kicks the old one with DUPLICATE_IDENTITY.
    let kick = |old: &Participant| {
        w.livekit.participant_event("participant_left", &w.lk_room, old, Some("DUPLICATE_IDENTITY"))
    };
    let a2 = w.livekit.connect(&w.lk_room, &w.identity("m1"));
    w.livekit.disconnect(&w.lk_room, &a1.sid);
    w.livekit.deliver(&w.bridge.url, &kick(&a1)).await;
    w.livekit.deliver(&w.bridge.url, &w.livekit.participant_event("participant_joined", &w.lk_room, &a2, None)).await;
    let b2 = w.livekit.connect(&w.lk_room, &three_part(&bob, "b1"));
    w.livekit.disconnect(&w.lk_room, &b1.sid);
    w.livekit.deliver(&w.bridge.url, &w.livekit.participant_event("participant_joined", &w.lk_room, &b2, None)).await;
    w.livekit.deliver(&w.bridge.url, &kick(&b1)).await;
    assert!(w.members_after(&[&w.alice, &bob], Duration::from_millis(2 * DELAY_MS + 500)).await, "{}", w.bridge.logs());
    assert!(w.hs.calls_of(&alice_delay, "send").is_empty() && w.hs.calls_of(&bob_delay, "send").is_empty());
    let left = Instant::now();
    w.livekit.leave(&w.bridge.url, &w.lk_room, &a2, "CLIENT_INITIATED").await;
    w.livekit.leave(&w.bridge.url, &w.lk_room, &b2, "CLIENT_INITIATED").await;
    assert!(w.left_by_bridge(&w.alice, &alice_delay, left, Duration::from_secs(2)).await < Duration::from_secs(1));
    assert!(w.left_by_bridge(&bob, &bob_delay, left, Duration::from_secs(2)).await < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departure_without_a_reason_is_final() {
    let w = World::new().await;
    let delay_id = w.alice_joins_call("m1", 60_000).await;
    let p = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    assert!(w.still_member_after(Duration::from_secs(2)).await, "removed while connected");
    // UNKNOWN_REASON is protojson's zero value: the field is left out of the body.
    let body = w.livekit.participant_event("participant_left", &w.lk_room, &p, None);
    assert!(!body.contains("disconnectReason"));
    w.livekit.disconnect(&w.lk_room, &p.sid);
    let left = Instant::now();
    w.livekit.deliver(&w.bridge.url, &body).await;
    assert!(w.left_by_bridge(&w.alice, &delay_id, left, Duration::from_secs(2)).await < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_with_expired_or_not_yet_valid_tokens_are_refused() {
    let w = World::new().await;
    let delay_id = w.alice_joins_call("m1", DELAY_MS).await;
    let p = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    let left = w.livekit.participant_event("participant_left", &w.lk_room, &p, Some("CLIENT_INITIATED"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    // Signed with the right secret over the right body, but expired an hour ago / valid only
    // from an hour from now (a replayed or pre-made webhook).
    let expired = LiveKit::sign_valid(&left, API_SECRET, now - 3_900, now - 3_600);
    let early = LiveKit::sign_valid(&left, API_SECRET, now + 3_600, now + 3_900);
    assert_eq!(w.livekit.post_webhook(&w.bridge.url, &left, Some(&expired)).await, 401);
    assert_eq!(w.livekit.post_webhook(&w.bridge.url, &left, Some(&early)).await, 401);
    assert!(w.still_member_after(Duration::from_millis(2 * DELAY_MS)).await, "{}", w.bridge.logs());
    assert!(w.hs.calls_of(&delay_id, "send").is_empty());
    assert_eq!(w.bridge.metric("rtc_leave_bridge_webhooks_total{event=\"unknown\",outcome=\"forged\"}").await, 2.0);
}

/// LiveKit's server lists a room that does not exist as empty (both its local and its Redis
/// room store: a missing key reads as no participants); other RoomService implementations may
/// answer Twirp `not_found`. Both mean: nobody is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_that_does_not_exist_is_empty_however_livekit_says_so() {
    let w = World::new().await;
    for (member, not_found) in [("m1", false), ("m2", true)] {
        w.livekit.set_missing_room_not_found(not_found);
        let delegated = Instant::now();
        let delay_id = w.alice_joins_call(member, 60_000).await;
        let took = w.left_by_bridge(&w.alice, &delay_id, delegated, Duration::from_secs(8)).await;
        assert!(took >= Duration::from_secs(3), "removed before the join timeout ({member}): {took:?}");
    }
    assert_eq!(w.bridge.metric("rtc_leave_bridge_livekit_requests_total{outcome=\"error\"}").await, 0.0);
    assert_eq!(w.bridge.metric("rtc_leave_bridge_leave_latency_seconds_count{trigger=\"never_joined\"}").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_left_while_the_bridge_was_down_is_removed_on_start() {
    let mut w = World::new().await;
    let bob = w.another("bob").await;
    let alice_delay = w.alice_joins_call("m1", 60_000).await;
    let bob_delay = w.joins_call(&bob, "b1", 60_000).await;
    let a = w.livekit.join(&w.bridge.url, &w.lk_room, &w.identity("m1")).await;
    w.livekit.join(&w.bridge.url, &w.lk_room, &three_part(&bob, "b1")).await;
    w.bridge.kill9();
    // Alice leaves while nobody receives LiveKit's webhook.
    w.livekit.disconnect(&w.lk_room, &a.sid);
    let restarted = Instant::now();
    w.bridge.restart().await;
    let took = w.left_by_bridge(&w.alice, &alice_delay, restarted, Duration::from_secs(10)).await;
    assert!(took <= Duration::from_millis(6_500), "caught only after {took:?}");
    assert!(w.synapse.is_member(&bob, &w.room).await, "the member still connected was removed");
    assert!(w.hs.calls_of(&bob_delay, "send").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_homeserver_call_finish() {
    let mut w = World::new().await;
    // Every restart takes 1.2 s at the homeserver (the bridge's request timeout here is 2 s):
    // the first one of a new delegation is issued at once and is in flight when SIGTERM arrives.
    w.hs.stall(Some(("restart", Duration::from_millis(1_200))));
    let delay_id = w.alice_joins_call("m1", 60_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(w.hs.calls_of(&delay_id, "restart").is_empty(), "the restart is in flight");
    let stopping = Instant::now();
    let status = w.bridge.terminate();
    let stopped = Instant::now();
    assert!(status.success(), "SIGTERM exit: {status}\n{}", w.bridge.logs());
    let restarts = w.hs.calls_of(&delay_id, "restart");
    assert_eq!(restarts.len(), 1, "{restarts:?}");
    assert_eq!(restarts[0].status, Some(200));
    assert!(restarts[0].answered > stopping && restarts[0].answered <= stopped, "answered after the exit");
    let logs = w.bridge.logs();
    let drain = logs.find("shutdown: draining").expect("drain logged");
    let done = logs.rfind("homeserver call done").expect("the call's answer reached the bridge");
    assert!(done > drain && logs[done..].contains("engine stopped"), "{logs}");
}
