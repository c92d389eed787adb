//! The one LiveKit emulator of the test suite. No LiveKit server can be installed here, so this
//! plays LiveKit's two roles towards the bridge, following LiveKit's protocol:
//!
//! * **Webhook sender**: bodies are Go-protojson shaped (lowerCamelCase, int64 as strings, enums
//!   by name, zero values left out), sent with `Content-Type: application/webhook+json`,
//!   `User-Agent: LiveKit` and an `Authorization` header holding (without `Bearer`) an HS256 JWT
//!   whose claims are `iss` = API key, `nbf`, `exp` = now + 5 min and `sha256` = padded standard
//!   base64 of the SHA-256 of the raw body — signed here with `jsonwebtoken`, not with the
//!   bridge's own verifier crate.
//! * **RoomService** (Twirp): `ListParticipants` accepting protobuf or JSON, requiring a Bearer
//!   JWT signed with the API secret whose `video` grant has `roomAdmin: true` and `room` equal to
//!   the requested room. For a room that does not exist it answers as LiveKit's server does
//!   (both its local and its Redis room store): an empty list; or, when told to, the Twirp
//!   `not_found` error other RoomService implementations (and proxies) may answer. A
//!   participant that disconnected may stay listed for a moment with state `DISCONNECTED`, as
//!   LiveKit's store keeps it until the room drops it. `CreateRoom` requires `roomCreate`,
//!   opens the room (or answers the existing one, as LiveKit does) and records its timeouts.
//!   `RemoveParticipant` requires `roomAdmin` for the room, disconnects the identity (Twirp
//!   `not_found` if nobody is connected as it) and records when, with `revokeTokenTs`; the test
//!   then posts the `participant_left` LiveKit would send. `DeleteRoom` requires `roomCreate`,
//!   closes the room and records it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use livekit_protocol as proto;
use prost::Message as _;
use serde_json::{Value, json};
use sha2::Digest as _;

pub const API_KEY: &str = "devkey";
pub const API_SECRET: &str = "devsecret-that-is-long-enough-for-hs256";

/// The bridge's own RoomService client for the LiveKit (emulator or real server) at `http_url`,
/// with the tests' key: to list what LiveKit lists, as the bridge would read it.
pub fn room_service(http_url: &str) -> rtc_leave_bridge::livekit::room_service::RoomService {
    rtc_leave_bridge::livekit::room_service::RoomService::new(
        reqwest::Client::new(),
        &url::Url::parse(http_url).unwrap(),
        API_KEY,
        API_SECRET,
        Duration::from_secs(5),
    )
    .unwrap()
}

#[derive(Clone, Debug)]
pub struct Participant {
    pub identity: String,
    pub sid: String,
    /// `joinedAt`, Unix seconds.
    pub joined_at: i64,
    /// `joinedAtMs`: LiveKit (since protocol 1.x) reports the join time in milliseconds too.
    pub joined_at_ms: i64,
}

#[derive(Default)]
struct Room {
    sid: String,
    participants: Vec<Participant>,
    /// Disconnected, still listed with state `DISCONNECTED`.
    lingering: Vec<Participant>,
}

#[derive(Default)]
struct Inner {
    rooms: Mutex<HashMap<String, Room>>,
    /// When set, RoomService answers 503 (LiveKit down).
    unavailable: AtomicBool,
    /// When not 0, a listing waits up to this many milliseconds before it reads the room and
    /// as long again before it answers (LiveKit slow): the world it shows is from some instant
    /// after the request was made, and is already old when the answer arrives.
    slow_ms: AtomicU64,
    /// Answer listings of a room that does not exist with Twirp `not_found` instead of the empty
    /// list LiveKit's server answers.
    missing_room_not_found: AtomicBool,
    list_calls: AtomicU64,
    counter: AtomicU64,
    /// Every CreateRoom: (room, empty timeout, departure timeout).
    created: Mutex<Vec<(String, u32, u32)>>,
    /// When set, CreateRoom fails (Twirp `internal`).
    create_fails: AtomicBool,
    /// Every RemoveParticipant that removed someone: (room, identity, revokeTokenTs, when).
    removed: Mutex<Vec<Removal>>,
    /// Every room closed by DeleteRoom, in order.
    deleted: Mutex<Vec<String>>,
}

/// A participant removed through RoomService.
#[derive(Debug, Clone)]
pub struct Removal {
    pub room: String,
    pub identity: String,
    pub revoke_token_ts: i64,
    pub at: std::time::Instant,
}

#[derive(Clone)]
pub struct LiveKit {
    inner: Arc<Inner>,
    pub url: String,
    http: reqwest::Client,
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

impl LiveKit {
    pub async fn start() -> LiveKit {
        rtc_leave_bridge::homeserver::install_crypto_provider();
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new()
            .route("/twirp/livekit.RoomService/ListParticipants", axum::routing::post(list_participants))
            .route("/twirp/livekit.RoomService/CreateRoom", axum::routing::post(create_room))
            .route("/twirp/livekit.RoomService/RemoveParticipant", axum::routing::post(remove_participant))
            .route("/twirp/livekit.RoomService/DeleteRoom", axum::routing::post(delete_room))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        LiveKit { inner, url: format!("ws://{addr}"), http: reqwest::Client::new() }
    }

    fn next_id(&self, prefix: &str) -> String {
        format!("{prefix}_{:012}", self.inner.counter.fetch_add(1, Ordering::SeqCst))
    }

    /// Makes LiveKit's RoomService unreachable (503) or reachable again.
    pub fn set_unavailable(&self, down: bool) {
        self.inner.unavailable.store(down, Ordering::SeqCst);
    }

    /// Makes listings slow (see `Inner::slow_ms`), or prompt again with `None`.
    pub fn set_slow(&self, slow: Option<Duration>) {
        self.inner.slow_ms.store(slow.map_or(0, |d| d.as_millis() as u64), Ordering::SeqCst);
    }

    /// Answers listings of rooms that do not exist with Twirp `not_found` rather than the empty
    /// list LiveKit's server answers.
    pub fn set_missing_room_not_found(&self, not_found: bool) {
        self.inner.missing_room_not_found.store(not_found, Ordering::SeqCst);
    }

    /// Every participant removed through RoomService, in order.
    pub fn removals(&self) -> Vec<Removal> {
        self.inner.removed.lock().unwrap().clone()
    }

    /// Every room closed through RoomService, in order.
    pub fn deleted_rooms(&self) -> Vec<String> {
        self.inner.deleted.lock().unwrap().clone()
    }

    /// Waits (up to `within`) for the removal of `identity` from `room`.
    pub async fn wait_removal(&self, room: &str, identity: &str, within: Duration) -> Option<Removal> {
        let until = std::time::Instant::now() + within;
        loop {
            let found = self.removals().into_iter().find(|r| r.room == room && r.identity == identity);
            if found.is_some() || std::time::Instant::now() >= until {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Every CreateRoom received: (room, empty timeout s, departure timeout s).
    pub fn created_rooms(&self) -> Vec<(String, u32, u32)> {
        self.inner.created.lock().unwrap().clone()
    }

    /// Makes CreateRoom fail, or work again.
    pub fn set_create_room_fails(&self, fails: bool) {
        self.inner.create_fails.store(fails, Ordering::SeqCst);
    }

    /// Whether LiveKit has room `room` open.
    pub fn has_room(&self, room: &str) -> bool {
        self.inner.rooms.lock().unwrap().contains_key(room)
    }

    pub fn list_calls(&self) -> u64 {
        self.inner.list_calls.load(Ordering::SeqCst)
    }

    /// The SID of `room`, creating the room if needed.
    pub fn room_sid(&self, room: &str) -> String {
        let mut rooms = self.inner.rooms.lock().unwrap();
        let r = rooms.entry(room.to_owned()).or_default();
        if r.sid.is_empty() {
            r.sid = format!("RM_{:012}", self.inner.counter.fetch_add(1, Ordering::SeqCst));
        }
        r.sid.clone()
    }

    /// A participant connects (shows up in RoomService); no webhook is sent by this alone.
    pub fn connect(&self, room: &str, identity: &str) -> Participant {
        self.room_sid(room);
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        let p = Participant {
            identity: identity.to_owned(),
            sid: self.next_id("PA"),
            joined_at: ms / 1000,
            joined_at_ms: ms,
        };
        self.inner.rooms.lock().unwrap().get_mut(room).unwrap().participants.push(p.clone());
        p
    }

    /// A participant disconnects (disappears from RoomService); no webhook is sent by this alone.
    pub fn disconnect(&self, room: &str, sid: &str) {
        if let Some(r) = self.inner.rooms.lock().unwrap().get_mut(room) {
            r.participants.retain(|p| p.sid != sid);
        }
    }

    /// A participant disconnects but stays listed, with state `DISCONNECTED`, as LiveKit lists a
    /// departing participant for a moment; no webhook is sent by this alone.
    pub fn disconnect_lingering(&self, room: &str, sid: &str) {
        if let Some(r) = self.inner.rooms.lock().unwrap().get_mut(room) {
            let (gone, stay): (Vec<_>, Vec<_>) = r.participants.drain(..).partition(|p| p.sid == sid);
            r.participants = stay;
            r.lingering.extend(gone);
        }
    }

    /// The room ends: everybody is gone and the room no longer exists.
    pub fn finish_room(&self, room: &str) -> String {
        self.inner.rooms.lock().unwrap().remove(room).map(|r| r.sid).unwrap_or_default()
    }

    fn room_json(&self, room: &str) -> Value {
        json!({ "sid": self.room_sid(room), "name": room, "emptyTimeout": 300, "departureTimeout": 20,
                "creationTime": unix_now().to_string(), "enabledCodecs": [{"mime": "audio/opus"}] })
    }

    fn participant_json(p: &Participant, state: &str, reason: Option<&str>) -> Value {
        let mut v = json!({ "sid": p.sid, "identity": p.identity, "state": state,
            "joinedAt": p.joined_at.to_string(), "joinedAtMs": p.joined_at_ms.to_string(),
            "version": 3, "permission": {"canSubscribe": true, "canPublish": true, "canPublishData": true},
            "isPublisher": true });
        if let Some(reason) = reason {
            v["disconnectReason"] = json!(reason);
        }
        v
    }

    /// Body of a participant event, Go-protojson style.
    pub fn participant_event(&self, event: &str, room: &str, p: &Participant, reason: Option<&str>) -> String {
        let state = if event == "participant_joined" { "ACTIVE" } else { "DISCONNECTED" };
        let body = json!({ "event": event, "room": self.room_json(room),
            "participant": Self::participant_json(p, state, reason),
            "id": self.next_id("EV"), "createdAt": unix_now().to_string() });
        // Go's encoder puts arbitrary whitespace; the hash is over these exact bytes.
        serde_json::to_string_pretty(&body).unwrap()
    }

    pub fn room_finished_event(&self, room: &str, room_sid: &str) -> String {
        let body = json!({ "event": "room_finished",
            "room": { "sid": room_sid, "name": room, "emptyTimeout": 300, "creationTime": unix_now().to_string() },
            "id": self.next_id("EV"), "createdAt": unix_now().to_string() });
        serde_json::to_string(&body).unwrap()
    }

    /// The `Authorization` value LiveKit sends with `body`.
    pub fn sign(body: &str, secret: &str) -> String {
        let now = unix_now();
        Self::sign_valid(body, secret, now, now + 300)
    }

    /// As [`LiveKit::sign`], with the token valid from `nbf` to `exp` (Unix seconds).
    pub fn sign_valid(body: &str, secret: &str, nbf: i64, exp: i64) -> String {
        let sha = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(body.as_bytes()));
        let claims = json!({ "iss": API_KEY, "nbf": nbf, "exp": exp, "sha256": sha });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    /// POSTs `body` to the bridge's webhook endpoint with `authorization`; returns the status.
    pub async fn post_webhook(&self, bridge: &str, body: &str, authorization: Option<&str>) -> u16 {
        self.try_post_webhook(bridge, body, authorization).await.unwrap()
    }

    /// As [`LiveKit::post_webhook`], but a connection the bridge closed is an error, not a panic.
    pub async fn try_post_webhook(
        &self,
        bridge: &str,
        body: &str,
        authorization: Option<&str>,
    ) -> reqwest::Result<u16> {
        let mut req = self
            .http
            .post(format!("{bridge}/sfu_webhook"))
            .header(header::CONTENT_TYPE, "application/webhook+json")
            .header(header::USER_AGENT, "LiveKit")
            .body(body.to_owned());
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        Ok(req.send().await?.status().as_u16())
    }

    /// Sends `body` signed as LiveKit does; asserts the bridge accepted it.
    pub async fn deliver(&self, bridge: &str, body: &str) {
        let status = self.post_webhook(bridge, body, Some(&Self::sign(body, API_SECRET))).await;
        assert_eq!(status, 200, "webhook refused: {body}");
    }

    /// Connects `identity` and sends `participant_joined`.
    pub async fn join(&self, bridge: &str, room: &str, identity: &str) -> Participant {
        let p = self.connect(room, identity);
        self.deliver(bridge, &self.participant_event("participant_joined", room, &p, None)).await;
        p
    }

    /// Disconnects `p` and sends `participant_left` with `reason`.
    pub async fn leave(&self, bridge: &str, room: &str, p: &Participant, reason: &str) {
        self.depart(bridge, room, p, "participant_left", Some(reason)).await;
    }

    /// Disconnects `p` and sends `event` (`participant_left`, or `participant_connection_aborted`
    /// for a session that never became active) with `reason`; `None` leaves `disconnectReason`
    /// out, as Go's protojson does for `UNKNOWN_REASON`.
    pub async fn depart(&self, bridge: &str, room: &str, p: &Participant, event: &str, reason: Option<&str>) {
        self.disconnect(room, &p.sid);
        self.deliver(bridge, &self.participant_event(event, room, p, reason)).await;
    }
}

fn twirp_error(status: StatusCode, code: &str, msg: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], json!({"code": code, "msg": msg}).to_string())
        .into_response()
}

/// The claims of the request's `Authorization: Bearer <JWT>`, if signed with the API secret.
fn claims(headers: &HeaderMap) -> Option<Value> {
    let token =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_issuer(&[API_KEY]);
    validation.set_required_spec_claims(&["exp", "iss"]);
    let key = jsonwebtoken::DecodingKey::from_secret(API_SECRET.as_bytes());
    jsonwebtoken::decode::<Value>(token, &key, &validation).ok().map(|d| d.claims)
}

async fn create_room(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(req) = proto::CreateRoomRequest::decode(body.as_ref()).ok() else {
        return twirp_error(StatusCode::BAD_REQUEST, "malformed", "cannot decode request");
    };
    let Some(claims) = claims(&headers) else {
        return twirp_error(StatusCode::UNAUTHORIZED, "unauthenticated", "invalid token");
    };
    if claims["video"]["roomCreate"] != json!(true) {
        return twirp_error(StatusCode::FORBIDDEN, "permission_denied", "requires roomCreate");
    }
    if inner.create_fails.load(Ordering::SeqCst) {
        return twirp_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "could not create room");
    }
    inner.created.lock().unwrap().push((req.name.clone(), req.empty_timeout, req.departure_timeout));
    let mut rooms = inner.rooms.lock().unwrap();
    let r = rooms.entry(req.name.clone()).or_default();
    if r.sid.is_empty() {
        r.sid = format!("RM_{:012}", inner.counter.fetch_add(1, Ordering::SeqCst));
    }
    let room = proto::Room {
        sid: r.sid.clone(),
        name: req.name,
        empty_timeout: req.empty_timeout,
        departure_timeout: req.departure_timeout,
        creation_time: unix_now(),
        ..Default::default()
    };
    ([(header::CONTENT_TYPE, "application/protobuf")], room.encode_to_vec()).into_response()
}

async fn remove_participant(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    if inner.unavailable.load(Ordering::SeqCst) {
        return twirp_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "service unavailable");
    }
    let Some(req) = proto::RoomParticipantIdentity::decode(body.as_ref()).ok() else {
        return twirp_error(StatusCode::BAD_REQUEST, "malformed", "cannot decode request");
    };
    let Some(claims) = claims(&headers) else {
        return twirp_error(StatusCode::UNAUTHORIZED, "unauthenticated", "invalid token");
    };
    if claims["video"]["roomAdmin"] != json!(true) || claims["video"]["room"] != json!(req.room) {
        return twirp_error(StatusCode::FORBIDDEN, "permission_denied", "requires roomAdmin for this room");
    }
    let mut rooms = inner.rooms.lock().unwrap();
    let Some(r) = rooms.get_mut(&req.room) else {
        return twirp_error(StatusCode::NOT_FOUND, "not_found", "requested room does not exist");
    };
    let before = r.participants.len();
    r.participants.retain(|p| p.identity != req.identity);
    if r.participants.len() == before {
        return twirp_error(StatusCode::NOT_FOUND, "not_found", "participant not found");
    }
    inner.removed.lock().unwrap().push(Removal {
        room: req.room,
        identity: req.identity,
        revoke_token_ts: req.revoke_token_ts,
        at: std::time::Instant::now(),
    });
    ([(header::CONTENT_TYPE, "application/protobuf")], proto::RemoveParticipantResponse::default().encode_to_vec())
        .into_response()
}

async fn delete_room(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(req) = proto::DeleteRoomRequest::decode(body.as_ref()).ok() else {
        return twirp_error(StatusCode::BAD_REQUEST, "malformed", "cannot decode request");
    };
    let Some(claims) = claims(&headers) else {
        return twirp_error(StatusCode::UNAUTHORIZED, "unauthenticated", "invalid token");
    };
    if claims["video"]["roomCreate"] != json!(true) {
        return twirp_error(StatusCode::FORBIDDEN, "permission_denied", "requires roomCreate");
    }
    if inner.rooms.lock().unwrap().remove(&req.room).is_none() {
        return twirp_error(StatusCode::NOT_FOUND, "not_found", "requested room does not exist");
    }
    inner.deleted.lock().unwrap().push(req.room);
    ([(header::CONTENT_TYPE, "application/protobuf")], proto::DeleteRoomResponse::default().encode_to_vec())
        .into_response()
}

async fn list_participants(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let calls = inner.list_calls.fetch_add(1, Ordering::SeqCst);
    let slow = inner.slow_ms.load(Ordering::SeqCst);
    // Waits of 0 to `slow` ms, varied by call (the emulator has no random source of its own).
    let wait = |salt: u64| Duration::from_millis((calls.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt) % (slow + 1));
    if slow > 0 {
        tokio::time::sleep(wait(0)).await;
    }
    let answer = list_now(&inner, &headers, &body);
    if slow > 0 {
        tokio::time::sleep(wait(0x5555)).await;
    }
    answer
}

/// A listing of the room as it is now.
fn list_now(inner: &Inner, headers: &HeaderMap, body: &Bytes) -> Response {
    if inner.unavailable.load(Ordering::SeqCst) {
        return twirp_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "service unavailable");
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let room = if is_json {
        serde_json::from_slice::<Value>(body).ok().and_then(|v| v["room"].as_str().map(str::to_owned))
    } else {
        proto::ListParticipantsRequest::decode(body.as_ref()).ok().map(|r| r.room)
    };
    let Some(room) = room else {
        return twirp_error(StatusCode::BAD_REQUEST, "malformed", "cannot decode request");
    };
    // Authorization: Bearer <JWT> with video.roomAdmin and video.room == room.
    let Some(claims) = claims(headers) else {
        return twirp_error(StatusCode::UNAUTHORIZED, "unauthenticated", "invalid token");
    };
    let video = &claims["video"];
    if video["roomAdmin"] != json!(true) || video["room"] != json!(room) {
        return twirp_error(StatusCode::FORBIDDEN, "permission_denied", "requires roomAdmin for this room");
    }
    let rooms = inner.rooms.lock().unwrap();
    let empty = Room::default();
    let r = match rooms.get(&room) {
        Some(r) => r,
        None if inner.missing_room_not_found.load(Ordering::SeqCst) => {
            return twirp_error(StatusCode::NOT_FOUND, "not_found", "requested room does not exist");
        }
        None => &empty,
    };
    use proto::participant_info::State;
    let info = |p: &Participant, state: State| proto::ParticipantInfo {
        sid: p.sid.clone(),
        identity: p.identity.clone(),
        state: state as i32,
        joined_at: p.joined_at,
        joined_at_ms: p.joined_at_ms,
        ..Default::default()
    };
    let participants: Vec<proto::ParticipantInfo> = r
        .participants
        .iter()
        .map(|p| info(p, State::Active))
        .chain(r.lingering.iter().map(|p| info(p, State::Disconnected)))
        .collect();
    let resp = proto::ListParticipantsResponse { participants };
    if is_json {
        let list: Vec<Value> = resp
            .participants
            .iter()
            .map(|p| {
                let state = State::try_from(p.state).unwrap().as_str_name();
                json!({"sid": p.sid, "identity": p.identity, "state": state, "joinedAt": p.joined_at.to_string(),
                    "joinedAtMs": p.joined_at_ms.to_string()})
            })
            .collect();
        ([(header::CONTENT_TYPE, "application/json")], json!({"participants": list}).to_string()).into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/protobuf")], resp.encode_to_vec()).into_response()
    }
}

/// Verifies `jwt` with LiveKit's own Python SDK (`livekit.api.TokenVerifier`, key and secret of
/// this emulator) and returns what the SDK read (`identity`, `video` grants as its dataclass) and
/// the raw claims; `Err` with the SDK's complaint if it refused the token.
pub fn verify_with_sdk(jwt: &str) -> Result<Value, String> {
    const SCRIPT: &str = r#"
import dataclasses, json, sys
import jwt as pyjwt
from livekit import api
token, key, secret = sys.argv[1:4]
try:
    claims = api.TokenVerifier(key, secret).verify(token)
except Exception as e:
    print(json.dumps({"refused": repr(e)}))
    sys.exit(0)
raw = pyjwt.decode(token, options={"verify_signature": False})
print(json.dumps({"identity": claims.identity, "video": dataclasses.asdict(claims.video), "raw": raw}))
"#;
    let out = std::process::Command::new(super::synapse::python())
        .args(["-c", SCRIPT, jwt, API_KEY, API_SECRET])
        .output()
        .expect("python runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    match v.get("refused") {
        Some(why) => Err(why.to_string()),
        None => Ok(v),
    }
}

/// What a JavaScript client (matrix-js-sdk's `computeRtcIdentityRaw`, Element Call) computes for
/// `parts`: unpadded base64 of SHA-256 of `JSON.stringify(parts)` — computed here by Python, not
/// by the bridge's code.
pub fn js_hash(parts: &[&str]) -> String {
    const SCRIPT: &str = r#"
import base64, hashlib, json, sys
text = json.dumps(sys.argv[1:], separators=(",", ":"), ensure_ascii=False)
print(base64.b64encode(hashlib.sha256(text.encode()).digest()).decode().rstrip("="))
"#;
    let out = std::process::Command::new(super::synapse::python())
        .args(["-c", SCRIPT])
        .args(parts)
        .output()
        .expect("python runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Checks `jwt` with LiveKit's Python SDK: identity, room, and exactly the grants a member needs.
pub fn assert_join_token(jwt: &str, identity: &str, room: &str) {
    let claims = verify_with_sdk(jwt).unwrap_or_else(|e| panic!("LiveKit's SDK refused the token: {e}"));
    assert_eq!(claims["identity"], json!(identity), "{claims}");
    let raw = &claims["raw"]["video"];
    assert_eq!(raw["room"], json!(room), "{claims}");
    for grant in ["roomJoin", "canPublish", "canSubscribe", "canUpdateOwnMetadata"] {
        assert_eq!(raw[grant], json!(true), "{grant}: {claims}");
    }
    for absent in ["roomCreate", "roomAdmin", "roomList", "roomRecord"] {
        assert!(raw[absent].is_null() || raw[absent] == json!(false), "{absent}: {claims}");
    }
    let ttl = claims["raw"]["exp"].as_i64().unwrap() - claims["raw"]["nbf"].as_i64().unwrap();
    assert_eq!(ttl, 3600, "one hour by default");
}
