//! The engine's spawned work: homeserver calls, RoomService listings and looks at a shard's
//! inbox, each a task, and store commits, handed to the store; each reports back to the engine
//! loop exactly once.
//!
//! The registry has already counted each against its limit before it is spawned, so nothing
//! waits inside a task for a permit, and the report channel is sized to hold every report that
//! can be outstanding. Work that panics or is cancelled still reports (a failure), from the
//! guard it holds: a lost report would leave a call counted in flight forever.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{Instrument as _, error};

use super::registry::CallRef;
use crate::cluster::{EntryId, Shard};
use crate::delegation::Delegation;
use crate::lifecycle::{HsAnswer, Millis};
use crate::livekit::Participant;
use crate::metrics::{ActionLabel, Metrics, RedisOpLabel};
use crate::ports::{CallGate, DelayedAction, DelayedEvents, Presence, Unobserved};
use crate::store::{Fence, Store, StoreError, StoreOp};

/// What a task reports.
#[derive(Debug)]
pub enum Report {
    Call { call: CallRef, action: DelayedAction, answer: HsAnswer },
    Listing { room: Arc<str>, at: Millis, result: Result<Vec<Participant>, Unobserved> },
    Committed(Result<(), StoreError>),
    InboxLooked { shard: Shard, epoch: u64, result: Result<Option<EntryId>, StoreError> },
}

/// How long a failed look at an inbox waits before it reports (the registry then looks again).
const LOOK_RETRY: Duration = Duration::from_millis(250);

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

/// What a call goes through.
pub struct CallPorts {
    pub homeserver: Arc<dyn DelayedEvents>,
    pub gate: Arc<dyn CallGate>,
    pub metrics: Arc<Metrics>,
}

/// Spawns a restart or send of `delegation`'s delayed event, if the gate lets it through at the
/// last moment (else it counts as failed, and the job tries again later). Every line logged
/// about it names the job, the room and the member's identity.
pub fn call(
    ports: CallPorts,
    reports: mpsc::Sender<Report>,
    (call, shard, action): (CallRef, Shard, DelayedAction),
    delegation: Arc<Delegation>,
    identity: String,
) {
    let span = tracing::info_span!("call", job = %call.job, room = %delegation.room_id, identity);
    let failed = Report::Call { call, action, answer: HsAnswer::Failed };
    let guard = ReportGuard::new(reports, failed, "homeserver call");
    let task = async move {
        if !ports.gate.may_call(shard, action) {
            ports.metrics.calls_fenced.get_or_create(&ActionLabel { action: action.as_str() }).inc();
            tracing::warn!(shard = %shard, action = action.as_str(), "call not made: the lease on its shard is not sure");
            return; // the guard reports it failed
        }
        let answer = ports.homeserver.call(&delegation, action).await;
        guard.done(Report::Call { call, action, answer });
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

/// Spawns a look at the latest entry of `shard`'s inbox (held under `epoch`).
pub fn look_at_inbox(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    reports: mpsc::Sender<Report>,
    shard: Shard,
    epoch: u64,
) {
    let failed = Report::InboxLooked { shard, epoch, result: Err(StoreError("the look was cut short".into())) };
    let guard = ReportGuard::new(reports, failed, "inbox look");
    tokio::spawn(async move {
        let started = Instant::now();
        let result = store.latest_in_inbox(shard).await;
        let op = RedisOpLabel { op: "inbox_look" };
        metrics.redis_duration.get_or_create(&op).observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            tokio::time::sleep(LOOK_RETRY).await;
        }
        guard.done(Report::InboxLooked { shard, epoch, result });
    });
}

/// Starts a commit of `ops`, fenced if `fence` is given; its outcome is reported from wherever
/// the store finishes it.
pub fn commit(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    reports: mpsc::Sender<Report>,
    ops: Vec<StoreOp>,
    fence: Option<Fence>,
) {
    let failed = Report::Committed(Err(StoreError("the commit ended without an answer".into())));
    let guard = ReportGuard::new(reports, failed, "store commit");
    let started = Instant::now();
    store.start_commit(
        ops,
        fence,
        Box::new(move |result| {
            metrics.store_commit_duration.observe(started.elapsed().as_secs_f64());
            guard.done(Report::Committed(result));
        }),
    );
}
