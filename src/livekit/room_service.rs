//! LiveKit's RoomService over Twirp: who is connected to a room right now, and opening the rooms
//! full-access users call in.
//!
//! The request is issued here rather than through `livekit-api`'s `RoomClient`, which drops any
//! path of `LIVEKIT_URL` (operators who serve LiveKit behind a reverse-proxy prefix need it kept).
//! The token and the protobuf messages still come from `livekit-api` / `livekit-protocol`.

use std::sync::Arc;
use std::time::Duration;

use livekit_api::access_token::{AccessToken, VideoGrants};
use livekit_protocol as proto;
use prost::Message as _;
use url::Url;

use super::Participant;
use crate::metrics::{Metrics, OutcomeLabel};
use crate::ports::Unobserved;

#[derive(Debug, thiserror::Error)]
pub enum RoomServiceError {
    #[error("LiveKit unreachable: {0}")]
    Unreachable(String),
    #[error("LiveKit refused the request ({status}): {body}")]
    Refused { status: u16, body: String },
    #[error("cannot sign the RoomService token: {0}")]
    Token(String),
}

/// Largest RoomService answer read: a listing of a room of tens of thousands of participants
/// fits; our own LiveKit is trusted, but a broken proxy in front of it must not exhaust memory.
const ANSWER_LIMIT: usize = 64 << 20;

/// RoomService's address and credentials; cheap to clone.
#[derive(Clone)]
pub struct RoomService {
    http: reqwest::Client,
    /// `…/twirp/livekit.RoomService/`
    base: Url,
    api_key: String,
    api_secret: String,
    timeout: Duration,
}

/// How long the LiveKit rooms this service opens stay open without participants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomTimeouts {
    /// After creation, if nobody joins.
    pub empty: Duration,
    /// After the last participant left.
    pub departure: Duration,
}

impl RoomService {
    pub fn new(
        http: reqwest::Client,
        api_base: &Url,
        api_key: &str,
        api_secret: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let base = Url::parse(&format!("{}/twirp/livekit.RoomService/", api_base.as_str().trim_end_matches('/')))
            .map_err(|e| e.to_string())?;
        Ok(RoomService { http, base, api_key: api_key.to_owned(), api_secret: api_secret.to_owned(), timeout })
    }

    /// Calls Twirp `method` with `request`, authorised by a one-minute token with `grants`.
    /// `Ok(None)`: Twirp's `not_found`.
    async fn call(
        &self,
        method: &str,
        grants: VideoGrants,
        request: impl prost::Message,
    ) -> Result<Option<Vec<u8>>, RoomServiceError> {
        let token = AccessToken::with_api_key(&self.api_key, &self.api_secret)
            .with_ttl(Duration::from_secs(60))
            .with_grants(grants)
            .to_jwt()
            .map_err(|e| RoomServiceError::Token(e.to_string()))?;
        let url = self.base.join(method).map_err(|e| RoomServiceError::Unreachable(e.to_string()))?;
        let resp = self
            .http
            .post(url)
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, "application/protobuf")
            .timeout(self.timeout)
            .body(request.encode_to_vec())
            .send()
            .await
            .map_err(|e| RoomServiceError::Unreachable(crate::homeserver::describe(e)))?;
        let status = resp.status();
        let bytes = crate::homeserver::read_capped(resp, ANSWER_LIMIT).await.map_err(RoomServiceError::Unreachable)?;
        if status.is_success() {
            return Ok(Some(bytes));
        }
        let body = String::from_utf8_lossy(&bytes).chars().take(300).collect::<String>();
        if status == reqwest::StatusCode::NOT_FOUND && body.contains("not_found") {
            return Ok(None);
        }
        if status.is_server_error() {
            return Err(RoomServiceError::Unreachable(format!("{status}: {body}")));
        }
        Err(RoomServiceError::Refused { status: status.as_u16(), body })
    }

    /// The connected participants of `room`; an empty list if the room does not exist.
    /// Participants already disconnected are left out.
    pub async fn list_participants(&self, room: &str) -> Result<Vec<Participant>, RoomServiceError> {
        let grants = VideoGrants { room_admin: true, room: room.to_owned(), ..Default::default() };
        let request = proto::ListParticipantsRequest { room: room.to_owned() };
        // Twirp's not_found: the room does not exist (yet, or any more), so nobody is in it.
        let Some(bytes) = self.call("ListParticipants", grants, request).await? else { return Ok(Vec::new()) };
        let list = proto::ListParticipantsResponse::decode(bytes.as_ref())
            .map_err(|e| RoomServiceError::Unreachable(format!("undecodable answer: {e}")))?;
        Ok(list
            .participants
            .into_iter()
            .filter(|p| p.state != proto::participant_info::State::Disconnected as i32)
            .map(|p| Participant {
                identity: p.identity,
                sid: p.sid,
                joined_at_ms: super::joined_ms(p.joined_at_ms, p.joined_at),
            })
            .collect())
    }

    /// Disconnects whoever is connected as `identity` in `room` (LiveKit then reports
    /// `participant_left`, reason `PARTICIPANT_REMOVED`), and asks LiveKit to refuse the tokens
    /// issued for it before `revoke_before_s` (Unix seconds; not LiveKit's default, a minute
    /// ahead, which would also refuse a token issued a moment later to a user let back in).
    /// `Ok(false)`: nobody was connected as `identity`.
    pub async fn remove_participant(
        &self,
        room: &str,
        identity: &str,
        revoke_before_s: i64,
    ) -> Result<bool, RoomServiceError> {
        let grants = VideoGrants { room_admin: true, room: room.to_owned(), ..Default::default() };
        let request = proto::RoomParticipantIdentity {
            room: room.to_owned(),
            identity: identity.to_owned(),
            revoke_token_ts: revoke_before_s,
        };
        Ok(self.call("RemoveParticipant", grants, request).await?.is_some())
    }

    /// Closes `room`, disconnecting everyone in it. `Ok(false)`: there was no such room.
    pub async fn delete_room(&self, room: &str) -> Result<bool, RoomServiceError> {
        let grants = VideoGrants { room_create: true, ..Default::default() };
        let request = proto::DeleteRoomRequest { room: room.to_owned() };
        Ok(self.call("DeleteRoom", grants, request).await?.is_some())
    }

    /// Opens LiveKit room `room` (no participant limit) unless it is open already: LiveKit answers
    /// an existing room's creation with that room.
    pub async fn create_room(&self, room: &str, timeouts: RoomTimeouts) -> Result<(), RoomServiceError> {
        let grants = VideoGrants { room_create: true, ..Default::default() };
        let request = proto::CreateRoomRequest {
            name: room.to_owned(),
            empty_timeout: timeouts.empty.as_secs() as u32,
            departure_timeout: timeouts.departure.as_secs() as u32,
            ..Default::default()
        };
        match self.call("CreateRoom", grants, request).await? {
            Some(_) => Ok(()),
            None => Err(RoomServiceError::Refused { status: 404, body: "not_found".into() }),
        }
    }
}

/// The [`crate::ports::Presence`] port over RoomService, with the metrics and log lines of each
/// listing. (How many run at once is the engine's business.)
pub struct Listings {
    pub room_service: RoomService,
    pub metrics: Arc<Metrics>,
}

#[async_trait::async_trait]
impl crate::ports::Presence for Listings {
    async fn participants(&self, room: &str) -> Result<Vec<Participant>, Unobserved> {
        let result = self.room_service.list_participants(room).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics.livekit_requests.get_or_create(&OutcomeLabel { outcome }).inc();
        result.map_err(|e| {
            tracing::warn!(livekit_room = %room, error = %e, "cannot ask LiveKit who is connected; keeping members alive");
            Unobserved
        })
    }
}
