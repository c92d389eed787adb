//! Keeps the LiveKit emulator honest: the same scripted sequence — two joins, a listing, one
//! client killed -9 (still listed until LiveKit times it out), the same identity joining from a
//! second client (duplicate identity), a listing, the killed client's timeout, a listing, a
//! hang-up, the room's end, a listing of a room that no longer exists — is run against a real LiveKit server with real
//! participants and against the emulator, and every field the bridge reads is compared: the
//! webhooks' event names, order and disconnect reasons, the form of every field the bridge
//! parses (ids, identities, states, timestamps), what the bridge itself makes of each webhook,
//! and the listings' participants and states.

mod common;

use std::time::Duration;

use common::livekit::{API_KEY, API_SECRET, LiveKit};
use common::livekit_server::LiveKitServer;
use common::participant::Participant;
use common::webhook_proxy::WebhookProxy;
use rtc_leave_bridge::livekit::webhook::WebhookVerifier;
use rtc_leave_bridge::livekit::{SfuEvent, SfuEventKind};
use serde_json::Value;

/// The events the bridge acts on.
const ACTED_ON: [&str; 4] =
    ["participant_joined", "participant_left", "participant_connection_aborted", "room_finished"];

/// A webhook body reduced to what the bridge reads: each field's presence and form (a string of
/// digits, a string with a prefix, a number), with the values that must match exactly (event
/// names, states, reasons) kept.
fn shape(body: &Value) -> Vec<(String, String)> {
    let form = |v: &Value| -> String {
        match v {
            Value::String(s) if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) => "digits".into(),
            Value::String(s) if s.len() > 3 && s.as_bytes()[2] == b'_' => format!("id {}", &s[..3]),
            Value::String(_) => "string".into(),
            Value::Number(_) => "number".into(),
            Value::Null => "absent".into(),
            other => format!("{other}"),
        }
    };
    let mut out = Vec::new();
    for path in [
        "/id",
        "/createdAt",
        "/room/name",
        "/room/sid",
        "/participant/identity",
        "/participant/sid",
        "/participant/joinedAt",
        "/participant/joinedAtMs",
    ] {
        out.push((path.to_owned(), form(body.pointer(path).unwrap_or(&Value::Null))));
    }
    for path in ["/event", "/participant/state", "/participant/disconnectReason"] {
        let v = body.pointer(path).and_then(Value::as_str).unwrap_or("(absent)");
        out.push((path.to_owned(), v.to_owned()));
    }
    out
}

/// What the bridge makes of a webhook: its kind, and for a departure whether the member may return.
fn reading(body: &str) -> String {
    let verifier = WebhookVerifier::new(&[(API_KEY.to_owned(), API_SECRET.to_owned())]);
    let auth = LiveKit::sign(body, API_SECRET);
    let event: SfuEvent = verifier.verify(body.as_bytes(), Some(&auth)).expect("the bridge reads it");
    match event.kind {
        SfuEventKind::ParticipantJoined(p) => format!("joined {} at>0={}", p.identity, p.joined_at_ms > 0),
        SfuEventKind::ParticipantLeft { participant, departure, aborted } => {
            format!("left {} {departure:?} aborted={aborted}", participant.identity)
        }
        SfuEventKind::RoomFinished => "room finished".into(),
        SfuEventKind::Other(name) => format!("other {name}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_speaks_as_the_real_server_does() {
    rtc_leave_bridge::homeserver::install_crypto_provider();
    // ---- the real server ----
    let sink = axum::Router::new().route("/sfu_webhook", axum::routing::post(|| async { "" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, sink).await.unwrap() });
    let webhooks = WebhookProxy::start(&sink_url).await;
    let server = LiveKitServer::start(std::slice::from_ref(&webhooks.url)).await;
    let real_rooms = common::livekit::room_service(&server.http_url);
    let room = "differential-room";
    let identity = "@alice:hs1.test:ALICEDEV";
    let killed_identity = "@bob:hs1.test:BOBDEV";
    // The empty timeout counts only until someone first joins: long, so that a participant slow to
    // start (CI under load) still finds the room; the departure timeout ends it quickly at the end.
    real_rooms
        .create_room(
            room,
            rtc_leave_bridge::livekit::room_service::RoomTimeouts {
                empty: Duration::from_secs(60),
                departure: Duration::from_secs(1),
            },
        )
        .await
        .unwrap();
    let token_for = |who: &str| {
        rtc_leave_bridge::livekit::token::join_token(API_KEY, API_SECRET, who, room, Duration::from_secs(600)).unwrap()
    };
    let mut listings_real = Vec::new();
    let first = Participant::join(&server.url, &token_for(identity)).await;
    webhooks.wait_for("participant_joined", Some(identity), Duration::from_secs(10)).await.unwrap();
    let mut killed = Participant::join(&server.url, &token_for(killed_identity)).await;
    webhooks.wait_for("participant_joined", Some(killed_identity), Duration::from_secs(10)).await.unwrap();
    listings_real.push(real_rooms.list_participants(room).await.unwrap());
    killed.kill9();
    let mut second = Participant::join(&server.url, &token_for(identity)).await;
    webhooks.wait_for("participant_left", Some(identity), Duration::from_secs(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    listings_real.push(real_rooms.list_participants(room).await.unwrap());
    webhooks.wait_for("participant_left", Some(killed_identity), Duration::from_secs(60)).await.unwrap();
    listings_real.push(real_rooms.list_participants(room).await.unwrap());
    drop(first);
    second.hang_up().await;
    webhooks.wait_for("room_finished", None, Duration::from_secs(30)).await.unwrap();
    listings_real.push(real_rooms.list_participants(room).await.unwrap());
    let real: Vec<Value> = webhooks
        .deliveries()
        .into_iter()
        .map(|d| d.body)
        .filter(|b| ACTED_ON.contains(&b["event"].as_str().unwrap_or_default()))
        .collect();

    // ---- the emulator, scripted as the tests that use it script LiveKit ----
    let emulator = LiveKit::start().await;
    let emu_rooms = common::livekit::room_service(&emulator.url.replace("ws://", "http://"));
    let mut emu: Vec<String> = Vec::new();
    let mut listings_emu = Vec::new();
    let a = emulator.connect(room, identity);
    emu.push(emulator.participant_event("participant_joined", room, &a, None));
    let k = emulator.connect(room, killed_identity);
    emu.push(emulator.participant_event("participant_joined", room, &k, None));
    listings_emu.push(emu_rooms.list_participants(room).await.unwrap());
    // Killed -9: nothing changes until LiveKit's timeout. The same identity from a second client:
    // the first session is dropped, then the new one joins.
    emulator.disconnect(room, &a.sid);
    emu.push(emulator.participant_event("participant_left", room, &a, Some("DUPLICATE_IDENTITY")));
    let b = emulator.connect(room, identity);
    emu.push(emulator.participant_event("participant_joined", room, &b, None));
    listings_emu.push(emu_rooms.list_participants(room).await.unwrap());
    // LiveKit's timeout of the killed client.
    emulator.disconnect(room, &k.sid);
    emu.push(emulator.participant_event("participant_left", room, &k, Some("CONNECTION_TIMEOUT")));
    listings_emu.push(emu_rooms.list_participants(room).await.unwrap());
    emulator.disconnect(room, &b.sid);
    emu.push(emulator.participant_event("participant_left", room, &b, Some("CLIENT_INITIATED")));
    let sid = emulator.finish_room(room);
    emu.push(emulator.room_finished_event(room, &sid));
    listings_emu.push(emu_rooms.list_participants(room).await.unwrap());

    // ---- compared ----
    let names = |bodies: &[Value]| -> Vec<String> {
        bodies
            .iter()
            .map(|b| {
                format!(
                    "{} {}",
                    b["event"].as_str().unwrap(),
                    b.pointer("/participant/disconnectReason").and_then(Value::as_str).unwrap_or("")
                )
            })
            .collect()
    };
    let emu_values: Vec<Value> = emu.iter().map(|b| serde_json::from_str(b).unwrap()).collect();
    assert_eq!(names(&real), names(&emu_values), "events the bridge acts on, in order, with their reasons");
    for (r, e) in real.iter().zip(&emu_values) {
        assert_eq!(shape(r), shape(e), "\nreal: {r}\nemulator: {e}");
        let real_text = serde_json::to_string(r).unwrap();
        assert_eq!(reading(&real_text), reading(&serde_json::to_string(e).unwrap()), "what the bridge makes of it");
    }
    // Listings compared as sets (LiveKit lists in no set order).
    let ids = |l: &Vec<Vec<rtc_leave_bridge::livekit::Participant>>| -> Vec<Vec<(String, bool)>> {
        l.iter()
            .map(|ps| {
                let mut v: Vec<_> = ps.iter().map(|p| (p.identity.clone(), p.joined_at_ms > 0)).collect();
                v.sort();
                v
            })
            .collect()
    };
    assert_eq!(ids(&listings_real), ids(&listings_emu), "listings after each step");
    // Sessions of one identity are ordered by their join time, in both.
    for l in [&listings_real, &listings_emu] {
        let alice = |i: usize| l[i].iter().find(|p| p.identity == identity).unwrap().clone();
        assert!(alice(1).joined_at_ms >= alice(0).joined_at_ms, "{l:?}");
        assert_ne!(alice(1).sid, alice(0).sid);
    }
}
