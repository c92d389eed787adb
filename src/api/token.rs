//! `POST /get_token` (Matrix 2.0) and `POST /sfu/get` (legacy): the LiveKit tokens MatrixRTC
//! clients join calls with, wire-compatible with lk-jwt-service — and the delayed leave that
//! today's clients hand over in the same request.
//!
//! The member proves who it is with an OpenID token its homeserver vouches for. Users of
//! `LIVEKIT_FULL_ACCESS_HOMESERVERS` get their LiveKit room opened (RoomService `CreateRoom`)
//! before the answer, and may hand over a delayed leave: it is stored durably, bound to the
//! exact identity just minted, before the token is returned — a request whose delegation cannot
//! be stored gets no token, never a token without its safety net. Other users get a token for a
//! room that must already exist, and `400 M_BAD_JSON` if they send delay fields (clients then
//! retry without them). `delay_cs_api_url` is ignored: we find the homeserver ourselves.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::member::{OpenIdToken, upstream_error, verified_user};
use super::{AppState, DelayRange, MatrixError, check_text, invalid, parse_json};
use crate::delegation::{DelayRef, Delegation, Mode, now_unix_ms};
use crate::homeserver::openid::OpenIdError;
use crate::identity;
use crate::livekit::room_service::{RoomService, RoomTimeouts};
use crate::metrics::{OutcomeLabel, TokenLabels};
use crate::store::Seat;

/// The MatrixRTC slot legacy `/sfu/get` calls live in.
const LEGACY_SLOT: &str = "m.call#ROOM";

/// What issuing tokens needs.
pub struct Issuer {
    /// The URL clients connect to (`LIVEKIT_URL`).
    pub url: String,
    pub api_key: String,
    pub api_secret: String,
    pub ttl: Duration,
    pub rooms: RoomTimeouts,
    pub room_service: RoomService,
}

/// `{"url", "jwt"}`
#[derive(Serialize)]
pub struct Answer {
    url: String,
    jwt: String,
}

#[derive(Deserialize)]
pub(crate) struct TokenRequest {
    room_id: String,
    slot_id: String,
    openid_token: OpenIdToken,
    member: Member,
    #[serde(flatten)]
    delay: DelayFields,
}

#[derive(Deserialize)]
struct Member {
    id: String,
    claimed_user_id: String,
    claimed_device_id: String,
}

#[derive(Deserialize)]
pub(crate) struct LegacyRequest {
    room: String,
    openid_token: OpenIdToken,
    device_id: String,
    #[serde(flatten)]
    delay: DelayFields,
}

/// The optional delayed leave of a token request.
#[derive(Deserialize)]
struct DelayFields {
    #[serde(default)]
    delay_id: Option<String>,
    #[serde(default)]
    delay_timeout: Option<i64>,
    /// Accepted for compatibility and ignored: clients must not choose where we send requests.
    #[serde(default)]
    #[allow(dead_code)]
    delay_cs_api_url: Option<String>,
}

impl DelayFields {
    /// `(delay_id, delay_timeout)` if the request hands over a delayed leave.
    fn requested(&self) -> Option<(&str, Option<i64>)> {
        self.delay_id.as_deref().filter(|id| !id.is_empty()).map(|id| (id, self.delay_timeout))
    }

    /// The delayed leave handed over, checked: `(delay_id, delay in ms)`.
    fn checked(&self, delays: &DelayRange) -> Result<Option<(&str, u64)>, MatrixError> {
        let Some((delay_id, timeout)) = self.requested() else { return Ok(None) };
        check_text("delay_id", delay_id)?;
        let timeout = timeout.ok_or_else(|| invalid("delay_timeout is required with delay_id"))?;
        Ok(Some((delay_id, delays.check("delay_timeout", timeout)?)))
    }
}

/// A `/get_token` body, parsed and checked for shape and syntax (but its delayed leave, checked
/// once the user's access is known): no I/O (a fuzz target).
pub(crate) fn check_get_token(body: &[u8]) -> Result<(TokenRequest, ruma::OwnedUserId), MatrixError> {
    let req: TokenRequest = parse_json(body)?;
    ruma::RoomId::parse(req.room_id.as_str()).map_err(|e| invalid(format!("room_id: {e}")))?;
    let claimed = ruma::OwnedUserId::try_from(req.member.claimed_user_id.as_str())
        .map_err(|e| invalid(format!("member.claimed_user_id: {e}")))?;
    check_text("slot_id", &req.slot_id)?;
    check_text("member.id", &req.member.id)?;
    check_text("member.claimed_device_id", &req.member.claimed_device_id)?;
    req.openid_token.server()?;
    Ok((req, claimed))
}

/// A `/sfu/get` body, likewise.
pub(crate) fn check_sfu_get(body: &[u8]) -> Result<LegacyRequest, MatrixError> {
    let req: LegacyRequest = parse_json(body)?;
    ruma::RoomId::parse(req.room.as_str()).map_err(|e| invalid(format!("room: {e}")))?;
    check_text("device_id", &req.device_id)?;
    // The identity is `@user:server:DEVICE`: with a `:` in the device, `@a:hs` + `8448:X` and
    // `@a:hs:8448` + `X` would be one identity.
    if req.device_id.contains(':') {
        return Err(invalid("device_id must not contain ':'"));
    }
    req.openid_token.server()?;
    Ok(req)
}

/// Both token request bodies and their delayed leaves, as the endpoints check them before asking
/// anyone: `legacy` picks `/sfu/get`.
pub(crate) fn check_body(body: &[u8], legacy: bool, delays: &DelayRange) -> Result<(), MatrixError> {
    let delay = if legacy { check_sfu_get(body)?.delay } else { check_get_token(body)?.0.delay };
    delay.checked(delays).map(drop)
}

/// Who gets a token for what.
pub(super) struct Grant {
    pub user_id: ruma::OwnedUserId,
    pub device_id: String,
    pub member_id: String,
    pub room_id: String,
    pub slot_id: String,
    pub identity: String,
}

impl Grant {
    /// The delegation of `delay_id` that rides along with this grant: bound to its identity.
    pub(super) fn delegation(&self, delay_id: &str, delay_ms: u64, cs_api_url: String, mode: Mode) -> Delegation {
        Delegation {
            room_id: self.room_id.as_str().into(),
            slot_id: self.slot_id.as_str().into(),
            user_id: self.user_id.as_str().into(),
            device_id: self.device_id.as_str().into(),
            member_id: self.member_id.as_str().into(),
            delay_id: delay_id.into(),
            delay_ms,
            cs_api_url: cs_api_url.into(),
            created_at_ms: now_unix_ms(),
            mode,
            identity: Some(self.identity.as_str().into()),
        }
    }
}

/// `400 M_BAD_JSON`, which Element Call takes as "retry without the delay fields".
pub(super) fn not_full_access(server: &str, user: &ruma::UserId) -> MatrixError {
    warn!(server, user = %user, "delay fields from a user who may not delegate; refused");
    MatrixError::new(
        StatusCode::BAD_REQUEST,
        "M_BAD_JSON",
        "delegation of delayed events is only supported for full-access users",
    )
}

/// `POST /get_token`: identity = the 3-part hash of user, device and member id.
pub async fn get_token(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Answer>, MatrixError> {
    count(&state, "get_token", get_token_inner(&state, &body).await)
}

async fn get_token_inner(state: &AppState, body: &[u8]) -> Result<Answer, MatrixError> {
    let (req, claimed) = check_get_token(body)?;
    let user_id = verified_user(state, "get_token", &req.openid_token, Some(&claimed)).await?;
    let identity = identity::identity_three_part(user_id.as_str(), &req.member.claimed_device_id, &req.member.id);
    let grant = Grant {
        user_id,
        device_id: req.member.claimed_device_id,
        member_id: req.member.id,
        room_id: req.room_id,
        slot_id: req.slot_id,
        identity,
    };
    issue(state, "get_token", grant, &req.openid_token, &req.delay).await
}

/// `POST /sfu/get`: identity = `@user:server:DEVICE`, slot `m.call#ROOM`.
pub async fn sfu_get(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Answer>, MatrixError> {
    count(&state, "sfu_get", sfu_get_inner(&state, &body).await)
}

async fn sfu_get_inner(state: &AppState, body: &[u8]) -> Result<Answer, MatrixError> {
    let req = check_sfu_get(body)?;
    let user_id = verified_user(state, "sfu_get", &req.openid_token, None).await?;
    let identity = identity::identity_legacy(user_id.as_str(), &req.device_id);
    let grant = Grant {
        user_id,
        // The legacy membership is keyed by the device: that is its member id too.
        member_id: req.device_id.clone(),
        device_id: req.device_id,
        room_id: req.room,
        slot_id: LEGACY_SLOT.to_owned(),
        identity,
    };
    issue(state, "sfu_get", grant, &req.openid_token, &req.delay).await
}

/// Mints the token; for a full-access user, opens the room and stores the delegation first.
async fn issue(
    state: &AppState,
    endpoint: &'static str,
    grant: Grant,
    token: &OpenIdToken,
    delay: &DelayFields,
) -> Result<Answer, MatrixError> {
    let server = token.server()?;
    let full_access = state.allowed.allows(server);
    // A user who may not delegate learns that first (clients then retry without the fields),
    // before anything about the fields themselves.
    if delay.requested().is_some() && !full_access {
        return Err(not_full_access(server, &grant.user_id));
    }
    let delegation = match delay.checked(&state.delays)? {
        None => None,
        Some((delay_id, timeout)) => {
            // Where its homeserver is, by our own means.
            let _slot = super::member::check_slot(state, endpoint, server).await?;
            let cs = state.discovery.client_server_api(server).await.map_err(|e| {
                let e = upstream_error(server, OpenIdError::Discovery(e));
                MatrixError::new(
                    StatusCode::BAD_REQUEST,
                    "M_BAD_JSON",
                    format!("unable to resolve the client-server API: {}", e.error),
                )
            })?;
            Some(grant.delegation(delay_id, timeout, cs.base.to_string(), Mode::OpenId))
        }
    };
    grant_token(state, endpoint, &grant, full_access, delegation).await
}

/// Mints `grant`'s token; for a full-access user, first opens its LiveKit room and stores the
/// delegation riding along (nothing is answered without it).
pub(super) async fn grant_token(
    state: &AppState,
    endpoint: &'static str,
    grant: &Grant,
    full_access: bool,
    delegation: Option<Delegation>,
) -> Result<Answer, MatrixError> {
    // Nothing happens for a user who is not in the room: no token, no LiveKit room, no job.
    super::membership::require_joined(state, endpoint, &grant.user_id, &grant.room_id).await?;
    let issuer = &state.issuer;
    let livekit_room = identity::livekit_room(&grant.room_id, &grant.slot_id);
    let jwt = crate::livekit::token::join_token(
        &issuer.api_key,
        &issuer.api_secret,
        &grant.identity,
        &livekit_room,
        issuer.ttl,
    )
    .map_err(|e| {
        error!(user = %grant.user_id, error = %e, "cannot sign a LiveKit token");
        MatrixError::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", "cannot sign the token")
    })?;
    if full_access {
        let created = issuer.room_service.create_room(&livekit_room, issuer.rooms).await;
        let outcome = if created.is_ok() { "ok" } else { "error" };
        state.metrics.room_creations.get_or_create(&OutcomeLabel { outcome }).inc();
        if let Err(e) = created {
            error!(room = %grant.room_id, livekit_room = %livekit_room, user = %grant.user_id, error = %e,
                "cannot open the LiveKit room; no token issued");
            return Err(MatrixError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "M_UNKNOWN",
                "unable to create the room on the SFU",
            ));
        }
    }
    if state.following.is_some() {
        // Whose this token is, for removing them from the call if they leave the room.
        let seat = Seat {
            room_id: grant.room_id.clone(),
            user_id: grant.user_id.to_string(),
            livekit_room: livekit_room.clone(),
            identity: grant.identity.clone(),
            expires_at_ms: now_unix_ms() + issuer.ttl.as_millis() as u64,
        };
        state.store.add_seat(&seat).await.map_err(|e| {
            error!(room = %grant.room_id, user = %grant.user_id, error = %e, "cannot record the token's seat; no token issued");
            MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "cannot record the token now")
        })?;
    }
    if let Some(d) = delegation {
        let delay_id = d.delay_id.clone();
        super::store_delegation(state, d).await.inspect_err(|_| {
            warn!(room = %grant.room_id, user = %grant.user_id, delay_id = %DelayRef(&delay_id),
                "delegation not stored; no token issued");
        })?;
    }
    info!(room = %grant.room_id, livekit_room = %livekit_room, identity = %grant.identity, user = %grant.user_id,
        device = %grant.device_id, access = if full_access { "full" } else { "restricted" }, "LiveKit token issued");
    Ok(Answer { url: issuer.url.clone(), jwt })
}

/// Counts the request by endpoint and outcome.
pub(super) fn count(
    state: &AppState,
    endpoint: &'static str,
    result: Result<Answer, MatrixError>,
) -> Result<Json<Answer>, MatrixError> {
    let outcome = match &result {
        Ok(_) => "issued",
        Err(e) => match e.status {
            StatusCode::TOO_MANY_REQUESTS => "limited",
            StatusCode::BAD_REQUEST => "invalid",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            _ => "unavailable",
        },
    };
    state.metrics.tokens.get_or_create(&TokenLabels { endpoint, outcome }).inc();
    result.map(Json)
}

/// Built once at start from the configuration.
pub fn issuer(config: &crate::config::Config, room_service: RoomService) -> Arc<Issuer> {
    Arc::new(Issuer {
        url: config.livekit.url.clone(),
        api_key: config.livekit.key.clone(),
        api_secret: config.livekit.secret.clone(),
        ttl: config.tokens.ttl,
        rooms: RoomTimeouts {
            empty: config.tokens.room_empty_timeout,
            departure: config.tokens.room_departure_timeout,
        },
        room_service,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_legacy_device_id_never_makes_two_members_share_an_identity() {
        let body = |device: &str| {
            serde_json::json!({
                "room": "!r:hs.test",
                "device_id": device,
                "openid_token": {"access_token": "t", "matrix_server_name": "hs.test"},
            })
            .to_string()
        };
        assert!(check_sfu_get(body("DEVICE").as_bytes()).is_ok());
        // `@a:hs.test` + `8448:X` would be `@a:hs.test:8448` + `X`.
        let e = check_sfu_get(body("8448:X").as_bytes()).err().unwrap();
        assert_eq!((e.status, e.errcode), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
    }
}
