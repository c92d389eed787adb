//! LiveKit token issuance against a real Synapse and the LiveKit emulator: real OpenID tokens,
//! Element Call's request bodies, JWTs checked with LiveKit's own Python SDK, identities as a
//! JavaScript client computes them, and the delayed leave handed over in the token request
//! followed through its whole lifecycle.

mod common;

use std::time::{Duration, Instant};

use common::bridge::{Bridge, SLOT, get_token_body};
use common::hs_proxy::HsProxy;
use common::livekit::{LiveKit, assert_join_token, js_hash};
use common::synapse::{MatrixUser, SERVER_NAME, Synapse, SynapseOptions};
use serde_json::{Value, json};

const DELAY_MS: u64 = 3_000;

struct World {
    synapse: Synapse,
    hs: HsProxy,
    livekit: LiveKit,
    bridge: Bridge,
    alice: MatrixUser,
    room: String,
    http: reqwest::Client,
}

impl World {
    async fn with(env: &[(&str, &str)]) -> World {
        let synapse = Synapse::start(SynapseOptions::default()).await;
        let hs = HsProxy::start(&synapse.url).await;
        let livekit = LiveKit::start().await;
        let mut bridge_env = Bridge::env_for(&hs.url, &livekit);
        for (k, v) in env {
            bridge_env.insert((*k).into(), (*v).into());
        }
        let bridge = Bridge::start(bridge_env).await;
        let alice = synapse.register("alice").await;
        let room = synapse.create_room(&alice).await;
        World { synapse, hs, livekit, bridge, alice, room, http: reqwest::Client::new() }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self.http.post(format!("{}{path}", self.bridge.url)).json(body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Element Call's `/get_token` body (`getLiveKitJWTWithDelayDelegation`): the member id is
    /// `user:device`, the slot `m.call#ROOM`, and it sends its homeserver's URL, which we ignore.
    async fn get_token_body(&self, user: &MatrixUser, delay_id: Option<&str>) -> Value {
        let mut body = get_token_body(&self.synapse.openid_token(user).await, user, &self.room);
        if let Some(delay_id) = delay_id {
            body["delay_id"] = json!(delay_id);
            body["delay_timeout"] = json!(DELAY_MS);
            body["delay_cs_api_url"] = json!("http://169.254.169.254/latest/meta-data");
        }
        body
    }

    async fn still_member_after(&self, user: &MatrixUser, wait: Duration) -> bool {
        self.synapse.still_member_after(user, &self.room, wait).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_token_mints_what_the_client_computes_and_the_leave_rides_along() {
    let w = World::with(&[]).await;
    let delay_id = w.synapse.join_call(&w.alice, &w.room, DELAY_MS).await;
    let body = w.get_token_body(&w.alice, Some(&delay_id)).await;
    let (status, answer) = w.post("/get_token", &body).await;
    assert_eq!(status, 200, "{answer}\n{}", w.bridge.logs());
    assert_eq!(answer["url"], json!(w.livekit.url));
    let member_id = format!("{}:{}", w.alice.user_id, w.alice.device_id);
    let identity = js_hash(&[&w.alice.user_id, &w.alice.device_id, &member_id]);
    let lk_room = js_hash(&[&w.room, SLOT]);
    assert_join_token(answer["jwt"].as_str().unwrap(), &identity, &lk_room);
    // The room was opened, with the default timeouts, before the answer.
    assert_eq!(w.livekit.created_rooms(), vec![(lk_room.clone(), 300, 20)]);
    // The delegation was stored before the answer, bound to that identity.
    assert_eq!(w.bridge.jobs_tracked().await, 1.0);

    // The member connects under the minted identity: kept alive past twice the delay.
    let p = w.livekit.join(&w.bridge.url, &lk_room, &identity).await;
    assert!(w.still_member_after(&w.alice, Duration::from_millis(2 * DELAY_MS + 1_000)).await);
    assert!(w.hs.count("restart", Some(200)) >= 2, "kept alive by the bridge's restarts");
    // It leaves: the bridge's own send lands within a second.
    let since = Instant::now();
    w.livekit.leave(&w.bridge.url, &lk_room, &p, "CLIENT_INITIATED").await;
    let send = w.hs.wait_accepted_send(&delay_id, Duration::from_secs(2)).await.expect("the bridge sent the leave");
    assert!(send.after(since) < Duration::from_secs(1));
    assert!(!w.synapse.is_member(&w.alice, &w.room).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_get_mints_the_legacy_identity_and_the_leave_rides_along() {
    let w = World::with(&[]).await;
    let delay_id = w.synapse.join_call(&w.alice, &w.room, DELAY_MS).await;
    // Element Call's legacy body (`getLiveKitJWT`).
    let body = json!({
        "room": w.room,
        "openid_token": w.synapse.openid_token(&w.alice).await,
        "device_id": w.alice.device_id,
        "delay_id": delay_id,
        "delay_timeout": DELAY_MS,
        "delay_cs_api_url": "https://matrix.example.org",
    });
    let (status, answer) = w.post("/sfu/get", &body).await;
    assert_eq!(status, 200, "{answer}\n{}", w.bridge.logs());
    let identity = format!("{}:{}", w.alice.user_id, w.alice.device_id);
    let lk_room = js_hash(&[&w.room, SLOT]);
    assert_join_token(answer["jwt"].as_str().unwrap(), &identity, &lk_room);

    // Only the minted identity is watched: the member's hashed identity joining is not it.
    let hashed = js_hash(&[&w.alice.user_id, &w.alice.device_id, &w.alice.device_id]);
    w.livekit.join(&w.bridge.url, &lk_room, &hashed).await;
    let p = w.livekit.join(&w.bridge.url, &lk_room, &identity).await;
    assert!(w.still_member_after(&w.alice, Duration::from_millis(2 * DELAY_MS + 1_000)).await);
    let since = Instant::now();
    w.livekit.leave(&w.bridge.url, &lk_room, &p, "CLIENT_INITIATED").await;
    let send = w.hs.wait_accepted_send(&delay_id, Duration::from_secs(2)).await.expect("the bridge sent the leave");
    assert!(send.after(since) < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_change_nothing() {
    let w = World::with(&[]).await;
    let bob = w.synapse.register("bob").await;
    let delay_id = w.synapse.join_call(&w.alice, &w.room, DELAY_MS).await;

    // Another user's OpenID token.
    let mut body = w.get_token_body(&w.alice, Some(&delay_id)).await;
    body["openid_token"] = w.synapse.openid_token(&bob).await;
    let (status, v) = w.post("/get_token", &body).await;
    assert_eq!((status, v["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{v}");
    // A token said to be from another server than the claimed user's.
    let mut body = w.get_token_body(&w.alice, Some(&delay_id)).await;
    body["openid_token"]["matrix_server_name"] = json!("elsewhere.test");
    let (status, v) = w.post("/get_token", &body).await;
    assert_eq!((status, v["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{v}");
    // Malformed bodies, and a probe without credentials: never 404 on a route we serve.
    for (path, raw) in [("/get_token", "{"), ("/get_token", "{}"), ("/sfu/get", "[]"), ("/sfu/get", "{}")] {
        let resp = w.http.post(format!("{}{path}", w.bridge.url)).body(raw).send().await.unwrap();
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        assert_eq!((status, v["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{path} {raw}: {v}");
    }
    // Browsers' preflight.
    let preflight = w
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/get_token", w.bridge.url))
        .header("Origin", "https://call.example.org")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");

    // LiveKit cannot open the room: no token, no job.
    w.livekit.set_create_room_fails(true);
    let (status, v) = w.post("/get_token", &w.get_token_body(&w.alice, Some(&delay_id)).await).await;
    assert_eq!(status, 500, "{v}");
    assert!(v.get("jwt").is_none());
    w.livekit.set_create_room_fails(false);

    // The store cannot take the delegation: no token (never a token without its safety net).
    let db = rusqlite::Connection::open(w.bridge.data.path().join("state/jobs.sqlite3")).unwrap();
    db.execute_batch("CREATE TRIGGER refuse BEFORE INSERT ON jobs BEGIN SELECT RAISE(FAIL, 'disk on fire'); END;")
        .unwrap();
    let (status, v) = w.post("/get_token", &w.get_token_body(&w.alice, Some(&delay_id)).await).await;
    assert_eq!(status, 503, "{v}");
    assert!(v.get("jwt").is_none());
    db.execute_batch("DROP TRIGGER refuse;").unwrap();
    assert_eq!(w.bridge.jobs_tracked().await, 0.0, "no refusal left a job behind");
    // Once it works, the same request succeeds.
    let body = w.get_token_body(&w.alice, Some(&delay_id)).await;
    let (status, v) = w.post("/get_token", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(w.bridge.jobs_tracked().await, 1.0);
    let logs = w.bridge.logs();
    assert!(!logs.contains(v["jwt"].as_str().unwrap()), "a JWT was logged");
    assert!(!logs.contains(body["openid_token"]["access_token"].as_str().unwrap()), "an OpenID token was logged");
    assert!(!logs.contains(&delay_id), "a delay id was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_user_gets_a_token_but_no_room_and_no_delegation() {
    // Only another homeserver has full access: alice's users are restricted.
    let w = World::with(&[("LIVEKIT_FULL_ACCESS_HOMESERVERS", "elsewhere.test")]).await;
    assert_ne!(SERVER_NAME, "elsewhere.test");
    let delay_id = w.synapse.join_call(&w.alice, &w.room, DELAY_MS).await;
    // With delay fields: what Element Call's fallback expects, so that it retries without them.
    let (status, v) = w.post("/get_token", &w.get_token_body(&w.alice, Some(&delay_id)).await).await;
    assert_eq!((status, v["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{v}");
    // Without: a token for a room that must already exist; nothing opened, nothing tracked.
    let (status, v) = w.post("/get_token", &w.get_token_body(&w.alice, None).await).await;
    assert_eq!(status, 200, "{v}");
    let member_id = format!("{}:{}", w.alice.user_id, w.alice.device_id);
    let lk_room = js_hash(&[&w.room, SLOT]);
    assert_join_token(
        v["jwt"].as_str().unwrap(),
        &js_hash(&[&w.alice.user_id, &w.alice.device_id, &member_id]),
        &lk_room,
    );
    assert!(w.livekit.created_rooms().is_empty());
    assert!(!w.livekit.has_room(&lk_room));
    assert_eq!(w.bridge.jobs_tracked().await, 0.0);
    let m = w.bridge.metrics().await;
    assert!(m.contains(r#"rtc_leave_bridge_tokens_total{endpoint="get_token",outcome="issued"} 1"#), "{m}");
    assert!(m.contains(r#"rtc_leave_bridge_tokens_total{endpoint="get_token",outcome="invalid"} 1"#), "{m}");
}

/// The deploy snippet that names this service to clients through the homeserver is one the
/// installed Synapse accepts, and serves at `rtc/transports`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_serves_the_deploy_snippet_at_rtc_transports() {
    let snippet: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string("deploy/synapse-matrix-rtc.yaml").unwrap()).unwrap();
    assert_eq!(snippet["experimental_features"]["msc4143_enabled"].as_bool(), Some(true));
    let section = serde_yaml_ng::to_string(&snippet["matrix_rtc"]).unwrap();
    let synapse = Synapse::start(SynapseOptions { matrix_rtc: Some(section), ..SynapseOptions::default() }).await;
    let alice = synapse.register("alice").await;
    let v: Value = reqwest::Client::new()
        .get(format!("{}/_matrix/client/unstable/org.matrix.msc4143/rtc/transports", synapse.url))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["rtc_transports"][0]["type"], json!("livekit"), "{v}");
    let named = v["rtc_transports"][0]["livekit_service_url"].as_str().unwrap();
    let well_known: Value =
        serde_json::from_str(&std::fs::read_to_string("deploy/well-known-matrix-client.json").unwrap()).unwrap();
    assert_eq!(well_known["org.matrix.msc4143.rtc_foci"][0]["livekit_service_url"].as_str(), Some(named));
}
