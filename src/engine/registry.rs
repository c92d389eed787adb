//! The engine's routing and bookkeeping as a synchronous state machine: it owns every job, the
//! indexes from LiveKit identities, rooms, members and delay ids to jobs, the deadline
//! scheduler, the queues of homeserver calls and RoomService listings (with their limits), the
//! delegations staged for the store, and the batch being committed.
//!
//! Like [`crate::lifecycle::Job`] it performs no IO and reads no clock: inputs come with `now`
//! ([`Registry::delegate`], [`Registry::webhook`], [`Registry::call_answered`],
//! [`Registry::listed`], [`Registry::committed`], [`Registry::handle_timeout`]), and what the
//! shell must do comes out of [`Registry::poll_effect`] after [`Registry::flush`]. Replies are
//! named by the shell's [`Ticket`]s. [`Registry::poll_timeout`] says when it next wants
//! [`Registry::handle_timeout`].
//!
//! With several instances ([`crate::cluster`]) the registry drives only the shards it was given
//! ([`Registry::adopt`], [`Registry::release`]); requests reach it through their shard's inbox
//! ([`Registry::consume`]), and each entry's position is committed with its effects
//! ([`StoreOp::Consumed`]), under the epochs of the shards' leases (the commit's fence).
//!
//! Durability rules kept here:
//! * a delegation takes effect (and is answered) only once the commit that stores it (and
//!   deletes the job it supersedes) succeeded — except one from an inbox, durable there and
//!   answered already, which takes effect at once so that the entries after it (the member's
//!   departure) apply to it;
//! * a webhook is answered only once the commit holding its effects succeeded (a webhook with no
//!   effects waits for the commit in flight, if any) — except one for a room with no job at all,
//!   which the shell answers without asking ([`Effect::Watch`]): no job's state depends on it,
//!   and a job resumed after a crash lists its room before it believes anything;
//! * restarts and sends never wait for the store: a slow or stuck store delays answers to LiveKit
//!   and delegating clients, never a call to a homeserver.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tracing::{debug, error, info, warn};

use super::calls::FairQueues;
use super::index::{HashCount, HashIndex, JobIdHasher};
use super::views::{self, JobSummary};
use crate::cluster::{EntryId, Inbound, Shard, shard_of};
use crate::delegation::{DelayRef, Delegation, JobId};
use crate::identity::Matcher;
use crate::lifecycle::{
    Action, Durable, Event, HsAnswer, Job, LeaveReason, Maybe, Millis, Outcome, Session, Timing, Trigger,
};
use crate::livekit::{Departure, Participant, SfuEvent, SfuEventKind};
use crate::metrics::{ActionLabel, Metrics, OutcomeLabel, TriggerLabel};
use crate::ports::{DelayedAction, Unobserved};
use crate::scheduler::Scheduler;
use crate::store::{JobRecord, StoreError, StoreOp};

/// How much the registry lets run at once.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Restarts in flight at most, across homeservers (a cold start restarts every job at once).
    pub restarts: usize,
    /// Sends in flight at most; sends never queue behind restarts.
    pub sends: usize,
    /// Restarts, and sends, in flight at most for any one homeserver: its members' calls wait in
    /// its own queue, and homeservers take turns ([`super::calls::FairQueues`]), so a slow one
    /// delays only its own members.
    pub per_homeserver: usize,
    /// Live jobs at most for one Matrix user (a member replacing its own job does not count
    /// twice); a delegation over it is refused.
    pub jobs_per_user: usize,
    /// RoomService listings in flight at most.
    pub listings: usize,
    /// Due jobs handled per [`Registry::handle_timeout`].
    pub timeouts: usize,
    /// Webhook ids remembered to drop LiveKit's duplicate deliveries.
    pub seen_webhooks: usize,
    /// Wait after a failed commit before the next attempt.
    pub commit_retry: Millis,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            restarts: 1_024,
            sends: 256,
            per_homeserver: 128,
            jobs_per_user: 50,
            listings: 16,
            timeouts: 256,
            seen_webhooks: 16_384,
            commit_retry: 500,
        }
    }
}

/// Names a request the shell will answer when the registry says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

impl Ticket {
    /// An inbox entry's: nobody waits for its answer (the entry was answered when it was
    /// queued).
    pub const INBOX: Ticket = Ticket(0);
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
    /// Queued in its shard's inbox, for whichever instance holds the shard (several instances).
    Queued,
}

impl WebhookOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookOutcome::Applied => "accepted",
            WebhookOutcome::Ignored => "ignored",
            WebhookOutcome::Duplicate => "duplicate",
            WebhookOutcome::Queued => "queued",
        }
    }
}

/// Why a delegation was not taken.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// The store could not keep it.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Its user already has [`Limits::jobs_per_user`] live jobs.
    #[error("the user already has {0} delegated leaves in effect")]
    TooManyJobs(usize),
    /// Its delay id is tracked for another member (a delay id names one member's event).
    #[error("this delayed event is already delegated for another member")]
    Conflict,
}

/// Names one homeserver call of a job, in the job's current holding: a job given up with its
/// shard and taken over again by this instance (same id, calls counted from zero again) never
/// takes a late answer to a call of its earlier holding for one of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallRef {
    pub job: JobId,
    incarnation: u32,
    call: u64,
}

/// Something the shell must do.
#[derive(Debug)]
pub enum Effect {
    /// Restart or send the job's delayed event; report with [`Registry::call_answered`].
    Call { call: CallRef, shard: Shard, action: DelayedAction, delegation: Arc<Delegation>, identity: String },
    /// Ask LiveKit who is in `room`; report with [`Registry::listed`], passing `at` back.
    List { room: Arc<str>, at: Millis },
    /// Apply these changes atomically; report with [`Registry::committed`]. One at a time. With
    /// shards, `fence` has the lease epoch of each shard held: the commit is refused if another
    /// instance took one of those it touches.
    Commit { ops: Vec<StoreOp>, fence: Option<Vec<(Shard, u64)>> },
    /// Answer a delegation.
    Delegated { ticket: Ticket, result: Result<JobId, Refusal> },
    /// Answer a webhook.
    WebhookHandled { ticket: Ticket, result: Result<WebhookOutcome, StoreError> },
    /// LiveKit room `room` has jobs from now on (`watched`), or no longer has any: webhooks for
    /// a room without jobs may be answered without the registry. Comes before the answers to
    /// the delegations that gave the room its first job.
    Watch { room: Arc<str>, watched: bool },
    /// With shards: read the id of the latest entry in `shard`'s inbox (held under `epoch`);
    /// report with [`Registry::inbox_looked`]. One at a time per shard.
    LookAtInbox { shard: Shard, epoch: u64 },
}

/// A delegation waiting for the commit that makes it durable.
#[derive(Debug)]
struct Staged {
    id: JobId,
    delegation: Delegation,
    /// The job of the same member it replaces (tracked, or staged before it).
    replaces: Option<JobId>,
    /// Everyone who asked for it (a client may repeat itself before it is stored).
    tickets: Vec<Ticket>,
}

/// A webhook waiting for its effects to be durable.
#[derive(Debug)]
struct Waiter {
    webhook_id: String,
    outcome: WebhookOutcome,
    ticket: Ticket,
    /// The shard whose inbox it was read from: if that shard is given up before its effects are
    /// committed, it is read again by the next holder and must not count as handled here.
    inbox: Option<Shard>,
}

/// The commit in flight, and what waits for it.
#[derive(Debug)]
struct Batch {
    /// The job changes in it, put back in front of newer ones if it fails.
    ops: Vec<(Shard, StoreOp)>,
    staged: Vec<Staged>,
    waiting: Vec<Waiter>,
}

struct Entry {
    job: Job,
    /// Which of the job's lives in this process (see [`CallRef`]; counts wrap after 4 billion
    /// insertions, far past any call still in flight).
    incarnation: u32,
    shard: Shard,
    delegation: Arc<Delegation>,
    room: Arc<str>,
    /// Checks that a LiveKit identity is one the member may connect under.
    watch: Matcher,
    /// Where the job stands in the scheduler: its `poll_timeout` when last looked at.
    scheduled: Maybe,
}

impl Entry {
    /// Moves the job in `scheduler` to when it next wants its timeout handled.
    fn reschedule(&mut self, scheduler: &mut Scheduler<JobId>, id: JobId) {
        let at = self.job.poll_timeout();
        scheduler.set(id, self.scheduled.get(), at);
        self.scheduled = Maybe::of(at);
    }

    /// The LiveKit identity to name in logs: the bound one, else the first one watched.
    fn identity(&self) -> String {
        match self.job.binding() {
            Some(b) => b.identity.to_string(),
            None => self.delegation.primary_identity(),
        }
    }

    /// Whether `identity` in LiveKit room `room` is one of the member's.
    fn watches_in(&self, room: &Arc<str>, identity: &str) -> bool {
        (Arc::ptr_eq(&self.room, room) || self.room == *room)
            && self.watch.matches(
                identity,
                &self.delegation.user_id,
                &self.delegation.device_id,
                self.delegation.identity.as_deref(),
            )
    }
}

/// A shard this instance holds.
#[derive(Debug)]
struct Owned {
    epoch: u64,
    /// The last inbox entry taken in (entries at or before it are not taken twice).
    last: EntryId,
    sends: HeldSends,
}

/// The sends of one shard's jobs, held until the shard's inbox is known to hold no newer
/// delegation of their members. Any instance stores a delegation in the inbox and answers the
/// client at once; until the holder takes it in, the member's older job may still decide to
/// send — and an older delay id sent after the newer one was accepted would overwrite the
/// member's new membership with a leave. So each send waits for a look at the inbox's latest
/// entry that started after it was decided, then for the entries up to that one to be taken in:
/// a newer delegation among them supersedes its job, and the send is dropped.
#[derive(Debug, Default)]
struct HeldSends {
    /// Decided since the look under way started, or with none under way: the next look's.
    next: Vec<(JobId, u64)>,
    /// Covered by the look under way, or by the last one while the entries it found come in.
    covered: Vec<(JobId, u64)>,
    look: Look,
    /// Looks failed in a row (said once per streak: Redis down makes every shard's fail).
    failed_looks: u32,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Look {
    #[default]
    Idle,
    InFlight,
    /// The inbox's latest entry then (the zero id: it was empty).
    Found(EntryId),
}

/// A room's listing: queued, or in flight (and wanted once more after it).
struct Listing {
    in_flight: bool,
    again: bool,
    /// A listing asked for again waits until then (see [`listing_spacing`]).
    not_before: Millis,
}

/// How long after one listing of a room the next may start: 10 µs per job of the room (200 ms
/// in a 20,000-member town hall, nothing in a room of under 100). Applying a listing costs the
/// engine about 2 µs per job; without spacing, a room whose members keep arriving (each new job
/// asks for a listing) is listed back to back, and the engine spends its time applying them
/// while every request waits behind it.
fn listing_spacing(jobs: usize) -> Millis {
    (jobs / 100) as Millis
}

pub struct Registry {
    timing: Arc<Timing>,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Boxed: the table's slack then costs a pointer per slot, not a whole entry.
    jobs: HashMap<JobId, Box<Entry>, JobIdHasher>,
    /// (LiveKit room, identity) → the jobs watching it.
    by_identity: HashIndex,
    by_room: HashMap<Arc<str>, HashSet<JobId, JobIdHasher>>,
    /// [`Delegation::member_key`] → the member's job.
    by_member: HashIndex,
    /// (server name, delay id) → its job.
    by_delay: HashIndex,
    /// Matrix user → how many live jobs it has ([`Limits::jobs_per_user`]).
    by_user: HashCount,
    scheduler: Scheduler<JobId>,
    /// Calls issued by jobs, waiting and in flight, per homeserver; sends apart so they never
    /// wait behind restarts.
    restarts: FairQueues<(JobId, u64)>,
    sends: FairQueues<(JobId, u64)>,
    /// The homeserver of each call in flight (its job may be gone when the answer comes), and
    /// when it was started.
    calls: HashMap<CallRef, (Arc<str>, Millis)>,
    /// Entries inserted so far (the last [`Entry::incarnation`]).
    incarnations: u32,
    listings: HashMap<Arc<str>, Listing>,
    listing_queue: VecDeque<Arc<str>>,
    listings_in_flight: usize,
    /// When the first listing spaced out may start.
    listing_wake: Option<Millis>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    /// Job changes not yet in a commit, in order, with the shard of each.
    pending: Vec<(Shard, StoreOp)>,
    /// Delegations not yet in a commit, in arrival order.
    staged: Vec<Staged>,
    /// Webhooks whose effects are in `pending`.
    waiting: Vec<Waiter>,
    committing: Option<Batch>,
    /// After a failed commit, the next one waits until then.
    commit_not_before: Millis,
    draining: bool,
    effects: VecDeque<Effect>,
    /// With several instances, the shards held; `None` for a single instance (it drives
    /// everything).
    owned: Option<BTreeMap<Shard, Owned>>,
    /// Draws job ids (which also seed each job's jitter): the only randomness here, seeded, so
    /// that a test can replay a run exactly.
    ids: StdRng,
    /// `calls_waiting{action}` for restarts and sends, looked up once (set on every flush).
    waiting_gauges: [Gauge; 2],
}

impl Registry {
    pub fn new(timing: Timing, limits: Limits, metrics: Arc<Metrics>) -> Self {
        let (per_homeserver, restarts, sends) = (limits.per_homeserver, limits.restarts, limits.sends);
        let waiting_gauges =
            ["restart", "send"].map(|action| metrics.calls_waiting.get_or_create(&ActionLabel { action }).clone());
        Registry {
            timing: Arc::new(timing),
            limits,
            metrics,
            jobs: HashMap::default(),
            by_identity: HashIndex::default(),
            by_room: HashMap::new(),
            by_member: HashIndex::default(),
            by_delay: HashIndex::default(),
            by_user: HashCount::default(),
            scheduler: Scheduler::default(),
            restarts: FairQueues::new(per_homeserver, restarts),
            sends: FairQueues::new(per_homeserver, sends),
            calls: HashMap::new(),
            incarnations: 0,
            listings: HashMap::new(),
            listing_queue: VecDeque::new(),
            listings_in_flight: 0,
            listing_wake: None,
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            pending: Vec::new(),
            staged: Vec::new(),
            waiting: Vec::new(),
            committing: None,
            commit_not_before: 0,
            draining: false,
            effects: VecDeque::new(),
            owned: None,
            ids: StdRng::from_rng(&mut rand::rng()),
            waiting_gauges,
        }
    }

    /// The LiveKit rooms with jobs (each also announced by [`Effect::Watch`]).
    pub fn rooms(&self) -> impl Iterator<Item = Arc<str>> + '_ {
        self.by_room.keys().cloned()
    }

    /// Draws job ids from `seed` (a test replaying a run exactly).
    #[cfg(test)]
    pub fn with_ids_from(mut self, seed: u64) -> Self {
        self.ids = StdRng::seed_from_u64(seed);
        self
    }

    fn new_id(&mut self) -> JobId {
        JobId(self.ids.random())
    }

    /// A registry for one of several instances: it drives no shard until one is adopted.
    pub fn sharded(mut self) -> Self {
        self.owned = Some(BTreeMap::new());
        self
    }

    // ---- inputs -------------------------------------------------------------------------------

    /// Resumes a job loaded from the store.
    pub fn resume(&mut self, record: JobRecord, now: Millis) {
        let delegation = Arc::new(record.delegation);
        let (job, actions) = Job::resume(
            delegation.delay_ms,
            record.id.0,
            self.timing.clone(),
            record.state,
            delegation.created_at_ms,
            now,
        );
        self.insert(record.id, job, delegation);
        self.run(record.id, actions);
    }

    /// Takes shard `shard` over (lease epoch `epoch`): resumes its stored jobs (each restarts at
    /// once and is reconciled with LiveKit) and takes in its inbox after `applied`.
    pub fn adopt(&mut self, shard: Shard, epoch: u64, applied: EntryId, records: Vec<JobRecord>, now: Millis) {
        let Some(owned) = &mut self.owned else { return };
        if owned.insert(shard, Owned { epoch, last: applied, sends: HeldSends::default() }).is_some() {
            error!(shard = %shard, "adopted a shard already held; its jobs are replaced by the stored ones");
            self.release_jobs(shard);
        }
        let count = records.len();
        for record in records {
            if shard_of(&record.delegation.livekit_room()) != shard {
                error!(job = %record.id, shard = %shard, "stored job in the wrong shard; skipped");
                continue;
            }
            self.resume(record, now);
        }
        info!(shard = %shard, epoch, jobs = count, applied = %applied, "shard taken over; its jobs resumed");
    }

    /// Gives shard `shard` up: its jobs are forgotten without any call (another instance takes
    /// them over from the store), with their changes not yet committed (the inbox entries behind
    /// them too: their positions were not committed either).
    pub fn release(&mut self, shard: Shard) {
        let Some(owned) = &mut self.owned else { return };
        if owned.remove(&shard).is_none() {
            return;
        }
        let jobs = self.release_jobs(shard);
        info!(shard = %shard, jobs, "shard given up; its jobs are no longer driven here");
    }

    fn release_jobs(&mut self, shard: Shard) -> usize {
        let ids: Vec<JobId> = self.jobs.iter().filter(|(_, e)| e.shard == shard).map(|(id, _)| *id).collect();
        for &id in &ids {
            if let Some(entry) = self.remove(id) {
                views::move_gauge(&self.metrics, Some(entry.job.kind()), None);
            }
        }
        self.pending.retain(|(s, _)| *s != shard);
        // Nor retried if the commit in flight fails: they belong to the shard's next holding,
        // which starts again from the store (this instance's too, under a new epoch).
        if let Some(batch) = &mut self.committing {
            batch.ops.retain(|(s, _)| *s != shard);
        }
        // Their entries are read again by the shard's next holder (this instance too): handled
        // here only if a commit in flight makes them durable.
        self.waiting.retain(|w| w.inbox != Some(shard));
        ids.len()
    }

    /// Inbox entry `entry` of `shard`, read while the shard was held under `epoch`: applied like
    /// a request, its position committed with its effects. Entries of shards not held, read under
    /// another epoch (an earlier holding: they are read again), or at or before the last one
    /// taken in, are ignored.
    pub fn consume(&mut self, shard: Shard, epoch: u64, entry: EntryId, inbound: Inbound, now: Millis) {
        let Some(owned) = self.owned.as_mut().and_then(|o| o.get_mut(&shard)) else {
            debug!(shard = %shard, entry = %entry, "inbox entry of a shard not held; left for its holder");
            return;
        };
        if owned.epoch != epoch || entry <= owned.last {
            return;
        }
        owned.last = entry;
        match inbound {
            Inbound::Delegation(d) => self.delegate_from_inbox(d, now),
            Inbound::Webhook(event) => self.take_webhook(event, Ticket::INBOX, Some(shard), now),
            Inbound::Unreadable => {}
        }
        self.pending.push((shard, StoreOp::Consumed { shard, entry }));
        self.release_sends(shard);
    }

    /// The answer to a look at `shard`'s inbox ([`Effect::LookAtInbox`]) started under `epoch`:
    /// its latest entry then (`None`: it was empty), or why it could not be read.
    pub fn inbox_looked(&mut self, shard: Shard, epoch: u64, result: Result<Option<EntryId>, StoreError>) {
        let Some(owned) = self.owned.as_mut().and_then(|o| o.get_mut(&shard)) else { return };
        if owned.epoch != epoch || owned.sends.look != Look::InFlight {
            return;
        }
        let held = &mut owned.sends;
        match result {
            Ok(latest) => {
                if held.failed_looks > 0 {
                    info!(shard = %shard, failed_looks = held.failed_looks, "the shard's inbox can be looked at again");
                }
                held.failed_looks = 0;
                held.look = Look::Found(latest.unwrap_or_default());
            }
            Err(e) => {
                // Looked at again, with the sends decided since: Redis answers again, or the lease
                // runs out and the shard's next holder decides its sends afresh.
                held.failed_looks += 1;
                if held.failed_looks == 1 {
                    warn!(shard = %shard, sends = held.covered.len(), error = %e,
                        "cannot look at the shard's inbox; its sends wait until it can");
                }
                let mut covered = std::mem::take(&mut held.covered);
                covered.append(&mut held.next);
                held.next = covered;
                held.look = Look::Idle;
            }
        }
        self.release_sends(shard);
        self.look_at_inbox(shard);
    }

    /// A delegation from an inbox: already durable there, and already answered, so it takes effect
    /// at once — before the entries after it, a departure of the member among them — and its
    /// record goes into the commit that also records its position. A crash before that commit
    /// replays the entry, with the same outcome.
    fn delegate_from_inbox(&mut self, d: Delegation, now: Millis) {
        // `None`: a repeat, already tracked; else the member's job it replaces, if any.
        let checked = self.repeated(&d).and_then(|repeat| match repeat {
            Some(_) => Ok(None),
            None => {
                let replaces = self.tracked_member(&d);
                self.check_user_limit(&d, replaces.is_some()).map(|()| Some(replaces))
            }
        });
        let replaces = match checked {
            Ok(Some(replaces)) => replaces,
            Ok(None) => return,
            Err(refusal) => {
                // Answered when it was queued: the client believes it delegated. Its delayed
                // event is left to the homeserver's own timer, said loudly.
                error!(room = %d.room_id, user = %d.user_id, delay_id = %DelayRef(&d.delay_id), error = %refusal,
                    "delegation from the inbox refused; its leave is left to the homeserver's timer");
                return;
            }
        };
        let shard = shard_of(&d.livekit_room());
        let id = self.new_id();
        let record = JobRecord { id, delegation: d.clone(), state: Durable::WAITING };
        self.pending.push((shard, StoreOp::Insert(Box::new(record))));
        self.pending.extend(replaces.map(|old| (shard, StoreOp::Delete(old))));
        self.start_delegation(Staged { id, delegation: d, replaces, tickets: vec![Ticket::INBOX] }, now);
    }

    /// The job already tracking `d`'s delay id for the same member, if any (a client repeating
    /// itself), counted and logged as such; [`Refusal::Conflict`] if another member's job tracks
    /// it (it must not be taken for the same: the other member's departures would send it).
    fn repeated(&self, d: &Delegation) -> Result<Option<JobId>, Refusal> {
        let Some(id) = self.tracked_delay(d.server_name(), &d.delay_id) else { return Ok(None) };
        let same = self.jobs.get(&id).is_some_and(|e| e.delegation.member_key() == d.member_key());
        if !same {
            warn!(job = %id, room = %d.room_id, user = %d.user_id, delay_id = %DelayRef(&d.delay_id),
                "delegation of a delayed event already delegated for another member; refused");
            self.metrics.delegations.get_or_create(&OutcomeLabel { outcome: "conflict" }).inc();
            return Err(Refusal::Conflict);
        }
        debug!(job = %id, room = %d.room_id, identity = %d.primary_identity(), delay_id = %DelayRef(&d.delay_id),
            "delegation repeated; already tracked");
        self.metrics.delegations.get_or_create(&OutcomeLabel { outcome: "repeated" }).inc();
        Ok(Some(id))
    }

    /// Whether `d`'s user may have one more live job (`replacing` one of its own: it may).
    fn check_user_limit(&self, d: &Delegation, replacing: bool) -> Result<(), Refusal> {
        if replacing {
            return Ok(());
        }
        let staged = self.staged.iter().chain(self.committing.iter().flat_map(|b| &b.staged));
        let staged = staged.filter(|s| s.replaces.is_none() && s.delegation.user_id == d.user_id).count();
        let live = self.by_user.get(&d.user_id.as_str()) as usize;
        if live + staged < self.limits.jobs_per_user {
            return Ok(());
        }
        warn!(room = %d.room_id, user = %d.user_id, delay_id = %DelayRef(&d.delay_id), live, staged,
            limit = self.limits.jobs_per_user, "delegation refused: the user has too many delegated leaves");
        self.metrics.delegations.get_or_create(&OutcomeLabel { outcome: "over_user_limit" }).inc();
        Err(Refusal::TooManyJobs(self.limits.jobs_per_user))
    }

    /// A delegation: stored (replacing an older one of the same member) in the next commit, and
    /// started once that commit succeeded. A repeat of a tracked or staged one is answered with
    /// its job. A single instance's way in: with shards, delegations come through their inbox
    /// ([`Registry::consume`]).
    pub fn delegate(&mut self, d: Delegation, ticket: Ticket) {
        debug_assert!(self.owned.is_none(), "a sharded registry takes delegations from inboxes only");
        match self.repeated(&d) {
            Ok(None) => {}
            result => {
                let result = result.map(|id| id.expect("matched None above"));
                self.effects.push_back(Effect::Delegated { ticket, result });
                return;
            }
        }
        let server = d.server_name();
        let same_delay = |s: &&mut Staged| s.delegation.server_name() == server && s.delegation.delay_id == d.delay_id;
        let in_flight = self.committing.as_mut().map(|b| &mut b.staged);
        if let Some(s) = self.staged.iter_mut().chain(in_flight.into_iter().flatten()).find(same_delay) {
            if s.delegation.member_key() == d.member_key() {
                s.tickets.push(ticket);
            } else {
                warn!(room = %d.room_id, user = %d.user_id, delay_id = %DelayRef(&d.delay_id),
                    "delegation of a delayed event being delegated for another member; refused");
                self.metrics.delegations.get_or_create(&OutcomeLabel { outcome: "conflict" }).inc();
                self.effects.push_back(Effect::Delegated { ticket, result: Err(Refusal::Conflict) });
            }
            return;
        }
        let key = d.member_key();
        let in_flight = self.committing.as_ref().map(|b| &b.staged);
        let replaces = self
            .staged
            .iter()
            .rev()
            .chain(in_flight.into_iter().flatten().rev())
            .find(|s| s.delegation.member_key() == key)
            .map(|s| s.id)
            .or_else(|| self.tracked_member(&d));
        if let Err(refusal) = self.check_user_limit(&d, replaces.is_some()) {
            self.effects.push_back(Effect::Delegated { ticket, result: Err(refusal) });
            return;
        }
        let id = self.new_id();
        self.staged.push(Staged { id, delegation: d, replaces, tickets: vec![ticket] });
    }

    /// A verified webhook: applied to the jobs it concerns at once, answered once durable.
    pub fn webhook(&mut self, event: SfuEvent, ticket: Ticket, now: Millis) {
        self.take_webhook(event, ticket, None, now);
    }

    fn take_webhook(&mut self, event: SfuEvent, ticket: Ticket, inbox: Option<Shard>, now: Millis) {
        if !event.id.is_empty() && self.seen.contains(&event.id) {
            let result = Ok(WebhookOutcome::Duplicate);
            self.effects.push_back(Effect::WebhookHandled { ticket, result });
            return;
        }
        let room: Arc<str> = event.room.as_str().into();
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
        let (identity, sid, reason) = match &event.kind {
            SfuEventKind::ParticipantJoined(p) => (Some(p.identity.as_str()), p.sid.as_str(), ""),
            SfuEventKind::ParticipantLeft { participant: p, departure, .. } => {
                (Some(p.identity.as_str()), p.sid.as_str(), departure.reason())
            }
            _ => (None, "", ""),
        };
        for (id, ev) in targets {
            if let Some(entry) = self.jobs.get(&id) {
                let derived; // a room event names no participant: the job's identity, derived
                let identity = match identity {
                    Some(identity) => identity,
                    None => {
                        derived = entry.identity();
                        derived.as_str()
                    }
                };
                info!(
                    job = %id, room = %entry.delegation.room_id, identity, sid, event = event.kind.name(),
                    webhook = %event.id, livekit_room = %entry.room, user = %entry.delegation.user_id, reason,
                    "webhook for a tracked member"
                );
            }
            self.apply(id, ev, now);
        }
        self.waiting.push(Waiter { webhook_id: event.id, outcome, ticket, inbox });
    }

    /// The answer to an [`Effect::Call`].
    pub fn call_answered(&mut self, call: CallRef, action: DelayedAction, answer: HsAnswer, now: Millis) {
        let started = match self.calls.remove(&call) {
            Some((server, started)) => {
                self.queue_of(action).finished(&server);
                started
            }
            None => {
                error!(job = %call.job, "an answer to a call not in flight");
                0 // started no one knows when: nothing learnt from it if late
            }
        };
        // A job that ended meanwhile, or was given up and taken again, ignores it.
        if self.jobs.get(&call.job).is_none_or(|e| e.incarnation != call.incarnation) {
            return;
        }
        let event = match action {
            DelayedAction::Restart => Event::Restarted { call: call.call, started, answer },
            DelayedAction::Send => Event::SendAnswered { call: call.call, answer },
        };
        self.apply(call.job, event, now);
    }

    /// The answer to an [`Effect::List`] started at `at`. Costs O(participants + jobs of the
    /// room): each participant is looked up in the identity index.
    pub fn listed(&mut self, room: Arc<str>, at: Millis, result: Result<Vec<Participant>, Unobserved>, now: Millis) {
        self.listings_in_flight -= 1;
        let again = self.listings.remove(&room).is_some_and(|l| l.again);
        let ids: Vec<JobId> = self.by_room.get(&room).into_iter().flatten().copied().collect();
        match result {
            Ok(participants) => {
                // (job, participant) pairs, found through the identity index, grouped by job.
                let mut matched: Vec<(JobId, usize)> = Vec::with_capacity(participants.len());
                for (i, p) in participants.iter().enumerate() {
                    matched.extend(self.watching(&room, &p.identity).map(|id| (id, i)));
                }
                matched.sort_unstable();
                for id in ids {
                    let first = matched.partition_point(|(j, _)| *j < id);
                    let present = matched[first..]
                        .iter()
                        .take_while(|(j, _)| *j == id)
                        .map(|(_, i)| session(&participants[*i], ""))
                        .collect::<Vec<_>>();
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let sids: Vec<&str> = present.iter().map(|s| s.sid.as_str()).collect();
                        let phase = self.jobs.get(&id).map(|e| e.job.kind().as_str()).unwrap_or("gone");
                        debug!(job = %id, phase, started_ms_ago = now.saturating_sub(at), present = ?sids, "listing applied");
                    }
                    self.apply(id, Event::Observed { at, present }, now);
                }
            }
            Err(Unobserved) => {
                for id in ids {
                    self.apply(id, Event::ObservationFailed, now);
                }
            }
        }
        if again {
            let spacing = listing_spacing(self.by_room.get(&room).map_or(0, HashSet::len));
            self.list_after(room, at + spacing);
        }
    }

    /// The outcome of the [`Effect::Commit`] in flight.
    pub fn committed(&mut self, result: Result<(), StoreError>, now: Millis) {
        let Some(batch) = self.committing.take() else {
            error!("a commit was reported, but none was in flight");
            return;
        };
        match result {
            Ok(()) => {
                self.answer_webhooks(batch.waiting, Ok(()));
                for s in batch.staged {
                    self.start_delegation(s, now);
                }
            }
            Err(e) => {
                error!(changes = batch.ops.len(), delegations = batch.staged.len(), error = %e,
                    "store commit failed; webhooks answered 503, delegations refused, changes retried");
                self.metrics.store_errors.inc();
                // (Changes of shards given up meanwhile were taken out of the batch then.)
                let newer = std::mem::replace(&mut self.pending, batch.ops);
                self.pending.extend(newer);
                // (Inbox delegations are never staged: in effect at once, their records are in
                // the changes retried above.)
                for s in batch.staged {
                    let d = &s.delegation;
                    error!(room = %d.room_id, user = %d.user_id, delay_id = %DelayRef(&d.delay_id), "delegation not stored");
                    for ticket in s.tickets {
                        self.effects.push_back(Effect::Delegated { ticket, result: Err(Refusal::Store(e.clone())) });
                    }
                }
                self.answer_webhooks(batch.waiting, Err(e));
                self.commit_not_before = now + self.limits.commit_retry;
            }
        }
    }

    /// Lets due jobs act; at most [`Limits::timeouts`] of them (call again while
    /// [`Registry::poll_timeout`] is due).
    pub fn handle_timeout(&mut self, now: Millis) {
        for id in self.scheduler.pop_due(now, self.limits.timeouts) {
            if let Some(entry) = self.jobs.get_mut(&id) {
                entry.scheduled = Maybe::NONE;
            }
            let actions = self.step(id, |job, out| job.handle_timeout(now, out));
            self.run(id, actions);
        }
    }

    /// Lists every room with jobs (the periodic reconciliation with LiveKit).
    pub fn reconcile(&mut self) {
        self.metrics.reconciliations.inc();
        let rooms: Vec<Arc<str>> = self.by_room.keys().cloned().collect();
        debug!(rooms = rooms.len(), "reconciling with LiveKit");
        for room in rooms {
            self.list(room);
        }
    }

    /// Stops starting calls and listings (they are redone on start); answers still count.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    // ---- outputs ------------------------------------------------------------------------------

    /// Starts what the limits allow: queued sends, restarts and listings, and the next commit.
    pub fn flush(&mut self, now: Millis) {
        if !self.draining {
            self.start_calls(now);
            self.start_listings(now);
        }
        let [restarts, sends] = &self.waiting_gauges;
        restarts.set(self.restarts.waiting() as i64);
        sends.set(self.sends.waiting() as i64);
        self.start_commit(now);
    }

    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// When [`Registry::handle_timeout`] (or [`Registry::flush`], for a commit retry) next has
    /// something to do.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let waiting = !self.pending.is_empty() || !self.staged.is_empty();
        let retry = (self.committing.is_none() && waiting).then_some(self.commit_not_before);
        [self.scheduler.next_deadline(), retry, self.listing_wake].into_iter().flatten().min()
    }

    /// Calls started and not answered.
    pub fn calls_in_flight(&self) -> usize {
        self.restarts.in_flight() + self.sends.in_flight()
    }

    /// Whether changes are waiting for the store (pending, staged, or being committed).
    pub fn uncommitted(&self) -> usize {
        self.pending.len() + self.staged.len() + self.committing.as_ref().map_or(0, |b| b.ops.len() + b.staged.len())
    }

    pub fn is_committing(&self) -> bool {
        self.committing.is_some()
    }

    /// Every tracked job, oldest first.
    pub fn summaries(&self, now: Millis) -> Vec<JobSummary> {
        let mut list: Vec<JobSummary> =
            self.jobs.iter().map(|(id, e)| JobSummary::of(*id, &e.delegation, &e.room, &e.job, now)).collect();
        list.sort_by_key(|j| j.created_at_ms);
        list
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    // ---- delegations --------------------------------------------------------------------------

    /// Starts a delegation whose record (and its predecessor's deletion) is committed.
    fn start_delegation(&mut self, staged: Staged, now: Millis) {
        let Staged { id, delegation: d, replaces, tickets } = staged;
        if let Some(old) = replaces {
            if let Some(entry) = self.jobs.get(&old) {
                info!(job = %old, room = %entry.delegation.room_id, identity = entry.identity(),
                    user = %entry.delegation.user_id, delay_id = %DelayRef(&entry.delegation.delay_id), new_job = %id,
                    "superseded by a newer delegation; its delay id will not be sent");
            }
            let actions = self.step(old, |job, out| out.extend(job.supersede()));
            self.run(old, actions);
        }
        let delegation = Arc::new(d);
        let (job, actions) = Job::new(delegation.delay_ms, id.0, self.timing.clone(), now);
        info!(
            job = %id, room = %delegation.room_id, identity = %delegation.primary_identity(),
            livekit_room = %delegation.livekit_room(), user = %delegation.user_id, device = %delegation.device_id,
            delay_id = %DelayRef(&delegation.delay_id), delay_ms = delegation.delay_ms, mode = ?delegation.mode,
            "delegation accepted"
        );
        let outcome = if replaces.is_some() { "replaced" } else { "accepted" };
        self.metrics.delegations.get_or_create(&OutcomeLabel { outcome }).inc();
        self.insert(id, job, delegation);
        // Its first durable state was stored with it.
        let actions = actions.into_iter().filter(|a| *a != Action::Persist).collect();
        self.run(id, actions);
        for ticket in tickets {
            self.effects.push_back(Effect::Delegated { ticket, result: Ok(id) });
        }
    }

    fn insert(&mut self, id: JobId, job: Job, delegation: Arc<Delegation>) {
        // One allocation per LiveKit room, shared by its jobs.
        let name = delegation.livekit_room();
        let room = self.by_room.get_key_value(name.as_str()).map(|(k, _)| k.clone()).unwrap_or_else(|| name.into());
        let watch = delegation.watch();
        for identity in watch.identities(&delegation.user_id, &delegation.device_id) {
            self.by_identity.insert(&(&*room, identity.as_str()), id);
        }
        let watch = watch.matcher();
        let jobs = self.by_room.entry(room.clone()).or_default();
        if jobs.is_empty() {
            self.effects.push_back(Effect::Watch { room: room.clone(), watched: true });
        }
        jobs.insert(id);
        self.by_member.insert(&delegation.member_key(), id);
        self.by_delay.insert(&(delegation.server_name(), delegation.delay_id.as_str()), id);
        self.by_user.increment(&delegation.user_id.as_str());
        views::move_gauge(&self.metrics, None, Some(job.kind()));
        let shard = shard_of(&room);
        self.incarnations = self.incarnations.wrapping_add(1);
        let incarnation = self.incarnations;
        let scheduled = Maybe::NONE;
        self.jobs.insert(id, Box::new(Entry { job, incarnation, shard, delegation, room, watch, scheduled }));
    }

    fn remove(&mut self, id: JobId) -> Option<Box<Entry>> {
        let entry = self.jobs.remove(&id)?;
        for identity in entry.delegation.identities() {
            self.by_identity.remove(&(&*entry.room, identity.as_str()), id);
        }
        if let Some(ids) = self.by_room.get_mut(&entry.room) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_room.remove(&entry.room);
                self.effects.push_back(Effect::Watch { room: entry.room.clone(), watched: false });
            }
        }
        let d = &entry.delegation;
        self.by_member.remove(&d.member_key(), id);
        self.by_delay.remove(&(d.server_name(), d.delay_id.as_str()), id);
        self.by_user.decrement(&d.user_id.as_str());
        self.scheduler.set(id, entry.scheduled.get(), None);
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

    /// The jobs watching `identity` in LiveKit room `room` (the index's candidates, checked).
    fn watching<'a>(&'a self, room: &'a Arc<str>, identity: &'a str) -> impl Iterator<Item = JobId> + 'a {
        self.by_identity
            .candidates(&(&**room, identity))
            .iter()
            .copied()
            .filter(move |id| self.jobs.get(id).is_some_and(|e| e.watches_in(room, identity)))
    }

    // ---- driving jobs -------------------------------------------------------------------------

    fn apply(&mut self, id: JobId, event: Event, now: Millis) {
        let actions = self.step(id, |job, out| job.handle(event, now, out));
        self.run(id, actions);
    }

    /// Lets job `id` (if it still exists) take one step, keeping the state gauges in step.
    fn step(&mut self, id: JobId, f: impl FnOnce(&mut Job, &mut Vec<Action>)) -> Vec<Action> {
        let Some(entry) = self.jobs.get_mut(&id) else { return Vec::new() };
        let before = entry.job.kind();
        let mut actions = Vec::new();
        f(&mut entry.job, &mut actions);
        views::move_gauge(&self.metrics, Some(before), Some(entry.job.kind()));
        actions
    }

    /// Carries out a job's actions, then reschedules it.
    fn run(&mut self, id: JobId, actions: Vec<Action>) {
        for action in actions {
            let Some(entry) = self.jobs.get(&id) else { return };
            match action {
                Action::Restart { call } => {
                    self.restarts.push(entry.delegation.server_name(), (id, call));
                }
                Action::Send { call } => {
                    let shard = entry.shard;
                    if let Some(owned) = self.owned.as_mut().and_then(|o| o.get_mut(&shard)) {
                        owned.sends.next.push((id, call));
                        self.look_at_inbox(shard);
                    } else if let Some(entry) = self.jobs.get(&id) {
                        self.sends.push(entry.delegation.server_name(), (id, call));
                    }
                }
                Action::Probe => {
                    let room = entry.room.clone();
                    self.list(room);
                }
                Action::Persist => {
                    if let Some(state) = entry.job.durable() {
                        self.pending.push((entry.shard, StoreOp::SetState(id, state)));
                    }
                }
                Action::Finish(outcome) => self.finish(id, outcome),
            }
        }
        if let Some(entry) = self.jobs.get_mut(&id) {
            entry.reschedule(&mut self.scheduler, id);
        }
    }

    fn finish(&mut self, id: JobId, outcome: Outcome) {
        let Some(entry) = self.remove(id) else { return };
        let d = &entry.delegation;
        let (room, identity, delay_id) = (&d.room_id, entry.identity(), DelayRef(&d.delay_id));
        let m = &self.metrics;
        m.jobs_finished.get_or_create(&OutcomeLabel { outcome: outcome.as_str() }).inc();
        match outcome {
            Outcome::Sent { trigger, latency } => {
                if trigger == Trigger::Reconciled {
                    m.reconciliation_departures.inc();
                }
                m.leave_latency
                    .get_or_create(&TriggerLabel { trigger: trigger.as_str() })
                    .observe(latency as f64 / 1000.0);
                info!(job = %id, room = %room, identity, user = %d.user_id, device = %d.device_id,
                    %delay_id, trigger = trigger.as_str(), latency_ms = latency, "leave sent");
            }
            Outcome::Expired => {
                warn!(job = %id, room = %room, identity, user = %d.user_id, %delay_id,
                    "homeserver unreachable past the event's deadline; its own timer has fired the leave");
            }
            Outcome::Unconfirmed => {
                warn!(job = %id, room = %room, identity, user = %d.user_id, %delay_id,
                    "LiveKit could not confirm the member's presence for too long; restarts stopped, the homeserver's timer decides");
            }
            Outcome::Gone => {
                info!(job = %id, room = %room, identity, user = %d.user_id, %delay_id,
                    "delayed event no longer exists on the homeserver; job ended without sending");
            }
            // Its row was deleted in the commit that stored its successor.
            Outcome::Superseded => return,
        }
        self.pending.push((entry.shard, StoreOp::Delete(id)));
    }

    /// Starts a look at `shard`'s inbox for the sends decided since the last one, unless one is
    /// under way or its sends still wait for the entries it found.
    fn look_at_inbox(&mut self, shard: Shard) {
        let Some(owned) = self.owned.as_mut().and_then(|o| o.get_mut(&shard)) else { return };
        let held = &mut owned.sends;
        if held.look != Look::Idle || held.next.is_empty() {
            return;
        }
        held.covered = std::mem::take(&mut held.next);
        held.look = Look::InFlight;
        self.effects.push_back(Effect::LookAtInbox { shard, epoch: owned.epoch });
    }

    /// Queues `shard`'s sends covered by its last look once every entry the look found is taken
    /// in (a send whose job was superseded meanwhile is dropped when its turn comes), and looks
    /// again for those decided since.
    fn release_sends(&mut self, shard: Shard) {
        let Some(owned) = self.owned.as_mut().and_then(|o| o.get_mut(&shard)) else { return };
        let held = &mut owned.sends;
        match held.look {
            Look::Found(latest) if latest <= owned.last => held.look = Look::Idle,
            _ => return,
        }
        for (id, call) in std::mem::take(&mut held.covered) {
            if let Some(entry) = self.jobs.get(&id) {
                self.sends.push(entry.delegation.server_name(), (id, call));
            }
        }
        self.look_at_inbox(shard);
    }

    fn queue_of(&mut self, action: DelayedAction) -> &mut FairQueues<(JobId, u64)> {
        match action {
            DelayedAction::Restart => &mut self.restarts,
            DelayedAction::Send => &mut self.sends,
        }
    }

    /// Starts queued calls up to the limits, homeservers in turn, sends first. A call its job no
    /// longer awaits (the job moved on while it waited) is dropped.
    fn start_calls(&mut self, now: Millis) {
        for action in [DelayedAction::Send, DelayedAction::Restart] {
            while let Some((server, (id, call))) = self.queue_of(action).pop() {
                if !self.start_call(id, call, server.clone(), action, now) {
                    self.queue_of(action).finished(&server);
                }
            }
        }
    }

    fn start_call(&mut self, id: JobId, call: u64, server: Arc<str>, action: DelayedAction, now: Millis) -> bool {
        let Some(entry) = self.jobs.get_mut(&id) else { return false };
        if !entry.job.call_started(call, now) {
            return false;
        }
        entry.reschedule(&mut self.scheduler, id);
        let d = entry.delegation.clone();
        let identity = entry.identity();
        if action == DelayedAction::Restart && now > entry.job.deadline() {
            self.metrics.late_restarts.inc();
            warn!(job = %id, room = %d.room_id, identity, user = %d.user_id, delay_id = %DelayRef(&d.delay_id),
                "restart issued after the event's estimated deadline");
        }
        let (shard, call) = (entry.shard, CallRef { job: id, incarnation: entry.incarnation, call });
        self.calls.insert(call, (server, now));
        self.effects.push_back(Effect::Call { call, shard, action, delegation: d, identity });
        true
    }

    /// Lists `room`, unless a listing of it is queued, or running (then once more after it, so
    /// that whoever asked gets an answer that started after asking).
    fn list(&mut self, room: Arc<str>) {
        self.list_after(room, 0);
    }

    /// As [`Registry::list`], not before `not_before`.
    fn list_after(&mut self, room: Arc<str>, not_before: Millis) {
        match self.listings.get_mut(&room) {
            Some(l) => l.again |= l.in_flight,
            None => {
                self.listings.insert(room.clone(), Listing { in_flight: false, again: false, not_before });
                self.listing_queue.push_back(room);
            }
        }
    }

    fn start_listings(&mut self, now: Millis) {
        self.listing_wake = None;
        // Each queued room is looked at once; one spaced out goes back to the end of the queue.
        for _ in 0..self.listing_queue.len() {
            if self.listings_in_flight >= self.limits.listings {
                break;
            }
            let Some(room) = self.listing_queue.pop_front() else { break };
            if !self.by_room.contains_key(&room) {
                self.listings.remove(&room); // its jobs ended while it waited
                continue;
            }
            let Some(l) = self.listings.get_mut(&room) else { continue };
            if l.not_before > now {
                self.listing_wake = Some(self.listing_wake.map_or(l.not_before, |w| w.min(l.not_before)));
                self.listing_queue.push_back(room);
                continue;
            }
            l.in_flight = true;
            self.listings_in_flight += 1;
            self.effects.push_back(Effect::List { room, at: now });
        }
    }

    // ---- store --------------------------------------------------------------------------------

    fn start_commit(&mut self, now: Millis) {
        if let Some(batch) = &mut self.committing {
            if self.pending.is_empty() && self.staged.is_empty() {
                // No effects of their own: they wait for the state they saw to be durable.
                batch.waiting.append(&mut self.waiting);
            }
            return;
        }
        if self.pending.is_empty() && self.staged.is_empty() {
            let waiting = std::mem::take(&mut self.waiting);
            self.answer_webhooks(waiting, Ok(()));
            return;
        }
        if now < self.commit_not_before {
            return;
        }
        let job_ops = std::mem::take(&mut self.pending);
        let staged = std::mem::take(&mut self.staged);
        let mut ops: Vec<StoreOp> = job_ops.iter().map(|(_, op)| op.clone()).collect();
        for s in &staged {
            ops.push(StoreOp::Insert(Box::new(JobRecord {
                id: s.id,
                delegation: s.delegation.clone(),
                state: Durable::WAITING,
            })));
            ops.extend(s.replaces.map(StoreOp::Delete));
        }
        let fence = self.owned.as_ref().map(|o| o.iter().map(|(s, held)| (*s, held.epoch)).collect());
        let waiting = std::mem::take(&mut self.waiting);
        self.committing = Some(Batch { ops: job_ops, staged, waiting });
        self.effects.push_back(Effect::Commit { ops, fence });
    }

    fn answer_webhooks(&mut self, waiting: Vec<Waiter>, result: Result<(), StoreError>) {
        for w in waiting {
            let result = match &result {
                Ok(()) => {
                    // Only what took effect: the same webhook delivered again once a job cares
                    // (its delegation took effect meanwhile) must not be dropped as a duplicate.
                    if w.outcome == WebhookOutcome::Applied {
                        self.remember_webhook(w.webhook_id);
                    }
                    Ok(w.outcome)
                }
                Err(e) => Err(e.clone()),
            };
            self.effects.push_back(Effect::WebhookHandled { ticket: w.ticket, result });
        }
    }

    fn remember_webhook(&mut self, id: String) {
        if id.is_empty() || !self.seen.insert(id.clone()) {
            return;
        }
        self.seen_order.push_back(id);
        if self.seen_order.len() > self.limits.seen_webhooks {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
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

#[cfg(test)]
mod tests;
