//! Appservice mode (MSC4512 / MSC4195's homeserver-proxied flow): the member calls its **own**
//! homeserver, which authenticates it and forwards the request to us with the appservice's
//! `hs_token` and the member's user id in `X-Matrix-User-Identifier`.
//!
//! Nothing the body claims about the member is trusted: the user comes from the homeserver, and
//! the delayed event is looked up on the homeserver as its owner (which proves the delay id is
//! this user's, in this room) with the delay the homeserver knows. Jobs made here manage their
//! event through the appservice (`as_token` + `user_id`), so they work where delayed-event
//! management needs authentication and are not throttled like anonymous callers.
//!
//! Also here: the homeserver's appservice `ping` and `transactions` (answered, events ignored).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;
use subtle::ConstantTimeEq as _;
use tracing::{error, warn};

use super::{AppState, MatrixError, empty_ok, invalid};
use crate::config::Appservice;
use crate::delegation::{Delegation, Mode, now_unix_ms};
use crate::homeserver::delayed_events::{self, Caller, LookupError, PathStyles};
use crate::membership::Reason;
use crate::membership::driver::Observed;

/// What appservice mode needs besides the shared state.
pub struct AppserviceState {
    pub config: Appservice,
    /// Our LiveKit URL: a request naming another SFU is not for us.
    pub livekit_url: String,
    pub path_styles: Arc<PathStyles>,
    pub request_timeout: Duration,
}

#[derive(Deserialize, Default)]
pub struct TokenQuery {
    pub access_token: Option<String>,
}

/// Checks the homeserver's `hs_token` (header, or the legacy `access_token` query parameter).
fn check_hs_token(state: &AppserviceState, headers: &HeaderMap, query: &TokenQuery) -> Result<(), MatrixError> {
    let header_token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = header_token.or(query.access_token.as_deref()) else {
        return Err(MatrixError::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "missing hs_token"));
    };
    if !bool::from(token.as_bytes().ct_eq(state.config.hs_token.as_bytes())) {
        warn!("appservice request with a wrong hs_token refused");
        return Err(MatrixError::new(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "unknown hs_token"));
    }
    Ok(())
}

fn appservice(state: &AppState) -> Result<&AppserviceState, MatrixError> {
    state
        .appservice
        .as_deref()
        .ok_or_else(|| MatrixError::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "appservice mode is not configured"))
}

/// `GET`/`PUT`/`POST /_matrix/app/v1/ping` (the homeserver checking it can reach us): answered
/// once the hs_token checks out.
pub async fn acknowledge(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Query<TokenQuery>,
) -> Result<Response, MatrixError> {
    check_hs_token(appservice(&state)?, &headers, &query)?;
    Ok(empty_ok())
}

/// Transactions up to this size are read for their membership changes; a larger one is read to
/// its end and dropped, and every room with seats polled instead.
const TRANSACTION_LIMIT: usize = 16 << 20;

/// `PUT /_matrix/app/v1/transactions/{txn}`: room events the homeserver pushes (the users
/// namespace the bridge needs to act as members makes that much of the server's traffic). Only
/// `m.room.member` changes are kept, handed in their order to membership following
/// ([`crate::membership`]); every other event is skipped unparsed. Once the hs_token checks out
/// the answer is always `200 {}`: a homeserver retries a refused transaction forever, holding
/// every later one behind it, so one too large or unreadable is dropped and every room with
/// seats polled instead — nothing relies on it alone. (The body is read to its end so that the
/// homeserver, still writing, is not cut off before it reads the answer.)
pub async fn transaction(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Query<TokenQuery>,
    body: axum::body::Body,
) -> Result<Response, MatrixError> {
    check_hs_token(appservice(&state)?, &headers, &query)?;
    let mut chunks = body.into_data_stream();
    let mut size = 0usize;
    // Kept only while membership is followed, and only up to the limit: in a buffer sized once
    // from the declared length (hyper reads no more than it), not kept at all when that is over
    // the limit. Grown by doubling, the buffer left up to twice the body behind in the allocator.
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let mut kept = state.following.as_ref().and_then(|_| match declared {
        Some(length) if length > TRANSACTION_LIMIT => None,
        Some(length) => Some(Vec::with_capacity(length)),
        None => Some(Vec::new()),
    });
    while let Some(chunk) = futures::StreamExt::next(&mut chunks).await {
        match chunk {
            Ok(c) => {
                size += c.len();
                if size > TRANSACTION_LIMIT {
                    kept = None;
                }
                if let Some(kept) = &mut kept {
                    kept.extend_from_slice(&c);
                }
            }
            Err(e) => {
                warn!(read = size, error = %e, "appservice transaction cut off while being read");
                return Err(MatrixError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", "transaction body cut off"));
            }
        }
    }
    let Some(following) = &state.following else {
        tracing::debug!(bytes = size, "appservice transaction acknowledged; events not needed");
        return Ok(empty_ok());
    };
    match kept.as_deref().map(membership_changes) {
        Some(Ok(changes)) => {
            tracing::debug!(bytes = size, changes = changes.len(), "appservice transaction read");
            following.observed(changes).await;
        }
        Some(Err(e)) => {
            warn!(bytes = size, error = %e, "unreadable appservice transaction dropped; every room with seats is polled");
            following.poll_now().await;
        }
        None => {
            warn!(
                bytes = size,
                limit = TRANSACTION_LIMIT,
                "appservice transaction too large to read; dropped, and every room with seats is polled"
            );
            following.poll_now().await;
        }
    }
    Ok(empty_ok())
}

/// The `m.room.member` changes of a transaction body, in its order: who joined, left, was
/// kicked or banned (invites and knocks change nobody's seat). Other events are skipped by the
/// parser without being built (no fuzz target needed beyond serde's own: no I/O).
pub(crate) fn membership_changes(body: &[u8]) -> Result<Vec<Observed>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Transaction {
        #[serde(default)]
        events: Vec<Event>,
    }
    #[derive(Deserialize)]
    struct Event {
        #[serde(rename = "type", default)]
        kind: String,
        #[serde(default)]
        room_id: String,
        #[serde(default)]
        sender: String,
        #[serde(default)]
        state_key: Option<String>,
        #[serde(default)]
        content: Option<Content>,
    }
    #[derive(Deserialize)]
    struct Content {
        #[serde(default)]
        membership: Option<String>,
    }
    let txn: Transaction = serde_json::from_slice(body)?;
    Ok(txn
        .events
        .into_iter()
        .filter(|e| e.kind == "m.room.member" && !e.room_id.is_empty())
        .filter_map(|e| {
            let user = e.state_key.filter(|u| u.starts_with('@'))?;
            let departed = match e.content?.membership?.as_str() {
                "join" => None,
                "leave" if e.sender == user => Some(Reason::Left),
                "leave" => Some(Reason::Kicked),
                "ban" => Some(Reason::Banned),
                _ => return None,
            };
            Some(Observed { room: e.room_id, user, departed })
        })
        .collect())
}

#[derive(Deserialize)]
struct Request {
    /// The LiveKit URL the client means: must be ours (optional for `get_token`).
    #[serde(default)]
    url: Option<String>,
    room_id: String,
    slot_id: String,
    #[serde(default)]
    member_id: Option<String>,
    #[serde(default)]
    member: Option<Member>,
    /// Required for `delegate_delayed_leave`; optional for `get_token`.
    #[serde(default)]
    delay_id: Option<String>,
    /// Informative: the delay that counts is the homeserver's.
    #[serde(default)]
    delay_timeout: Option<i64>,
}

#[derive(Deserialize)]
struct Member {
    id: String,
    #[serde(default)]
    claimed_device_id: Option<String>,
    #[serde(default)]
    claimed_user_id: Option<String>,
}

/// A request the homeserver forwarded: who it is from, and what it asks about.
pub(crate) struct Proxied<'a> {
    a: &'a AppserviceState,
    user_id: ruma::OwnedUserId,
    room_id: ruma::OwnedRoomId,
    slot_id: String,
    member_id: String,
    /// Empty when the client named only its member id.
    device_id: String,
    delay_id: Option<String>,
    /// Whether the body named the LiveKit URL (it was ours).
    url_given: bool,
}

/// `POST …/rtc/livekit/delegate_delayed_leave`, unstable and stable paths.
pub async fn delegate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Query<TokenQuery>,
    body: Bytes,
) -> Result<Response, MatrixError> {
    super::delegation_answer(&state, handle_delegation(&state, &headers, &query, &body).await)
}

/// `POST …/rtc/livekit/get_token`, unstable and stable paths: a LiveKit token for the member the
/// homeserver authenticated, under the 2-part identity `b64(sha256(json([user, member])))`,
/// with its delayed leave riding along if it names one.
pub async fn get_token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Query<TokenQuery>,
    body: Bytes,
) -> Result<axum::Json<super::token::Answer>, MatrixError> {
    super::token::count(&state, "proxied_get_token", handle_get_token(&state, &headers, &query, &body).await)
}

fn trim_url(url: &str) -> &str {
    url.trim().trim_end_matches('/')
}

/// Authenticates the homeserver, takes the member from it, and checks the body: no I/O (a fuzz
/// target).
pub(crate) fn proxied<'a>(
    a: &'a AppserviceState,
    headers: &HeaderMap,
    query: &TokenQuery,
    body: &[u8],
) -> Result<Proxied<'a>, MatrixError> {
    check_hs_token(a, headers, query)?;
    let server = a.config.server_name.as_str();

    // The member, as its homeserver authenticated it: exactly one, never a choice between two.
    let mut user_headers = headers.get_all("x-matrix-user-identifier").iter();
    let user_header = user_headers
        .next()
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| MatrixError::new(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", "no X-Matrix-User-Identifier"))?;
    if user_headers.next().is_some() {
        warn!("appservice request with several X-Matrix-User-Identifier headers refused");
        return Err(invalid("several X-Matrix-User-Identifier headers"));
    }
    let user_id =
        ruma::OwnedUserId::try_from(user_header).map_err(|e| invalid(format!("X-Matrix-User-Identifier: {e}")))?;
    if user_id.server_name().as_str() != server {
        warn!(user = %user_id, "appservice request refused: user of another homeserver");
        return Err(MatrixError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "user does not belong to this homeserver"));
    }

    let req: Request = serde_json::from_slice(body)
        .map_err(|e| MatrixError::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", format!("invalid request: {e}")))?;
    if req.url.as_deref().is_some_and(|url| trim_url(url) != trim_url(&a.livekit_url)) {
        return Err(invalid(format!("url: this service serves {}", a.livekit_url)));
    }
    let room_id = ruma::OwnedRoomId::try_from(req.room_id.as_str()).map_err(|e| invalid(format!("room_id: {e}")))?;
    super::check_text("slot_id", &req.slot_id)?;
    if let Some(delay_id) = &req.delay_id {
        super::check_text("delay_id", delay_id)?;
    }
    let (member_id, device_id) = match (&req.member, &req.member_id) {
        (Some(m), _) => {
            if m.claimed_user_id.as_deref().is_some_and(|c| c != user_id.as_str()) {
                return Err(invalid("member.claimed_user_id is not the authenticated user"));
            }
            (m.id.clone(), m.claimed_device_id.clone().unwrap_or_default())
        }
        (None, Some(id)) => (id.clone(), String::new()),
        (None, None) => return Err(invalid("member_id or member is required")),
    };
    super::check_text("member id", &member_id)?;
    if !device_id.is_empty() {
        super::check_text("member.claimed_device_id", &device_id)?;
    }
    if req.delay_timeout.is_some_and(|t| t <= 0) {
        return Err(invalid("delay_timeout must be positive"));
    }
    let url_given = req.url.is_some();
    Ok(Proxied { a, user_id, room_id, slot_id: req.slot_id, member_id, device_id, delay_id: req.delay_id, url_given })
}

/// The delegation of `delay_id`, checked with the homeserver as the event's owner: it must be
/// this user's, in this room, with a usable delay (the homeserver's, not the client's).
async fn looked_up(
    state: &AppState,
    p: &Proxied<'_>,
    delay_id: &str,
    identity: Option<String>,
) -> Result<Delegation, MatrixError> {
    let (a, server) = (p.a, p.a.config.server_name.as_str());
    let _slot = super::member::check_slot(state, "proxied_delegate", server).await?;
    let endpoint = state.discovery.client_server_api(server).await.map_err(|e| {
        error!(server, error = %e, "cannot locate our homeserver's client-server API");
        MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "homeserver unreachable")
    })?;
    let http = endpoint.client(state.discovery.clients());
    let style = a.path_styles.get(http, &endpoint.base, a.request_timeout).await;
    let caller = Caller::Appservice { as_token: &a.config.as_token, user_id: p.user_id.as_str() };
    let event = delayed_events::lookup(http, &endpoint.base, style, delay_id, caller, a.request_timeout)
        .await
        .map_err(|e| match e {
            LookupError::NotFound => invalid("delay_id: no such delayed event of this user"),
            LookupError::Refused(detail) => {
                error!(server, detail = %detail, "homeserver refused the appservice: check as_token and the users namespace");
                MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "homeserver refused the bridge")
            }
            LookupError::Unavailable(detail) => {
                warn!(server, detail = %detail, "homeserver unreachable for a delegation");
                MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "homeserver unreachable")
            }
        })?;
    if event.room_id != p.room_id.as_str() {
        return Err(invalid("delay_id: the delayed event belongs to another room"));
    }
    let delay_ms = state.delays.check("the delayed event's delay", event.delay_ms)?;
    Ok(Delegation {
        room_id: p.room_id.as_str().into(),
        slot_id: p.slot_id.as_str().into(),
        user_id: p.user_id.as_str().into(),
        device_id: p.device_id.as_str().into(),
        member_id: p.member_id.as_str().into(),
        delay_id: delay_id.into(),
        delay_ms,
        cs_api_url: endpoint.base.as_str().into(),
        created_at_ms: now_unix_ms(),
        mode: Mode::Appservice,
        identity: identity.map(Into::into),
    })
}

async fn handle_delegation(
    state: &AppState,
    headers: &HeaderMap,
    query: &TokenQuery,
    body: &[u8],
) -> Result<(), MatrixError> {
    let p = proxied(appservice(state)?, headers, query, body)?;
    super::member::take_budget(state, "proxied_delegate", &p.user_id)?;
    let missing = |field: &str| {
        MatrixError::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", format!("invalid request: missing field `{field}`"))
    };
    if !p.url_given {
        return Err(missing("url"));
    }
    let delay_id = p.delay_id.clone().ok_or_else(|| missing("delay_id"))?;
    super::membership::require_joined(state, "proxied_delegate", &p.user_id, p.room_id.as_str()).await?;
    let delegation = looked_up(state, &p, &delay_id, None).await?;
    super::store_delegation(state, delegation).await
}

async fn handle_get_token(
    state: &AppState,
    headers: &HeaderMap,
    query: &TokenQuery,
    body: &[u8],
) -> Result<super::token::Answer, MatrixError> {
    let p = proxied(appservice(state)?, headers, query, body)?;
    super::member::take_budget(state, "proxied_get_token", &p.user_id)?;
    let server = p.a.config.server_name.as_str();
    let grant = super::token::Grant {
        identity: crate::identity::identity_two_part(p.user_id.as_str(), &p.member_id),
        user_id: p.user_id.clone(),
        device_id: p.device_id.clone(),
        member_id: p.member_id.clone(),
        room_id: p.room_id.to_string(),
        slot_id: p.slot_id.clone(),
    };
    let full_access = state.allowed.allows(server);
    let delegation = match &p.delay_id {
        None => None,
        Some(_) if !full_access => return Err(super::token::not_full_access(server, &p.user_id)),
        Some(delay_id) => Some(looked_up(state, &p, delay_id, Some(grant.identity.clone())).await?),
    };
    super::token::grant_token(state, "proxied_get_token", &grant, full_access, delegation).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AppserviceState {
        AppserviceState {
            config: Appservice { as_token: "as".into(), hs_token: "hs".into(), server_name: "hs.test".into() },
            livekit_url: "https://sfu.example.org".into(),
            path_styles: Default::default(),
            request_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn transactions_yield_membership_changes_in_order_and_nothing_else() {
        let body = serde_json::json!({"events": [
            {"type": "m.room.message", "room_id": "!r:hs", "sender": "@a:hs", "content": {"body": "hi", "membership": "leave"}},
            {"type": "m.room.member", "room_id": "!r:hs", "sender": "@a:hs", "state_key": "@a:hs", "content": {"membership": "leave"}},
            {"type": "m.room.member", "room_id": "!r:hs", "sender": "@mod:hs", "state_key": "@b:hs", "content": {"membership": "leave", "reason": "spam"}},
            {"type": "m.room.member", "room_id": "!r:hs", "sender": "@mod:hs", "state_key": "@c:hs", "content": {"membership": "ban"}},
            {"type": "m.room.member", "room_id": "!r:hs", "sender": "@mod:hs", "state_key": "@d:hs", "content": {"membership": "invite"}},
            {"type": "m.room.member", "room_id": "!s:hs", "sender": "@a:hs", "state_key": "@a:hs", "content": {"membership": "join"}},
            {"type": "m.room.member", "room_id": "!s:hs", "sender": "@a:hs", "content": {"membership": "join"}},
            {"type": "m.room.member", "sender": "@a:hs", "state_key": "@a:hs", "content": {"membership": "join"}}
        ], "ephemeral": [{"type": "m.typing"}]});
        let changes = membership_changes(body.to_string().as_bytes()).unwrap();
        let seen: Vec<(&str, &str, Option<Reason>)> =
            changes.iter().map(|c| (c.room.as_str(), c.user.as_str(), c.departed)).collect();
        assert_eq!(
            seen,
            vec![
                ("!r:hs", "@a:hs", Some(Reason::Left)),
                ("!r:hs", "@b:hs", Some(Reason::Kicked)),
                ("!r:hs", "@c:hs", Some(Reason::Banned)),
                ("!s:hs", "@a:hs", None),
            ]
        );
        assert!(membership_changes(b"{}").unwrap().is_empty());
        assert!(membership_changes(b"not json").is_err());
    }

    #[test]
    fn the_member_is_named_by_exactly_one_header() {
        let a = state();
        let body = br#"{"room_id": "!r:hs.test", "slot_id": "m.call#ROOM", "member_id": "m"}"#;
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer hs".parse().unwrap());
        headers.append("x-matrix-user-identifier", "@a:hs.test".parse().unwrap());
        let p = proxied(&a, &headers, &TokenQuery::default(), body).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(p.user_id.as_str(), "@a:hs.test");
        // A second header (whichever a proxy would pass on): refused, not one of them chosen.
        headers.append("x-matrix-user-identifier", "@victim:hs.test".parse().unwrap());
        let e = proxied(&a, &headers, &TokenQuery::default(), body).err().unwrap();
        assert_eq!((e.status, e.errcode), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
    }
}
