//! The engine's outbound ports, next to [`crate::store::Store`]: restarting and sending a
//! member's delayed event on its homeserver ([`DelayedEvents`]), asking LiveKit who is in a
//! room ([`Presence`]), and asking whether this instance may call for a job right now
//! ([`CallGate`]: always, alone; with several instances, while it surely holds the job's shard).
//!
//! The engine knows only these traits; the adapters that speak HTTP live with the party they
//! talk to ([`crate::homeserver::delayed_events::HomeserverCalls`],
//! [`crate::livekit::room_service::Listings`]), each with the metrics and logging of its calls.
//! Engine tests put fakes here (answers, delays, panics).

use async_trait::async_trait;

use crate::cluster::Shard;
use crate::delegation::Delegation;
use crate::lifecycle::HsAnswer;
use crate::livekit::Participant;

/// What is done to a delayed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DelayedAction {
    Restart,
    Send,
}

impl DelayedAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DelayedAction::Restart => "restart",
            DelayedAction::Send => "send",
        }
    }
}

/// The member's homeserver, as far as its delegated delayed event goes.
#[async_trait]
pub trait DelayedEvents: Send + Sync + 'static {
    /// Restarts or sends `delegation`'s delayed event; the answer is classified for the
    /// lifecycle. Never fails otherwise: a homeserver that cannot be reached is
    /// [`HsAnswer::Failed`].
    async fn call(&self, delegation: &Delegation, action: DelayedAction) -> HsAnswer;
}

/// LiveKit could not say who is in a room (unreachable, refused, undecodable answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("LiveKit could not be asked")]
pub struct Unobserved;

/// LiveKit's view of who is connected.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// The connected participants of LiveKit room `room` (none if the room does not exist).
    async fn participants(&self, room: &str) -> Result<Vec<Participant>, Unobserved>;
}

/// Whether this instance may call a homeserver for a job of `shard` right now: with several
/// instances, only while it surely holds the shard ([`crate::cluster::leases::Leases`]).
pub trait CallGate: Send + Sync {
    fn may_call(&self, shard: Shard, action: DelayedAction) -> bool;
}

/// The only instance: every call may be made.
pub struct Sole;

impl CallGate for Sole {
    fn may_call(&self, _: Shard, _: DelayedAction) -> bool {
        true
    }
}
