//! Everything about LiveKit, the source of truth on who is connected: verifying and decoding its
//! webhooks ([`webhook`]), asking its RoomService who is in a room and opening rooms
//! ([`room_service`]), and minting the tokens clients join with ([`token`]).

pub mod room_service;
pub mod token;
pub mod webhook;

/// One session of a participant as LiveKit reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Participant {
    pub identity: String,
    /// `PA_…`
    pub sid: String,
    /// When it joined, Unix milliseconds (`joinedAtMs`; from `joinedAt` seconds when a LiveKit
    /// too old to send milliseconds left it out). Orders sessions of one identity.
    pub joined_at_ms: i64,
}

/// A participant's join time in milliseconds from LiveKit's two fields (0 when absent).
pub fn joined_ms(joined_at_ms: i64, joined_at_secs: i64) -> i64 {
    if joined_at_ms != 0 { joined_at_ms } else { joined_at_secs.saturating_mul(1000) }
}

/// Why LiveKit says a participant left, as far as we need to know.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Departure {
    /// MIGRATION, SERVER_SHUTDOWN, DUPLICATE_IDENTITY: the member may reappear without a
    /// `participant_joined` webhook.
    MayReturn(String),
    /// Anything else, including reasons newer than this build knows.
    Final(String),
}

impl Departure {
    /// Classifies a DisconnectReason by its protobuf name.
    pub fn from_reason_name(name: &str) -> Departure {
        match name {
            "MIGRATION" | "SERVER_SHUTDOWN" | "DUPLICATE_IDENTITY" => Departure::MayReturn(name.into()),
            _ => Departure::Final(name.into()),
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Departure::MayReturn(r) | Departure::Final(r) => r,
        }
    }
}

/// A verified webhook, reduced to what the bridge acts on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SfuEvent {
    /// `EV_…`; LiveKit may deliver an event more than once.
    pub id: String,
    /// LiveKit room name.
    pub room: String,
    /// `RM_…`: the instance of the room.
    pub room_sid: String,
    pub kind: SfuEventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SfuEventKind {
    ParticipantJoined(Participant),
    /// `participant_left`, or `participant_connection_aborted` (`aborted`).
    ParticipantLeft {
        participant: Participant,
        departure: Departure,
        aborted: bool,
    },
    RoomFinished,
    /// Any other event (track_published, egress_*, …), by name.
    Other(String),
}

impl SfuEventKind {
    /// The webhook's `event` name, for logs and metrics.
    pub fn name(&self) -> &str {
        match self {
            SfuEventKind::ParticipantJoined(_) => "participant_joined",
            SfuEventKind::ParticipantLeft { aborted: false, .. } => "participant_left",
            SfuEventKind::ParticipantLeft { aborted: true, .. } => "participant_connection_aborted",
            SfuEventKind::RoomFinished => "room_finished",
            SfuEventKind::Other(_) => "other",
        }
    }
}
