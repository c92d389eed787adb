//! What the engine shows of itself: the operator's view of each job ([`JobSummary`], for
//! `rtc-leave-bridge jobs` and `/admin/jobs`) and the `jobs{state}` gauges.

use crate::delegation::{DelayRef, Delegation, JobId, Mode};
use crate::lifecycle::{Job, Millis, PhaseKind};
use crate::metrics::{Metrics, StateLabel};

/// One tracked job, for operators.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobSummary {
    pub id: String,
    pub room_id: String,
    pub livekit_room: String,
    pub user_id: String,
    pub device_id: String,
    pub member_id: String,
    /// A fingerprint of the delay id (`#` and 8 hex digits), as in the logs: the id itself is a
    /// capability (in OpenID mode anyone holding it can send the member's leave).
    pub delay_ref: String,
    pub mode: Mode,
    pub state: String,
    /// The LiveKit identity the job is bound to, once connected.
    pub identity: Option<String>,
    /// Milliseconds until the next restart (or send), if one is planned and not in flight.
    pub next_call_in_ms: Option<i64>,
    pub created_at_ms: u64,
}

impl JobSummary {
    pub fn of(id: JobId, d: &Delegation, livekit_room: &str, job: &Job, now: Millis) -> Self {
        JobSummary {
            id: id.to_string(),
            room_id: d.room_id.to_string(),
            livekit_room: livekit_room.to_owned(),
            user_id: d.user_id.to_string(),
            device_id: d.device_id.to_string(),
            member_id: d.member_id.to_string(),
            delay_ref: DelayRef(&d.delay_id).to_string(),
            mode: d.mode,
            state: job.kind().as_str().to_owned(),
            identity: job.binding().map(|b| b.identity.to_string()),
            next_call_in_ms: job.next_call().map(|t| t as i64 - now as i64),
            created_at_ms: d.created_at_ms,
        }
    }
}

/// Moves one job between the `jobs{state}` gauges (`None` and `Done` are not gauges).
pub fn move_gauge(metrics: &Metrics, from: Option<PhaseKind>, to: Option<PhaseKind>) {
    if from == to {
        return;
    }
    let gauge = |k: PhaseKind| metrics.jobs.get_or_create(&StateLabel { state: k.as_str() }).clone();
    if let Some(k) = from.filter(|k| *k != PhaseKind::Done) {
        gauge(k).dec();
    }
    if let Some(k) = to.filter(|k| *k != PhaseKind::Done) {
        gauge(k).inc();
    }
}
