//! Verification and decoding of LiveKit webhooks.
//!
//! LiveKit signs each webhook with an HS256 JWT made from the API key and secret, whose `sha256`
//! claim is the base64 SHA-256 of the raw body. `livekit-api`'s [`WebhookReceiver`] checks both.
//! It then decodes the body into protobuf types and fails on enum values it does not know (a newer
//! LiveKit's disconnect reasons) — *after* the signature verified. Such events are authentic, so
//! we fall back to reading the few fields we need from the raw JSON rather than dropping a
//! departure.

use livekit_api::access_token::TokenVerifier;
use livekit_api::webhooks::{WebhookError, WebhookReceiver};
use livekit_protocol as proto;
use serde_json::Value;

use super::{Departure, Participant, SfuEvent, SfuEventKind};

#[derive(Debug, thiserror::Error)]
pub enum RejectedWebhook {
    /// Missing, forged, expired or mismatching signature: answer 401.
    #[error("webhook signature invalid: {0}")]
    Unauthenticated(String),
    /// Authentic, but the body cannot be understood: answer 400.
    #[error("webhook body malformed: {0}")]
    Malformed(String),
}

/// Verifies with whichever of the configured keys a token's `iss` names (several while keys
/// rotate, as in LiveKit's key file).
#[derive(Clone)]
pub struct WebhookVerifier {
    receivers: Vec<(String, WebhookReceiver)>,
}

/// The `iss` claim of a JWT, read without verifying it (to pick the key that will).
pub fn issuer(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

impl WebhookVerifier {
    pub fn new(keys: &[(String, String)]) -> Self {
        let receivers = keys
            .iter()
            .map(|(key, secret)| (key.clone(), WebhookReceiver::new(TokenVerifier::with_api_key(key, secret))))
            .collect();
        WebhookVerifier { receivers }
    }

    /// Verifies `body` against the `Authorization` header value and decodes it.
    pub fn verify(&self, body: &str, authorization: Option<&str>) -> Result<SfuEvent, RejectedWebhook> {
        let token = authorization
            .map(|h| h.trim())
            .map(|h| h.strip_prefix("Bearer ").unwrap_or(h).trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RejectedWebhook::Unauthenticated("no Authorization header".into()))?;
        let key = issuer(token).ok_or_else(|| RejectedWebhook::Unauthenticated("no issuer in the token".into()))?;
        let (_, receiver) = self
            .receivers
            .iter()
            .find(|(k, _)| *k == key)
            .ok_or_else(|| RejectedWebhook::Unauthenticated(format!("unknown key {key:?}")))?;
        match receiver.receive(body, token) {
            Ok(event) => from_proto(event),
            Err(WebhookError::InvalidData(e)) => {
                // The signature and body hash verified; only the typed decoding failed.
                let value: Value =
                    serde_json::from_str(body).map_err(|_| RejectedWebhook::Malformed(format!("not JSON: {e}")))?;
                from_json(&value)
            }
            Err(e) => Err(RejectedWebhook::Unauthenticated(e.to_string())),
        }
    }
}

fn from_proto(event: proto::WebhookEvent) -> Result<SfuEvent, RejectedWebhook> {
    let room = event.room.unwrap_or_default();
    let participant = || -> Result<Participant, RejectedWebhook> {
        let p = event
            .participant
            .clone()
            .ok_or_else(|| RejectedWebhook::Malformed(format!("{} without participant", event.event)))?;
        Ok(Participant {
            identity: p.identity,
            sid: p.sid,
            joined_at_ms: super::joined_ms(p.joined_at_ms, p.joined_at),
        })
    };
    let departure = || {
        let reason = event.participant.as_ref().map(|p| p.disconnect_reason).unwrap_or_default();
        let name = proto::DisconnectReason::try_from(reason)
            .map(|r| r.as_str_name().to_owned())
            .unwrap_or_else(|_| reason.to_string());
        Departure::from_reason_name(&name)
    };
    let kind = match event.event.as_str() {
        "participant_joined" => SfuEventKind::ParticipantJoined(participant()?),
        "participant_left" | "participant_connection_aborted" => SfuEventKind::ParticipantLeft {
            participant: participant()?,
            departure: departure(),
            aborted: event.event == "participant_connection_aborted",
        },
        "room_finished" => SfuEventKind::RoomFinished,
        other => SfuEventKind::Other(other.to_owned()),
    };
    check_room(&kind, &room.name)?;
    Ok(SfuEvent { id: event.id, room: room.name, room_sid: room.sid, kind })
}

/// Reads the fields we need from protojson (camelCase) or snake_case JSON.
fn from_json(v: &Value) -> Result<SfuEvent, RejectedWebhook> {
    fn field<'a>(v: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
        v.get(camel).or_else(|| v.get(snake))
    }
    fn text(v: Option<&Value>) -> String {
        v.and_then(Value::as_str).unwrap_or_default().to_owned()
    }
    fn int(v: Option<&Value>) -> i64 {
        match v {
            Some(Value::Number(n)) => n.as_i64().unwrap_or_default(),
            Some(Value::String(s)) => s.parse().unwrap_or_default(),
            _ => 0,
        }
    }
    let name = text(v.get("event"));
    let room = v.get("room").cloned().unwrap_or(Value::Null);
    let participant = || -> Result<Participant, RejectedWebhook> {
        let p =
            v.get("participant").ok_or_else(|| RejectedWebhook::Malformed(format!("{name} without participant")))?;
        Ok(Participant {
            identity: text(p.get("identity")),
            sid: text(p.get("sid")),
            joined_at_ms: super::joined_ms(
                int(field(p, "joinedAtMs", "joined_at_ms")),
                int(field(p, "joinedAt", "joined_at")),
            ),
        })
    };
    let departure = || {
        let reason = v.get("participant").and_then(|p| field(p, "disconnectReason", "disconnect_reason"));
        let name = match reason {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n
                .as_i64()
                .and_then(|n| proto::DisconnectReason::try_from(n as i32).ok())
                .map(|r| r.as_str_name().to_owned())
                .unwrap_or_else(|| n.to_string()),
            _ => "UNKNOWN_REASON".to_owned(),
        };
        Departure::from_reason_name(&name)
    };
    let kind = match name.as_str() {
        "participant_joined" => SfuEventKind::ParticipantJoined(participant()?),
        "participant_left" | "participant_connection_aborted" => SfuEventKind::ParticipantLeft {
            participant: participant()?,
            departure: departure(),
            aborted: name == "participant_connection_aborted",
        },
        "room_finished" => SfuEventKind::RoomFinished,
        "" => return Err(RejectedWebhook::Malformed("no event name".into())),
        other => SfuEventKind::Other(other.to_owned()),
    };
    let room_name = text(room.get("name"));
    check_room(&kind, &room_name)?;
    Ok(SfuEvent { id: text(v.get("id")), room: room_name, room_sid: text(room.get("sid")), kind })
}

fn check_room(kind: &SfuEventKind, room: &str) -> Result<(), RejectedWebhook> {
    let needs_room = !matches!(kind, SfuEventKind::Other(_));
    if needs_room && room.is_empty() {
        return Err(RejectedWebhook::Malformed(format!("{} without room name", kind.name())));
    }
    if let SfuEventKind::ParticipantJoined(p) | SfuEventKind::ParticipantLeft { participant: p, .. } = kind {
        if p.identity.is_empty() || p.sid.is_empty() {
            return Err(RejectedWebhook::Malformed(format!("{} without identity or sid", kind.name())));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use sha2::Digest as _;

    fn sign(body: &str, secret: &str) -> String {
        sign_with("key", body, secret)
    }

    fn sign_with(key: &str, body: &str, secret: &str) -> String {
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(body));
        livekit_api::access_token::AccessToken::with_api_key(key, secret).with_sha256(&hash).to_jwt().unwrap()
    }

    #[test]
    fn a_webhook_is_verified_with_the_key_its_issuer_names() {
        let keys = [("new".to_owned(), "new-secret".to_owned()), ("old".to_owned(), "old-secret".to_owned())];
        let v = WebhookVerifier::new(&keys);
        assert!(v.verify(LEFT, Some(&sign_with("old", LEFT, "old-secret"))).is_ok(), "the old key, while rotating");
        assert!(v.verify(LEFT, Some(&sign_with("new", LEFT, "new-secret"))).is_ok());
        // The secret must be the one of the key named; an unknown key is refused.
        let crossed = v.verify(LEFT, Some(&sign_with("new", LEFT, "old-secret")));
        assert!(matches!(crossed, Err(RejectedWebhook::Unauthenticated(_))));
        let unknown = v.verify(LEFT, Some(&sign_with("gone", LEFT, "gone-secret")));
        assert!(
            matches!(unknown, Err(RejectedWebhook::Unauthenticated(ref why)) if why.contains("unknown key")),
            "{unknown:?}"
        );
        assert!(matches!(v.verify(LEFT, Some("not-a-jwt")), Err(RejectedWebhook::Unauthenticated(_))));
    }

    const LEFT: &str = r#"{"event":"participant_left","room":{"sid":"RM_1","name":"room"},
        "participant":{"sid":"PA_1","identity":"alice","state":"DISCONNECTED","joinedAt":"1732550100",
        "disconnectReason":"MIGRATION"},"id":"EV_1","createdAt":"1732550200"}"#;

    #[test]
    fn accepts_a_signed_departure_and_classifies_its_reason() {
        let v = WebhookVerifier::new(&[("key".into(), "secret".into())]);
        let e = v.verify(LEFT, Some(&sign(LEFT, "secret"))).unwrap();
        assert_eq!(e.room, "room");
        assert_eq!(e.room_sid, "RM_1");
        let SfuEventKind::ParticipantLeft { participant, departure, aborted } = e.kind else { panic!() };
        assert_eq!(
            participant,
            Participant { identity: "alice".into(), sid: "PA_1".into(), joined_at_ms: 1_732_550_100_000 }
        );
        assert_eq!(departure, Departure::MayReturn("MIGRATION".into()));
        assert!(!aborted);
    }

    #[test]
    fn rejects_forged_missing_and_tampered() {
        let v = WebhookVerifier::new(&[("key".into(), "secret".into())]);
        assert!(matches!(v.verify(LEFT, None), Err(RejectedWebhook::Unauthenticated(_))));
        assert!(matches!(v.verify(LEFT, Some(&sign(LEFT, "other"))), Err(RejectedWebhook::Unauthenticated(_))));
        let tampered = LEFT.replace("PA_1", "PA_2");
        assert!(matches!(v.verify(&tampered, Some(&sign(LEFT, "secret"))), Err(RejectedWebhook::Unauthenticated(_))));
    }

    #[test]
    fn an_unknown_reason_from_a_newer_livekit_is_a_final_departure() {
        let body = LEFT.replace("MIGRATION", "SOME_FUTURE_REASON");
        let v = WebhookVerifier::new(&[("key".into(), "secret".into())]);
        let e = v.verify(&body, Some(&format!("Bearer {}", sign(&body, "secret")))).unwrap();
        let SfuEventKind::ParticipantLeft { departure, .. } = e.kind else { panic!() };
        assert_eq!(departure, Departure::Final("SOME_FUTURE_REASON".into()));
    }

    #[test]
    fn signed_garbage_is_malformed_not_unauthenticated() {
        let v = WebhookVerifier::new(&[("key".into(), "secret".into())]);
        let body = "{not json";
        assert!(matches!(v.verify(body, Some(&sign(body, "secret"))), Err(RejectedWebhook::Malformed(_))));
    }
}
