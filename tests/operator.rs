//! The operator commands against a running bridge, a real Synapse and the LiveKit emulator.

mod common;

use std::time::Duration;

use common::bridge::{Bridge, SLOT};
use common::livekit::LiveKit;
use common::synapse::{Synapse, SynapseOptions};
use rtc_leave_bridge::identity;

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_check_config_and_jobs() {
    let mut synapse = Synapse::start(SynapseOptions::default()).await;
    let livekit = LiveKit::start().await;
    let bridge = Bridge::start(Bridge::env_for(&synapse.url, &livekit)).await;
    let port = bridge.url.rsplit(':').next().unwrap().to_owned();

    // healthcheck honours every form of LIVEKIT_JWT_BIND, `:port` included.
    for bind in
        [format!(":{port}"), format!("0.0.0.0:{port}"), format!("127.0.0.1:{port}"), format!("localhost:{port}")]
    {
        let out = bridge.cli(&["healthcheck"], &[("LIVEKIT_JWT_BIND", &bind)]);
        assert!(out.status.success(), "{bind}: {}", text(&out));
    }
    // It reads the listen address alone: no LiveKit settings, another setting invalid.
    let bind = format!(":{port}");
    let alone = [
        ("LIVEKIT_JWT_BIND", bind.as_str()),
        ("LIVEKIT_URL", ""),
        ("LIVEKIT_KEY", ""),
        ("LIVEKIT_SECRET", ""),
        ("RTC_LEAVE_BRIDGE_MAX_DELAY", "forever"),
    ];
    let out = bridge.cli(&["healthcheck"], &alone);
    assert!(out.status.success(), "{}", text(&out));
    let out = bridge.cli(&["jobs"], &alone);
    assert_eq!(out.status.code(), Some(2), "jobs needs the LiveKit key: {}", text(&out));
    // ... from a --config file too, with nothing in the environment; and it says why when not.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bridge.toml");
    let healthcheck = |bind: &str| {
        std::fs::write(&file, format!("LIVEKIT_JWT_BIND = \"{bind}\"\n")).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_rtc-leave-bridge"))
            .args(["healthcheck", "--config"])
            .arg(&file)
            .env_clear()
            .output()
            .unwrap()
    };
    let out = healthcheck(&format!("127.0.0.1:{port}"));
    assert!(out.status.success(), "{}", text(&out));
    let nobody = common::free_port();
    let out = healthcheck(&format!("127.0.0.1:{nobody}"));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains(&format!("unhealthy: http://127.0.0.1:{nobody}/healthz")), "{}", text(&out));
    let free = common::free_port().to_string();
    assert!(!bridge.cli(&["healthcheck"], &[("LIVEKIT_JWT_BIND", &format!(":{free}"))]).status.success());

    // check-config: everything reachable and accepted.
    let out = bridge.cli(&["check-config"], &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("ok       livekit: RoomService") && t.contains("ok       homeserver hs1.test"), "{t}");
    // A wrong secret, an unreachable homeserver, an unwritable data dir: each named, exit 1.
    let out = bridge.cli(&["check-config"], &[("LIVEKIT_SECRET", "wrong-secret-wrong-secret-wrong")]);
    assert!(
        !out.status.success() && text(&out).contains("PROBLEM  livekit: RoomService refused key"),
        "{}",
        text(&out)
    );
    let out = bridge.cli(&["check-config"], &[("RTC_LEAVE_BRIDGE_DATA_DIR", "/proc/no-such-dir")]);
    assert!(!out.status.success() && text(&out).contains("PROBLEM  data dir"), "{}", text(&out));
    let out = bridge.cli(&["check-config"], &[("LIVEKIT_URL", "")]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("LIVEKIT_URL: required"));

    // jobs: what the running service tracks.
    let alice = synapse.register("alice").await;
    let room = synapse.create_room(&alice).await;
    let delay_id = synapse.join_call(&alice, &room, 60_000).await;
    bridge.delegate(&synapse, &alice, &room, "m1", &delay_id, 60_000).await;
    let ident = identity::identity_three_part(&alice.user_id, &alice.device_id, "m1");
    livekit.join(&bridge.url, &identity::livekit_room(&room, SLOT), &ident).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = bridge.cli(&["jobs"], &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(&room) && t.contains(&alice.user_id) && t.contains(&ident) && t.contains("connected"), "{t}");
    assert!(t.contains("1 job(s)"));
    let out = bridge.cli(&["jobs", "--json"], &[]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The delay id is a capability: listings show its fingerprint, as the logs do, never the id.
    assert_eq!(list[0]["delay_ref"], rtc_leave_bridge::delegation::DelayRef(&delay_id).to_string());
    assert!(!t.contains(&delay_id) && !String::from_utf8_lossy(&out.stdout).contains(&delay_id), "{t}");
    let table = text(&bridge.cli(&["jobs"], &[]));
    assert!(table.contains(&rtc_leave_bridge::delegation::DelayRef(&delay_id).to_string()), "{table}");
    // The listing names users: a webhook-style token (no admin grants) or none is refused.
    let status = reqwest::get(format!("{}/admin/jobs", bridge.url)).await.unwrap().status().as_u16();
    assert_eq!(status, 401);

    synapse.stop();
    let out = bridge.cli(&["check-config"], &[]);
    assert!(!out.status.success() && text(&out).contains("PROBLEM  homeserver hs1.test"), "{}", text(&out));
}

/// With `RTC_LEAVE_BRIDGE_OPERATOR_BIND`, `/metrics` and `/admin/jobs` leave the public listener
/// (`/healthz` and `/readyz` stay on both), and `rtc-leave-bridge jobs` finds them there. The job
/// listing wants an admin token with no room scope; the full-access homeservers must be named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_endpoints_apart_and_unscoped_admin_tokens() {
    let livekit = LiveKit::start().await;
    let operator_port = common::free_port();
    let operator = format!("http://127.0.0.1:{operator_port}");
    let mut env = Bridge::env_for("http://127.0.0.1:9", &livekit);
    env.insert("RTC_LEAVE_BRIDGE_OPERATOR_BIND".into(), format!("127.0.0.1:{operator_port}"));
    let bridge = Bridge::start(env).await;
    let get = |url: String, token: Option<String>| async move {
        let mut req = reqwest::Client::new().get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    };
    for path in ["/metrics", "/admin/jobs"] {
        let (status, body) = get(format!("{}{path}", bridge.url), None).await;
        assert_eq!(status, 404, "{path} on the public listener: {body}");
        assert!(body.contains("M_UNRECOGNIZED"), "{body}");
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(get(format!("{}{path}", bridge.url), None).await.0, 200, "{path} public");
        assert_eq!(get(format!("{operator}{path}"), None).await.0, 200, "{path} operator");
    }
    let (status, metrics) = get(format!("{operator}/metrics"), None).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("rtc_leave_bridge_http_connections"), "{metrics}");
    let out = bridge.cli(&["jobs"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("0 job(s)"), "{}", text(&out));

    // Admin tokens: both grants and no room scope.
    let token = |room: &str| {
        let grants = livekit_api::access_token::VideoGrants {
            room_admin: true,
            room_list: true,
            room: room.to_owned(),
            ..Default::default()
        };
        livekit_api::access_token::AccessToken::with_api_key(common::livekit::API_KEY, common::livekit::API_SECRET)
            .with_grants(grants)
            .to_jwt()
            .unwrap()
    };
    assert_eq!(get(format!("{operator}/admin/jobs"), Some(token(""))).await.0, 200);
    let (status, body) = get(format!("{operator}/admin/jobs"), Some(token("some-room"))).await;
    assert_eq!(status, 403, "a room-scoped admin token: {body}");

    // LIVEKIT_FULL_ACCESS_HOMESERVERS is required: the service does not start without it.
    let out = bridge.cli(&["check-config"], &[("LIVEKIT_FULL_ACCESS_HOMESERVERS", "")]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("LIVEKIT_FULL_ACCESS_HOMESERVERS: required"), "{}", text(&out));
}
