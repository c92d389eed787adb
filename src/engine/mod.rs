//! The engine: one task that drives the [`registry::Registry`] (every job, its routing and
//! bookkeeping, a synchronous state machine) with commands from the HTTP handlers, reports of the
//! work it spawned, the registry's own deadlines and the reconciliation tick.
//!
//! The loop is the whole of it: take a bounded batch of one kind of input, feed it to the
//! registry with the time, then carry out the registry's effects — spawn calls and listings,
//! hand commits to the store ([`tasks`]), and answer requests. The task never waits on anything
//! but its inputs; in particular not on the store, which reports each commit's outcome as one of
//! them ([`crate::store::Store::start_commit`]). (The embedded store runs a small commit of
//! phase changes before it returns, when its connection is free: a write into the page cache
//! without fsync, cheaper than a hand-off to its thread; see [`crate::store::sqlite`].)
//!
//! With several instances ([`crate::cluster`]) the engine starts empty; the cluster's driver
//! hands it shards ([`EngineHandle::adopt`], [`EngineHandle::release`]) and their inbox entries
//! ([`EngineHandle::consume`]); every homeserver call passes the [`CallGate`] first, and commits are
//! fenced with this instance's name.
//!
//! Layout: [`registry`] (state machine), [`calls`] (its per-homeserver call queues), [`index`]
//! (its compact indexes), [`tasks`] (spawned
//! work), [`views`] (what operators see).

mod calls;
mod index;
pub mod registry;
mod tasks;
pub mod views;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

pub use registry::{Limits, Refusal, WebhookOutcome};
pub use views::JobSummary;

use crate::cluster::{EntryId, Inbound, Shard};
use crate::delegation::{Delegation, JobId};
use crate::lifecycle::{Millis, Timing};
use crate::livekit::SfuEvent;
use crate::metrics::{InputLabel, Metrics};
use crate::ports::{CallGate, DelayedEvents, Presence};
use crate::store::{Fence, JobRecord, Store, StoreError};
use registry::{Effect, Registry, Ticket};
use tasks::Report;

/// Inputs of one kind handled before the registry's effects are carried out.
const BATCH: usize = 256;

/// Engine settings that are not lifecycle timing.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub timing: Timing,
    /// How often every room with jobs is listed through RoomService.
    pub reconcile_interval: Duration,
    pub limits: Limits,
    /// With several instances, this one's name (the engine then starts with no shard, and its
    /// commits are fenced); `None` for a single instance, which loads and drives every job.
    pub instance: Option<String>,
    /// In appservice mode, its homeserver: a stored appservice job naming another is refused
    /// at load (its as_token would be shown to that server).
    pub appservice_server: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A delegation refused for what it is (not for the store): too many of its user's, or its
    /// delay id delegated for another member.
    #[error(transparent)]
    Refused(Refusal),
    #[error("the engine has stopped")]
    Stopped,
}

/// What the engine calls out to.
pub struct Ports {
    pub store: Arc<dyn Store>,
    pub homeserver: Arc<dyn DelayedEvents>,
    pub presence: Arc<dyn Presence>,
    pub metrics: Arc<Metrics>,
    /// Asked before every homeserver call ([`crate::ports::Sole`] for a single instance).
    pub gate: Arc<dyn CallGate>,
}

enum Command {
    Jobs(oneshot::Sender<Vec<JobSummary>>),
    Delegate(Delegation, oneshot::Sender<Result<JobId, EngineError>>),
    Webhook(SfuEvent, oneshot::Sender<Result<WebhookOutcome, EngineError>>),
    Shutdown(Duration, oneshot::Sender<()>),
    Adopt { shard: Shard, epoch: u64, applied: EntryId, records: Vec<JobRecord>, done: oneshot::Sender<()> },
    Release(Shard, oneshot::Sender<()>),
    Consume { shard: Shard, epoch: u64, entry: EntryId, inbound: Inbound },
}

/// What woke the engine loop.
enum Woken {
    Report(Report),
    Command(Command),
    Deadline,
    Reconcile,
}

/// A request waiting for the registry's answer.
enum Reply {
    Delegate(oneshot::Sender<Result<JobId, EngineError>>),
    Webhook(oneshot::Sender<Result<WebhookOutcome, EngineError>>),
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    rooms: Arc<WatchedRooms>,
}

/// The LiveKit rooms the registry has jobs in, kept by the engine from [`Effect::Watch`] and
/// read by the HTTP handlers: a webhook for any other room concerns nobody and is answered
/// without a round trip through the engine (a LiveKit shared with other applications sends
/// every room's webhooks).
#[derive(Default)]
struct WatchedRooms(std::sync::RwLock<HashSet<Arc<str>>>);

impl WatchedRooms {
    fn contains(&self, room: &str) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).contains(room)
    }

    fn set(&self, room: Arc<str>, watched: bool) {
        let mut rooms = self.0.write().unwrap_or_else(|e| e.into_inner());
        if watched {
            rooms.insert(room);
        } else {
            rooms.remove(&room);
        }
    }
}

impl EngineHandle {
    /// Stores the delegation (replacing an older one of the same member) and starts its job.
    pub async fn delegate(&self, delegation: Delegation) -> Result<JobId, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Delegate(delegation, tx)).await.map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Applies a verified webhook; returns once its effects are durable. One for a room without
    /// jobs is ignored at once.
    pub async fn webhook(&self, event: SfuEvent) -> Result<WebhookOutcome, EngineError> {
        if !self.rooms.contains(&event.room) {
            return Ok(WebhookOutcome::Ignored);
        }
        // A place in the queue first, then the command: a pending send would hold the whole
        // command in this future.
        let place = self.tx.reserve().await.map_err(|_| EngineError::Stopped)?;
        let (tx, rx) = oneshot::channel();
        place.send(Command::Webhook(event, tx));
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Every tracked job, oldest first.
    pub async fn jobs(&self) -> Result<Vec<JobSummary>, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Jobs(tx)).await.map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Takes shard `shard` over: resumes its stored jobs and takes its inbox in after `applied`.
    pub async fn adopt(
        &self,
        shard: Shard,
        epoch: u64,
        applied: EntryId,
        records: Vec<JobRecord>,
    ) -> Result<(), EngineError> {
        let (done, rx) = oneshot::channel();
        let cmd = Command::Adopt { shard, epoch, applied, records, done };
        self.tx.send(cmd).await.map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Gives shard `shard` up; returns once no call for its jobs will be started here.
    pub async fn release(&self, shard: Shard) -> Result<(), EngineError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Release(shard, done)).await.map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Hands over inbox entry `entry` of `shard`, read while it was held under `epoch`
    /// (applied if the shard is still held so, and the entry is new to it).
    pub async fn consume(&self, shard: Shard, epoch: u64, entry: EntryId, inbound: Inbound) -> Result<(), EngineError> {
        self.tx.send(Command::Consume { shard, epoch, entry, inbound }).await.map_err(|_| EngineError::Stopped)
    }

    /// Stops starting calls, waits up to `drain` for those in flight and for the store, and
    /// stops.
    pub async fn shutdown(&self, drain: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(drain, tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The engine's clock: Unix milliseconds as of the engine's start, advanced by the monotonic
/// clock from there (it never steps back with the wall clock). The times stored with a job (an
/// absence proof's listings, a grace period's end) so mean the same to its next holder (this
/// process restarted, or another instance), up to the machines' clock skew.
#[derive(Clone, Copy)]
struct Clock {
    origin: Instant,
    origin_ms: Millis,
}

impl Clock {
    fn start() -> Clock {
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Clock { origin: Instant::now(), origin_ms: unix.as_millis() as Millis }
    }
    fn now(&self) -> Millis {
        self.origin_ms + self.origin.elapsed().as_millis() as Millis
    }
    fn instant(&self, at: Millis) -> tokio::time::Instant {
        (self.origin + Duration::from_millis(at.saturating_sub(self.origin_ms))).into()
    }
}

/// What the engine is busy with, as `engine_busy_seconds{input}` names it.
#[derive(Clone, Copy)]
pub enum Input {
    Listing,
    Webhook,
    Delegation,
    CallAnswer,
    Commit,
    Timeouts,
    Reconcile,
    Effects,
    Jobs,
    Inbox,
    Adopt,
    Release,
}

impl Input {
    pub const ALL: [Input; 12] = [
        Input::Listing,
        Input::Webhook,
        Input::Delegation,
        Input::CallAnswer,
        Input::Commit,
        Input::Timeouts,
        Input::Reconcile,
        Input::Effects,
        Input::Jobs,
        Input::Inbox,
        Input::Adopt,
        Input::Release,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Input::Listing => "listing",
            Input::Webhook => "webhook",
            Input::Delegation => "delegation",
            Input::CallAnswer => "call_answer",
            Input::Commit => "commit",
            Input::Timeouts => "timeouts",
            Input::Reconcile => "reconcile",
            Input::Effects => "effects",
            Input::Jobs => "jobs",
            Input::Inbox => "inbox",
            Input::Adopt => "adopt",
            Input::Release => "release",
        }
    }

    /// Each input's histogram, by [`Input`] order: looked up once, not on every input.
    fn meters(metrics: &Metrics) -> [Histogram; Input::ALL.len()] {
        Input::ALL.map(|input| metrics.engine_busy.get_or_create(&InputLabel { input: input.as_str() }).clone())
    }
}

struct Engine {
    registry: Registry,
    busy_meters: [Histogram; Input::ALL.len()],
    ports: Ports,
    clock: Clock,
    replies: HashMap<Ticket, Reply>,
    next_ticket: u64,
    reports_tx: mpsc::Sender<Report>,
    instance: Option<String>,
    appservice_server: Option<String>,
    rooms: Arc<WatchedRooms>,
}

/// The stored jobs that may be resumed: an appservice job must belong to the appservice's own
/// homeserver (a job written into a shared store naming another would have the as_token sent
/// there); any other is refused, loudly, and left in the store for the operator.
fn loadable(records: Vec<JobRecord>, appservice_server: Option<&str>) -> Vec<JobRecord> {
    let Some(server) = appservice_server else { return records };
    records
        .into_iter()
        .filter(|r| {
            let d = &r.delegation;
            let ok = d.mode != crate::delegation::Mode::Appservice || d.server_name() == server;
            if !ok {
                error!(job = %r.id, user = %d.user_id, room = %d.room_id, appservice_server = server,
                    "stored appservice job of another homeserver refused at load: not resumed, left in the store");
            }
            ok
        })
        .collect()
}

/// Loads every stored job (a single instance; with several, jobs come with their shards),
/// resumes it, and starts the engine task.
pub async fn start(
    config: EngineConfig,
    ports: Ports,
) -> Result<(EngineHandle, tokio::task::JoinHandle<()>), StoreError> {
    let records = match config.instance {
        None => ports.store.load().await?,
        Some(_) => Vec::new(),
    };
    let records = loadable(records, config.appservice_server.as_deref());
    let (tx, rx) = mpsc::channel(4_096);
    // Room for every report that can be outstanding: each started call, listing, commit and look
    // at an inbox reports once, and the registry starts no more than its limits (one commit at a
    // time, one look per shard).
    let limits = &config.limits;
    let outstanding = limits.restarts + limits.sends + limits.listings + 1 + usize::from(crate::cluster::SHARDS);
    let (reports_tx, reports_rx) = mpsc::channel(outstanding);
    let clock = Clock::start();
    let mut registry = Registry::new(config.timing, config.limits, ports.metrics.clone());
    if config.instance.is_some() {
        registry = registry.sharded();
    }
    let count = records.len();
    let now = clock.now();
    for record in records {
        registry.resume(record, now);
    }
    if count > 0 {
        info!(jobs = count, "resumed stored jobs; reconciling them with LiveKit");
    }
    let instance = config.instance;
    let appservice_server = config.appservice_server;
    // Known before the task first runs: the listener may take webhooks before that.
    let rooms = Arc::new(WatchedRooms::default());
    for room in registry.rooms() {
        rooms.set(room, true);
    }
    let engine = Engine {
        busy_meters: Input::meters(&ports.metrics),
        registry,
        ports,
        clock,
        replies: HashMap::new(),
        next_ticket: 0,
        reports_tx,
        instance,
        appservice_server,
        rooms: rooms.clone(),
    };
    let task = tokio::spawn(engine.run(rx, reports_rx, config.reconcile_interval));
    Ok((EngineHandle { tx, rooms }, task))
}

impl Engine {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, mut reports: mpsc::Receiver<Report>, every: Duration) {
        let mut reconcile = tokio::time::interval(every);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reconcile.tick().await; // the first tick is immediate; resumed jobs probe by themselves
        let mut shutdown: Option<(tokio::time::Instant, oneshot::Sender<()>)> = None;
        // The registry's next deadline, kept across turns and moved only when it changes (a new
        // timer each turn would enter and leave the runtime's timer wheel every time).
        let deadline = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(deadline);
        let mut armed = None;
        let mut woken = None;
        loop {
            {
                // What one turn logs is written out together (see `crate::logging`); the batch
                // ends before the wait, as the task may resume on another thread.
                let _lines = crate::logging::Batch::start();
                match woken.take() {
                    Some(Woken::Report(report)) => {
                        self.on_report(report);
                        for _ in 0..BATCH {
                            match reports.try_recv() {
                                Ok(report) => self.on_report(report),
                                Err(_) => break,
                            }
                        }
                    }
                    Some(Woken::Command(cmd)) => {
                        shutdown = self.on_command(cmd);
                        for _ in 0..BATCH {
                            if shutdown.is_some() {
                                break;
                            }
                            match rx.try_recv() {
                                Ok(cmd) => shutdown = self.on_command(cmd),
                                Err(_) => break,
                            }
                        }
                    }
                    Some(Woken::Deadline) => {
                        let started = Instant::now();
                        self.registry.handle_timeout(self.clock.now());
                        self.busy(Input::Timeouts, started);
                    }
                    Some(Woken::Reconcile) => {
                        let started = Instant::now();
                        self.registry.reconcile();
                        self.busy(Input::Reconcile, started);
                    }
                    None => {}
                }
                self.carry_out();
            }
            if shutdown.is_some() && self.registry.calls_in_flight() == 0 && self.settled() {
                break;
            }
            let next = self.registry.poll_timeout().map(|at| self.clock.instant(at));
            if let Some(at) = next.filter(|at| armed != Some(*at)) {
                deadline.as_mut().reset(at);
                armed = Some(at);
            }
            let far = tokio::time::Instant::now() + Duration::from_secs(3600);
            // Unbiased: neither a stream of reports nor one of requests starves the other; each
            // is taken in a bounded batch before the effects are carried out.
            woken = Some(tokio::select! {
                Some(report) = reports.recv() => Woken::Report(report),
                cmd = rx.recv(), if shutdown.is_none() => match cmd {
                    Some(cmd) => Woken::Command(cmd),
                    None => break,
                },
                () = &mut deadline, if next.is_some() => {
                    armed = None; // elapsed: set again next turn, even to the same instant
                    Woken::Deadline
                }
                _ = reconcile.tick(), if shutdown.is_none() => Woken::Reconcile,
                () = tokio::time::sleep_until(shutdown.as_ref().map_or(far, |s| s.0)), if shutdown.is_some() => {
                    warn!(calls = self.registry.calls_in_flight(), "shutdown: drain time is up, calls still in flight");
                    break;
                }
            });
        }
        let left = self.registry.uncommitted();
        if left > 0 {
            error!(changes = left, "stopping with uncommitted changes; they are redone on start");
        }
        if let Some((_, done)) = shutdown {
            let _ = done.send(());
        }
        info!("engine stopped");
    }

    /// Whether the store has everything (nothing pending, nothing being committed).
    fn settled(&self) -> bool {
        self.registry.uncommitted() == 0 && !self.registry.is_committing()
    }

    fn ticket(&mut self, reply: Reply) -> Ticket {
        self.next_ticket += 1;
        let ticket = Ticket(self.next_ticket);
        self.replies.insert(ticket, reply);
        ticket
    }

    /// Records how long the engine was busy with one input.
    fn busy(&self, input: Input, started: Instant) {
        self.busy_meters[input as usize].observe(started.elapsed().as_secs_f64());
    }

    fn on_command(&mut self, cmd: Command) -> Option<(tokio::time::Instant, oneshot::Sender<()>)> {
        let started = Instant::now();
        let now = self.clock.now();
        match cmd {
            Command::Delegate(d, reply) => {
                let ticket = self.ticket(Reply::Delegate(reply));
                self.registry.delegate(d, ticket);
                self.busy(Input::Delegation, started);
            }
            Command::Webhook(event, reply) => {
                let ticket = self.ticket(Reply::Webhook(reply));
                self.registry.webhook(event, ticket, now);
                self.busy(Input::Webhook, started);
            }
            Command::Jobs(reply) => {
                let _ = reply.send(self.registry.summaries(now));
                self.busy(Input::Jobs, started);
            }
            Command::Adopt { shard, epoch, applied, records, done } => {
                let records = loadable(records, self.appservice_server.as_deref());
                self.registry.adopt(shard, epoch, applied, records, now);
                let _ = done.send(());
                self.busy(Input::Adopt, started);
            }
            Command::Release(shard, done) => {
                self.registry.release(shard);
                let _ = done.send(());
                self.busy(Input::Release, started);
            }
            Command::Consume { shard, epoch, entry, inbound } => {
                self.registry.consume(shard, epoch, entry, inbound, now);
                self.busy(Input::Inbox, started);
            }
            Command::Shutdown(drain, done) => {
                info!(calls = self.registry.calls_in_flight(), "shutdown: draining homeserver calls");
                self.registry.drain();
                return Some((tokio::time::Instant::now() + drain, done));
            }
        }
        None
    }

    fn on_report(&mut self, report: Report) {
        let started = Instant::now();
        let now = self.clock.now();
        let input = match report {
            Report::Call { call, action, answer } => {
                self.registry.call_answered(call, action, answer, now);
                Input::CallAnswer
            }
            Report::Listing { room, at, result } => {
                self.registry.listed(room, at, result, now);
                Input::Listing
            }
            Report::Committed(result) => {
                self.registry.committed(result, now);
                Input::Commit
            }
            Report::InboxLooked { shard, epoch, result } => {
                self.registry.inbox_looked(shard, epoch, result);
                Input::Inbox
            }
        };
        self.busy(input, started);
    }

    /// Lets the registry start what it may, and carries out its effects.
    fn carry_out(&mut self) {
        let started = Instant::now();
        self.carry_out_effects();
        self.busy(Input::Effects, started);
    }

    fn carry_out_effects(&mut self) {
        self.registry.flush(self.clock.now());
        while let Some(effect) = self.registry.poll_effect() {
            match effect {
                Effect::Call { call, shard, action, delegation, identity } => tasks::call(
                    tasks::CallPorts {
                        homeserver: self.ports.homeserver.clone(),
                        gate: self.ports.gate.clone(),
                        metrics: self.ports.metrics.clone(),
                    },
                    self.reports_tx.clone(),
                    (call, shard, action),
                    delegation,
                    identity,
                ),
                Effect::List { room, at } => {
                    tasks::list(self.ports.presence.clone(), self.reports_tx.clone(), room, at)
                }
                Effect::Commit { ops, fence } => {
                    let fence = match (&self.instance, fence) {
                        (Some(instance), Some(epochs)) => Some(Fence { instance: instance.clone(), epochs }),
                        _ => None,
                    };
                    let store = self.ports.store.clone();
                    tasks::commit(store, self.ports.metrics.clone(), self.reports_tx.clone(), ops, fence)
                }
                Effect::Watch { room, watched } => self.rooms.set(room, watched),
                Effect::LookAtInbox { shard, epoch } => tasks::look_at_inbox(
                    self.ports.store.clone(),
                    self.ports.metrics.clone(),
                    self.reports_tx.clone(),
                    shard,
                    epoch,
                ),
                // Inbox entries were answered when they were queued.
                Effect::Delegated { ticket: Ticket::INBOX, .. }
                | Effect::WebhookHandled { ticket: Ticket::INBOX, .. } => {}
                Effect::Delegated { ticket, result } => match self.replies.remove(&ticket) {
                    Some(Reply::Delegate(tx)) => {
                        let _ = tx.send(result.map_err(|r| match r {
                            Refusal::Store(e) => EngineError::Store(e),
                            r => EngineError::Refused(r),
                        }));
                    }
                    _ => error!(ticket = ticket.0, "no delegation waits for this answer"),
                },
                Effect::WebhookHandled { ticket, result } => match self.replies.remove(&ticket) {
                    Some(Reply::Webhook(tx)) => {
                        let _ = tx.send(result.map_err(EngineError::Store));
                    }
                    _ => error!(ticket = ticket.0, "no webhook waits for this answer"),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests;
