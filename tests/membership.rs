//! Room membership against a real Synapse.
//!
//! Before a token or a delegation: users who never joined, left, were kicked or banned are
//! refused (`403`) with nothing opened in LiveKit and nothing stored; joining again is enough to
//! be let in at once; a check that cannot be made refuses with `503` rather than guessing.
//! Through the membership bot in OpenID mode, and as the user themselves in appservice mode.
//!
//! During the call: Synapse pushes its membership changes to the appservice (through a proxy
//! that can lose transactions); a user who leaves, is kicked or banned is removed from the
//! LiveKit room (the emulator's RoomService), their delegated leave sent once LiveKit reports
//! them gone; nobody is removed while the homeserver cannot confirm it; lost transactions are
//! made up by polling.

mod common;

use std::time::{Duration, Instant};

use common::bridge::{Bridge, SLOT, delegation_body, get_token_body};
use common::hs_proxy::HsProxy;
use common::hs_proxy::Outage;
use common::livekit::{LiveKit, Participant};
use common::synapse::{MatrixUser, SERVER_NAME, Synapse, SynapseOptions};
use common::txn_proxy::{self, TxnProxy};
use rtc_leave_bridge::identity;
use serde_json::{Value, json};

const AS_TOKEN: &str = "as-token-membership-0123456789";
const HS_TOKEN: &str = "hs-token-membership-9876543210";

/// The appservice registration: its users namespace holds alice, bob, dan and erin only (not
/// carol); transactions go to `txn_port`, proxied requests to the bridge.
fn registration(bridge_port: u16, txn_port: u16) -> String {
    txn_proxy::registration(bridge_port, txn_port, AS_TOKEN, HS_TOKEN, "(alice|bob|dan|erin)")
}

struct World {
    synapse: Synapse,
    hs: HsProxy,
    /// The membership bot's access token, if there is one.
    bot_token: Option<String>,
    txns: TxnProxy,
    livekit: LiveKit,
    bridge: Bridge,
    alice: MatrixUser,
    bob: MatrixUser,
    room: String,
    http: reqwest::Client,
}

/// How the bridge sees rooms.
enum Checks {
    /// OpenID mode, with a bot account joined to the room.
    Bot,
    /// Appservice mode, no bot.
    Appservice,
}

impl World {
    async fn new(checks: Checks) -> World {
        World::with(checks, &[]).await
    }

    async fn with(checks: Checks, settings: &[(&str, &str)]) -> World {
        rtc_leave_bridge::homeserver::install_crypto_provider();
        let (port, txn_port) = (common::free_port(), common::free_port());
        let appservice = matches!(checks, Checks::Appservice);
        let txns = TxnProxy::start(txn_port, format!("http://127.0.0.1:{port}")).await;
        let options = SynapseOptions {
            appservice_registration: appservice.then(|| registration(port, txn_port)),
            ..Default::default()
        };
        let synapse = Synapse::start(options).await;
        let hs = HsProxy::start(&synapse.url).await;
        let livekit = LiveKit::start().await;
        let alice = synapse.register("alice").await;
        let bob = synapse.register("bob").await;
        let room = synapse.create_room(&alice).await;
        let mut env = Bridge::env_for(&hs.url, &livekit);
        let mut bot_token = None;
        match checks {
            Checks::Bot => {
                let bot = synapse.register("callbot").await;
                synapse.join_room(&bot, &room).await;
                env.insert("RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_SERVER".into(), SERVER_NAME.into());
                env.insert("RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_TOKEN".into(), bot.token.clone());
                bot_token = Some(bot.token);
            }
            Checks::Appservice => {
                env.insert("LIVEKIT_AS_TOKEN".into(), AS_TOKEN.into());
                env.insert("LIVEKIT_HS_TOKEN".into(), HS_TOKEN.into());
                env.insert("LIVEKIT_HS_SERVER_NAME".into(), SERVER_NAME.into());
            }
        }
        for (k, v) in settings {
            env.insert((*k).into(), (*v).into());
        }
        let bridge = Bridge::start_on(port, env).await;
        World { synapse, hs, bot_token, livekit, bridge, alice, bob, room, txns, http: reqwest::Client::new() }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self.http.post(format!("{}{path}", self.bridge.url)).json(body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `user` asks `/get_token` for `room`, as Element Call does, without a delayed leave.
    async fn get_token(&self, user: &MatrixUser, room: &str) -> (u16, Value) {
        let body = get_token_body(&self.synapse.openid_token(user).await, user, room);
        self.post("/get_token", &body).await
    }

    async fn sfu_get(&self, user: &MatrixUser, room: &str) -> (u16, Value) {
        let body =
            json!({"room": room, "openid_token": self.synapse.openid_token(user).await, "device_id": user.device_id});
        self.post("/sfu/get", &body).await
    }

    /// `user` hands over a delayed leave in OpenID mode (the id is never looked at when refused).
    async fn delegate(&self, user: &MatrixUser, room: &str) -> (u16, Value) {
        let openid = self.synapse.openid_token(user).await;
        self.bridge.delegate_raw(&delegation_body(&openid, user, room, "m1", "syd_notchecked", 8_000)).await
    }

    /// `user` asks its homeserver for a token (MSC4512 proxying, appservice mode).
    async fn proxied_get_token(&self, user: &MatrixUser) -> (u16, Value) {
        let body = json!({"room_id": self.room, "slot_id": SLOT, "member_id": "m1"});
        self.synapse.proxied(user, "get_token", &body, true).await
    }

    async fn proxied_delegate(&self, user: &MatrixUser) -> (u16, Value) {
        let body = json!({"url": self.livekit.url, "room_id": self.room, "slot_id": SLOT, "member_id": "m1",
            "delay_id": "syd_notchecked", "delay_timeout": 8000});
        self.synapse.proxied(user, "delegate_delayed_leave", &body, true).await
    }

    async fn checks(&self, via: &str, outcome: &str) -> f64 {
        self.bridge
            .metric(&format!(
                "rtc_leave_bridge_membership_checks_total{{purpose=\"token\",via=\"{via}\",outcome=\"{outcome}\"}}"
            ))
            .await
    }
}

#[track_caller]
fn assert_refused(answer: (u16, Value), what: &str) {
    assert_eq!(answer.0, 403, "{what}: {}", answer.1);
    assert_eq!(answer.1["errcode"], json!("M_FORBIDDEN"), "{what}: {}", answer.1);
}

#[track_caller]
fn assert_issued(answer: (u16, Value), what: &str) {
    assert_eq!(answer.0, 200, "{what}: {}", answer.1);
    assert!(answer.1["jwt"].is_string(), "{what}: {}", answer.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_bot_only_joined_users_get_tokens_and_delegations() {
    let w = World::new(Checks::Bot).await;
    let (alice, bob) = (&w.alice, &w.bob);

    // Bob never joined: refused at every endpoint, before anything is opened or stored.
    assert_refused(w.get_token(bob, &w.room).await, "get_token, never joined");
    assert_refused(w.sfu_get(bob, &w.room).await, "sfu/get, never joined");
    assert_refused(w.delegate(bob, &w.room).await, "delegation, never joined");
    assert_eq!(w.livekit.created_rooms(), vec![], "no LiveKit room opened for a refused user");
    assert_eq!(w.bridge.jobs_tracked().await, 0.0);

    assert_issued(w.get_token(alice, &w.room).await, "alice, joined");
    assert_eq!(w.livekit.created_rooms().len(), 1);

    // Joining is enough, at once; leaving, a kick and a ban each end it; rejoining restores it.
    w.synapse.join_room(bob, &w.room).await;
    assert_issued(w.get_token(bob, &w.room).await, "bob, just joined");
    assert_issued(w.sfu_get(bob, &w.room).await, "bob, just joined (legacy)");
    w.synapse.leave_room(bob, &w.room).await;
    assert_refused(w.get_token(bob, &w.room).await, "bob, left");
    w.synapse.join_room(bob, &w.room).await;
    assert_issued(w.get_token(bob, &w.room).await, "bob, rejoined");
    w.synapse.remove_from_room(alice, "kick", bob, &w.room).await;
    assert_refused(w.get_token(bob, &w.room).await, "bob, kicked");
    assert_refused(w.delegate(bob, &w.room).await, "delegation, kicked");
    w.synapse.join_room(bob, &w.room).await;
    assert_issued(w.get_token(bob, &w.room).await, "bob, back after a kick");
    w.synapse.remove_from_room(alice, "ban", bob, &w.room).await;
    assert_refused(w.get_token(bob, &w.room).await, "bob, banned");
    assert_eq!(w.bridge.jobs_tracked().await, 0.0, "nothing stored for a refused delegation");

    // A room the bot is not in cannot be seen: not checked, as lk-jwt-service.
    let elsewhere = w.synapse.create_room(alice).await;
    assert_issued(w.get_token(bob, &elsewhere).await, "a room the bot cannot see");

    assert_eq!(w.checks("bot", "not_joined").await, 7.0);
    assert_eq!(w.checks("bot", "joined").await, 5.0);
    assert_eq!(w.checks("bot", "unchecked").await, 1.0);
    assert_eq!(w.checks("bot", "failed").await, 0.0);
    let logs = w.bridge.logs();
    assert!(logs.contains("through the membership bot of"), "said at start");
    assert!(!logs.contains(w.bot_token.as_deref().unwrap()), "the bot's token is never logged");

    // check-config tries the bot's token.
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let out = w.bridge.cli(&["check-config"], &[]);
    assert!(out.status.success() && text(&out).contains("accepts the membership bot's token"), "{}", text(&out));
    let out = w.bridge.cli(&["check-config"], &[("RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_TOKEN", "syt_wrong")]);
    assert!(!out.status.success() && text(&out).contains("whoami answered 401"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_cannot_be_made_refuses_with_503_and_opens_nothing() {
    let w = World::new(Checks::Bot).await;
    // The bot's homeserver does not answer; then it refuses the bot's token.
    let dead = common::free_port();
    for (server, token, overrides) in [
        ("down.test", "whatever", format!("{SERVER_NAME}={},down.test=http://127.0.0.1:{dead}", w.hs.url)),
        (SERVER_NAME, "syt_not_a_token", format!("{SERVER_NAME}={}", w.hs.url)),
    ] {
        let mut env = Bridge::env_for(&w.hs.url, &w.livekit);
        env.insert("RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_SERVER".into(), server.into());
        env.insert("RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_TOKEN".into(), token.into());
        env.insert("LIVEKIT_CS_API_URL_OVERRIDES".into(), overrides);
        let bridge = Bridge::start(env).await;
        let body = json!({
            "room_id": w.room,
            "slot_id": SLOT,
            "openid_token": w.synapse.openid_token(&w.alice).await,
            "member": {"id": "m1", "claimed_user_id": w.alice.user_id, "claimed_device_id": w.alice.device_id},
        });
        let resp = w.http.post(format!("{}/get_token", bridge.url)).json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        assert_eq!((status, &v["errcode"]), (503, &json!("M_UNKNOWN")), "{server}: {v}");
        assert_eq!(w.livekit.created_rooms(), vec![], "{server}: no LiveKit room opened on a guess");
        let failed = "rtc_leave_bridge_membership_checks_total{purpose=\"token\",via=\"bot\",outcome=\"failed\"}";
        assert_eq!(bridge.metric(failed).await, 1.0, "{server}");
        let logs = bridge.logs();
        let said = if server == SERVER_NAME { "refused a membership check" } else { "homeserver unreachable" };
        assert!(logs.contains(said), "{server}: {logs}");
        assert!(!logs.contains(token), "the bot's token is never logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appservice_users_are_checked_as_themselves() {
    let w = World::new(Checks::Appservice).await;
    let bob = &w.bob;

    // Never joined: refused on every path (proxied or not), nothing opened, nothing stored.
    assert_refused(w.proxied_get_token(bob).await, "proxied get_token, never joined");
    assert_refused(w.proxied_delegate(bob).await, "proxied delegation, never joined");
    assert_refused(w.get_token(bob, &w.room).await, "OpenID get_token of a local user, never joined");
    assert_eq!(w.livekit.created_rooms(), vec![]);
    assert_eq!(w.bridge.jobs_tracked().await, 0.0);

    w.synapse.join_room(bob, &w.room).await;
    assert_issued(w.proxied_get_token(bob).await, "proxied, joined");
    assert_issued(w.get_token(bob, &w.room).await, "OpenID, joined");
    w.synapse.remove_from_room(&w.alice, "ban", bob, &w.room).await;
    assert_refused(w.proxied_get_token(bob).await, "proxied, banned");

    // A local user the appservice may not act as (outside its namespace) is not taken for
    // someone who is not joined: the check cannot be made, 503.
    let carol = w.synapse.register("carol").await;
    w.synapse.join_room(&carol, &w.room).await;
    let (status, v) = w.get_token(&carol, &w.room).await;
    assert_eq!((status, &v["errcode"]), (503, &json!("M_UNKNOWN")), "{v}");
    assert!(w.bridge.logs().contains("refused a membership check"));

    assert_eq!(w.checks("appservice", "not_joined").await, 4.0);
    assert_eq!(w.checks("appservice", "joined").await, 2.0);
    assert_eq!(w.checks("appservice", "failed").await, 1.0);
    assert_eq!(w.checks("none", "unchecked").await, 0.0);
}

impl World {
    /// `user` joins the room (unless `alice`, its creator), asks its homeserver for a token as
    /// member `m1`, and connects with it; returns its LiveKit session.
    async fn seated(&self, user: &MatrixUser) -> Participant {
        if user.user_id != self.alice.user_id {
            self.synapse.join_room(user, &self.room).await;
        }
        assert_issued(self.proxied_get_token(user).await, &user.user_id);
        let identity = identity::identity_two_part(&user.user_id, "m1");
        self.livekit.join(&self.bridge.url, &self.lk_room(), &identity).await
    }

    fn lk_room(&self) -> String {
        identity::livekit_room(&self.room, SLOT)
    }

    fn removed(&self, user: &MatrixUser) -> bool {
        let identity = identity::identity_two_part(&user.user_id, "m1");
        self.livekit.removals().iter().any(|r| r.identity == identity)
    }

    /// Waits for `user`'s removal from the call; how long after `since` it came.
    async fn removal_after(&self, user: &MatrixUser, since: Instant, within: Duration) -> Option<Duration> {
        let identity = identity::identity_two_part(&user.user_id, "m1");
        let removal = self.livekit.wait_removal(&self.lk_room(), &identity, within).await?;
        Some(removal.at - since)
    }

    async fn removals(&self, reason: &str) -> f64 {
        self.bridge.metric(&format!("rtc_leave_bridge_membership_removals_total{{reason=\"{reason}\"}}")).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_leaves_is_kicked_or_banned_leaves_the_call_and_their_leave_is_sent() {
    let w = World::with(Checks::Appservice, &[("RTC_LEAVE_BRIDGE_MEMBERSHIP_POLL_INTERVAL", "1h")]).await;
    let dan = w.synapse.register("dan").await;
    let erin = w.synapse.register("erin").await;
    let alice_p = w.seated(&w.alice).await;
    // Bob hands his delayed leave over with his token request, as Element Call does.
    w.synapse.join_room(&w.bob, &w.room).await;
    let delay_id = w.synapse.join_call(&w.bob, &w.room, 8_000).await;
    let body =
        json!({"room_id": w.room, "slot_id": SLOT, "member_id": "m1", "delay_id": delay_id, "delay_timeout": 8000});
    assert_issued(w.synapse.proxied(&w.bob, "get_token", &body, true).await, "bob with his leave");
    let bob_identity = identity::identity_two_part(&w.bob.user_id, "m1");
    let bob_p = w.livekit.join(&w.bridge.url, &w.lk_room(), &bob_identity).await;
    w.seated(&dan).await;
    w.seated(&erin).await;

    // Kicked: removed from the LiveKit room, tokens issued before the check revoked.
    let kicked = Instant::now();
    w.synapse.remove_from_room(&w.alice, "kick", &w.bob, &w.room).await;
    let after = w.removal_after(&w.bob, kicked, Duration::from_secs(5)).await.expect("kicked user removed");
    let removal = w.livekit.removals().into_iter().find(|r| r.identity == bob_identity).unwrap();
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now_s - 5..=now_s).contains(&removal.revoke_token_ts), "revokes tokens issued before now");
    eprintln!("kick -> removed from the call: {after:?}");
    // LiveKit reports the removal; the bridge sends bob's delegated leave at once — which
    // Synapse refuses, bob being no longer in the room, and discards: the job ends quietly
    // (not as a configuration error), nothing left to restart.
    let reported = Instant::now();
    w.livekit.leave(&w.bridge.url, &w.lk_room(), &bob_p, "PARTICIPANT_REMOVED").await;
    assert_eq!(w.bridge.jobs_reach(0.0, Duration::from_secs(3)).await, 0.0, "bob's job ended");
    let sends = w.hs.calls_of(&delay_id, "send");
    assert_eq!(sends.len(), 1, "{sends:?}");
    assert_eq!(sends[0].status, Some(403));
    assert!(sends[0].received >= reported && sends[0].answered - reported < Duration::from_secs(1));
    let not_in_room =
        "rtc_leave_bridge_homeserver_requests_total{action=\"send\",homeserver=\"hs1.test\",outcome=\"not_in_room\"}";
    assert_eq!(w.bridge.metric(not_in_room).await, 1.0);
    assert!(!w.bridge.logs().contains("configuration error"), "{}", w.bridge.logs());

    // Leaving by oneself, and a ban: the same.
    let left = Instant::now();
    w.synapse.leave_room(&erin, &w.room).await;
    let after = w.removal_after(&erin, left, Duration::from_secs(5)).await.expect("user who left removed");
    eprintln!("leave -> removed from the call: {after:?}");
    let banned = Instant::now();
    w.synapse.remove_from_room(&w.alice, "ban", &dan, &w.room).await;
    let after = w.removal_after(&dan, banned, Duration::from_secs(5)).await.expect("banned user removed");
    eprintln!("ban -> removed from the call: {after:?}");

    // Alice, still joined, is never removed; each removal counted by why.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!w.removed(&w.alice), "a joined user was removed");
    assert_eq!(w.livekit.removals().len(), 3);
    for (reason, n) in [("kicked", 1.0), ("left", 1.0), ("banned", 1.0), ("gone", 0.0)] {
        assert_eq!(w.removals(reason).await, n, "{reason}");
    }
    let changes = |c: &str| format!("rtc_leave_bridge_membership_changes_total{{change=\"{c}\"}}");
    assert!(w.bridge.metric(&changes("kicked")).await >= 1.0);
    assert!(w.bridge.metric(&changes("joined")).await >= 4.0);
    drop(alice_p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_is_removed_on_a_doubt_and_polling_makes_up_for_lost_transactions() {
    let w = World::with(Checks::Appservice, &[("RTC_LEAVE_BRIDGE_MEMBERSHIP_POLL_INTERVAL", "2s")]).await;
    let dan = w.synapse.register("dan").await;
    let erin = w.synapse.register("erin").await;
    w.seated(&w.alice).await;
    w.seated(&w.bob).await;
    w.seated(&dan).await;
    w.seated(&erin).await;

    // The homeserver cannot be asked: bob's kick reaches the bridge, but nobody is removed on
    // it alone, however long it lasts (polls included).
    w.hs.outage(Some(Outage::Drop));
    w.synapse.remove_from_room(&w.alice, "kick", &w.bob, &w.room).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(w.livekit.removals().is_empty(), "removed while the homeserver could not confirm it");
    // Back: the next poll finds bob gone.
    let back = Instant::now();
    w.hs.outage(None);
    let after = w.removal_after(&w.bob, back, Duration::from_secs(6)).await.expect("removed once confirmed");
    eprintln!("homeserver back -> removed: {after:?}");

    // Transactions lost: erin's departure never reaches the bridge; polling finds it.
    w.txns.lose(true);
    let left = Instant::now();
    w.synapse.leave_room(&erin, &w.room).await;
    let after = w.removal_after(&erin, left, Duration::from_secs(6)).await.expect("found by polling");
    eprintln!("lost transaction -> removed by polling: {after:?}");
    assert!(after < Duration::from_secs(5), "within a poll interval or so: {after:?}");
    assert_eq!(w.removals("gone").await, 2.0, "both found by polling");

    // Dan leaves and rejoins: whether or not the bridge removed him in between (the homeserver
    // decides that race), once he is joined again a new token and session of his are kept.
    w.txns.lose(false);
    w.synapse.leave_room(&dan, &w.room).await;
    w.synapse.join_room(&dan, &w.room).await;
    assert_issued(w.proxied_get_token(&dan).await, "dan, rejoined");
    tokio::time::sleep(Duration::from_secs(1)).await;
    if w.removed(&dan) {
        w.livekit.join(&w.bridge.url, &w.lk_room(), &identity::identity_two_part(&dan.user_id, "m1")).await;
    }
    let removed_before = w.livekit.removals().len();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later: Vec<_> = w.livekit.removals().into_iter().skip(removed_before).collect();
    assert!(later.is_empty(), "a joined user's session removed: {later:?}");
    assert!(!w.removed(&w.alice));
}

/// The whole path on a real LiveKit server (v1.13.5) and a real client: a kicked member's
/// participant is disconnected by LiveKit (`PARTICIPANT_REMOVED`), and whatever this LiveKit
/// does with the revoked token, it cannot keep its seat: refused at connect, or removed again
/// as soon as LiveKit reports it connected (polling is off here: an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_real_livekit_a_kicked_member_is_disconnected_and_cannot_come_back() {
    use common::livekit_server::LiveKitServer;
    use common::participant::Participant as Client;
    rtc_leave_bridge::homeserver::install_crypto_provider();
    let (port, txn_port) = (common::free_port(), common::free_port());
    let bridge_url = format!("http://127.0.0.1:{port}");
    let _txns = TxnProxy::start(txn_port, bridge_url.clone()).await;
    let options = SynapseOptions { appservice_registration: Some(registration(port, txn_port)), ..Default::default() };
    let synapse = Synapse::start(options).await;
    let hs = HsProxy::start(&synapse.url).await;
    let livekit = LiveKitServer::start(&[format!("{bridge_url}/sfu_webhook")]).await;
    let mut env = Bridge::env_for_url(&hs.url, &livekit.url);
    env.insert("LIVEKIT_AS_TOKEN".into(), AS_TOKEN.into());
    env.insert("LIVEKIT_HS_TOKEN".into(), HS_TOKEN.into());
    env.insert("LIVEKIT_HS_SERVER_NAME".into(), SERVER_NAME.into());
    env.insert("RTC_LEAVE_BRIDGE_MEMBERSHIP_POLL_INTERVAL".into(), "1h".into());
    let bridge = Bridge::start_on(port, env).await;
    let alice = synapse.register("alice").await;
    let bob = synapse.register("bob").await;
    let room = synapse.create_room(&alice).await;
    synapse.join_room(&bob, &room).await;

    // Bob joins the call as Element Call does: membership with its delayed leave, then a token
    // from his homeserver with the leave handed over.
    let delay_id = synapse.join_call(&bob, &room, 8_000).await;
    let body = json!({"url": livekit.url, "room_id": room, "slot_id": SLOT, "member_id": "m1",
        "delay_id": delay_id, "delay_timeout": 8000});
    let (status, v) = synapse.proxied(&bob, "get_token", &body, true).await;
    assert_eq!(status, 200, "{v}\n{}", bridge.logs());
    let jwt = v["jwt"].as_str().unwrap().to_owned();
    let mut client = Client::join(&livekit.url, &jwt).await;

    let kicked = Instant::now();
    synapse.remove_from_room(&alice, "kick", &bob, &room).await;
    let gone = client.wait_for("disconnected", Duration::from_secs(5)).await;
    let gone = gone.unwrap_or_else(|| panic!("not disconnected: {:?}\n{}", client.seen, bridge.logs()));
    let after = kicked.elapsed();
    eprintln!("real LiveKit: kick -> client disconnected in {after:?} ({gone})");
    // The Python SDK names the reason by its number.
    let removed = livekit_protocol::DisconnectReason::ParticipantRemoved;
    let reason = gone["reason"].as_str().unwrap_or_default();
    assert!(reason == (removed as i32).to_string() || reason.contains(removed.as_str_name()), "{gone}");
    assert!(after < Duration::from_secs(2), "{after:?}");
    // LiveKit reports it; bob's leave is tried and refused by Synapse (not in the room).
    let until = Instant::now() + Duration::from_secs(3);
    while hs.calls_of(&delay_id, "send").is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hs.calls_of(&delay_id, "send").first().and_then(|c| c.status), Some(403));
    drop(client);

    // The old token again: this LiveKit may refuse it, or let it in — then the bridge removes
    // it at once. Either way, LiveKit soon lists nobody as bob.
    let again = Client::try_join_within(&livekit.url, &jwt, None, Duration::from_secs(8)).await;
    let seen = match &again {
        Ok(client) => client.seen.clone(),
        Err(seen) => seen.clone(),
    };
    eprintln!("the old token: {seen:?}");
    let listing = common::livekit::room_service(&livekit.http_url);
    let lk_room = identity::livekit_room(&room, SLOT);
    let bob_identity = identity::identity_two_part(&bob.user_id, "m1");
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let listed = listing.list_participants(&lk_room).await.unwrap();
        if !listed.iter().any(|p| p.identity == bob_identity) {
            break;
        }
        assert!(Instant::now() < until, "a kicked member came back with its old token and stayed: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        let listed = listing.list_participants(&lk_room).await.unwrap();
        assert!(!listed.iter().any(|p| p.identity == bob_identity), "came back: {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(again);
    let removals = "rtc_leave_bridge_membership_removals_total{reason=\"kicked\"}";
    assert_eq!(bridge.metric(removals).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_the_homeserver_left_is_closed_when_the_operator_asks() {
    let w = World::with(
        Checks::Appservice,
        &[("RTC_LEAVE_BRIDGE_MEMBERSHIP_POLL_INTERVAL", "1s"), ("RTC_LEAVE_BRIDGE_CLOSE_ABANDONED_ROOMS", "true")],
    )
    .await;
    w.seated(&w.alice).await;
    w.seated(&w.bob).await;
    // A participant of another homeserver, which this one cannot see once it has left.
    w.livekit.join(&w.bridge.url, &w.lk_room(), "guest-of-another-homeserver").await;

    // Bob leaves: removed; alice still there, the room stays open.
    w.synapse.leave_room(&w.bob, &w.room).await;
    assert!(w.removal_after(&w.bob, Instant::now(), Duration::from_secs(5)).await.is_some());
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(w.livekit.deleted_rooms().is_empty(), "closed while a local user is joined");

    // The last local user leaves: the homeserver is out of the room, and the call closed.
    let left = Instant::now();
    w.synapse.leave_room(&w.alice, &w.room).await;
    let until = Instant::now() + Duration::from_secs(5);
    while w.livekit.deleted_rooms().is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(w.livekit.deleted_rooms(), vec![w.lk_room()], "{}", w.bridge.logs());
    eprintln!("homeserver left -> LiveKit room closed after {:?}", left.elapsed());
    assert_eq!(w.bridge.metric("rtc_leave_bridge_membership_rooms_closed_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_bot_a_kicked_user_is_found_by_polling() {
    let w = World::with(Checks::Bot, &[("RTC_LEAVE_BRIDGE_MEMBERSHIP_POLL_INTERVAL", "1s")]).await;
    w.synapse.join_room(&w.bob, &w.room).await;
    let mut sessions = Vec::new();
    for user in [&w.alice, &w.bob] {
        assert_issued(w.get_token(user, &w.room).await, &user.user_id);
        let member = format!("{}:{}", user.user_id, user.device_id);
        let identity = identity::identity_three_part(&user.user_id, &user.device_id, &member);
        sessions.push((identity.clone(), w.livekit.join(&w.bridge.url, &w.lk_room(), &identity).await));
    }
    let kicked = Instant::now();
    w.synapse.remove_from_room(&w.alice, "kick", &w.bob, &w.room).await;
    let removal = w.livekit.wait_removal(&w.lk_room(), &sessions[1].0, Duration::from_secs(5)).await;
    let after = removal.expect("found by polling through the bot").at - kicked;
    eprintln!("OpenID mode, bot: kick -> removed by polling after {after:?}");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(w.livekit.removals().len(), 1, "alice, still joined, kept");
    assert_eq!(w.removals("gone").await, 1.0);
}

/// Two instances on one Redis; the homeserver pushes its transactions to one of them. Every
/// kicked member is removed once, by the instance holding its LiveKit room's shard: at once
/// when that is the instance the transaction reached, else by the holder's next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_several_instances_each_removal_is_made_once_by_the_shard_holder() {
    const ROOMS: usize = 8;
    rtc_leave_bridge::homeserver::install_crypto_provider();
    let redis = common::redis::Redis::start().await;
    let ports = [common::free_port(), common::free_port()];
    let txn_port = common::free_port();
    let _txns = TxnProxy::start(txn_port, format!("http://127.0.0.1:{}", ports[0])).await;
    let options =
        SynapseOptions { appservice_registration: Some(registration(ports[0], txn_port)), ..Default::default() };
    let synapse = Synapse::start(options).await;
    let hs = HsProxy::start(&synapse.url).await;
    let livekit = LiveKit::start().await;
    let mut bridges = Vec::new();
    for (i, port) in ports.into_iter().enumerate() {
        let lease = Duration::from_secs(1);
        let mut env = Bridge::env_for_cluster(&hs.url, &livekit, &redis.url(), lease, &format!("m{i}"));
        env.insert("LIVEKIT_AS_TOKEN".into(), AS_TOKEN.into());
        env.insert("LIVEKIT_HS_TOKEN".into(), HS_TOKEN.into());
        env.insert("LIVEKIT_HS_SERVER_NAME".into(), SERVER_NAME.into());
        env.insert("RTC_LEAVE_BRIDGE_MEMBERSHIP_POLL_INTERVAL".into(), "1s".into());
        bridges.push(Bridge::start_on(port, env).await);
    }
    let owned = "rtc_leave_bridge_shards_owned";
    let split = common::eventually(Duration::from_secs(15), || async {
        bridges[0].metric(owned).await + bridges[1].metric(owned).await == 64.0
            && bridges[0].metric(owned).await > 0.0
            && bridges[1].metric(owned).await > 0.0
    })
    .await;
    assert!(split, "the two instances did not share the shards");

    let alice = synapse.register("alice").await;
    let bob = synapse.register("bob").await;
    let identity = identity::identity_two_part(&bob.user_id, "m1");
    let mut rooms = Vec::new();
    for _ in 0..ROOMS {
        let room = synapse.create_room(&alice).await;
        synapse.join_room(&bob, &room).await;
        let body = json!({"room_id": room, "slot_id": SLOT, "member_id": "m1"});
        assert_issued(synapse.proxied(&bob, "get_token", &body, true).await, "bob");
        let lk_room = identity::livekit_room(&room, SLOT);
        livekit.join(&bridges[0].url, &lk_room, &identity).await;
        rooms.push((room, lk_room));
    }
    let kicked = Instant::now();
    for (room, _) in &rooms {
        synapse.remove_from_room(&alice, "kick", &bob, room).await;
    }
    let all = common::eventually(Duration::from_secs(6), || async { livekit.removals().len() >= ROOMS }).await;
    assert!(all, "removed from {} of {ROOMS} rooms: {:?}", livekit.removals().len(), livekit.removals());
    eprintln!("two instances: {ROOMS} kicks -> all removed after {:?}", kicked.elapsed());
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for (_, lk_room) in &rooms {
        let n = livekit.removals().iter().filter(|r| &r.room == lk_room).count();
        assert_eq!(n, 1, "removed {n} times from {lk_room}");
    }
    let mut by_instance = Vec::new();
    for b in &bridges {
        let mut n = 0.0;
        for reason in ["kicked", "gone"] {
            n += b.metric(&format!("rtc_leave_bridge_membership_removals_total{{reason=\"{reason}\"}}")).await;
        }
        by_instance.push(n);
    }
    assert_eq!(by_instance.iter().sum::<f64>(), ROOMS as f64, "{by_instance:?}");
    eprintln!("removals by instance: {by_instance:?}");
}

/// In appservice mode a user of another homeserver is looked up in the room's joined members as
/// the appservice sees them (no federation here: the remote user is in no room of this
/// homeserver, so is refused — after the catch-up waits, not unchecked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_user_is_checked_in_the_rooms_members_as_the_appservice_sees_them() {
    const REMOTE: &str = "remote.test";
    // The remote homeserver's OpenID check: the token names its user.
    let app = axum::Router::new().route(
        "/_matrix/federation/v1/openid/userinfo",
        axum::routing::get(|| async { axum::Json(json!({"sub": format!("@visitor:{REMOTE}")})) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let remote = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let w = World::new(Checks::Appservice).await;
    let mut env = Bridge::env_for(&w.hs.url, &w.livekit);
    env.insert("LIVEKIT_AS_TOKEN".into(), AS_TOKEN.into());
    env.insert("LIVEKIT_HS_TOKEN".into(), HS_TOKEN.into());
    env.insert("LIVEKIT_HS_SERVER_NAME".into(), SERVER_NAME.into());
    env.insert("LIVEKIT_FEDERATION_URL_OVERRIDES".into(), format!("{SERVER_NAME}={},{REMOTE}={remote}", w.hs.url));
    let bridge = Bridge::start(env).await;
    let body = json!({
        "room_id": w.room, "slot_id": SLOT,
        "openid_token": {"access_token": "t", "matrix_server_name": REMOTE},
        "member": {"id": "m1", "claimed_user_id": format!("@visitor:{REMOTE}"), "claimed_device_id": "D"},
    });
    let asked = Instant::now();
    let resp = w.http.post(format!("{}/get_token", bridge.url)).json(&body).send().await.unwrap();
    let answer = (resp.status().as_u16(), resp.json::<Value>().await.unwrap());
    assert_refused(answer, "a remote user in no room of this homeserver");
    assert!(asked.elapsed() >= Duration::from_millis(1_500), "refused before the catch-up waits");
    let refused =
        "rtc_leave_bridge_membership_checks_total{purpose=\"token\",via=\"appservice\",outcome=\"not_joined\"}";
    assert_eq!(bridge.metric(refused).await, 1.0);
    assert_eq!(w.livekit.created_rooms(), vec![], "no LiveKit room opened");
}
