//! Where a verified webhook or a validated delegation goes: straight to this instance's engine
//! (a single instance), or into the inbox of its shard (several instances), to be applied there
//! by whichever instance holds the shard. Either way the caller is answered only once the
//! request is durable: stored by the engine's commit, or held by Redis.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use super::{EntryId, Inbound, Shard, shard_of};
use crate::delegation::{Delegation, JobId};
use crate::engine::{EngineError, EngineHandle, WebhookOutcome};
use crate::livekit::{SfuEvent, SfuEventKind};
use crate::metrics::{Metrics, RedisOpLabel};
use crate::store::StoreError;
use crate::store::redis::RedisStore;

#[derive(Clone)]
pub enum Intake {
    Engine(EngineHandle),
    Inbox { store: Arc<RedisStore>, metrics: Arc<Metrics> },
}

/// What became of an accepted request, for logs.
#[derive(Debug, Clone, Copy)]
pub enum Receipt {
    /// Stored as this job.
    Job(JobId),
    /// Queued as this entry of this shard's inbox.
    Queued(Shard, EntryId),
}

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Receipt::Job(id) => write!(f, "job {id}"),
            Receipt::Queued(shard, entry) => write!(f, "inbox of shard {shard}, entry {entry}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Intake {
    pub async fn delegate(&self, delegation: Delegation) -> Result<Receipt, IntakeError> {
        match self {
            Intake::Engine(engine) => Ok(Receipt::Job(engine.delegate(delegation).await?)),
            Intake::Inbox { store, metrics } => {
                let shard = shard_of(&delegation.livekit_room());
                queue(store, metrics, shard, Inbound::Delegation(delegation)).await
            }
        }
    }

    pub async fn webhook(&self, event: SfuEvent) -> Result<WebhookOutcome, IntakeError> {
        // Nothing acts on other events: not worth a round trip, to the engine or to Redis.
        if matches!(event.kind, SfuEventKind::Other(_)) {
            return Ok(WebhookOutcome::Ignored);
        }
        match self {
            Intake::Engine(engine) => Ok(engine.webhook(event).await?),
            Intake::Inbox { store, metrics } => {
                let shard = shard_of(&event.room);
                // Boxed: a Redis call's future is large, and inline it would make every
                // webhook handler's future (allocated per request) as large, one instance or many.
                Box::pin(queue(store, metrics, shard, Inbound::Webhook(event))).await?;
                Ok(WebhookOutcome::Queued)
            }
        }
    }
}

/// Appends `inbound` to `shard`'s inbox, timed.
async fn queue(store: &RedisStore, metrics: &Metrics, shard: Shard, inbound: Inbound) -> Result<Receipt, IntakeError> {
    let started = Instant::now();
    let pushed = store.push(shard, &inbound).await;
    metrics.redis_duration.get_or_create(&RedisOpLabel { op: "inbox_add" }).observe(started.elapsed().as_secs_f64());
    Ok(Receipt::Queued(shard, pushed?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Receipts name what an operator looks for in the store: the job, or the inbox entry.
    #[test]
    fn receipts_show_where_the_request_went() {
        assert_eq!(Receipt::Job(JobId(0x2a)).to_string(), "job 000000000000002a");
        let queued = Receipt::Queued(Shard(7), EntryId { ms: 1_700_000_000_000, seq: 3 });
        assert_eq!(queued.to_string(), "inbox of shard 7, entry 1700000000000-3");
    }
}
