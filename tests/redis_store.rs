//! The service on a real Redis: a job moved there from SQLite with `migrate-store` is resumed,
//! survives a `kill -9` of the service and a crash of Redis (AOF), keeps its connected member in
//! room state, and its leave is sent when the member leaves.

mod common;

use std::time::{Duration, Instant};

use common::bridge::{Bridge, SLOT};
use common::hs_proxy::HsProxy;
use common::livekit::{LiveKit, Participant};
use common::redis::Redis;
use common::synapse::{MatrixUser, Synapse, SynapseOptions};
use rtc_leave_bridge::identity;

const DELAY_MS: u64 = 4_000;
/// The shortest lease: failover within 1.25 s + 1 s, so delays from 3.25 s are accepted.
const LEASE: &str = "1s";

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Alice in a call: her delayed leave delegated to a bridge (on Redis, or on SQLite beside a
/// Redis it may move to), and her session connected to LiveKit.
struct Call {
    synapse: Synapse,
    hs: HsProxy,
    livekit: LiveKit,
    redis: Redis,
    bridge: Bridge,
    alice: MatrixUser,
    room: String,
    lk_room: String,
    delay_id: String,
    ident: String,
    p: Participant,
}

impl Call {
    async fn start(on_redis: bool) -> Call {
        let synapse = Synapse::start(SynapseOptions::default()).await;
        let hs = HsProxy::start(&synapse.url).await;
        let livekit = LiveKit::start().await;
        let redis = Redis::start().await;
        let mut env = Bridge::env_for(&hs.url, &livekit);
        env.insert("RTC_LEAVE_BRIDGE_LEASE".into(), LEASE.into());
        // What failover allows on Redis (below the 5 s default), for both stores alike.
        env.insert("RTC_LEAVE_BRIDGE_MIN_DELAY".into(), format!("{DELAY_MS}ms"));
        if on_redis {
            env.insert("LIVEKIT_REDIS_URL".into(), redis.url());
        }
        let bridge = Bridge::start(env).await;
        let alice = synapse.register("alice").await;
        let room = synapse.create_room(&alice).await;
        let lk_room = identity::livekit_room(&room, SLOT);
        let delay_id = synapse.join_call(&alice, &room, DELAY_MS).await;
        bridge.delegate(&synapse, &alice, &room, "m1", &delay_id, DELAY_MS).await;
        let ident = identity::identity_three_part(&alice.user_id, &alice.device_id, "m1");
        let p = livekit.join(&bridge.url, &lk_room, &ident).await;
        Call { synapse, hs, livekit, redis, bridge, alice, room, lk_room, delay_id, ident, p }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_migrated_to_redis_survives_crashes_of_both_and_is_sent() {
    let Call { synapse, hs, livekit, mut redis, mut bridge, alice, room, lk_room, delay_id, p, .. } =
        Call::start(false).await;

    // Stop the SQLite-backed service and move its job to Redis.
    assert!(bridge.terminate().success());
    let sqlite = format!("sqlite:{}", bridge.data.path().join("state").display());
    let out = bridge.cli(&["migrate-store", "--from", &sqlite, "--to", &redis.url()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("1 job(s) copied"), "{}", text(&out));
    // A second migration into a store that holds jobs is refused.
    let again = bridge.cli(&["migrate-store", "--from", &sqlite, "--to", &redis.url()], &[]);
    assert!(!again.status.success() && text(&again).contains("--merge"), "{}", text(&again));

    // The service on Redis resumes it.
    bridge.env.insert("LIVEKIT_REDIS_URL".into(), redis.url());
    bridge.env.insert("RTC_LEAVE_BRIDGE_DATA_DIR".into(), "/nonexistent/unused".into());
    bridge.restart().await;
    assert_eq!(bridge.jobs_tracked().await, 1.0);
    let out = bridge.cli(&["check-config"], &[]);
    assert!(text(&out).contains("Redis reachable") && text(&out).contains("1 stored jobs"), "{}", text(&out));

    // Both crash; the job is still there, and the member still in room state past its delay.
    bridge.kill9();
    redis.kill9();
    redis.restart().await;
    bridge.restart().await;
    // The dead instance's lease on the job's shard runs out first.
    let count = bridge.jobs_reach(1.0, Duration::from_secs(5)).await;
    assert_eq!(count, 1.0, "nothing lost across a crash of Redis (AOF) and of the service");
    let until = Instant::now() + Duration::from_millis(2 * DELAY_MS + 1_000);
    while Instant::now() < until {
        assert!(synapse.is_member(&alice, &room).await, "removed while connected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // It leaves: the leave is the bridge's own send, within a second.
    let since = Instant::now();
    livekit.leave(&bridge.url, &lk_room, &p, "CLIENT_INITIATED").await;
    let send = hs.wait_accepted_send(&delay_id, Duration::from_secs(2)).await.expect("the bridge sent the leave");
    assert!(send.after(since) < Duration::from_secs(1));
    assert!(!synapse.is_member(&alice, &room).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_for_thirty_seconds_removes_nobody_and_everything_resumes() {
    let Call { synapse, hs, livekit, mut redis, bridge, alice, room, lk_room, delay_id, ident, p } =
        Call::start(true).await;

    redis.kill9();
    // While Redis is down: changes are refused with 503 (LiveKit retries; clients retry) ...
    let again = livekit.connect(&lk_room, &ident);
    let joined = livekit.participant_event("participant_joined", &lk_room, &again, None);
    let auth = LiveKit::sign(&joined, common::livekit::API_SECRET);
    assert_eq!(livekit.post_webhook(&bridge.url, &joined, Some(&auth)).await, 503);
    let bob = synapse.register("bob").await;
    synapse.join_room(&bob, &room).await;
    let bobs = synapse.join_call(&bob, &room, 60_000).await;
    let body = common::bridge::delegation_body(&synapse.openid_token(&bob).await, &bob, &room, "b1", &bobs, 60_000);
    assert_eq!(bridge.delegate_raw(&body).await.0, 503);
    // Not ready, and saying so without the store's internals (addresses, driver errors).
    let ready = reqwest::get(format!("{}/readyz", bridge.url)).await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let answer: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(answer, serde_json::json!({"errcode": "M_UNKNOWN", "error": "store unavailable"}));
    // ... and the connected member is kept alive from memory for 30 s, seven times its delay.
    let restarts_before = hs.count("restart", Some(200));
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        assert!(
            synapse.is_member(&alice, &room).await,
            "removed while connected, Redis down; fenced {}",
            bridge.logs().matches("call not made").count()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(hs.count("restart", Some(200)) >= restarts_before + 8, "restarts went on");
    assert!(hs.accepted_send(&delay_id).is_none(), "nothing sent on a guess");

    // Redis is back: no operator action; LiveKit's retry is applied, and the leave goes out.
    redis.restart().await;
    let mut applied = false;
    for _ in 0..50 {
        if livekit.post_webhook(&bridge.url, &joined, Some(&auth)).await == 200 {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(applied, "the webhook's retry was not applied after Redis came back");
    assert_eq!(bridge.delegate_raw(&body).await.0, 200, "delegations accepted again");
    // Recovered: the shard held again, its inbox read (Bob's delegation applied).
    assert_eq!(bridge.jobs_reach(2.0, Duration::from_secs(10)).await, 2.0, "{}", bridge.logs());
    let since = Instant::now();
    livekit.leave(&bridge.url, &lk_room, &p, "CLIENT_INITIATED").await;
    livekit.leave(&bridge.url, &lk_room, &again, "CLIENT_INITIATED").await;
    let send = hs.wait_accepted_send(&delay_id, Duration::from_secs(2)).await.expect("the bridge sent the leave");
    assert!(send.after(since) < Duration::from_secs(1));
}
