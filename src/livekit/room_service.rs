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

/// The HTTP(S) base of a LiveKit URL given as ws(s) or http(s), path kept, no trailing slash.
pub fn http_base(livekit_url: &str) -> Result<Url, String> {
    let mut url = Url::parse(livekit_url).map_err(|e| format!("{livekit_url:?}: {e}"))?;
    let scheme = match url.scheme() {
        "ws" | "http" => "http",
        "wss" | "https" => "https",
        other => return Err(format!("{livekit_url:?}: unsupported scheme {other:?}")),
    };
    url.set_scheme(scheme).map_err(|_| format!("{livekit_url:?}: cannot use scheme {scheme}"))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{livekit_url:?}: no host"));
    }
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&path);
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

impl RoomService {
    pub fn new(
        http: reqwest::Client,
        livekit_url: &str,
        api_key: &str,
        api_secret: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let base = http_base(livekit_url)?;
        let list_url =
            Url::parse(&format!("{}/twirp/livekit.RoomService/ListParticipants", base.as_str().trim_end_matches('/')))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_path_prefixes_and_maps_websocket_schemes() {
        assert_eq!(http_base("wss://sfu.example.com/livekit/").unwrap().as_str(), "https://sfu.example.com/livekit");
        assert_eq!(http_base("ws://127.0.0.1:7880").unwrap().as_str(), "http://127.0.0.1:7880/");
        assert!(http_base("ftp://x").is_err());
        assert!(http_base("not a url").is_err());
    }
}
