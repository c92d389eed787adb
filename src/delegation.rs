//! What a client delegated to us: the delayed leave event, its member, and where to reach the
//! member's homeserver. Immutable for the life of a job; the durable record of a job is this plus
//! its [`crate::lifecycle::Durable`] phase.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity;

/// Identifies one job (one delegation) in logs, metrics, the store and the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl JobId {
    pub fn random() -> Self {
        JobId(rand::random())
    }
}

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

/// A validated delegation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    /// Matrix room of the call.
    pub room_id: String,
    /// MatrixRTC slot (`m.call#ROOM` for legacy calls).
    pub slot_id: String,
    /// The member's Matrix user id (authenticated).
    pub user_id: String,
    pub device_id: String,
    /// The MatrixRTC member id (`member.id`).
    pub member_id: String,
    /// The delayed leave event to keep alive, then send.
    pub delay_id: String,
    /// The delay it was scheduled with, in milliseconds.
    pub delay_ms: u64,
    /// Client-server API base URL of the member's homeserver, resolved by us (operator override
    /// or well-known), never taken from the request.
    pub cs_api_url: String,
    /// When we accepted the delegation (Unix milliseconds).
    pub created_at_ms: u64,
}

impl Delegation {
    /// The LiveKit room the member connects to.
    pub fn livekit_room(&self) -> String {
        identity::livekit_room(&self.room_id, &self.slot_id)
    }

    /// Every LiveKit identity the member may connect under.
    pub fn identities(&self) -> Vec<String> {
        identity::member_identities(&self.user_id, &self.device_id, &self.member_id)
    }

    /// The server name of the member's homeserver.
    pub fn server_name(&self) -> &str {
        self.user_id.split_once(':').map(|(_, s)| s).unwrap_or_default()
    }

    /// A newer delegation with the same key replaces this one: the same device of the same user
    /// in the same Matrix room writes the same membership, which a stale leave would overwrite.
    pub fn member_key(&self) -> (String, String, String) {
        (self.room_id.clone(), self.user_id.clone(), self.device_id.clone())
    }
}
