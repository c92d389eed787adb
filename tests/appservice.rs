//! Appservice mode end to end: a real Synapse with the bridge registered as an appservice and
//! MSC4512 proxying on; members call **Synapse** with their own access tokens, Synapse forwards to
//! the bridge, and the bridge manages the delayed events as their owner through the appservice.

mod common;

use std::time::{Duration, Instant};

use common::bridge::{Bridge, SLOT};
use common::hs_proxy::HsProxy;
use common::livekit::{LiveKit, assert_join_token, js_hash};
use common::synapse::{MatrixUser, SERVER_NAME, Synapse, SynapseOptions};
use rtc_leave_bridge::identity;
use serde_json::{Value, json};

const AS_TOKEN: &str = "as-token-for-tests-0123456789";
const HS_TOKEN: &str = "hs-token-for-tests-9876543210";

/// The bridge registered as an appservice of every local user, its transactions sent to it.
fn registration(bridge_port: u16) -> String {
    common::txn_proxy::registration(bridge_port, bridge_port, AS_TOKEN, HS_TOKEN, ".*")
}

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
    /// `appservice`: register the bridge with Synapse and configure it for appservice mode.
    /// `rate`: Synapse's `rc_delayed_event_mgmt` (`None`: Synapse's default).
    async fn new(appservice: bool, rate: Option<(f64, u32)>) -> World {
        let port = common::free_port();
        let options = SynapseOptions {
            delayed_event_rate: rate,
            appservice_registration: appservice.then(|| registration(port)),
            ..SynapseOptions::default()
        };
        let synapse = Synapse::start(options).await;
        let hs = HsProxy::start(&synapse.url).await;
        let livekit = LiveKit::start().await;
        let mut env = Bridge::env_for(&hs.url, &livekit);
        if appservice {
            env.insert("LIVEKIT_AS_TOKEN".into(), AS_TOKEN.into());
            env.insert("LIVEKIT_HS_TOKEN".into(), HS_TOKEN.into());
            env.insert("LIVEKIT_HS_SERVER_NAME".into(), SERVER_NAME.into());
        }
        let bridge = Bridge::start_on(port, env).await;
        let alice = synapse.register("alice").await;
        let room = synapse.create_room(&alice).await;
        let lk_room = identity::livekit_room(&room, SLOT);
        World { synapse, hs, livekit, bridge, alice, room, lk_room }
    }

    fn body(&self, user: &MatrixUser, member_id: &str, delay_id: &str) -> Value {
        json!({
            "url": self.livekit.url,
            "room_id": self.room,
            "slot_id": SLOT,
            "member": {"id": member_id, "claimed_device_id": user.device_id},
            "delay_id": delay_id,
            "delay_timeout": 8000,
        })
    }

    /// Calls the bridge directly, as Synapse's proxy would, with the given headers.
    async fn direct(&self, hs_token: Option<&str>, user: Option<&str>, body: &Value) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .post(format!("{}/_matrix/client/v1/rtc/livekit/delegate_delayed_leave", self.bridge.url))
            .json(body);
        if let Some(t) = hs_token {
            req = req.bearer_auth(t);
        }
        if let Some(u) = user {
            req = req.header("X-Matrix-User-Identifier", u);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn still_members_after(&self, users: &[&MatrixUser], wait: Duration) -> Result<(), String> {
        let until = Instant::now() + wait;
        while Instant::now() < until {
            for u in users {
                if !self.synapse.is_member(u, &self.room).await {
                    return Err(u.user_id.clone());
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegation_through_the_homeserver_runs_the_whole_lifecycle() {
    let w = World::new(true, None).await;
    let delay_id = w.synapse.join_call(&w.alice, &w.room, 3_000).await;
    // Alice asks her own homeserver; it authenticates her and forwards to the bridge.
    let (status, v) = w.synapse.proxied_delegate(&w.alice, &w.body(&w.alice, "m1", &delay_id), false).await;
    assert_eq!((status, &v), (200, &json!({})), "{}", w.bridge.logs());
    // The identity of this flow: the 2-part hash.
    let p = w.livekit.join(&w.bridge.url, &w.lk_room, &identity::identity_two_part(&w.alice.user_id, "m1")).await;
    w.still_members_after(&[&w.alice], Duration::from_secs(7)).await.expect("connected member removed");
    let restarts =
        "rtc_leave_bridge_homeserver_requests_total{action=\"restart\",homeserver=\"hs1.test\",outcome=\"ok\"}";
    assert!(w.bridge.metric(restarts).await >= 3.0);

    assert!(w.hs.calls_of(&delay_id, "send").is_empty(), "sent while connected");
    let left = Instant::now();
    w.livekit.leave(&w.bridge.url, &w.lk_room, &p, "CLIENT_INITIATED").await;
    // The bridge's own send, accepted while the event was pending (Synapse's timer had not fired).
    let send = w.hs.wait_accepted_send(&delay_id, Duration::from_secs(3)).await.expect("the bridge sent the leave");
    assert!(send.after(left) < Duration::from_secs(1), "leave after {:?}", send.after(left));
    assert!(!w.synapse.is_member(&w.alice, &w.room).await);

    // The stable path works too, and a member that connected before delegating is found
    // through RoomService.
    let bob = w.synapse.register("bob").await;
    w.synapse.join_room(&bob, &w.room).await;
    let bp = w.livekit.join(&w.bridge.url, &w.lk_room, &identity::identity_two_part(&bob.user_id, "b1")).await;
    let bob_delay = w.synapse.join_call(&bob, &w.room, 3_000).await;
    let (status, v) = w.synapse.proxied_delegate(&bob, &w.body(&bob, "b1", &bob_delay), true).await;
    assert_eq!(status, 200, "{v}");
    w.still_members_after(&[&bob], Duration::from_secs(7)).await.expect("bob removed");
    let left = Instant::now();
    w.livekit.leave(&w.bridge.url, &w.lk_room, &bp, "CLIENT_INITIATED").await;
    let send = w.hs.wait_accepted_send(&bob_delay, Duration::from_secs(2)).await.expect("the bridge sent bob's leave");
    assert!(send.after(left) < Duration::from_secs(1), "leave after {:?}", send.after(left));
    assert!(!w.synapse.is_member(&bob, &w.room).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appservice_requests_are_authenticated_and_checked() {
    let w = World::new(true, None).await;
    let bob = w.synapse.register("bob").await;
    w.synapse.join_room(&bob, &w.room).await;
    let delay_id = w.synapse.join_call(&w.alice, &w.room, 60_000).await;
    let bob_delay = w.synapse.join_call(&bob, &w.room, 60_000).await;
    let other_room = w.synapse.create_room(&w.alice).await;
    let other_delay = w.synapse.join_call(&w.alice, &other_room, 60_000).await;
    let alice = Some(w.alice.user_id.as_str());
    let body = w.body(&w.alice, "m1", &delay_id);

    let (s, v) = w.direct(None, alice, &body).await;
    assert_eq!((s, v["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")));
    let (s, v) = w.direct(Some("wrong-token"), alice, &body).await;
    assert_eq!((s, v["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));
    let (s, v) = w.direct(Some(AS_TOKEN), alice, &body).await;
    assert_eq!((s, v["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")), "the as_token is not the hs_token");
    let (s, v) = w.direct(Some(HS_TOKEN), Some("@alice:elsewhere.test"), &body).await;
    assert_eq!((s, v["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "user of another homeserver");

    // Delay ids that are not this user's in this room, or not at all.
    for (what, delay) in
        [("bob's", bob_delay.as_str()), ("another room's", other_delay.as_str()), ("unknown", "syd_nope")]
    {
        let (s, v) = w.direct(Some(HS_TOKEN), alice, &w.body(&w.alice, "m1", delay)).await;
        assert_eq!((s, v["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{what} delay id: {v}");
    }
    let mut wrong_url = body.clone();
    wrong_url["url"] = "wss://another-sfu.example".into();
    let (s, v) = w.direct(Some(HS_TOKEN), alice, &wrong_url).await;
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    let mut claims_bob = body.clone();
    claims_bob["member"]["claimed_user_id"] = bob.user_id.clone().into();
    assert_eq!(w.direct(Some(HS_TOKEN), alice, &claims_bob).await.0, 400, "body claims are not trusted");
    assert_eq!(w.bridge.metric("rtc_leave_bridge_jobs{state=\"waiting\"}").await, 0.0, "nothing refused was kept");

    // Through Synapse, Bob cannot delegate Alice's event: Synapse says who he is.
    let (s, _) = w.synapse.proxied_delegate(&bob, &body, false).await;
    assert_eq!(s, 400);
    // The genuine request, and the homeserver's ping.
    let (s, v) = w.direct(Some(HS_TOKEN), alice, &body).await;
    assert_eq!((s, &v), (200, &json!({})));
    let ping = |token: Option<&'static str>| {
        let mut req = reqwest::Client::new().post(format!("{}/_matrix/app/v1/ping", w.bridge.url)).json(&json!({}));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(ping(Some(HS_TOKEN)).await, 200);
    assert_eq!(ping(None).await, 401);
    // A transaction of any size is acknowledged (a refused one would be retried forever, holding
    // the homeserver's queue), its body read and dropped, never held: 32 MiB.
    let rss_before = common::rss_kib(w.bridge.pid().unwrap());
    let transaction = |token: &'static str, body: reqwest::Body| {
        reqwest::Client::new()
            .put(format!("{}/_matrix/app/v1/transactions/txn1", w.bridge.url))
            .bearer_auth(token)
            .body(body)
            .send()
    };
    let resp = transaction(HS_TOKEN, reqwest::Body::from(vec![b' '; 32 << 20])).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({}));
    let grown = common::rss_kib(w.bridge.pid().unwrap()).saturating_sub(rss_before);
    assert!(grown < 16 * 1024, "a 32 MiB transaction grew the bridge by {grown} KiB");
    assert_eq!(transaction("wrong-token", reqwest::Body::from("{}")).await.unwrap().status().as_u16(), 401);
    // Synapse's own appservice ping (MSC2659) reaches the bridge and gets its answer.
    let resp = reqwest::Client::new()
        .post(format!("{}/_matrix/client/v1/appservice/rtc-leave-bridge/ping", w.synapse.url))
        .bearer_auth(AS_TOKEN)
        .json(&json!({"transaction_id": "t1"}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert!(v["duration_ms"].is_number(), "{v}");
    let logs = w.bridge.logs();
    assert!(!logs.contains(AS_TOKEN) && !logs.contains(HS_TOKEN) && !logs.contains("wrong-token"), "token in the logs");
    assert!(!logs.contains(&delay_id), "delay id in the logs");
}

/// Twenty connected members on 8 s delays, under Synapse's default delayed-event rate limits;
/// each with its delay id.
async fn twenty_members(appservice: bool) -> (World, Vec<(MatrixUser, String)>) {
    let w = World::new(appservice, None).await;
    let mut users = Vec::new();
    for i in 0..20 {
        let u = w.synapse.register(&format!("member{i}")).await;
        w.synapse.join_room(&u, &w.room).await;
        let delay_id = w.synapse.join_call(&u, &w.room, 8_000).await;
        let member = format!("m{i}");
        if appservice {
            let (status, v) = w.synapse.proxied_delegate(&u, &w.body(&u, &member, &delay_id), false).await;
            assert_eq!(status, 200, "{v}");
        } else {
            w.bridge.delegate(&w.synapse, &u, &w.room, &member, &delay_id, 8_000).await;
        }
        // Each mode's own identity: 2-part for homeserver-proxied members, 3-part for OpenID.
        let ident = if appservice {
            identity::identity_two_part(&u.user_id, &member)
        } else {
            identity::identity_three_part(&u.user_id, &u.device_id, &member)
        };
        w.livekit.join(&w.bridge.url, &w.lk_room, &ident).await;
        users.push((u, delay_id));
    }
    (w, users)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appservice_mode_keeps_twenty_members_alive_under_default_rate_limits() {
    let (w, users) = twenty_members(true).await;
    let refs: Vec<&MatrixUser> = users.iter().map(|(u, _)| u).collect();
    let result = w.still_members_after(&refs, Duration::from_secs(18)).await;
    assert!(result.is_ok(), "{} removed while connected:\n{}", result.unwrap_err(), w.bridge.metrics().await);
    let limited = w
        .bridge
        .metric("rtc_leave_bridge_homeserver_requests_total{action=\"restart\",homeserver=\"hs1.test\",outcome=\"rate_limited\"}")
        .await;
    assert_eq!(limited, 0.0);
}

/// Why appservice mode matters: the same load in OpenID mode, where every restart is an anonymous
/// call from the bridge's address, exceeds Synapse's default limit and connected members are lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openid_mode_loses_connected_members_under_default_rate_limits() {
    let (w, users) = twenty_members(false).await;
    let refs: Vec<&MatrixUser> = users.iter().map(|(u, _)| u).collect();
    let result = w.still_members_after(&refs, Duration::from_secs(18)).await;
    let lost = result.expect_err("expected Synapse's default rate limit to cost OpenID-mode members");
    // What failed is the rate limit, not the bridge: it kept restarting the lost member's event
    // (some restarts got through, others were answered 429) and never sent it; Synapse's own
    // timer fired it.
    let delay_id = &users.iter().find(|(u, _)| u.user_id == lost).unwrap().1;
    let restarts = w.hs.calls_of(delay_id, "restart");
    assert!(restarts.iter().any(|c| c.status == Some(200)), "never restarted: {restarts:?}");
    assert!(restarts.iter().any(|c| c.status == Some(429)), "never rate limited: {restarts:?}");
    assert!(w.hs.accepted_send(delay_id).is_none(), "the bridge sent the leave of a connected member");
    let limited = w
        .bridge
        .metric("rtc_leave_bridge_homeserver_requests_total{action=\"restart\",homeserver=\"hs1.test\",outcome=\"rate_limited\"}")
        .await;
    assert!(limited > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_token_through_the_homeserver_mints_the_two_part_identity_and_the_leave_rides_along() {
    let w = World::new(true, None).await;
    let delay_id = w.synapse.join_call(&w.alice, &w.room, 3_000).await;
    let member_id = "m-proxied";
    let body = json!({
        "room_id": w.room,
        "slot_id": SLOT,
        "member": {"id": member_id, "claimed_device_id": w.alice.device_id},
        "delay_id": delay_id,
        "delay_timeout": 3_000,
    });
    let (status, v) = w.synapse.proxied(&w.alice, "get_token", &body, false).await;
    assert_eq!(status, 200, "{v}\n{}", w.bridge.logs());
    assert_eq!(v["url"], json!(w.livekit.url));
    let identity = js_hash(&[&w.alice.user_id, member_id]);
    assert_join_token(v["jwt"].as_str().unwrap(), &identity, &js_hash(&[&w.room, SLOT]));
    assert_eq!(w.livekit.created_rooms(), vec![(w.lk_room.clone(), 300, 20)]);

    // The member connects under that identity: kept alive through the appservice; then leaves.
    let p = w.livekit.join(&w.bridge.url, &w.lk_room, &identity).await;
    w.still_members_after(&[&w.alice], Duration::from_millis(7_000)).await.expect("kept alive");
    assert!(w.hs.count("restart", Some(200)) >= 2, "restarted by the bridge");
    let since = Instant::now();
    w.livekit.leave(&w.bridge.url, &w.lk_room, &p, "CLIENT_INITIATED").await;
    let send = w.hs.wait_accepted_send(&delay_id, Duration::from_secs(2)).await.expect("the bridge sent the leave");
    assert!(send.after(since) < Duration::from_secs(1));
    assert!(!w.synapse.is_member(&w.alice, &w.room).await);

    // Without a delayed leave: a token, nothing tracked; a delay id not the user's: refused.
    let (status, v) = w
        .synapse
        .proxied(&w.alice, "get_token", &json!({"room_id": w.room, "slot_id": SLOT, "member_id": "m2"}), true)
        .await;
    assert_eq!(status, 200, "{v}");
    let bob = w.synapse.register("bob").await;
    w.synapse.join_room(&bob, &w.room).await;
    let bobs = w.synapse.join_call(&bob, &w.room, 3_000).await;
    let body = json!({"room_id": w.room, "slot_id": SLOT, "member_id": "m3", "delay_id": bobs});
    let (status, v) = w.synapse.proxied(&w.alice, "get_token", &body, true).await;
    assert_eq!(status, 400, "{v}");
    assert!(v.get("jwt").is_none());
}
