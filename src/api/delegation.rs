//! `POST /delegate_delayed_leave` (OpenID mode, wire-compatible with lk-jwt-service).
//!
//! The member proves who it is with an OpenID token, which its own homeserver vouches for
//! (federation `openid/userinfo`); the homeserver must be allowed to delegate; the client-server
//! URL we will call is resolved by us — `delay_cs_api_url` from the client is ignored. The answer
//! `200 {}` is given only once the delegation is durably stored.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use tracing::warn;

use super::member::{OpenIdToken, upstream_error, verified_user};
use super::{AppState, DelayRange, MatrixError, check_text, invalid, parse_json};
use crate::delegation::{Delegation, now_unix_ms};
use crate::homeserver::openid::OpenIdError;

#[derive(Deserialize)]
struct Request {
    room_id: String,
    slot_id: String,
    openid_token: OpenIdToken,
    member: Member,
    delay_id: String,
    delay_timeout: i64,
    /// Accepted for compatibility and ignored: clients must not choose where we send requests.
    #[serde(default)]
    #[allow(dead_code)]
    delay_cs_api_url: Option<String>,
}

#[derive(Deserialize)]
struct Member {
    id: String,
    claimed_user_id: String,
    claimed_device_id: String,
}

pub async fn delegate(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, MatrixError> {
    super::delegation_answer(&state, handle(&state, &body).await)
}

/// A request whose every field is well-formed; nothing asked of anyone yet.
pub(crate) struct Checked {
    req: Request,
    room_id: ruma::OwnedRoomId,
    user_id: ruma::OwnedUserId,
    delay_ms: u64,
}

/// Parses `body` and checks the shape and syntax of every field, delays within `delays`: no I/O
/// (a fuzz target).
pub(crate) fn check(body: &[u8], delays: &DelayRange) -> Result<Checked, MatrixError> {
    let req: Request = parse_json(body)?;
    let room_id = ruma::OwnedRoomId::try_from(req.room_id.as_str()).map_err(|e| invalid(format!("room_id: {e}")))?;
    let user_id = ruma::OwnedUserId::try_from(req.member.claimed_user_id.as_str())
        .map_err(|e| invalid(format!("member.claimed_user_id: {e}")))?;
    check_text("slot_id", &req.slot_id)?;
    check_text("member.id", &req.member.id)?;
    check_text("member.claimed_device_id", &req.member.claimed_device_id)?;
    check_text("delay_id", &req.delay_id)?;
    let delay_ms = delays.check("delay_timeout", req.delay_timeout)?;
    req.openid_token.server()?;
    Ok(Checked { req, room_id, user_id, delay_ms })
}

async fn handle(state: &AppState, body: &[u8]) -> Result<(), MatrixError> {
    let Checked { req, room_id, user_id, delay_ms } = check(body, &state.delays)?;
    let server = req.openid_token.server()?;

    // Who may delegate.
    if !state.allowed.allows(server) {
        warn!(server, user = %user_id, "delegation refused: homeserver not allowed");
        return Err(MatrixError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "this homeserver may not delegate here"));
    }
    let user_id = verified_user(state, "delegate", &req.openid_token, Some(&user_id)).await?;
    super::membership::require_joined(state, "delegate", &user_id, room_id.as_str()).await?;

    // Where its homeserver is, by our own means.
    let _slot = super::member::check_slot(state, "delegate", server).await?;
    let cs = state
        .discovery
        .client_server_api(server)
        .await
        .map_err(|e| upstream_error(server, OpenIdError::Discovery(e)))?;

    let delegation = Delegation {
        room_id: room_id.as_str().into(),
        slot_id: req.slot_id.into(),
        user_id: user_id.as_str().into(),
        device_id: req.member.claimed_device_id.into(),
        member_id: req.member.id.into(),
        delay_id: req.delay_id.into(),
        delay_ms,
        cs_api_url: cs.base.as_str().into(),
        created_at_ms: now_unix_ms(),
        mode: crate::delegation::Mode::OpenId,
        identity: None,
    };
    super::store_delegation(state, delegation).await
}
