//! LiveKit's RoomService over Twirp: who is connected to a room right now.
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

#[derive(Clone)]
pub struct RoomService {
    http: reqwest::Client,
    list_url: Url,
    api_key: String,
    api_secret: String,
    timeout: Duration,
}

impl RoomService {
    pub fn new(
        http: reqwest::Client,
        api_base: &Url,
        api_key: &str,
        api_secret: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let list_url = Url::parse(&format!(
            "{}/twirp/livekit.RoomService/ListParticipants",
            api_base.as_str().trim_end_matches('/')
        ))
        .map_err(|e| e.to_string())?;
        Ok(RoomService { http, list_url, api_key: api_key.to_owned(), api_secret: api_secret.to_owned(), timeout })
    }

    /// The connected participants of `room`; an empty list if the room does not exist.
    /// Participants already disconnected are left out.
    pub async fn list_participants(&self, room: &str) -> Result<Vec<Participant>, RoomServiceError> {
        let token = AccessToken::with_api_key(&self.api_key, &self.api_secret)
            .with_ttl(Duration::from_secs(60))
            .with_grants(VideoGrants { room_admin: true, room: room.to_owned(), ..Default::default() })
            .to_jwt()
            .map_err(|e| RoomServiceError::Token(e.to_string()))?;
        let body = proto::ListParticipantsRequest { room: room.to_owned() }.encode_to_vec();
        let resp = self
            .http
            .post(self.list_url.clone())
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, "application/protobuf")
            .timeout(self.timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| RoomServiceError::Unreachable(crate::homeserver::describe(e)))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| RoomServiceError::Unreachable(e.to_string()))?;
        if !status.is_success() {
            let body = String::from_utf8_lossy(&bytes).chars().take(300).collect::<String>();
            // Twirp's not_found: the room does not exist (yet, or any more), so nobody is in it.
            if status == reqwest::StatusCode::NOT_FOUND && body.contains("not_found") {
                return Ok(Vec::new());
            }
            if status.is_server_error() {
                return Err(RoomServiceError::Unreachable(format!("{status}: {body}")));
            }
            return Err(RoomServiceError::Refused { status: status.as_u16(), body });
        }
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
