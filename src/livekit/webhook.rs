//! Verification and decoding of LiveKit webhooks.
//!
//! LiveKit signs each webhook with an HS256 JWT made from the API key and secret (`iss` names the
//! key), whose `sha256` claim is the base64 SHA-256 of the raw body. We check what `livekit-api`'s
//! `WebhookReceiver` checks — the algorithm, the signature, `exp` (required) and `nbf` with its
//! 60 s leeway, no `aud`, the body's hash — with a key prepared once per configured secret, and
//! then read only the fields the bridge acts on, borrowing them from the body. (The receiver
//! rebuilds its verifier for every call and decodes every field of the event into protobuf
//! types, failing on enum values it does not know — a newer LiveKit's disconnect reasons: that
//! was two thirds of the cost of a webhook; `livekit_api` stays the oracle of the tests below.)

use std::borrow::Cow;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::{DecodeSliceError, Engine};
use livekit_protocol as proto;
use ring::hmac;
use serde::Deserialize;
use serde_json::Value;

use super::{Departure, Participant, SfuEvent, SfuEventKind};

/// How far `exp` and `nbf` may be off (LiveKit's and `livekit-api`'s leeway).
const LEEWAY_SECS: u64 = 60;

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
    keys: Vec<(String, hmac::Key)>,
}

/// The `iss` claim of a JWT, read without verifying it (to pick the key that will).
pub fn issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

/// The claims of a webhook token that are checked.
#[derive(Deserialize)]
struct Claims<'a> {
    #[serde(borrow, default)]
    iss: Option<Cow<'a, str>>,
    #[serde(default)]
    exp: Option<Value>,
    #[serde(default)]
    nbf: Option<Value>,
    #[serde(borrow, default)]
    sha256: Option<Cow<'a, str>>,
    #[serde(default)]
    aud: Option<Value>,
}

#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
}

/// A NumericDate claim as `livekit-api` reads it: a non-negative integer.
fn seconds(claim: &Value, name: &str) -> Result<u64, RejectedWebhook> {
    claim.as_u64().ok_or_else(|| RejectedWebhook::Unauthenticated(format!("{name} is not a timestamp")))
}

impl WebhookVerifier {
    pub fn new(keys: &[(String, String)]) -> Self {
        let keys = keys
            .iter()
            .map(|(key, secret)| (key.clone(), hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())))
            .collect();
        WebhookVerifier { keys }
    }

    /// Verifies `body` against the `Authorization` header value and decodes it.
    pub fn verify(&self, body: &[u8], authorization: Option<&str>) -> Result<SfuEvent, RejectedWebhook> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.verify_at(body, authorization, now)
    }

    fn verify_at(&self, body: &[u8], authorization: Option<&str>, now: u64) -> Result<SfuEvent, RejectedWebhook> {
        let unauthenticated = |why: &str| RejectedWebhook::Unauthenticated(why.to_owned());
        let token = authorization
            .map(|h| h.trim())
            .map(|h| h.strip_prefix("Bearer ").unwrap_or(h).trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthenticated("no Authorization header"))?;
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(unauthenticated("not a JWT"));
        };
        // Decoded on the stack (a token LiveKit signs fits; a larger one goes to the heap): a
        // zeroed heap buffer is allocated with `calloc`, which glibc serves under its arena lock.
        let (mut header_buf, mut payload_buf, mut signature_buf) = ([0; 128], [0; 512], [0; 64]);
        let decode =
            |part: &str, buf| decoded(&URL_SAFE_NO_PAD, part, buf).ok_or_else(|| unauthenticated("not a JWT (base64)"));
        let header_json = decode(header, &mut header_buf)?;
        let parsed: Header = serde_json::from_slice(&header_json).map_err(|_| unauthenticated("no JWT header"))?;
        if parsed.alg != "HS256" {
            return Err(unauthenticated("not HS256"));
        }
        let payload_json = decode(payload, &mut payload_buf)?;
        let claims: Claims = serde_json::from_slice(&payload_json).map_err(|_| unauthenticated("no JWT claims"))?;
        let iss = claims.iss.as_deref().ok_or_else(|| unauthenticated("no issuer in the token"))?;
        let (_, key) = self
            .keys
            .iter()
            .find(|(k, _)| k == iss)
            .ok_or_else(|| RejectedWebhook::Unauthenticated(format!("unknown key {iss:?}")))?;
        let signed = &token[..header.len() + 1 + payload.len()];
        hmac::verify(key, signed.as_bytes(), &decode(signature, &mut signature_buf)?)
            .map_err(|_| unauthenticated("bad signature"))?;
        // Authentic from here: the claims say what they mean.
        let exp = claims.exp.as_ref().ok_or_else(|| unauthenticated("no exp"))?;
        if seconds(exp, "exp")?.saturating_add(LEEWAY_SECS) < now {
            return Err(unauthenticated("expired"));
        }
        if let Some(nbf) = &claims.nbf {
            if seconds(nbf, "nbf")? > now.saturating_add(LEEWAY_SECS) {
                return Err(unauthenticated("not valid yet"));
            }
        }
        if claims.aud.as_ref().is_some_and(|a| !a.is_null()) {
            return Err(unauthenticated("has an audience"));
        }
        let mut claimed_buf = [0; 64];
        let claimed = decoded(&STANDARD, claims.sha256.as_deref().unwrap_or_default(), &mut claimed_buf)
            .ok_or_else(|| unauthenticated("sha256 claim not base64"))?;
        if ring::digest::digest(&ring::digest::SHA256, body).as_ref() != &*claimed {
            return Err(unauthenticated("the body's hash differs from the signed one"));
        }
        decode_event(body)
    }
}

/// `part` decoded into `buf` when it fits, else onto the heap; `None` if it is not base64.
fn decoded<'b>(engine: &impl Engine, part: &str, buf: &'b mut [u8]) -> Option<Cow<'b, [u8]>> {
    match engine.decode_slice(part, buf) {
        Ok(n) => Some(Cow::Borrowed(&buf[..n])),
        Err(DecodeSliceError::OutputSliceTooSmall) => engine.decode(part).ok().map(Cow::Owned),
        Err(DecodeSliceError::DecodeError(_)) => None,
    }
}

/// A webhook body as LiveKit sends it (protojson: camelCase, 64-bit integers as strings), or in
/// snake_case; only what the bridge reads. Unknown fields and values are skipped.
#[derive(Deserialize)]
struct WireEvent<'a> {
    #[serde(borrow, default)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    id: Cow<'a, str>,
    #[serde(borrow, default)]
    room: Option<WireRoom<'a>>,
    #[serde(borrow, default)]
    participant: Option<WireParticipant<'a>>,
}

#[derive(Deserialize)]
struct WireRoom<'a> {
    #[serde(borrow, default)]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    sid: Cow<'a, str>,
}

#[derive(Deserialize)]
struct WireParticipant<'a> {
    #[serde(borrow, default)]
    identity: Cow<'a, str>,
    #[serde(borrow, default)]
    sid: Cow<'a, str>,
    #[serde(default, rename = "joinedAt", alias = "joined_at")]
    joined_at: Int64,
    #[serde(default, rename = "joinedAtMs", alias = "joined_at_ms")]
    joined_at_ms: Int64,
    #[serde(borrow, default, rename = "disconnectReason", alias = "disconnect_reason")]
    disconnect_reason: Reason<'a>,
}

/// An int64 as protojson writes it (a string) or as a number; 0 when absent or unreadable.
#[derive(Default, Clone, Copy)]
struct Int64(i64);

impl<'de> Deserialize<'de> for Int64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Int64;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an integer, or one written as a string")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Int64, E> {
                Ok(Int64(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Int64, E> {
                Ok(Int64(i64::try_from(v).unwrap_or_default()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Int64, E> {
                Ok(Int64(0))
            }
            fn visit_str<E>(self, v: &str) -> Result<Int64, E> {
                Ok(Int64(v.parse().unwrap_or_default()))
            }
            fn visit_unit<E>(self) -> Result<Int64, E> {
                Ok(Int64(0))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Int64, E> {
                Ok(Int64(0))
            }
            // An object or a list is unreadable, not an error: skipped as 0.
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Int64, A::Error> {
                while m.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Int64(0))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Int64, A::Error> {
                while s.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Int64(0))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A DisconnectReason as sent: by name, or by number.
#[derive(Default)]
enum Reason<'a> {
    /// protojson leaves the default value out.
    #[default]
    Absent,
    Name(Cow<'a, str>),
    Number(i64),
}

impl<'de: 'a, 'a> Deserialize<'de> for Reason<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Reason<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a disconnect reason's name or number")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Reason<'de>, E> {
                Ok(Reason::Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Reason<'de>, E> {
                Ok(Reason::Name(Cow::Owned(v.to_owned())))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Reason<'de>, E> {
                Ok(Reason::Number(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Reason<'de>, E> {
                Ok(Reason::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_unit<E>(self) -> Result<Reason<'de>, E> {
                Ok(Reason::Absent)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Reason<'de>, E> {
                Ok(Reason::Absent)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Reason<'de>, E> {
                Ok(Reason::Absent)
            }
            // Unreadable, like an absent one: a final departure.
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Reason<'de>, A::Error> {
                while m.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Reason::Absent)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Reason<'de>, A::Error> {
                while s.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Reason::Absent)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Reason<'_> {
    /// The protobuf name; a number this build does not know stays a number (a final departure).
    fn name(&self) -> Cow<'_, str> {
        let known = |n: i64| i32::try_from(n).ok().and_then(|n| proto::DisconnectReason::try_from(n).ok());
        match self {
            Reason::Name(name) => Cow::Borrowed(name),
            Reason::Number(n) => {
                known(*n).map_or_else(|| Cow::Owned(n.to_string()), |r| Cow::Borrowed(r.as_str_name()))
            }
            Reason::Absent => Cow::Borrowed(proto::DisconnectReason::UnknownReason.as_str_name()),
        }
    }
}

fn decode_event(body: &[u8]) -> Result<SfuEvent, RejectedWebhook> {
    let wire: WireEvent =
        serde_json::from_slice(body).map_err(|e| RejectedWebhook::Malformed(format!("not JSON: {e}")))?;
    let name = wire.event.as_ref();
    let participant = || -> Result<Participant, RejectedWebhook> {
        let p = wire
            .participant
            .as_ref()
            .ok_or_else(|| RejectedWebhook::Malformed(format!("{name} without participant")))?;
        Ok(Participant {
            identity: p.identity.clone().into_owned(),
            sid: p.sid.clone().into_owned(),
            joined_at_ms: super::joined_ms(p.joined_at_ms.0, p.joined_at.0),
        })
    };
    let departure = || {
        let absent = Reason::Absent;
        let reason = wire.participant.as_ref().map_or(&absent, |p| &p.disconnect_reason);
        Departure::from_reason_name(&reason.name())
    };
    let kind = match name {
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
    let (room, room_sid) = wire.room.map_or_else(Default::default, |r| (r.name.into_owned(), r.sid.into_owned()));
    check_room(&kind, &room)?;
    Ok(SfuEvent { id: wire.id.into_owned(), room, room_sid, kind })
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
        assert!(
            v.verify(LEFT.as_bytes(), Some(&sign_with("old", LEFT, "old-secret"))).is_ok(),
            "the old key, while rotating"
        );
        assert!(v.verify(LEFT.as_bytes(), Some(&sign_with("new", LEFT, "new-secret"))).is_ok());
        // The secret must be the one of the key named; an unknown key is refused.
        let crossed = v.verify(LEFT.as_bytes(), Some(&sign_with("new", LEFT, "old-secret")));
        assert!(matches!(crossed, Err(RejectedWebhook::Unauthenticated(_))));
        let unknown = v.verify(LEFT.as_bytes(), Some(&sign_with("gone", LEFT, "gone-secret")));
        assert!(
            matches!(unknown, Err(RejectedWebhook::Unauthenticated(ref why)) if why.contains("unknown key")),
            "{unknown:?}"
        );
        assert!(matches!(v.verify(LEFT.as_bytes(), Some("not-a-jwt")), Err(RejectedWebhook::Unauthenticated(_))));
    }

    const LEFT: &str = r#"{"event":"participant_left","room":{"sid":"RM_1","name":"room"},
        "participant":{"sid":"PA_1","identity":"alice","state":"DISCONNECTED","joinedAt":"1732550100",
        "disconnectReason":"MIGRATION"},"id":"EV_1","createdAt":"1732550200"}"#;

    #[test]
    fn accepts_a_signed_departure_and_classifies_its_reason() {
        let v = WebhookVerifier::new(&[("key".into(), "secret".into())]);
        let e = v.verify(LEFT.as_bytes(), Some(&sign(LEFT, "secret"))).unwrap();
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
        assert!(matches!(v.verify(LEFT.as_bytes(), None), Err(RejectedWebhook::Unauthenticated(_))));
        assert!(matches!(
            v.verify(LEFT.as_bytes(), Some(&sign(LEFT, "other"))),
            Err(RejectedWebhook::Unauthenticated(_))
        ));
        let tampered = LEFT.replace("PA_1", "PA_2");
        assert!(matches!(
            v.verify(tampered.as_bytes(), Some(&sign(LEFT, "secret"))),
            Err(RejectedWebhook::Unauthenticated(_))
        ));
    }

    #[test]
    fn an_unknown_reason_from_a_newer_livekit_is_a_final_departure() {
        let body = LEFT.replace("MIGRATION", "SOME_FUTURE_REASON");
        let v = WebhookVerifier::new(&[("key".into(), "secret".into())]);
        let e = v.verify(body.as_bytes(), Some(&format!("Bearer {}", sign(&body, "secret")))).unwrap();
        let SfuEventKind::ParticipantLeft { departure, .. } = e.kind else { panic!() };
        assert_eq!(departure, Departure::Final("SOME_FUTURE_REASON".into()));
    }

    /// A token as LiveKit would make it, or altered in one of the ways a forger or a broken
    /// sender might: what `livekit-api`'s receiver (the oracle) accepts, we accept, and nothing
    /// else; and what it decodes, we read the same.
    mod against_livekit_api {
        use super::*;
        use proptest::prelude::*;

        const NOW: u64 = 1_796_540_000;

        #[derive(Debug, Clone)]
        struct Variant {
            secret: &'static str,
            iss: Option<&'static str>,
            exp: Option<i64>,
            nbf: Option<i64>,
            alg: jsonwebtoken::Algorithm,
            hash_of_other_body: bool,
            sha256_garbage: bool,
            aud: bool,
            tamper: bool,
            bearer: bool,
        }

        fn variant() -> impl Strategy<Value = Variant> {
            (
                // Weighted so that about half the cases are authentic.
                (
                    prop_oneof![9 => Just("secret"), 1 => Just("other-secret")],
                    prop_oneof![8 => Just(Some("key")), 1 => Just(Some("nokey")), 1 => Just(None)],
                ),
                (
                    prop_oneof![1 => Just(None), 9 => (-200i64..400).prop_map(Some)],
                    prop_oneof![5 => Just(None), 5 => (-200i64..200).prop_map(Some)],
                ),
                prop_oneof![9 => Just(jsonwebtoken::Algorithm::HS256), 1 => Just(jsonwebtoken::Algorithm::HS384)],
                (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
            )
                .prop_map(|((secret, iss), (exp, nbf), alg, (other, garbage, aud, tamper, bearer))| {
                    Variant {
                        secret,
                        iss,
                        exp,
                        nbf,
                        alg,
                        // Rare, so that most cases get as far as the body.
                        hash_of_other_body: other && garbage && aud,
                        sha256_garbage: garbage && !other && tamper,
                        aud: aud && bearer && tamper,
                        tamper: tamper && other,
                        bearer,
                    }
                })
        }

        fn body() -> impl Strategy<Value = String> {
            let reason = prop_oneof![
                Just(r#""disconnectReason":"MIGRATION","#.to_owned()),
                Just(r#""disconnectReason":"CLIENT_INITIATED","#.to_owned()),
                Just(r#""disconnectReason":"SOME_FUTURE_REASON","#.to_owned()),
                (0i64..30).prop_map(|n| format!(r#""disconnectReason":{n},"#)),
                Just(String::new()),
            ];
            let event = prop::sample::select(vec![
                "participant_joined",
                "participant_left",
                "participant_connection_aborted",
                "room_finished",
                "track_published",
            ]);
            let joined = prop_oneof![
                Just(r#""joinedAt":"1732550100","#.to_owned()),
                Just(r#""joinedAt":"1732550100","joinedAtMs":"1732550100123","#.to_owned()),
                Just(String::new()),
            ];
            (event, reason, joined, "[a-z@:]{1,12}").prop_map(|(event, reason, joined, identity)| {
                format!(
                    r#"{{"event":"{event}","room":{{"sid":"RM_1","name":"room","emptyTimeout":300}},
                    "participant":{{"sid":"PA_1","identity":"{identity}","state":"ACTIVE",{joined}{reason}"tracks":[]}},
                    "id":"EV_1","createdAt":"1732550200"}}"#
                )
            })
        }

        fn token(v: &Variant, body: &str) -> String {
            let hashed = if v.hash_of_other_body { "something else" } else { body };
            let sha = STANDARD.encode(ring::digest::digest(&ring::digest::SHA256, hashed.as_bytes()));
            let mut claims = serde_json::json!({ "video": {} });
            if let Some(iss) = v.iss {
                claims["iss"] = iss.into();
            }
            if let Some(exp) = v.exp {
                claims["exp"] = (NOW as i64 + exp).into();
            }
            if let Some(nbf) = v.nbf {
                claims["nbf"] = (NOW as i64 + nbf).into();
            }
            claims["sha256"] = if v.sha256_garbage { "*not base64*".into() } else { sha.into() };
            if v.aud {
                claims["aud"] = "someone".into();
            }
            let key = jsonwebtoken::EncodingKey::from_secret(v.secret.as_bytes());
            let jwt = jsonwebtoken::encode(&jsonwebtoken::Header::new(v.alg), &claims, &key).unwrap();
            if v.bearer { format!("Bearer {jwt}") } else { jwt }
        }

        /// What the oracle decodes, in our terms: (event, room, room sid, id, identity, sid,
        /// joined ms, reason name).
        fn oracle_reading(e: &proto::WebhookEvent) -> (String, String, String, String, String, String, i64, String) {
            let room = e.room.clone().unwrap_or_default();
            let p = e.participant.clone().unwrap_or_default();
            let reason = proto::DisconnectReason::try_from(p.disconnect_reason)
                .map(|r| r.as_str_name().to_owned())
                .unwrap_or_else(|_| p.disconnect_reason.to_string());
            (
                e.event.clone(),
                room.name,
                room.sid,
                e.id.clone(),
                p.identity,
                p.sid,
                crate::livekit::joined_ms(p.joined_at_ms, p.joined_at),
                reason,
            )
        }

        fn our_reading(e: &SfuEvent) -> (String, String, String, String, String, String, i64, String) {
            let (identity, sid, joined, reason) = match &e.kind {
                SfuEventKind::ParticipantJoined(p) => (p.identity.clone(), p.sid.clone(), p.joined_at_ms, None),
                SfuEventKind::ParticipantLeft { participant: p, departure, .. } => {
                    (p.identity.clone(), p.sid.clone(), p.joined_at_ms, Some(departure.reason().to_owned()))
                }
                _ => Default::default(),
            };
            (
                e.kind.name().to_owned(),
                e.room.clone(),
                e.room_sid.clone(),
                e.id.clone(),
                identity,
                sid,
                joined,
                reason.unwrap_or_default(),
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]
            #[test]
            fn accepts_and_reads_what_livekit_api_does(v in variant(), body in body()) {
                let auth = token(&v, &body);
                let sent = if v.tamper { body.replacen("PA_1", "PA_2", 1) } else { body.clone() };
                let ours = WebhookVerifier::new(&[("key".into(), "secret".into())]).verify_at(sent.as_bytes(), Some(&auth), NOW);
                // The oracle reads the clock: its verdict is taken only where the token's times
                // are far from the edges (more than a few seconds from now ± the leeway).
                let edge = |t: Option<i64>| t.is_some_and(|t| (t.abs() - LEEWAY_SECS as i64).abs() < 5);
                let real_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                let shifted = token(&Variant { exp: v.exp.map(|e| e + (real_now - NOW) as i64), nbf: v.nbf.map(|n| n + (real_now - NOW) as i64), ..v.clone() }, &body);
                prop_assume!(!edge(v.exp) && !edge(v.nbf));
                // Stricter than the oracle where it is lax: with one key it takes a token that
                // names no issuer; we pick the key by its issuer, and LiveKit always names it.
                if v.iss.is_none() {
                    prop_assert!(matches!(ours, Err(RejectedWebhook::Unauthenticated(_))), "{:?}", ours);
                    return Ok(());
                }
                let receiver = livekit_api::webhooks::WebhookReceiver::new(livekit_api::access_token::TokenVerifier::with_api_key("key", "secret"));
                let token_only = shifted.trim().strip_prefix("Bearer ").unwrap_or(&shifted);
                let oracle = receiver.receive(&sent, token_only);
                match (&ours, &oracle) {
                    (Ok(e), Ok(o)) => {
                        let mut theirs = oracle_reading(o);
                        if !matches!(e.kind, SfuEventKind::ParticipantLeft { .. }) {
                            theirs.7 = String::new();
                        }
                        if matches!(e.kind, SfuEventKind::RoomFinished | SfuEventKind::Other(_)) {
                            (theirs.4, theirs.5, theirs.6) = Default::default();
                        }
                        if let SfuEventKind::Other(name) = &e.kind {
                            prop_assert_eq!(name, &theirs.0);
                            theirs.0 = "other".into();
                        }
                        prop_assert_eq!(our_reading(e), theirs);
                    }
                    // Authentic, but an enum value the oracle's protobuf types do not know: it
                    // gives up after verifying; we read the event (a departure: final).
                    (Ok(e), Err(livekit_api::webhooks::WebhookError::InvalidData(_))) => {
                        let known = ["MIGRATION", "CLIENT_INITIATED"].iter().any(|r| sent.contains(r));
                        prop_assert!(!known, "{}", sent);
                        if let SfuEventKind::ParticipantLeft { departure, .. } = &e.kind {
                            prop_assert!(matches!(departure, Departure::Final(_)), "{:?}", e);
                        }
                    }
                    (Err(RejectedWebhook::Unauthenticated(_)), Err(o)) => {
                        prop_assert!(!matches!(o, livekit_api::webhooks::WebhookError::InvalidData(_)), "{:?}", o);
                    }
                    (ours, oracle) => prop_assert!(false, "ours {:?}, livekit-api {:?}", ours, oracle),
                }
            }
        }
    }

    /// Fields of unexpected shapes (a newer or broken sender) are read as absent, never taken
    /// for a reason to refuse an authentic departure.
    #[test]
    fn odd_field_shapes_read_as_absent() {
        let v = WebhookVerifier::new(&[("key".into(), "secret".into())]);
        for (joined, reason) in [
            (r#"{"s":1}"#, r#"{"x":[1,2]}"#),
            ("[1,2]", "[\"MIGRATION\"]"),
            ("true", "null"),
            ("1.5", "2.5"),
            (r#""not a number""#, "false"),
        ] {
            let body = LEFT.replace(r#""1732550100""#, joined).replace(r#""MIGRATION""#, reason);
            let e = v.verify(body.as_bytes(), Some(&sign(&body, "secret"))).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(e.id, "EV_1", "the fields after them are read: {body}");
            let SfuEventKind::ParticipantLeft { participant, departure, .. } = e.kind else { panic!() };
            assert_eq!(participant.joined_at_ms, 0, "{body}");
            assert_eq!(departure, Departure::Final("UNKNOWN_REASON".into()), "{body}");
        }
    }

    #[test]
    fn signed_garbage_is_malformed_not_unauthenticated() {
        let v = WebhookVerifier::new(&[("key".into(), "secret".into())]);
        let body = "{not json";
        assert!(matches!(v.verify(body.as_bytes(), Some(&sign(body, "secret"))), Err(RejectedWebhook::Malformed(_))));
    }
}
