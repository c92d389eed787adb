//! The async shell around the lifecycle: one task that owns every job, the deadline scheduler and
//! the indexes from LiveKit identities to jobs.
//!
//! HTTP handlers talk to it through an [`EngineHandle`]. Webhooks are routed to the jobs watching
//! the participant's identity, applied, and acknowledged only after the resulting state is
//! committed to the store (several webhooks share one commit when they arrive together).
//! Delegations are committed before they take effect. Homeserver and RoomService calls run as
//! spawned tasks whose answers come back to this task as events; the task itself never waits on
//! anything but the store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::delegation::Mode;
use crate::delegation::{DelayRef, Delegation, JobId};
use crate::homeserver::Discovery;
use crate::homeserver::delayed_events::{self, Caller, DelayedAction, PathStyles};
use crate::homeserver::discovery::Endpoint;
use crate::identity::Watch;
use crate::lifecycle::{Action, Event, HsAnswer, Job, LeaveReason, Millis, Outcome, PhaseKind, Session, Timing};
use crate::livekit::room_service::RoomService;
use crate::livekit::{Departure, Participant, SfuEvent, SfuEventKind};
use crate::metrics::{ActionLabels, CallLabels, Metrics, OutcomeLabel, StateLabel, TriggerLabel};
use crate::scheduler::Scheduler;

mod index;
use crate::store::{JobRecord, Store, StoreError, StoreOp};
use index::HashIndex;

/// Webhook ids remembered to drop LiveKit's duplicate deliveries.
const SEEN_WEBHOOKS: usize = 16_384;
/// Commands handled before the results of one store commit are awaited.
const BATCH: usize = 256;
/// Restart requests in flight at most, across homeservers.
const MAX_CONCURRENT_RESTARTS: usize = 512;

/// Engine settings that are not lifecycle timing.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub timing: Timing,
    /// How often every room with jobs is listed through RoomService.
    pub reconcile_interval: Duration,
    /// Timeout of each homeserver request.
    pub request_timeout: Duration,
}

/// How a webhook was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// It concerned at least one job and was applied.
    Applied,
    /// No job watches this participant or room, or the event is of a kind we do not act on.
    Ignored,
    /// Delivered before (LiveKit retries); nothing done.
    Duplicate,
}

impl WebhookOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookOutcome::Applied => "accepted",
            WebhookOutcome::Ignored => "ignored",
            WebhookOutcome::Duplicate => "duplicate",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the engine has stopped")]
    Stopped,
}

/// One tracked job, for operators (`rtc-leave-bridge jobs`).
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

enum Command {
    Jobs(oneshot::Sender<Vec<JobSummary>>),
    Delegate(Delegation, oneshot::Sender<Result<JobId, EngineError>>),
    Webhook(SfuEvent, oneshot::Sender<Result<WebhookOutcome, EngineError>>),
    Shutdown(Duration, oneshot::Sender<()>),
}

/// Answers of spawned calls.
enum Report {
    Homeserver { job: JobId, call: u64, action: DelayedAction, answer: HsAnswer },
    Listing { room: Arc<str>, at: Millis, result: Result<Vec<Participant>, ()> },
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
}

impl EngineHandle {
    /// Stores the delegation (replacing an older one of the same member) and starts its job.
    pub async fn delegate(&self, delegation: Delegation) -> Result<JobId, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Delegate(delegation, tx)).await.map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Applies a verified webhook; returns once its effects are durable.
    pub async fn webhook(&self, event: SfuEvent) -> Result<WebhookOutcome, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Webhook(event, tx)).await.map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Every tracked job, oldest first.
    pub async fn jobs(&self) -> Result<Vec<JobSummary>, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Jobs(tx)).await.map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Stops issuing calls, waits up to `drain` for those in flight, commits, and stops.
    pub async fn shutdown(&self, drain: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(drain, tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Monotonic milliseconds since the engine started.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> Millis {
        self.0.elapsed().as_millis() as Millis
    }
    fn instant(&self, at: Millis) -> tokio::time::Instant {
        (self.0 + Duration::from_millis(at)).into()
    }
}

/// Where a webhook's outcome goes once its effects are durable.
type WebhookReply = oneshot::Sender<Result<WebhookOutcome, EngineError>>;

/// A delegation waiting for the commit that makes it durable.
struct Staged {
    id: JobId,
    delegation: Delegation,
    /// The job of the same member it replaces (tracked, or staged earlier in the same batch).
    replaces: Option<JobId>,
    /// Everyone who asked for it (a client may repeat itself within one batch).
    replies: Vec<oneshot::Sender<Result<JobId, EngineError>>>,
}

struct Entry {
    job: Job,
    delegation: Arc<Delegation>,
    room: Arc<str>,
    /// The LiveKit identities the member may connect under.
    watch: Watch,
    /// Where the member's homeserver is (`None`: the stored address is no longer acceptable).
    endpoint: Option<Arc<Endpoint>>,
}

impl Entry {
    /// The LiveKit identity to name in logs: the bound one, else the first one watched.
    fn identity(&self) -> String {
        match self.job.binding() {
            Some(b) => b.identity.clone(),
            None => self.watch.primary(),
        }
    }

    /// Whether `identity` is one of the member's.
    fn watches(&self, identity: &str) -> bool {
        self.watch.matches(identity, &self.delegation.user_id, &self.delegation.device_id)
    }
}

/// What the engine calls out to.
pub struct Outside {
    pub store: Arc<dyn Store>,
    pub discovery: Arc<Discovery>,
    pub path_styles: Arc<PathStyles>,
    /// The appservice's token, for jobs delegated through the homeserver.
    pub as_token: Option<Arc<str>>,
    pub room_service: RoomService,
    pub metrics: Arc<Metrics>,
}

struct Engine {
    config: EngineConfig,
    /// The lifecycle timing, shared by every job.
    timing: Arc<Timing>,
    out: Outside,
    clock: Clock,
    /// Boxed: the table's slack then costs a pointer per slot, not a whole entry.
    jobs: HashMap<JobId, Box<Entry>>,
    /// (LiveKit room, identity) → the jobs watching it.
    by_identity: HashIndex,
    by_room: HashMap<Arc<str>, HashSet<JobId>>,
    /// [`Delegation::member_key`] → the member's job.
    by_member: HashIndex,
    /// (server name, delay id) → its job.
    by_delay: HashIndex,
    /// One endpoint per homeserver URL, shared by its jobs.
    endpoints: HashMap<String, Option<Arc<Endpoint>>>,
    scheduler: Scheduler<JobId>,
    listings_in_flight: HashSet<Arc<str>>,
    listings_wanted: HashSet<Arc<str>>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    /// Store changes not yet committed, in order.
    pending: Vec<StoreOp>,
    /// Delegations to store in the next commit, in arrival order.
    staged: Vec<Staged>,
    /// Webhooks waiting for `pending` to be committed.
    waiting: Vec<(String, WebhookOutcome, WebhookReply)>,
    reports_tx: mpsc::UnboundedSender<Report>,
    calls_in_flight: usize,
    /// Bounds concurrent restarts (a cold start with many jobs restarts them all at once).
    restart_permits: Arc<tokio::sync::Semaphore>,
    draining: bool,
}

/// Loads every stored job, resumes it, and starts the engine task.
pub async fn start(
    config: EngineConfig,
    out: Outside,
) -> Result<(EngineHandle, tokio::task::JoinHandle<()>), StoreError> {
    let records = out.store.load().await?;
    let (tx, rx) = mpsc::channel(4_096);
    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let mut engine = Engine {
        timing: Arc::new(config.timing.clone()),
        config,
        out,
        clock: Clock(Instant::now()),
        jobs: HashMap::new(),
        by_identity: HashIndex::default(),
        by_room: HashMap::new(),
        by_member: HashIndex::default(),
        by_delay: HashIndex::default(),
        endpoints: HashMap::new(),
        scheduler: Scheduler::default(),
        listings_in_flight: HashSet::new(),
        listings_wanted: HashSet::new(),
        seen: HashSet::new(),
        seen_order: VecDeque::new(),
        pending: Vec::new(),
        staged: Vec::new(),
        waiting: Vec::new(),
        reports_tx,
        calls_in_flight: 0,
        restart_permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_RESTARTS)),
        draining: false,
    };
    let count = records.len();
    let now = engine.clock.now();
    for record in records {
        let delegation = Arc::new(record.delegation);
        let (job, actions) = Job::resume(delegation.delay_ms, record.id.0, engine.timing.clone(), record.state, now);
        engine.insert(record.id, job, delegation);
        engine.run(record.id, actions);
    }
    if count > 0 {
        info!(jobs = count, "resumed stored jobs; reconciling them with LiveKit");
    }
    let task = tokio::spawn(engine.main_loop(rx, reports_rx));
    Ok((EngineHandle { tx }, task))
}

impl Engine {
    async fn main_loop(mut self, mut rx: mpsc::Receiver<Command>, mut reports: mpsc::UnboundedReceiver<Report>) {
        let mut reconcile = tokio::time::interval(self.config.reconcile_interval);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reconcile.tick().await; // the first tick is immediate; resumed jobs probe by themselves
        let mut shutdown: Option<(tokio::time::Instant, oneshot::Sender<()>)> = None;
        loop {
            let next = self.scheduler.next_deadline().map(|at| self.clock.instant(at));
            let retry_store = !self.pending.is_empty();
            // Unbiased: neither a stream of homeserver answers nor one of webhooks starves the
            // other; each branch handles a bounded batch before the commit.
            tokio::select! {
                Some(report) = reports.recv() => {
                    self.on_report(report);
                    for _ in 0..BATCH {
                        match reports.try_recv() {
                            Ok(report) => self.on_report(report),
                            Err(_) => break,
                        }
                    }
                }
                cmd = rx.recv(), if shutdown.is_none() => {
                    let Some(cmd) = cmd else { break };
                    if let Some(stop) = self.on_command(cmd).await {
                        shutdown = Some(stop);
                    }
                    for _ in 0..BATCH {
                        match rx.try_recv() {
                            Ok(cmd) => if let Some(stop) = self.on_command(cmd).await {
                                shutdown = Some(stop);
                                break;
                            },
                            Err(_) => break,
                        }
                    }
                }
                _ = tokio::time::sleep_until(next.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600))), if next.is_some() => {
                    self.on_timeouts();
                }
                _ = reconcile.tick(), if !self.draining => self.reconcile_all(),
                _ = tokio::time::sleep(Duration::from_millis(500)), if retry_store => {}
                _ = tokio::time::sleep_until(shutdown.as_ref().map(|s| s.0).unwrap_or_else(tokio::time::Instant::now)), if shutdown.is_some() => {
                    warn!(calls = self.calls_in_flight, "shutdown: drain time is up, calls still in flight");
                    break;
                }
            }
            self.flush().await;
            if shutdown.is_some() && self.calls_in_flight == 0 {
                break;
            }
        }
        self.flush().await;
        if !self.pending.is_empty() {
            error!(changes = self.pending.len(), "stopping with uncommitted changes; they are redone on start");
        }
        if let Some((_, done)) = shutdown {
            let _ = done.send(());
        }
        info!("engine stopped");
    }

    async fn on_command(&mut self, cmd: Command) -> Option<(tokio::time::Instant, oneshot::Sender<()>)> {
        match cmd {
            Command::Delegate(d, reply) => self.stage_delegation(d, reply),
            Command::Webhook(event, reply) => self.webhook(event, reply),
            Command::Jobs(reply) => {
                let _ = reply.send(self.summaries());
            }
            Command::Shutdown(drain, done) => {
                info!(calls = self.calls_in_flight, "shutdown: draining homeserver calls");
                self.draining = true;
                return Some((tokio::time::Instant::now() + drain, done));
            }
        }
        None
    }

    // ---- delegations ------------------------------------------------------------------------

    /// Stages a delegation for the next commit: it takes effect (and is answered) only once
    /// durable, together with the other delegations and webhooks of the same batch.
    fn stage_delegation(&mut self, d: Delegation, reply: oneshot::Sender<Result<JobId, EngineError>>) {
        let server = d.server_name().to_owned();
        if let Some(id) = self.tracked_delay(&server, &d.delay_id) {
            debug!(job = %id, room = %d.room_id, identity = %d.identities()[0], delay_id = %DelayRef(&d.delay_id),
                "delegation repeated; already tracked");
            self.out.metrics.delegations.get_or_create(&OutcomeLabel { outcome: "repeated" }).inc();
            let _ = reply.send(Ok(id));
            return;
        }
        if let Some(s) =
            self.staged.iter_mut().find(|s| s.delegation.server_name() == server && s.delegation.delay_id == d.delay_id)
        {
            s.replies.push(reply); // repeated within the batch
            return;
        }
        let key = d.member_key();
        let replaces = self
            .staged
            .iter()
            .rev()
            .find(|s| s.delegation.member_key() == key)
            .map(|s| s.id)
            .or_else(|| self.tracked_member(&d));
        self.staged.push(Staged { id: JobId::random(), delegation: d, replaces, replies: vec![reply] });
    }

    /// Starts a delegation whose record (and its predecessor's deletion) is committed.
    fn apply_delegation(&mut self, staged: Staged) {
        let Staged { id, delegation: d, replaces, replies } = staged;
        if let Some(old) = replaces {
            if let Some(entry) = self.jobs.get(&old) {
                info!(job = %old, room = %entry.delegation.room_id, identity = entry.identity(),
                    user = %entry.delegation.user_id, delay_id = %DelayRef(&entry.delegation.delay_id), new_job = %id,
                    "superseded by a newer delegation; its delay id will not be sent");
            }
            let actions = self.step(old, |job, out| out.extend(job.supersede()));
            self.run_committed(old, actions);
        }
        let delegation = Arc::new(d);
        let (job, actions) = Job::new(delegation.delay_ms, id.0, self.timing.clone(), self.clock.now());
        info!(
            job = %id, room = %delegation.room_id, identity = %delegation.identities()[0],
            livekit_room = %delegation.livekit_room(), user = %delegation.user_id, device = %delegation.device_id,
            delay_id = %DelayRef(&delegation.delay_id), delay_ms = delegation.delay_ms, mode = ?delegation.mode,
            "delegation accepted"
        );
        self.out
            .metrics
            .delegations
            .get_or_create(&OutcomeLabel { outcome: if replaces.is_some() { "replaced" } else { "accepted" } })
            .inc();
        self.insert(id, job, delegation);
        self.run_committed(id, actions);
        for reply in replies {
            let _ = reply.send(Ok(id));
        }
    }

    /// Runs actions whose durable effects are already committed (the job's insert, or the
    /// delete of the job it superseded).
    fn run_committed(&mut self, id: JobId, actions: Vec<Action>) {
        let actions = actions.into_iter().filter(|a| !matches!(a, Action::Persist)).collect::<Vec<_>>();
        let finishes = actions.iter().any(|a| matches!(a, Action::Finish(_)));
        self.run(id, actions);
        if finishes && matches!(self.pending.last(), Some(StoreOp::Delete(d)) if *d == id) {
            self.pending.pop();
        }
    }

    fn insert(&mut self, id: JobId, job: Job, delegation: Arc<Delegation>) {
        // One allocation per LiveKit room, shared by its jobs.
        let name = delegation.livekit_room();
        let room = self.by_room.get_key_value(name.as_str()).map(|(k, _)| k.clone()).unwrap_or_else(|| name.into());
        let watch = delegation.watch();
        let identities = watch.identities(&delegation.user_id, &delegation.device_id);
        for identity in &identities {
            self.by_identity.insert(&(&*room, identity.as_str()), id);
        }
        self.by_room.entry(room.clone()).or_default().insert(id);
        self.by_member.insert(&delegation.member_key(), id);
        self.by_delay.insert(&(delegation.server_name(), delegation.delay_id.as_str()), id);
        self.gauge_move(None, Some(job.kind()));
        let endpoint = match self.endpoints.get(&delegation.cs_api_url) {
            Some(e) => e.clone(),
            None => {
                let e = match self
                    .out
                    .discovery
                    .cs_endpoint_for_stored(delegation.server_name(), &delegation.cs_api_url)
                {
                    Ok(e) => Some(Arc::new(e)),
                    Err(e) => {
                        error!(job = %id, room = %delegation.room_id, identity = %identities[0], user = %delegation.user_id,
                            error = %e, "cannot call the member's homeserver; its delayed leave is left to the homeserver's timer");
                        None
                    }
                };
                self.endpoints.insert(delegation.cs_api_url.clone(), e.clone());
                e
            }
        };
        self.jobs.insert(id, Box::new(Entry { job, delegation, room, watch, endpoint }));
    }

    fn remove(&mut self, id: JobId) -> Option<Box<Entry>> {
        let entry = self.jobs.remove(&id)?;
        for identity in entry.watch.identities(&entry.delegation.user_id, &entry.delegation.device_id) {
            self.by_identity.remove(&(&*entry.room, identity.as_str()), id);
        }
        if let Some(ids) = self.by_room.get_mut(&entry.room) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_room.remove(&entry.room);
            }
        }
        let d = &entry.delegation;
        self.by_member.remove(&d.member_key(), id);
        self.by_delay.remove(&(d.server_name(), d.delay_id.as_str()), id);
        self.scheduler.set(id, None);
        Some(entry)
    }

    /// The tracked job of `delay_id` on `server`, if any.
    fn tracked_delay(&self, server: &str, delay_id: &str) -> Option<JobId> {
        self.by_delay.candidates(&(server, delay_id)).iter().copied().find(|id| {
            self.jobs.get(id).is_some_and(|e| e.delegation.server_name() == server && e.delegation.delay_id == delay_id)
        })
    }

    /// The tracked job of the same member as `d`, if any.
    fn tracked_member(&self, d: &Delegation) -> Option<JobId> {
        let key = d.member_key();
        self.by_member
            .candidates(&key)
            .iter()
            .copied()
            .find(|id| self.jobs.get(id).is_some_and(|e| e.delegation.member_key() == key))
    }

    // ---- webhooks ---------------------------------------------------------------------------

    fn webhook(&mut self, event: SfuEvent, reply: oneshot::Sender<Result<WebhookOutcome, EngineError>>) {
        if !event.id.is_empty() && self.seen.contains(&event.id) {
            let _ = reply.send(Ok(WebhookOutcome::Duplicate));
            return;
        }
        let room: Arc<str> = event.room.as_str().into();
        let now = self.clock.now();
        let mut targets: Vec<(JobId, Event)> = Vec::new();
        match &event.kind {
            SfuEventKind::ParticipantJoined(p) => {
                for id in self.watching(&room, &p.identity) {
                    targets.push((id, Event::Joined(session(p, &event.room_sid))));
                }
            }
            SfuEventKind::ParticipantLeft { participant: p, departure, .. } => {
                let reason = match departure {
                    Departure::MayReturn(_) => LeaveReason::MayReturn,
                    Departure::Final(_) => LeaveReason::Final,
                };
                for id in self.watching(&room, &p.identity) {
                    targets.push((id, Event::Left { session: session(p, &event.room_sid), reason }));
                }
            }
            SfuEventKind::RoomFinished => {
                for &id in self.by_room.get(&room).into_iter().flatten() {
                    targets.push((id, Event::RoomFinished { room_sid: event.room_sid.clone() }));
                }
            }
            SfuEventKind::Other(_) => {}
        }
        let outcome = if targets.is_empty() { WebhookOutcome::Ignored } else { WebhookOutcome::Applied };
        for (id, ev) in targets {
            if let Some(entry) = self.jobs.get(&id) {
                info!(
                    job = %id, room = %entry.delegation.room_id, identity = participant_identity(&event.kind).unwrap_or_else(|| entry.identity()),
                    sid = participant_sid(&event.kind), event = event.kind.name(), webhook = %event.id,
                    livekit_room = %entry.room, user = %entry.delegation.user_id,
                    reason = departure_reason(&event.kind), "webhook for a tracked member"
                );
            }
            self.apply(id, ev, now);
        }
        self.waiting.push((event.id, outcome, reply));
    }

    fn watching(&self, room: &Arc<str>, identity: &str) -> Vec<JobId> {
        self.by_identity
            .candidates(&(&**room, identity))
            .iter()
            .copied()
            .filter(|id| self.jobs.get(id).is_some_and(|e| e.room == *room && e.watches(identity)))
            .collect()
    }

    fn remember_webhook(&mut self, id: String) {
        if id.is_empty() || !self.seen.insert(id.clone()) {
            return;
        }
        self.seen_order.push_back(id);
        if self.seen_order.len() > SEEN_WEBHOOKS {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    // ---- reports of spawned calls -----------------------------------------------------------

    fn on_report(&mut self, report: Report) {
        let now = self.clock.now();
        match report {
            Report::Homeserver { job, call, action, answer } => {
                self.calls_in_flight -= 1;
                let event = match action {
                    DelayedAction::Restart => Event::Restarted { call, answer },
                    DelayedAction::Send => Event::SendAnswered { call, answer },
                };
                self.apply(job, event, now);
            }
            Report::Listing { room, at, result } => {
                self.listings_in_flight.remove(&room);
                let ids: Vec<JobId> = self.by_room.get(&room).into_iter().flatten().copied().collect();
                for id in ids {
                    let Some(entry) = self.jobs.get(&id) else { continue };
                    let event = match &result {
                        Ok(participants) => Event::Observed {
                            at,
                            present: participants
                                .iter()
                                .filter(|p| entry.watches(&p.identity))
                                .map(|p| session(p, ""))
                                .collect(),
                        },
                        Err(()) => Event::ObservationFailed,
                    };
                    self.apply(id, event, now);
                }
                if self.listings_wanted.remove(&room) {
                    self.list(room);
                }
            }
        }
    }

    fn on_timeouts(&mut self) {
        let now = self.clock.now();
        for id in self.scheduler.pop_due(now) {
            let actions = self.step(id, |job, out| job.handle_timeout(now, out));
            self.run(id, actions);
        }
    }

    fn reconcile_all(&mut self) {
        self.out.metrics.reconciliations.inc();
        let rooms: Vec<Arc<str>> = self.by_room.keys().cloned().collect();
        debug!(rooms = rooms.len(), "reconciling with LiveKit");
        for room in rooms {
            self.list(room);
        }
    }

    // ---- driving jobs -----------------------------------------------------------------------

    fn apply(&mut self, id: JobId, event: Event, now: Millis) {
        // A job that ended may still get a late answer or a listing: it is moot.
        let actions = self.step(id, |job, out| job.handle(event, now, out));
        self.run(id, actions);
    }

    /// Lets job `id` (if it still exists) take one step, keeping the state gauges in step.
    fn step(&mut self, id: JobId, f: impl FnOnce(&mut Job, &mut Vec<Action>)) -> Vec<Action> {
        let Some(entry) = self.jobs.get_mut(&id) else { return Vec::new() };
        let before = entry.job.kind();
        let mut actions = Vec::new();
        f(&mut entry.job, &mut actions);
        let after = entry.job.kind();
        self.gauge_move(Some(before), Some(after));
        actions
    }

    /// Carries out a job's actions, then reschedules it.
    fn run(&mut self, id: JobId, actions: Vec<Action>) {
        for action in actions {
            let Some(entry) = self.jobs.get(&id) else { return };
            match action {
                Action::Restart { call } => self.call(id, call, DelayedAction::Restart),
                Action::Send { call } => self.call(id, call, DelayedAction::Send),
                Action::Probe => {
                    let room = entry.room.clone();
                    self.list(room);
                }
                Action::Persist => {
                    if let Some(state) = entry.job.durable() {
                        self.pending.push(StoreOp::SetState(id, state));
                    }
                }
                Action::Finish(outcome) => self.finish(id, outcome),
            }
        }
        if let Some(entry) = self.jobs.get(&id) {
            self.scheduler.set(id, entry.job.poll_timeout());
        }
    }

    fn finish(&mut self, id: JobId, outcome: Outcome) {
        let Some(entry) = self.remove(id) else { return };
        let d = &entry.delegation;
        let (room, identity) = (&d.room_id, entry.identity());
        let m = &self.out.metrics;
        m.jobs_finished.get_or_create(&OutcomeLabel { outcome: outcome.as_str() }).inc();
        match outcome {
            Outcome::Sent { trigger, latency } => {
                if trigger == crate::lifecycle::Trigger::Reconciled {
                    m.reconciliation_departures.inc();
                }
                m.leave_latency
                    .get_or_create(&TriggerLabel { trigger: trigger.as_str() })
                    .observe(latency as f64 / 1000.0);
                info!(job = %id, room = %room, identity, user = %d.user_id, device = %d.device_id,
                    delay_id = %DelayRef(&d.delay_id), trigger = trigger.as_str(), latency_ms = latency, "leave sent");
            }
            Outcome::Expired => {
                warn!(job = %id, room = %room, identity, user = %d.user_id, delay_id = %DelayRef(&d.delay_id),
                    "homeserver unreachable past the event's deadline; its own timer has fired the leave");
            }
            Outcome::Unconfirmed => {
                warn!(job = %id, room = %room, identity, user = %d.user_id, delay_id = %DelayRef(&d.delay_id),
                    "LiveKit could not confirm the member's presence for too long; restarts stopped, the homeserver's timer decides");
            }
            Outcome::Gone => {
                info!(job = %id, room = %room, identity, user = %d.user_id, delay_id = %DelayRef(&d.delay_id),
                    "delayed event no longer exists on the homeserver; job ended without sending");
            }
            Outcome::Superseded => {}
        }
        self.pending.push(StoreOp::Delete(id));
    }

    /// Spawns a restart or send of job `id`'s delayed event.
    fn call(&mut self, id: JobId, call: u64, action: DelayedAction) {
        let Some(entry) = self.jobs.get(&id) else { return };
        if self.draining {
            // Not started during shutdown: a resumed job restarts (or sends) at once on start.
            return;
        }
        let d = entry.delegation.clone();
        // Every line logged about this call names the job, the room and the member's identity.
        let span = tracing::info_span!("call", job = %id, room = %d.room_id, identity = entry.identity());
        if action == DelayedAction::Restart && self.clock.now() > entry.job.deadline() {
            self.out.metrics.late_restarts.inc();
            span.in_scope(|| warn!(user = %d.user_id, delay_id = %DelayRef(&d.delay_id), "restart issued after the event's estimated deadline"));
        }
        self.calls_in_flight += 1;
        let Some(endpoint) = entry.endpoint.clone() else {
            let _ = self.reports_tx.send(Report::Homeserver { job: id, call, action, answer: HsAnswer::Failed });
            return;
        };
        let http = endpoint.client(self.out.discovery.clients()).clone();
        // Restarts are many and have headroom; sends are few and urgent, so only restarts queue.
        let permits = (action == DelayedAction::Restart).then(|| self.restart_permits.clone());
        let timeout = self.config.request_timeout;
        let metrics = self.out.metrics.clone();
        let reports = self.reports_tx.clone();
        let styles = self.out.path_styles.clone();
        let as_token = self.out.as_token.clone();
        let task = async move {
            let _permit = match permits {
                Some(p) => Some(p.acquire_owned().await.expect("never closed")),
                None => None,
            };
            let started = Instant::now();
            let style = styles.get(&http, &endpoint.base, timeout).await;
            let caller = match (d.mode, as_token.as_deref()) {
                (Mode::OpenId, _) => Caller::Anonymous,
                (Mode::Appservice, Some(as_token)) => Caller::Appservice { as_token, user_id: &d.user_id },
                (Mode::Appservice, None) => {
                    error!(user = %d.user_id, "delegated through the appservice, but no appservice is configured now");
                    Caller::Anonymous
                }
            };
            let answer = delayed_events::call(&http, &endpoint.base, style, &d.delay_id, action, caller, timeout).await;
            metrics
                .homeserver_request_duration
                .get_or_create(&ActionLabels { action: action.as_str(), homeserver: d.server_name().to_owned() })
                .observe(started.elapsed().as_secs_f64());
            metrics
                .homeserver_requests
                .get_or_create(&CallLabels {
                    action: action.as_str(),
                    homeserver: d.server_name().to_owned(),
                    outcome: answer.outcome,
                })
                .inc();
            if let Some(detail) = &answer.detail {
                let msg = "homeserver call did not succeed";
                match answer.outcome {
                    "auth" | "unrecognized" => {
                        error!(user = %d.user_id, delay_id = %DelayRef(&d.delay_id),
                        action = action.as_str(), outcome = answer.outcome, detail = %detail,
                        "{msg}: configuration error (delayed events disabled or access refused)")
                    }
                    _ => warn!(user = %d.user_id, delay_id = %DelayRef(&d.delay_id),
                        action = action.as_str(), outcome = answer.outcome, detail = %detail, "{msg}"),
                }
            } else {
                debug!(action = action.as_str(), outcome = answer.outcome, "homeserver call done");
            }
            let _ = reports.send(Report::Homeserver { job: id, call, action, answer: answer.answer });
        };
        tokio::spawn(tracing::Instrument::instrument(task, span));
    }

    /// Lists `room` through RoomService, unless a listing of it is already running (then once
    /// more after it, so that whoever asked gets an answer that started after asking).
    fn list(&mut self, room: Arc<str>) {
        if self.draining {
            return;
        }
        if self.listings_in_flight.contains(&room) {
            self.listings_wanted.insert(room);
            return;
        }
        self.listings_in_flight.insert(room.clone());
        let at = self.clock.now();
        let rs = self.out.room_service.clone();
        let reports = self.reports_tx.clone();
        let metrics = self.out.metrics.clone();
        tokio::spawn(async move {
            let result = match rs.list_participants(&room).await {
                Ok(list) => {
                    metrics.livekit_requests.get_or_create(&OutcomeLabel { outcome: "ok" }).inc();
                    Ok(list)
                }
                Err(e) => {
                    metrics.livekit_requests.get_or_create(&OutcomeLabel { outcome: "error" }).inc();
                    warn!(livekit_room = %room, error = %e, "cannot ask LiveKit who is connected; keeping members alive");
                    Err(())
                }
            };
            let _ = reports.send(Report::Listing { room, at, result });
        });
    }

    // ---- store ------------------------------------------------------------------------------

    async fn commit(&self, ops: Vec<StoreOp>) -> Result<(), StoreError> {
        let started = Instant::now();
        let r = self.out.store.commit(ops).await;
        self.out.metrics.store_commit_duration.observe(started.elapsed().as_secs_f64());
        if r.is_err() {
            self.out.metrics.store_errors.inc();
        }
        r
    }

    /// Commits pending changes and staged delegations in one transaction, then answers the
    /// webhooks that waited for them and starts the delegations.
    async fn flush(&mut self) {
        if self.pending.is_empty() && self.staged.is_empty() {
            self.reply_waiting(Ok(()));
            return;
        }
        let job_ops = std::mem::take(&mut self.pending);
        let staged = std::mem::take(&mut self.staged);
        let mut ops = job_ops.clone();
        for s in &staged {
            ops.push(StoreOp::Insert(JobRecord {
                id: s.id,
                delegation: s.delegation.clone(),
                state: crate::lifecycle::Durable::Waiting,
            }));
            ops.extend(s.replaces.map(StoreOp::Delete));
        }
        match self.commit(ops).await {
            Ok(()) => {
                self.reply_waiting(Ok(()));
                for s in staged {
                    self.apply_delegation(s);
                }
            }
            Err(e) => {
                error!(changes = job_ops.len(), delegations = staged.len(), error = %e,
                    "store commit failed; webhooks answered 503, delegations refused, changes retried");
                self.pending = job_ops;
                for s in staged {
                    error!(room = %s.delegation.room_id, user = %s.delegation.user_id, delay_id = %DelayRef(&s.delegation.delay_id),
                        "delegation not stored");
                    for reply in s.replies {
                        let _ = reply.send(Err(EngineError::Store(StoreError(e.0.clone()))));
                    }
                }
                self.reply_waiting(Err(e));
            }
        }
    }

    fn reply_waiting(&mut self, result: Result<(), StoreError>) {
        let waiting = std::mem::take(&mut self.waiting);
        match result {
            Ok(()) => {
                for (id, outcome, reply) in waiting {
                    self.remember_webhook(id);
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                for (_, _, reply) in waiting {
                    let _ = reply.send(Err(EngineError::Store(StoreError(e.0.clone()))));
                }
            }
        }
    }

    // ---- views ------------------------------------------------------------------------------

    fn summaries(&self) -> Vec<JobSummary> {
        let now = self.clock.now() as i64;
        let mut list: Vec<JobSummary> = self
            .jobs
            .iter()
            .map(|(id, e)| {
                let d = &e.delegation;
                JobSummary {
                    id: id.to_string(),
                    room_id: d.room_id.clone(),
                    livekit_room: e.room.to_string(),
                    user_id: d.user_id.clone(),
                    device_id: d.device_id.clone(),
                    member_id: d.member_id.clone(),
                    delay_ref: DelayRef(&d.delay_id).to_string(),
                    mode: d.mode,
                    state: e.job.kind().as_str().to_owned(),
                    identity: e.job.binding().map(|b| b.identity.clone()),
                    next_call_in_ms: e.job.next_call().map(|t| t as i64 - now),
                    created_at_ms: d.created_at_ms,
                }
            })
            .collect();
        list.sort_by_key(|j| j.created_at_ms);
        list
    }

    /// Moves one job between the `jobs{state}` gauges (`Done` is not a gauge).
    fn gauge_move(&self, from: Option<PhaseKind>, to: Option<PhaseKind>) {
        if from == to {
            return;
        }
        let gauge = |k: PhaseKind| self.out.metrics.jobs.get_or_create(&StateLabel { state: k.as_str() }).clone();
        if let Some(k) = from.filter(|k| *k != PhaseKind::Done) {
            gauge(k).dec();
        }
        if let Some(k) = to.filter(|k| *k != PhaseKind::Done) {
            gauge(k).inc();
        }
    }
}

fn session(p: &Participant, room_sid: &str) -> Session {
    Session {
        identity: p.identity.clone(),
        sid: p.sid.clone(),
        joined_at_ms: p.joined_at_ms,
        room_sid: room_sid.to_owned(),
    }
}

fn participant_sid(kind: &SfuEventKind) -> &str {
    match kind {
        SfuEventKind::ParticipantJoined(p) | SfuEventKind::ParticipantLeft { participant: p, .. } => &p.sid,
        _ => "",
    }
}

fn participant_identity(kind: &SfuEventKind) -> Option<String> {
    match kind {
        SfuEventKind::ParticipantJoined(p) | SfuEventKind::ParticipantLeft { participant: p, .. } => {
            Some(p.identity.clone())
        }
        _ => None,
    }
}

fn departure_reason(kind: &SfuEventKind) -> &str {
    match kind {
        SfuEventKind::ParticipantLeft { departure, .. } => departure.reason(),
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::homeserver::{Clients, Overrides};
    use crate::livekit::Participant;
    use crate::store::JobRecord;

    /// An in-memory store that can be made to fail, and keeps every commit it applied.
    #[derive(Default)]
    struct FlakyStore {
        jobs: Mutex<HashMap<JobId, JobRecord>>,
        commits: Mutex<Vec<Vec<StoreOp>>>,
        down: AtomicBool,
    }

    #[async_trait]
    impl Store for FlakyStore {
        async fn load(&self) -> Result<Vec<JobRecord>, StoreError> {
            Ok(self.jobs.lock().unwrap().values().cloned().collect())
        }
        async fn commit(&self, ops: Vec<StoreOp>) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError("disk on fire".into()));
            }
            self.commits.lock().unwrap().push(ops.clone());
            let mut jobs = self.jobs.lock().unwrap();
            for op in ops {
                match op {
                    StoreOp::Insert(r) => {
                        jobs.insert(r.id, r);
                    }
                    StoreOp::SetState(id, state) => {
                        if let Some(r) = jobs.get_mut(&id) {
                            r.state = state;
                        }
                    }
                    StoreOp::Delete(id) => {
                        jobs.remove(&id);
                    }
                }
            }
            Ok(())
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn delegation(delay_id: &str, device: &str) -> Delegation {
        Delegation {
            room_id: "!r:hs.test".into(),
            slot_id: "m.call#ROOM".into(),
            user_id: "@a:hs.test".into(),
            device_id: device.into(),
            member_id: "m".into(),
            delay_id: delay_id.into(),
            delay_ms: 60_000,
            // Nothing listens here: calls fail, which these tests do not look at.
            cs_api_url: "http://127.0.0.1:9/".into(),
            created_at_ms: 0,
            mode: crate::delegation::Mode::OpenId,
        }
    }

    async fn engine(store: Arc<FlakyStore>) -> EngineHandle {
        let clients = Clients::new(Duration::from_millis(200), false, true).unwrap();
        let mut overrides = Overrides::new();
        overrides.insert("hs.test".into(), url::Url::parse("http://127.0.0.1:9/").unwrap());
        let discovery = Arc::new(Discovery::new(clients.clone(), overrides, Overrides::new(), true));
        let room_service =
            RoomService::new(clients.trusted.clone(), "http://127.0.0.1:9", "k", "s", Duration::from_millis(200))
                .unwrap();
        let config = EngineConfig {
            timing: Timing::default(),
            reconcile_interval: Duration::from_secs(3600),
            request_timeout: Duration::from_millis(200),
        };
        let out = Outside {
            store,
            discovery,
            path_styles: Arc::default(),
            as_token: None,
            room_service,
            metrics: Arc::new(Metrics::new()),
        };
        start(config, out).await.unwrap().0
    }

    fn joined(d: &Delegation, sid: &str, id: &str) -> SfuEvent {
        SfuEvent {
            id: id.into(),
            room: d.livekit_room(),
            room_sid: "RM_1".into(),
            kind: SfuEventKind::ParticipantJoined(Participant {
                identity: d.identities()[0].clone(),
                sid: sid.into(),
                joined_at_ms: 1_000,
            }),
        }
    }

    #[tokio::test]
    async fn webhooks_are_acknowledged_only_once_durable_and_retries_are_not_lost() {
        let store = Arc::new(FlakyStore::default());
        let engine = engine(store.clone()).await;
        let d = delegation("syd_1", "DEV");
        let id = engine.delegate(d.clone()).await.unwrap();
        assert_eq!(store.jobs.lock().unwrap()[&id].state, crate::lifecycle::Durable::Waiting);

        store.down.store(true, Ordering::SeqCst);
        let e = joined(&d, "PA_1", "EV_1");
        assert!(matches!(engine.webhook(e.clone()).await, Err(EngineError::Store(_))), "503 for LiveKit to retry");
        // A delegation while the store is down changes nothing.
        assert!(engine.delegate(delegation("syd_2", "DEV2")).await.is_err());

        store.down.store(false, Ordering::SeqCst);
        // LiveKit's retry of the same event: applied (not a duplicate), and now durable.
        assert_eq!(engine.webhook(e.clone()).await.unwrap(), WebhookOutcome::Applied);
        assert!(matches!(store.jobs.lock().unwrap()[&id].state, crate::lifecycle::Durable::Connected { .. }));
        assert_eq!(store.jobs.lock().unwrap().len(), 1, "the refused delegation was not stored");
        // Once acknowledged, a further delivery is a duplicate.
        assert_eq!(engine.webhook(e).await.unwrap(), WebhookOutcome::Duplicate);
    }

    #[tokio::test]
    async fn a_newer_delegation_replaces_the_older_in_one_commit_and_repeats_are_idempotent() {
        let store = Arc::new(FlakyStore::default());
        let engine = engine(store.clone()).await;
        let old = engine.delegate(delegation("syd_old", "DEV")).await.unwrap();
        assert_eq!(engine.delegate(delegation("syd_old", "DEV")).await.unwrap(), old, "repeat is idempotent");
        let new = engine.delegate(delegation("syd_new", "DEV")).await.unwrap();
        let jobs = store.jobs.lock().unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[&new].delegation.delay_id, "syd_new");
        assert!(!jobs.contains_key(&old));
        // The new delegation and the deletion of the old one are in the same commit: no crash
        // can leave both (the old delay id would be resumed and could be sent) or neither.
        let commits = store.commits.lock().unwrap();
        let stored_new: Vec<&Vec<StoreOp>> =
            commits.iter().filter(|ops| ops.iter().any(|op| matches!(op, StoreOp::Insert(r) if r.id == new))).collect();
        assert_eq!(stored_new.len(), 1, "{commits:?}");
        assert!(stored_new[0].contains(&StoreOp::Delete(old)), "{commits:?}");
        let deleting_old = commits.iter().filter(|ops| ops.contains(&StoreOp::Delete(old))).count();
        assert_eq!(deleting_old, 1, "{commits:?}");
    }

    #[tokio::test]
    async fn stored_jobs_are_resumed() {
        let store = Arc::new(FlakyStore::default());
        let d = delegation("syd_1", "DEV");
        let id = {
            let engine = engine(store.clone()).await;
            let id = engine.delegate(d.clone()).await.unwrap();
            engine.webhook(joined(&d, "PA_1", "EV_1")).await.unwrap();
            engine.shutdown(Duration::from_millis(500)).await;
            id
        };
        let engine = engine(store.clone()).await;
        // The resumed job is bound: a departure of its session sends (moves it to Sending).
        let left = SfuEvent {
            kind: SfuEventKind::ParticipantLeft {
                participant: Participant {
                    identity: d.identities()[0].clone(),
                    sid: "PA_1".into(),
                    joined_at_ms: 1_000,
                },
                departure: Departure::Final("CLIENT_INITIATED".into()),
                aborted: false,
            },
            ..joined(&d, "PA_1", "EV_2")
        };
        assert_eq!(engine.webhook(left).await.unwrap(), WebhookOutcome::Applied);
        assert!(matches!(store.jobs.lock().unwrap()[&id].state, crate::lifecycle::Durable::Sending { .. }));
    }
}
