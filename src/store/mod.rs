//! Durable job state behind one trait, so that the engine does not care where it lives.
//!
//! The engine writes a job when it is created (the delegation and its phase), whenever its durable
//! phase changes, and deletes it when the job ends. On start it loads every job and resumes it.
//! A commit is atomic: a delegation that supersedes another is stored in the same transaction that
//! deletes the old one, so a crash can never resurrect a superseded delay id.
//!
//! Shared by several instances (Redis), a commit is also *fenced*: it names the lease epoch of
//! every shard it touches, and is refused whole if another instance has taken one of them over
//! since ([`Store::commit_fenced`]). It also records how far each shard's inbox has been applied
//! ([`StoreOp::Consumed`]), in the same atomic step as the changes those entries caused.

#[cfg(test)]
pub mod conformance;
pub mod redis;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::cluster::{EntryId, Shard};
use crate::delegation::{Delegation, JobId};
use crate::lifecycle::Durable;

/// One stored job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: JobId,
    pub delegation: Delegation,
    pub state: Durable,
}

/// One change, applied atomically with the others of the same commit.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreOp {
    /// Boxed: a record is several times the size of the other changes, which are most of them.
    Insert(Box<JobRecord>),
    SetState(JobId, Durable),
    Delete(JobId),
    /// The inbox of `shard` has been applied up to `entry` (inclusive). Only shared stores have
    /// inboxes; the others ignore it.
    Consumed {
        shard: Shard,
        entry: EntryId,
    },
}

/// A LiveKit token issued to a Matrix user: who may connect as which identity in which LiveKit
/// room, until the token expires. What removing a user who left the Matrix room needs (a token's
/// identity is a hash: it does not say whose it is). Kept apart from jobs, by Matrix room and
/// user; written by the instance that issued the token, read by whichever follows the room.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Seat {
    pub room_id: String,
    pub user_id: String,
    pub livekit_room: String,
    pub identity: String,
    /// When the token expires (Unix ms): the seat is gone then.
    pub expires_at_ms: u64,
}

/// The leases a fenced commit is made under: this instance's name and, for each shard it
/// holds, the lease's epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub instance: String,
    pub epochs: Vec<(Shard, u64)>,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("store unavailable: {0}")]
pub struct StoreError(pub String);

/// Where a commit's outcome is told, once. Dropped without being called when the work that
/// holds it dies: its owner must then count the commit as failed.
pub type CommitDone = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Every stored job.
    async fn load(&self) -> Result<Vec<JobRecord>, StoreError>;
    /// Applies all `ops` atomically and durably, or none of them.
    async fn commit(&self, ops: Vec<StoreOp>) -> Result<(), StoreError>;
    /// Like [`Store::commit`], refused whole unless every shard the changes touch is held
    /// under `fence`. Only stores shared by several instances support it.
    async fn commit_fenced(&self, ops: Vec<StoreOp>, fence: &Fence) -> Result<(), StoreError> {
        let _ = (ops, fence);
        Err(StoreError("this store is not shared: it takes no fenced commits".into()))
    }
    /// Starts committing `ops` ([`Store::commit_fenced`] under `fence` when given, else
    /// [`Store::commit`]) and returns without waiting on the network or an fsync; `done` is
    /// told the outcome. By default from a task of its own; a store that works on a thread of
    /// its own tells it from there, and one that can finish a small commit in microseconds may
    /// do so before returning, telling `done` on the caller's thread.
    fn start_commit(self: Arc<Self>, ops: Vec<StoreOp>, fence: Option<Fence>, done: CommitDone) {
        tokio::spawn(async move {
            let result = match &fence {
                Some(fence) => self.commit_fenced(ops, fence).await,
                None => self.commit(ops).await,
            };
            done(result);
        });
    }
    /// The id of the latest entry in `shard`'s inbox (`None`: it is empty). Only stores shared
    /// by several instances have inboxes.
    async fn latest_in_inbox(&self, shard: Shard) -> Result<Option<EntryId>, StoreError> {
        let _ = shard;
        Err(StoreError("this store is not shared: it has no inboxes".into()))
    }
    /// Whether the store can be used right now.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Records `seat`, replacing the seat of the same LiveKit room and identity (a later token).
    async fn add_seat(&self, seat: &Seat) -> Result<(), StoreError> {
        let _ = seat;
        Err(StoreError("this store keeps no seats".into()))
    }
    /// The seats in Matrix room `room_id` not expired at `now_ms`: `user`'s, or everyone's; by
    /// user, LiveKit room and identity.
    async fn seats(&self, room_id: &str, user: Option<&str>, now_ms: u64) -> Result<Vec<Seat>, StoreError> {
        let _ = (room_id, user, now_ms);
        Err(StoreError("this store keeps no seats".into()))
    }
    /// The Matrix rooms with a seat not expired at `now_ms`, in order (expired seats are
    /// forgotten).
    async fn seated_rooms(&self, now_ms: u64) -> Result<Vec<String>, StoreError> {
        let _ = now_ms;
        Err(StoreError("this store keeps no seats".into()))
    }
}
