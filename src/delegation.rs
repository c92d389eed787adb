//! What a client delegated to us: the delayed leave event, its member, and where to reach the
//! member's homeserver. Immutable for the life of a job; the durable record of a job is this plus
//! its [`crate::lifecycle::Durable`] phase.

use std::fmt;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::identity;

/// Identifies one job (one delegation) in logs, metrics, the store and the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for JobId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(JobId)
    }
}

/// Unix milliseconds now: delegation records' `created_at_ms`, the store's `updated_at_ms`.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// A delay id as logs show it. In OpenID mode the delay id is the capability to send or cancel
/// the member's leave, so logs carry only a fingerprint: enough to follow a job across lines and
/// to match a client's own record, useless to act on.
pub struct DelayRef<'a>(pub &'a str);

impl fmt::Display for DelayRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(self.0.as_bytes());
        write!(f, "#{:02x}{:02x}{:02x}{:02x}", digest[0], digest[1], digest[2], digest[3])
    }
}

/// How a delegation was made, which decides how its delayed event is managed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// MSC4195 OpenID mode: the member proved itself with an OpenID token; the delayed event is
    /// managed without authentication (the delay id is the capability).
    #[default]
    OpenId,
    /// Homeserver-proxied (MSC4512) mode: the member's own homeserver vouched for it; the delayed
    /// event is managed as its owner through the appservice (`as_token` + `user_id`).
    Appservice,
}

/// A validated delegation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    /// Matrix room of the call.
    pub room_id: CompactString,
    /// MatrixRTC slot (`m.call#ROOM` for legacy calls).
    pub slot_id: CompactString,
    /// The member's Matrix user id (authenticated).
    pub user_id: CompactString,
    /// Empty when the client named only its member id (homeserver-proxied form).
    pub device_id: CompactString,
    /// The MatrixRTC member id (`member.id`).
    pub member_id: CompactString,
    /// The delayed leave event to keep alive, then send.
    pub delay_id: CompactString,
    /// The delay it was scheduled with, in milliseconds.
    pub delay_ms: u64,
    /// Client-server API base URL of the member's homeserver, resolved by us (operator override
    /// or well-known), never taken from the request.
    pub cs_api_url: CompactString,
    /// When we accepted the delegation (Unix milliseconds).
    pub created_at_ms: u64,
    #[serde(default)]
    pub mode: Mode,
    /// The LiveKit identity this service minted for the member when the delegation came with its
    /// token request: then the only identity watched. `None` for a delegation made on its own
    /// (the member may hold a token from any service, under any of its identities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<CompactString>,
}

impl Delegation {
    /// The member's most specific identity, for logs (the first of [`Delegation::identities`]):
    /// the one minted with its token, else its hashed form with the device (without one, the
    /// two-part form). One hash, where the whole watch takes two to four.
    pub fn primary_identity(&self) -> String {
        match &self.identity {
            Some(minted) => minted.to_string(),
            None if self.device_id.is_empty() => identity::identity_two_part(&self.user_id, &self.member_id),
            None => identity::identity_three_part(&self.user_id, &self.device_id, &self.member_id),
        }
    }

    /// The LiveKit room the member connects to.
    pub fn livekit_room(&self) -> String {
        identity::livekit_room(&self.room_id, &self.slot_id)
    }

    /// Every LiveKit identity the member may connect under (without a device id, only the one
    /// that does not need it).
    pub fn identities(&self) -> Vec<String> {
        self.watch().identities(&self.user_id, &self.device_id)
    }

    /// The member's identities in compact form, for matching.
    pub fn watch(&self) -> identity::Watch {
        match &self.identity {
            Some(minted) => identity::Watch::Exact(minted.as_str().into()),
            None => identity::Watch::new(&self.user_id, &self.device_id, &self.member_id),
        }
    }

    /// The server name of the member's homeserver.
    pub fn server_name(&self) -> &str {
        self.user_id.split_once(':').map(|(_, s)| s).unwrap_or_default()
    }

    /// A newer delegation with the same key replaces this one: the same device of the same user
    /// in the same Matrix room writes the same membership, which a stale leave would overwrite.
    /// Without a device id, the member id is what the membership (and its leave) is keyed by.
    pub fn member_key(&self) -> (&str, &str, &str, &str) {
        let member = if self.device_id.is_empty() { self.member_id.as_str() } else { "" };
        (&self.room_id, &self.user_id, &self.device_id, member)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_show_a_fingerprint_of_the_delay_id_not_the_id() {
        let shown = DelayRef("syd_secretcapability").to_string();
        assert!(!shown.contains("secret") && shown.starts_with('#') && shown.len() == 9, "{shown}");
        assert_eq!(shown, DelayRef("syd_secretcapability").to_string());
        assert_ne!(shown, DelayRef("syd_other").to_string());
    }

    #[test]
    fn the_primary_identity_is_the_first_watched() {
        let d = |device: &str, minted: Option<&str>| Delegation {
            room_id: "!r:hs".into(),
            slot_id: "m.call#".into(),
            user_id: "@alice:example.com".into(),
            device_id: device.into(),
            member_id: "memberABC".into(),
            delay_id: "syd_1".into(),
            delay_ms: 10_000,
            cs_api_url: "https://hs".into(),
            created_at_ms: 0,
            mode: Mode::OpenId,
            identity: minted.map(Into::into),
        };
        let minted = identity::identity_legacy("@alice:example.com", "DEVICE123");
        for d in [d("DEVICE123", None), d("", None), d("D<&>", None), d("DEVICE123", Some(&minted))] {
            assert_eq!(d.primary_identity(), d.identities()[0], "{d:?}");
        }
        assert_eq!(d("DEVICE123", Some(&minted)).primary_identity(), minted);
        assert_eq!(
            d("DEVICE123", None).primary_identity(),
            identity::identity_three_part("@alice:example.com", "DEVICE123", "memberABC")
        );
    }
}
