//! Room membership before a token or a delegation, against a real Synapse: users who never
//! joined, left, were kicked or banned are refused (`403`) with nothing opened in LiveKit and
//! nothing stored; joining again is enough to be let in at once; a check that cannot be made
//! refuses with `503` rather than guessing. Through the membership bot in OpenID mode, and as the
//! user themselves in appservice mode.

mod common;

use common::bridge::{Bridge, SLOT, delegation_body};
use common::hs_proxy::HsProxy;
use common::livekit::LiveKit;
use common::synapse::{MatrixUser, SERVER_NAME, Synapse, SynapseOptions};
use serde_json::{Value, json};

const AS_TOKEN: &str = "as-token-membership-0123456789";
const HS_TOKEN: &str = "hs-token-membership-9876543210";

/// An appservice registration whose users namespace holds alice and bob only.
fn registration(bridge_port: u16) -> String {
    format!(
        r#"id: rtc-leave-bridge
url: "http://127.0.0.1:{bridge_port}"
as_token: "{AS_TOKEN}"
hs_token: "{HS_TOKEN}"
sender_localpart: rtc-leave-bridge
rate_limited: false
namespaces:
  users:
    - exclusive: false
      regex: "@(alice|bob):{server}"
  aliases: []
  rooms: []
io.element.msc4512.proxy_prefix: "rtc/livekit"
io.element.msc4512.proxy_url: "http://127.0.0.1:{bridge_port}"
"#,
        server = SERVER_NAME.replace('.', "\\\\.")
    )
}

struct World {
    synapse: Synapse,
    hs: HsProxy,
    /// The membership bot's access token, if there is one.
    bot_token: Option<String>,
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
        let port = common::free_port();
        let appservice = matches!(checks, Checks::Appservice);
        let options =
            SynapseOptions { appservice_registration: appservice.then(|| registration(port)), ..Default::default() };
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
        let bridge = Bridge::start_on(port, env).await;
        World { synapse, hs, bot_token, livekit, bridge, alice, bob, room, http: reqwest::Client::new() }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self.http.post(format!("{}{path}", self.bridge.url)).json(body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `user` asks `/get_token` for `room`, as Element Call does, without a delayed leave.
    async fn get_token(&self, user: &MatrixUser, room: &str) -> (u16, Value) {
        let body = json!({
            "room_id": room,
            "slot_id": SLOT,
            "openid_token": self.synapse.openid_token(user).await,
            "member": {
                "id": format!("{}:{}", user.user_id, user.device_id),
                "claimed_user_id": user.user_id,
                "claimed_device_id": user.device_id,
            },
        });
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
            .metric(&format!("rtc_leave_bridge_membership_checks_total{{via=\"{via}\",outcome=\"{outcome}\"}}"))
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
        let failed = "rtc_leave_bridge_membership_checks_total{via=\"bot\",outcome=\"failed\"}";
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
