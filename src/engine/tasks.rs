//! The engine's spawned work: homeserver calls, RoomService listings and store commits, each a
//! task that reports back to the engine loop exactly once.
//!
//! The registry has already counted each against its limit before it is spawned, so nothing
//! waits inside a task for a permit, and the report channel is sized to hold every report that
//! can be outstanding. A task that panics or is cancelled still reports (a failure), from the
//! guard it holds: a lost report would leave a call counted in flight forever.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::{Instrument as _, error};

use crate::delegation::{Delegation, JobId};
use crate::lifecycle::{HsAnswer, Millis};
use crate::livekit::Participant;
use crate::metrics::Metrics;
use crate::ports::{DelayedAction, DelayedEvents, Presence, Unobserved};
use crate::store::{Store, StoreError, StoreOp};

/// What a task reports.
#[derive(Debug)]
pub enum Report {
    Call { job: JobId, call: u64, action: DelayedAction, answer: HsAnswer },
    Listing { room: Arc<str>, at: Millis, result: Result<Vec<Participant>, Unobserved> },
    Committed(Result<(), StoreError>),
}

/// Sends its report when dropped: the real one if the task got that far, else the failure it
/// was created with.
struct ReportGuard {
    tx: mpsc::Sender<Report>,
    report: Option<Report>,
    what: &'static str,
}

impl ReportGuard {
    fn new(tx: mpsc::Sender<Report>, failure: Report, what: &'static str) -> Self {
        ReportGuard { tx, report: Some(failure), what }
    }

    fn done(mut self, report: Report) {
        self.report = Some(report);
    }
}

impl Drop for ReportGuard {
    fn drop(&mut self) {
        let Some(report) = self.report.take() else { return };
        if std::thread::panicking() {
            error!(task = self.what, "task panicked; reported as failed");
        }
        // Never full: sized for every task that can be outstanding.
        if self.tx.try_send(report).is_err() && !self.tx.is_closed() {
            error!(task = self.what, "report channel full; report lost");
        }
    }
}

/// Spawns a restart or send of `delegation`'s delayed event. Every line logged about it names
/// the job, the room and the member's identity.
pub fn call(
    port: Arc<dyn DelayedEvents>,
    reports: mpsc::Sender<Report>,
    (job, call, action): (JobId, u64, DelayedAction),
    delegation: Arc<Delegation>,
    identity: String,
) {
    let span = tracing::info_span!("call", job = %job, room = %delegation.room_id, identity);
    let failed = Report::Call { job, call, action, answer: HsAnswer::Failed };
    let guard = ReportGuard::new(reports, failed, "homeserver call");
    let task = async move {
        let answer = port.call(&delegation, action).await;
        guard.done(Report::Call { job, call, action, answer });
    };
    tokio::spawn(task.instrument(span));
}

/// Spawns a listing of `room`, started at `at`.
pub fn list(port: Arc<dyn Presence>, reports: mpsc::Sender<Report>, room: Arc<str>, at: Millis) {
    let failed = Report::Listing { room: room.clone(), at, result: Err(Unobserved) };
    let guard = ReportGuard::new(reports, failed, "RoomService listing");
    tokio::spawn(async move {
        let result = port.participants(&room).await;
        guard.done(Report::Listing { room, at, result });
    });
}

/// Spawns a commit of `ops`.
pub fn commit(store: Arc<dyn Store>, metrics: Arc<Metrics>, reports: mpsc::Sender<Report>, ops: Vec<StoreOp>) {
    let failed = Report::Committed(Err(StoreError("the commit task ended without an answer".into())));
    let guard = ReportGuard::new(reports, failed, "store commit");
    tokio::spawn(async move {
        let started = Instant::now();
        let result = store.commit(ops).await;
        metrics.store_commit_duration.observe(started.elapsed().as_secs_f64());
        guard.done(Report::Committed(result));
    });
}
