//! The per-member lifecycle of one delegated delayed leave, as a pure state machine.
//!
//! A [`Job`] is fed events (webhooks, RoomService observations, homeserver answers) together with
//! the current time, and answers with [`Action`]s for the shell to carry out: restart or send the
//! delayed event, ask LiveKit who is connected, persist the job, forget it. It never does IO, never
//! sleeps and never reads a clock; [`Job::poll_timeout`] tells the shell when it next wants
//! [`Job::handle_timeout`]. This is what the property tests in this module exercise.
//!
//! The two sacred rules live here:
//! * a member with a LiveKit session the job knows to be connected is never sent a leave. A job
//!   tracks every live session of its member (a reconnection or a second device under the same
//!   identity overlaps the old session, and webhooks may arrive in any order); only the final
//!   departure of the *last* of them, a finished room, or LiveKit confirming the member absent
//!   leads to a send;
//! * a member who is gone is sent a leave at once: the send is issued in the same step as the
//!   event that proved the departure.
//!
//! When unsure (LiveKit unreachable, a migration in progress) the job keeps the delayed event alive
//! and asks again; the homeserver's own timer remains the last safety net.

use std::sync::Arc;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// Milliseconds on the shell's clock: Unix time as of the shell's start, advanced monotonically
/// from there. Mostly only differences matter; the times stored with a job (an absence proof's
/// listings, [`Absences`], and a grace period's end) mean the same to the job's next holder, up
/// to clock skew.
pub use crate::config::Millis;
/// The lifecycle's timing knobs, read from the configuration.
pub use crate::config::Timing;

/// A LiveKit participant identity, held without a heap allocation: a hashed one (43 characters
/// of unpadded base64, what today's services mint) as its 32-byte digest, any other as text
/// (inline up to 24 bytes, as the legacy `@user:server:DEVICE`). Every connected member holds
/// one: as text, the hashed form took 88 bytes of it.
#[derive(Clone, PartialEq, Eq)]
pub enum Identity {
    Digest([u8; 32]),
    Text(CompactString),
}

impl Identity {
    pub fn new(identity: &str) -> Identity {
        match crate::identity::hashed_digest(identity) {
            Some(digest) => Identity::Digest(digest),
            None => Identity::Text(identity.into()),
        }
    }
}

impl From<&str> for Identity {
    fn from(identity: &str) -> Identity {
        Identity::new(identity)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Digest(digest) => f.write_str(crate::identity::hashed_text(digest, &mut [0; 43])),
            Identity::Text(text) => f.write_str(text),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Identity, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Ok(Identity::new(&text))
    }
}

/// A LiveKit session of the member that the job is bound to (believes connected).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredBinding", into = "StoredBinding")]
pub struct Binding {
    pub identity: Identity,
    /// Participant SID of the session (`PA_…`).
    pub sid: CompactString,
    /// When it joined, Unix milliseconds (`joinedAt` × 1000 from a LiveKit that sends no
    /// `joinedAtMs`).
    pub joined_at_ms: i64,
    /// SID of the LiveKit room instance (`RM_…`), when known; empty when learnt from a listing.
    pub room_sid: CompactString,
}

/// A [`Binding`] as stored: `joined_at` in seconds too, all that rows stored before the
/// milliseconds were kept have (their `joined_at_ms` is 0).
#[derive(Serialize, Deserialize)]
struct StoredBinding {
    identity: Identity,
    sid: CompactString,
    joined_at: i64,
    #[serde(default)]
    joined_at_ms: i64,
    #[serde(default)]
    room_sid: CompactString,
}

impl From<StoredBinding> for Binding {
    fn from(s: StoredBinding) -> Binding {
        let joined_at_ms = crate::livekit::joined_ms(s.joined_at_ms, s.joined_at);
        Binding { identity: s.identity, sid: s.sid, joined_at_ms, room_sid: s.room_sid }
    }
}

impl From<Binding> for StoredBinding {
    fn from(b: Binding) -> StoredBinding {
        let joined_at = b.joined_at_ms.div_euclid(1000);
        StoredBinding {
            identity: b.identity,
            sid: b.sid,
            joined_at,
            joined_at_ms: b.joined_at_ms,
            room_sid: b.room_sid,
        }
    }
}

/// Why a job decided to send its leave. Kept for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `participant_left` / `participant_connection_aborted` of the bound session.
    Departed,
    /// The bound member was absent from consecutive RoomService listings (a lost webhook).
    Reconciled,
    /// The member never connected and LiveKit confirmed it absent after the join timeout.
    NeverJoined,
    /// A migration / shutdown grace period ended and LiveKit confirmed the member absent.
    GraceExpired,
    /// `room_finished` for the room the member was bound in.
    RoomFinished,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Departed => "departed",
            Trigger::Reconciled => "reconciled",
            Trigger::NeverJoined => "never_joined",
            Trigger::GraceExpired => "grace_expired",
            Trigger::RoomFinished => "room_finished",
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The homeserver accepted our send (or told us the event was already sent). `latency` runs
    /// from the moment the departure was known to the homeserver's answer.
    Sent { trigger: Trigger, latency: Millis },
    /// A restart answered 404/409: the client cancelled or sent it itself. Nothing to do.
    Gone,
    /// The event's deadline passed while the homeserver could not be reached: it fired by itself.
    Expired,
    /// LiveKit could not confirm for `unconfirmed_limit` whether a member that had to be confirmed
    /// is there; restarts stopped, and the homeserver's own timer sends the leave.
    Unconfirmed,
    /// A newer delegation for the same member replaced this one; its delay id is never sent.
    Superseded,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Sent { .. } => "sent",
            Outcome::Gone => "gone",
            Outcome::Expired => "expired",
            Outcome::Unconfirmed => "unconfirmed",
            Outcome::Superseded => "superseded",
        }
    }
}

/// The part of a job's phase that survives a restart of the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Durable {
    /// `absent`: past the join timeout, the listings that found the member absent so far (the
    /// join timeout itself runs from the delegation's `created_at_ms`).
    Waiting {
        #[serde(default, skip_serializing_if = "Absences::is_empty")]
        absent: Absences,
    },
    /// `binding` is the newest live session; `others` the member's other live sessions;
    /// `absent`, by session, the listings that found one absent so far: the proof of a lost
    /// departure, which the job's next holder (another instance, or this one restarted)
    /// continues instead of starting over.
    Connected {
        binding: Binding,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        others: Vec<Binding>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        absent: Vec<(CompactString, Absences)>,
    },
    /// `until`: when the grace period given to the bound session ends; `absent`: the listings
    /// past it that found the member absent so far.
    Grace {
        binding: Binding,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<Millis>,
        #[serde(default, skip_serializing_if = "Absences::is_empty")]
        absent: Absences,
    },
    /// `returned`: sessions of the member seen connected again while the send was in flight.
    Sending {
        trigger: Trigger,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        returned: Vec<Binding>,
    },
}

/// Coarse phase name, for metrics and listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PhaseKind {
    Waiting,
    Connected,
    Grace,
    Sending,
    Done,
}

impl PhaseKind {
    pub const LIVE: [PhaseKind; 4] = [PhaseKind::Waiting, PhaseKind::Connected, PhaseKind::Grace, PhaseKind::Sending];

    pub fn as_str(self) -> &'static str {
        match self {
            PhaseKind::Waiting => "waiting",
            PhaseKind::Connected => "connected",
            PhaseKind::Grace => "grace",
            PhaseKind::Sending => "sending",
            PhaseKind::Done => "done",
        }
    }
}

/// Why the SFU said a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    /// The session may come back on another node or after a restart of the SFU (MIGRATION,
    /// SERVER_SHUTDOWN) or was replaced by a newer session of the same identity
    /// (DUPLICATE_IDENTITY): wait for the member to reappear before sending.
    MayReturn,
    /// Any other reason: the session is over.
    Final,
}

/// A session of one of the member's identities as LiveKit reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub identity: String,
    pub sid: String,
    /// When it joined, Unix milliseconds.
    pub joined_at_ms: i64,
    pub room_sid: String,
}

/// Answer of the homeserver to a restart or send, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HsAnswer {
    /// 200.
    Ok,
    /// 404 / 409: the delayed event no longer exists (sent, cancelled or unknown).
    Gone,
    /// 429, with the wait the homeserver asked for.
    RetryAfter(Millis),
    /// 5xx, network error, timeout, or 401/403 (misconfiguration): try again later.
    Failed,
}

/// Everything that can happen to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `participant_joined` for one of the member's identities.
    Joined(Session),
    /// `participant_left` / `participant_connection_aborted` for one of the member's identities.
    Left { session: Session, reason: LeaveReason },
    /// `room_finished` for the member's LiveKit room.
    RoomFinished { room_sid: String },
    /// A RoomService listing of the member's room, started at `at`: the member's connected
    /// sessions (none if it is not there).
    Observed { at: Millis, present: Vec<Session> },
    /// RoomService could not be asked.
    ObservationFailed,
    /// The homeserver answered the restart issued as call `call`, which the shell started at
    /// `started` (the homeserver cannot have restarted the event before).
    Restarted { call: u64, started: Millis, answer: HsAnswer },
    /// The homeserver answered the send issued as call `call`.
    SendAnswered { call: u64, answer: HsAnswer },
}

/// What the shell must do for the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Restart the delayed event on the homeserver; answer with [`Event::Restarted`] carrying the
    /// same `call`, so that a late answer to an older call is never taken for this one.
    Restart { call: u64 },
    /// Send the delayed event now; answer with [`Event::SendAnswered`] carrying the same `call`.
    Send { call: u64 },
    /// List the member's LiveKit room; answer with [`Event::Observed`] / [`Event::ObservationFailed`].
    Probe,
    /// The durable phase changed: store [`Job::durable`].
    Persist,
    /// The job is over: forget it, in memory and in the store.
    Finish(Outcome),
}

/// Bookkeeping of the restart (or send) loop against the homeserver.
#[derive(Debug, Clone, PartialEq)]
struct Calls {
    /// A request is outstanding; its answer will arrive as an event.
    in_flight: bool,
    /// When the outstanding request was issued.
    issued_at: Millis,
    /// When the outstanding request counts as failed if unanswered; set once the shell has
    /// started it (it may wait in the shell's queue first, which is not the homeserver's fault).
    expires: Maybe,
    /// When to issue the next request (meaningful only when not in flight).
    next_at: Millis,
    /// Consecutive failures, for the backoff.
    failures: u32,
    /// Calls started whose answer has not come (the one in flight, and any given up on as too
    /// slow: the homeserver may still carry them out).
    unanswered: u8,
    /// Requests issued so far; salts the jitter.
    count: u64,
}

impl Calls {
    /// Whether the call asked for has been started by the shell and not answered yet: a send
    /// may then reach the homeserver whatever the job learns from now on.
    fn started(&self) -> bool {
        self.in_flight && self.expires.get().is_some()
    }

    fn due_now(now: Millis) -> Self {
        Calls {
            in_flight: false,
            issued_at: now,
            expires: Maybe::NONE,
            next_at: now,
            failures: 0,
            unanswered: 0,
            count: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Delegated; the member has not been seen connected yet.
    Waiting {
        join_deadline: Millis,
    },
    /// Bound to the member's live sessions (at least one), oldest first.
    Connected {
        sessions: Vec<Live>,
    },
    /// The bound session left at `since` with a reason it may come back from.
    Grace {
        /// Boxed: the phase is in every job, a grace period in few of them at a time (inline, it
        /// made every job 70 bytes larger).
        binding: Box<Binding>,
        since: Millis,
        until: Millis,
    },
    /// The member is gone; the leave is being sent.
    Sending {
        trigger: Trigger,
        since: Millis,
        /// Sessions of the member seen connected again while the send was in flight: if the send
        /// does not go out, the job binds to them instead of sending again.
        returned: Few<Binding>,
    },
    Done(Outcome),
}

/// A session the job believes connected, and what reconciliation knows of it.
#[derive(Debug, Clone, PartialEq)]
struct Live {
    binding: Binding,
    /// When the job learnt of it: only a listing started later can prove it absent.
    since: Millis,
    /// Listings that did not show it since one last did.
    absent: Absences,
}

impl Live {
    fn new(binding: Binding, now: Millis) -> Self {
        Live { binding, since: now, absent: Absences::default() }
    }
}

/// Listings that found a session (or the member) absent, since one last found it: the evidence
/// that it is gone. One listing is no proof, nor are two: each may fall in the gap of a
/// reconnection whose webhooks were lost (a migration, a new session replacing the old), and a
/// member can reconnect twice between two listings. Gone means [`Timing::absences_to_leave`]
/// listings without it, each started at least [`Timing::absence_spacing`] after the previous one
/// counted (listings started moments apart fall in the same gap), spanning at least `span`: the
/// time a reconnection is given when we know of it.
///
/// Stored with the job (times on the shell's clock), so that its next holder carries on with the
/// evidence rather than starting over.
///
/// 16 bytes (two in most connected jobs): the count rides in the top byte of the last listing's
/// time, which Unix milliseconds leave free for two million years.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "StoredAbsences", into = "StoredAbsences")]
pub struct Absences {
    /// When the first listing counted started.
    first: Millis,
    /// When the last one started (low 56 bits), and how many counted (top 8).
    last_and_count: u64,
}

/// [`Absences`] as stored.
#[derive(Serialize, Deserialize)]
struct StoredAbsences {
    count: u8,
    first: Millis,
    last: Millis,
}

impl From<StoredAbsences> for Absences {
    fn from(s: StoredAbsences) -> Absences {
        Absences::new(s.count, s.first, s.last)
    }
}

impl From<Absences> for StoredAbsences {
    fn from(a: Absences) -> StoredAbsences {
        StoredAbsences { count: a.count(), first: a.first, last: a.last() }
    }
}

impl Durable {
    /// A delegation just stored: waiting for its member, nothing established yet.
    pub const WAITING: Durable = Durable::Waiting { absent: Absences { first: 0, last_and_count: 0 } };
}

impl Absences {
    const TIME: u64 = (1 << 56) - 1;

    fn new(count: u8, first: Millis, last: Millis) -> Absences {
        Absences { first, last_and_count: (last & Absences::TIME) | (u64::from(count) << 56) }
    }

    /// How many listings counted.
    fn count(&self) -> u8 {
        (self.last_and_count >> 56) as u8
    }

    /// When the last listing counted started.
    fn last(&self) -> Millis {
        self.last_and_count & Absences::TIME
    }

    fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// Evidence gathered by an earlier holder, as this one can use it at `now`: a time ahead of
    /// `now` (the earlier holder's clock ran ahead of ours) is taken as `now`, so that skew can
    /// only make the proof slower, never let it span less than it must.
    fn carried_over(self, now: Millis) -> Absences {
        Absences::new(self.count(), self.first.min(now), self.last().min(now))
    }

    /// The same listings seen `by` later (a test of clocks that disagree).
    #[cfg(test)]
    pub(crate) fn shifted(self, by: Millis) -> Absences {
        Absences::new(self.count(), self.first + by, self.last() + by)
    }

    /// Counts a listing started at `at` that did not show it (unless it started too soon after
    /// the last one counted).
    fn note(&mut self, at: Millis, timing: &Timing) {
        if self.count() == 0 {
            *self = Absences::new(1, at, at);
        } else if at >= self.last() + timing.absence_spacing {
            *self = Absences::new(self.count().saturating_add(1), self.first, at);
        }
    }

    fn proven(&self, span: Millis, timing: &Timing) -> bool {
        self.count() >= timing.absences_to_leave && self.last() >= self.first + span
    }

    /// When a listing can next add to the evidence, if it is still short of proof.
    fn next_listing(&self, span: Millis, timing: &Timing) -> Option<Millis> {
        (self.count() > 0 && !self.proven(span, timing))
            .then(|| (self.last() + timing.absence_spacing).max(self.first + span))
    }
}

impl Binding {
    fn of(session: Session) -> Self {
        Binding {
            identity: Identity::new(&session.identity),
            sid: session.sid.into(),
            joined_at_ms: session.joined_at_ms,
            room_sid: session.room_sid.into(),
        }
    }
}

/// Sessions of one member counted at most. LiveKit keeps one session per identity and a member
/// has at most three identities; more only accumulate when departures are lost, and listings
/// prune those. The cap bounds a job's memory whatever LiveKit says.
const MAX_SESSIONS: usize = 8;

/// Counts session `b` as live from `now`; whether anything changed. LiveKit keeps one session per
/// identity: a session of the same identity that joined strictly earlier is over (kicked as a
/// duplicate), and one that joined strictly later makes `b` a stale report. Equal join times (a
/// LiveKit that sends whole seconds only) keep both. At the cap, the session learnt longest ago
/// makes room.
fn admit(sessions: &mut Vec<Live>, gone: &mut Few<(CompactString, Millis)>, b: Binding, now: Millis) -> bool {
    let same_identity = |l: &Live| l.binding.identity == b.identity;
    if sessions.iter().any(|l| l.binding.sid == b.sid || (same_identity(l) && l.binding.joined_at_ms > b.joined_at_ms))
    {
        return false;
    }
    prune(sessions, gone, now, |l| !(same_identity(l) && l.binding.joined_at_ms < b.joined_at_ms));
    if sessions.len() == MAX_SESSIONS {
        sessions.remove(0);
    }
    sessions.push(Live::new(b, now));
    true
}

/// Remembers that session `b` was seen back while a send was in flight (once, and as many as
/// [`MAX_SESSIONS`]); whether it was new. Stored: a job taken over must not send again for a
/// member its previous holder saw back.
fn note_return(returned: &mut Few<Binding>, b: Binding) -> bool {
    if returned.len() < MAX_SESSIONS && !returned.iter().any(|r| r.sid == b.sid) {
        returned.push(b);
        return true;
    }
    false
}

/// Forgets the sessions seen back that are `gone`; whether any was.
fn forget_returns(returned: &mut Few<Binding>, gone: impl Fn(&Binding) -> bool) -> bool {
    let before = returned.len();
    returned.retain(|b| !gone(b));
    returned.len() != before
}

/// Records that the job stopped counting on session `sid` at `at`.
fn note_gone(gone: &mut Few<(CompactString, Millis)>, sid: &str, at: Millis) {
    gone.retain(|(s, _)| s != sid);
    if gone.len() == DEAD_SIDS_KEPT {
        gone.remove(0);
    }
    gone.push((sid.into(), at));
}

/// Keeps the `sessions` for which `keep` holds, noting the others gone at `now`; whether any went.
fn prune(
    sessions: &mut Vec<Live>,
    gone: &mut Few<(CompactString, Millis)>,
    now: Millis,
    keep: impl Fn(&Live) -> bool,
) -> bool {
    let before = sessions.len();
    sessions.retain(|l| {
        let kept = keep(l);
        if !kept {
            note_gone(gone, &l.binding.sid, now);
        }
        kept
    });
    sessions.len() != before
}

/// Applies a listing started at `at` that shows `present` to the live `sessions`: listed ones are
/// confirmed; one the job knew before the listing started (a listing started earlier may predate
/// its join) and that it does not show is one absence closer to being pruned, and pruned once its
/// absence is proven over the grace period: a session that vanished without a departure is given
/// the time a migration announced by a webhook is given. Whether anything to store changed (a
/// session pruned, or the evidence against one).
fn reconcile(
    sessions: &mut Vec<Live>,
    gone: &mut Few<(CompactString, Millis)>,
    present: &[Session],
    at: Millis,
    now: Millis,
    timing: &Timing,
) -> bool {
    let mut changed = false;
    for live in sessions.iter_mut() {
        let before = live.absent;
        if present.iter().any(|s| s.sid == live.binding.sid) {
            live.absent = Absences::default();
        } else if at > live.since {
            live.absent.note(at, timing);
        }
        // The evidence is stored: the next holder must see it grow, and see it cleared.
        changed |= live.absent != before;
    }
    prune(sessions, gone, now, |l| !l.absent.proven(timing.grace, timing)) | changed
}

/// When a listing can next add to the evidence against one of `sessions`.
fn next_listing(sessions: &[Live], timing: &Timing) -> Option<Millis> {
    sessions.iter().filter_map(|l| l.absent.next_listing(timing.grace, timing)).min()
}

/// Asks for a listing at `at` (not before `now`), unless one is asked for sooner already.
fn want_listing(probe_at: &mut Maybe, at: Option<Millis>, now: Millis) {
    if let Some(at) = at {
        *probe_at = Maybe::at(probe_at.get().map_or(at, |p| p.min(at)).max(now));
    }
}

/// An instant or none in 8 bytes, where an `Option<Millis>` takes 16: four in every job's
/// entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Maybe(Millis);

impl Maybe {
    pub const NONE: Maybe = Maybe(Millis::MAX);

    /// `at`, which is never `Millis::MAX` (585 million years after the epoch).
    pub fn at(at: Millis) -> Maybe {
        debug_assert!(at != Millis::MAX);
        Maybe(at)
    }

    pub fn of(at: Option<Millis>) -> Maybe {
        at.map_or(Maybe::NONE, Maybe::at)
    }

    pub fn get(self) -> Option<Millis> {
        (self != Maybe::NONE).then_some(self.0)
    }

    pub fn take(&mut self) -> Option<Millis> {
        std::mem::replace(self, Maybe::NONE).get()
    }
}

/// The newest of `sessions` (by `joinedAt`; of equals, the one learnt last).
fn newest(sessions: &[Live]) -> Option<&Binding> {
    sessions.iter().rev().max_by_key(|l| l.binding.joined_at_ms).map(|l| &l.binding)
}

/// One delegated delayed leave and everything known about its member.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The delay the client scheduled the event with.
    delay: Millis,
    /// Seed of this job's jitter, so that jitter is deterministic (and the machine pure).
    seed: u64,
    /// Shared by every job of a process.
    timing: Arc<Timing>,
    phase: Phase,
    /// Keeps the delayed event alive while the phase is Waiting / Connected / Grace, and sends it
    /// while Sending.
    calls: Calls,
    /// Conservative estimate of when the homeserver fires the event if we do nothing more.
    deadline: Millis,
    /// A RoomService listing is wanted at this time (and none has been asked for since).
    probe_at: Maybe,
    /// Waiting or in grace: the listings that found the member absent past its deadline.
    absent: Absences,
    /// A listing was asked for; unanswered by then, it counts as failed.
    probe_expires: Maybe,
    /// Sessions we have seen leave; a late or duplicated `participant_joined` for them is stale.
    dead_sids: Few<CompactString>,
    /// Sessions the job stopped counting on without a final departure (gone for a migration,
    /// absent from listings, in a finished room, or the reason the job is sending), with when:
    /// only a listing started after that shows them back.
    gone_sids: Few<(CompactString, Millis)>,
}

/// A short list (sessions seen leaving, at most [`DEAD_SIDS_KEPT`]; or back during a send) that
/// costs one pointer while empty, as it is in almost every job (three `Vec`s cost every job 72
/// bytes).
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::box_collection)] // the point: one pointer (a Vec is three) while empty
struct Few<T>(Option<Box<Vec<T>>>);

impl<T> Default for Few<T> {
    fn default() -> Self {
        Few(None)
    }
}

impl<T> std::ops::Deref for Few<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl<T> Few<T> {
    fn into_vec(self) -> Vec<T> {
        self.0.map_or_else(Vec::new, |items| *items)
    }

    fn push(&mut self, item: T) {
        self.0.get_or_insert_with(Box::default).push(item);
    }

    fn remove(&mut self, i: usize) -> T {
        let items = self.0.as_mut().expect("removing from an empty list");
        let item = items.remove(i);
        if items.is_empty() {
            self.0 = None;
        }
        item
    }

    fn retain(&mut self, keep: impl FnMut(&T) -> bool) {
        if let Some(items) = &mut self.0 {
            items.retain(keep);
            if items.is_empty() {
                self.0 = None;
            }
        }
    }
}

const DEAD_SIDS_KEPT: usize = 4;

impl Job {
    /// A new delegation. We do not know how much of the delay has elapsed, so the event is
    /// restarted at once; LiveKit is asked at once whether the member is already connected.
    pub fn new(delay: Millis, seed: u64, timing: impl Into<Arc<Timing>>, now: Millis) -> (Job, Vec<Action>) {
        let timing = timing.into();
        let join_deadline = now + timing.join_timeout;
        let mut job = Job {
            delay,
            seed,
            timing,
            phase: Phase::Waiting { join_deadline },
            calls: Calls::due_now(now),
            // Unknown until our first restart succeeds; it cannot be later than this.
            deadline: now + delay,
            probe_at: Maybe::at(now),
            probe_expires: Maybe::NONE,
            absent: Absences::default(),
            dead_sids: Few::default(),
            gone_sids: Few::default(),
        };
        let mut actions = vec![Action::Persist];
        job.handle_timeout(now, &mut actions);
        (job, actions)
    }

    /// A job loaded from the store after a restart of the service. Its durable phase is trusted
    /// only as far as it is safe: the event is restarted (or sent) at once and LiveKit is asked
    /// again before any absence can lead to a send.
    ///
    /// `delegated_at` is when the delegation was accepted, on the same clock as `now`: a member
    /// that has not joined gets what is left of its join timeout, and a migrating one what is
    /// left of its grace period (never more than a whole one: a clock that ran ahead only makes
    /// them longer); evidence of absence gathered by the earlier holder goes on.
    pub fn resume(
        delay: Millis,
        seed: u64,
        timing: impl Into<Arc<Timing>>,
        durable: Durable,
        delegated_at: Millis,
        now: Millis,
    ) -> (Job, Vec<Action>) {
        let timing = timing.into();
        // Bound to the sessions that came back: a phase to store in place of the stored one.
        let rebound = matches!(&durable, Durable::Sending { returned, .. } if !returned.is_empty());
        // What is left of a period that ran out at `end` (as the earlier holder saw it): not
        // before now, and never more than the whole `period` from now.
        let left = |end: Millis, period: Millis| end.clamp(now, now + period);
        let mut absent = Absences::default();
        let phase = match durable {
            Durable::Waiting { absent: evidence } => {
                absent = evidence.carried_over(now);
                Phase::Waiting { join_deadline: left(delegated_at + timing.join_timeout, timing.join_timeout) }
            }
            Durable::Connected { binding, mut others, absent } => {
                // Back where it was among them: before every session that joined no earlier, so
                // that it is the newest again (ties go to the session admitted first), and the
                // job's durable phase reads as stored until something changes.
                let at = others.iter().position(|o| o.joined_at_ms >= binding.joined_at_ms).unwrap_or(others.len());
                others.insert(at, binding);
                // The proof of a lost departure goes on where it was: listings the earlier holder
                // made count, and the next one here may complete it.
                let evidence = |b: &Binding| {
                    absent.iter().find(|(sid, _)| *sid == b.sid).map(|(_, a)| a.carried_over(now)).unwrap_or_default()
                };
                let live = others.into_iter().map(|b| Live { absent: evidence(&b), ..Live::new(b, now) });
                Phase::Connected { sessions: live.collect() }
            }
            Durable::Grace { binding, until, absent: evidence } => {
                absent = evidence.carried_over(now);
                let until = until.map_or(now + timing.grace, |u| left(u, timing.grace));
                Phase::Grace { binding: Box::new(binding), since: now, until }
            }
            // The member came back while the send was in flight: whether it went out is not
            // known here. Kept alive instead of sent again: if it did go out, the first restart
            // answers that the event is gone.
            Durable::Sending { returned, .. } if !returned.is_empty() => {
                Phase::Connected { sessions: returned.into_iter().map(|b| Live::new(b, now)).collect() }
            }
            Durable::Sending { trigger, .. } => Phase::Sending { trigger, since: now, returned: Few::default() },
        };
        let probe_at = match phase {
            Phase::Sending { .. } => None,
            _ => Some(now),
        };
        let mut job = Job {
            delay,
            seed,
            timing,
            phase,
            calls: Calls::due_now(now),
            deadline: now + delay,
            probe_at: Maybe::of(probe_at),
            probe_expires: Maybe::NONE,
            absent,
            dead_sids: Few::default(),
            gone_sids: Few::default(),
        };
        let mut actions = if rebound { vec![Action::Persist] } else { Vec::new() };
        job.handle_timeout(now, &mut actions);
        (job, actions)
    }

    pub fn kind(&self) -> PhaseKind {
        match self.phase {
            Phase::Waiting { .. } => PhaseKind::Waiting,
            Phase::Connected { .. } => PhaseKind::Connected,
            Phase::Grace { .. } => PhaseKind::Grace,
            Phase::Sending { .. } => PhaseKind::Sending,
            Phase::Done(_) => PhaseKind::Done,
        }
    }

    /// What to store for this job; `None` once it is done.
    pub fn durable(&self) -> Option<Durable> {
        Some(match &self.phase {
            Phase::Waiting { .. } => Durable::Waiting { absent: self.absent },
            Phase::Connected { sessions } => {
                let binding = newest(sessions).expect("a connected job has a session").clone();
                let others = sessions.iter().map(|l| &l.binding).filter(|b| b.sid != binding.sid).cloned().collect();
                let absent = sessions
                    .iter()
                    .filter(|l| l.absent.count() > 0)
                    .map(|l| (l.binding.sid.clone(), l.absent))
                    .collect();
                Durable::Connected { binding, others, absent }
            }
            Phase::Grace { binding, until, .. } => {
                Durable::Grace { binding: (**binding).clone(), until: Some(*until), absent: self.absent }
            }
            Phase::Sending { trigger, returned, .. } => {
                Durable::Sending { trigger: *trigger, returned: returned.to_vec() }
            }
            Phase::Done(_) => return None,
        })
    }

    /// The session the job is bound to (the newest, if several), if any.
    pub fn binding(&self) -> Option<&Binding> {
        match &self.phase {
            Phase::Connected { sessions } => newest(sessions),
            Phase::Grace { binding, .. } => Some(binding),
            _ => None,
        }
    }

    /// How many sessions of the member the job believes connected.
    pub fn live_sessions(&self) -> usize {
        match &self.phase {
            Phase::Connected { sessions } => sessions.len(),
            Phase::Grace { .. } => 1,
            _ => 0,
        }
    }

    /// When the next restart (or send) is planned, if one is planned and not in flight.
    pub fn next_call(&self) -> Option<Millis> {
        match self.phase {
            Phase::Done(_) => None,
            _ if self.calls.in_flight => None,
            _ => Some(self.calls.next_at),
        }
    }

    /// Estimated time at which the homeserver fires the event by itself: the latest possible
    /// until the first restart succeeds, then the earliest possible.
    pub fn deadline(&self) -> Millis {
        self.deadline
    }

    /// The earliest time at which [`Job::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Millis> {
        if matches!(self.phase, Phase::Done(_)) {
            return None;
        }
        let call = if self.calls.in_flight { self.calls.expires.get() } else { Some(self.calls.next_at) };
        let probe = self.probe_expires.get().or(self.probe_at.get());
        [call, probe, self.unconfirmed_deadline()].into_iter().flatten().min()
    }

    /// When to give up on a confirmation LiveKit cannot give (see [`Timing::unconfirmed_limit`]):
    /// that long after it became due, or after the last listing LiveKit answered since (a proof
    /// of absence takes several): only LiveKit's silence makes the job give up, never a proof
    /// still under way.
    fn unconfirmed_deadline(&self) -> Option<Millis> {
        let answered = if self.absent.count() > 0 { self.absent.last() } else { 0 };
        match self.phase {
            Phase::Waiting { join_deadline } => Some(join_deadline.max(answered) + self.timing.unconfirmed_limit),
            Phase::Grace { until, .. } => Some(until.max(answered) + self.timing.unconfirmed_limit),
            _ => None,
        }
    }

    /// Ends the job because a newer delegation replaced it. Nothing of it is ever sent again.
    pub fn supersede(&mut self) -> Vec<Action> {
        if matches!(self.phase, Phase::Done(_)) {
            return Vec::new();
        }
        self.phase = Phase::Done(Outcome::Superseded);
        vec![Action::Finish(Outcome::Superseded)]
    }

    /// Issues whatever is due at `now`.
    pub fn handle_timeout(&mut self, now: Millis, out: &mut Vec<Action>) {
        if matches!(self.phase, Phase::Done(_)) {
            return;
        }
        if self.unconfirmed_deadline().is_some_and(|t| t <= now) {
            self.finish(Outcome::Unconfirmed, out);
            return;
        }
        if self.probe_expires.get().is_some_and(|t| t <= now) {
            self.on_observation_failed(now);
        }
        if self.calls.in_flight && self.calls.expires.get().is_some_and(|t| t <= now) {
            // Too slow, or its answer lost: retried as if the homeserver could not be reached.
            // The call itself may still be carried out; its answer, if it comes, is still heard.
            match self.phase {
                Phase::Sending { .. } => self.on_send_answered(HsAnswer::Failed, now, out),
                _ => self.on_restarted(HsAnswer::Failed, now, out),
            }
            return self.handle_timeout(now, out);
        }
        if self.probe_expires.get().is_none() && self.probe_at.get().is_some_and(|t| t <= now) {
            self.probe_at = Maybe::NONE;
            self.probe_expires = Maybe::at(now + self.timing.call_timeout);
            out.push(Action::Probe);
        }
        if !self.calls.in_flight && self.calls.next_at <= now {
            // Once the event's own deadline has passed while every call failed (the homeserver
            // could not be reached), the homeserver has fired it by itself. Not while a call
            // given up on as too slow may still be carried out (its answer would say), and a late
            // call that is not after failures is still made: the homeserver's answer tells
            // whether the event is still there.
            if self.calls.failures > 0 && now > self.deadline && self.calls.unanswered == 0 {
                self.finish(Outcome::Expired, out);
                return;
            }
            self.calls.in_flight = true;
            self.calls.issued_at = now;
            self.calls.expires = Maybe::NONE;
            self.calls.count += 1;
            let call = self.calls.count;
            out.push(match self.phase {
                Phase::Sending { .. } => Action::Send { call },
                _ => Action::Restart { call },
            });
        }
    }

    /// Applies one event at `now`, appending the resulting actions to `out`.
    pub fn handle(&mut self, event: Event, now: Millis, out: &mut Vec<Action>) {
        match event {
            Event::Joined(session) => self.on_joined(session, now, out),
            Event::Left { session, reason } => self.on_left(session, reason, now, out),
            Event::RoomFinished { room_sid } => self.on_room_finished(&room_sid, now, out),
            Event::Observed { at, present } => self.on_observed(at, present, now, out),
            Event::ObservationFailed => self.on_observation_failed(now),
            Event::Restarted { call, started, answer } => {
                self.calls.unanswered = self.calls.unanswered.saturating_sub(1);
                if self.answers_current_call(call) {
                    self.on_restarted(answer, now, out)
                } else if answer == HsAnswer::Ok && !matches!(self.phase, Phase::Done(_)) {
                    self.on_late_restart(started, now);
                }
            }
            Event::SendAnswered { call, answer } => {
                self.calls.unanswered = self.calls.unanswered.saturating_sub(1);
                if self.answers_current_call(call) {
                    self.on_send_answered(answer, now, out)
                }
            }
        }
        // A step may have made something due right now (e.g. a send).
        self.handle_timeout(now, out);
    }

    fn on_joined(&mut self, session: Session, now: Millis, out: &mut Vec<Action>) {
        if self.dead_sids.iter().any(|d| *d == session.sid) {
            return; // a stale or duplicated join of a session that already left
        }
        match &mut self.phase {
            Phase::Waiting { .. } | Phase::Grace { .. } => self.bind(vec![Binding::of(session)], now, out),
            Phase::Connected { sessions } => {
                // Another session of the member (a reconnection, a second tab): both count until
                // each is known gone, whatever order their webhooks come in.
                if admit(sessions, &mut self.gone_sids, Binding::of(session), now) {
                    out.push(Action::Persist);
                }
            }
            Phase::Sending { returned, .. } => {
                // The member is connected again before the leave went out: it must not go out.
                // (Once the shell has started the send it cannot be recalled: the job binds to
                // the session if the send fails, and ends if it succeeded. Until then — it may
                // wait in the shell's queues — it is dropped.)
                if !self.calls.started() {
                    self.bind(vec![Binding::of(session)], now, out);
                } else if note_return(returned, Binding::of(session)) {
                    out.push(Action::Persist);
                }
            }
            Phase::Done(_) => {}
        }
    }

    fn on_left(&mut self, session: Session, reason: LeaveReason, now: Millis, out: &mut Vec<Action>) {
        // A session that may return (a migration keeps its SID) is not dead yet.
        if reason == LeaveReason::Final && !self.dead_sids.iter().any(|d| *d == session.sid) {
            if self.dead_sids.len() == DEAD_SIDS_KEPT {
                self.dead_sids.remove(0);
            }
            self.dead_sids.push(session.sid.as_str().into());
        }
        match &mut self.phase {
            Phase::Connected { sessions } => {
                let Some(i) = sessions.iter().position(|l| l.binding.sid == session.sid) else {
                    return; // an old session, or a duplicate identity: the member is still there
                };
                if sessions.len() > 1 {
                    // Another live session of the member remains. One that may return is kept:
                    // it may come back without a join, and listings prune it if it does not.
                    if reason == LeaveReason::Final {
                        sessions.remove(i);
                        out.push(Action::Persist);
                    }
                    return;
                }
                match reason {
                    LeaveReason::Final => self.start_sending(Trigger::Departed, now, out),
                    LeaveReason::MayReturn => {
                        let binding = sessions.remove(i).binding;
                        note_gone(&mut self.gone_sids, &binding.sid, now);
                        let until = now + self.timing.grace;
                        self.phase = Phase::Grace { binding: Box::new(binding), since: now, until };
                        self.absent = Absences::default();
                        self.probe_at = Maybe::at(until);
                        out.push(Action::Persist);
                    }
                }
            }
            Phase::Grace { binding, .. } if reason == LeaveReason::Final && binding.sid == session.sid => {
                self.start_sending(Trigger::Departed, now, out)
            }
            // A session that came back while the send was in flight and has left again for good.
            Phase::Sending { returned, .. } if reason == LeaveReason::Final => {
                out.extend(forget_returns(returned, |b| b.sid == session.sid).then_some(Action::Persist));
            }
            // Not bound, or waiting for the bound session to return: says nothing.
            _ => {}
        }
    }

    fn on_room_finished(&mut self, room_sid: &str, now: Millis, out: &mut Vec<Action>) {
        // A room_finished of an older instance of the room says nothing about sessions in the
        // current one; a session learnt from a listing (instance unknown) may be in either.
        let of_finished_room = |b: &Binding| b.room_sid.is_empty() || room_sid.is_empty() || b.room_sid == room_sid;
        match &mut self.phase {
            // A member that never connected may still be connecting to a new instance.
            Phase::Waiting { .. } | Phase::Done(_) => {}
            Phase::Sending { returned, .. } => {
                out.extend(forget_returns(returned, of_finished_room).then_some(Action::Persist));
            }
            Phase::Grace { binding, .. } => {
                if of_finished_room(binding) {
                    self.start_sending(Trigger::RoomFinished, now, out);
                }
            }
            Phase::Connected { sessions } => {
                let changed = prune(sessions, &mut self.gone_sids, now, |l| !of_finished_room(&l.binding));
                if sessions.is_empty() {
                    self.start_sending(Trigger::RoomFinished, now, out);
                } else if changed {
                    out.push(Action::Persist);
                }
            }
        }
    }

    fn on_observed(&mut self, at: Millis, present: Vec<Session>, now: Millis, out: &mut Vec<Action>) {
        // A listing started before the job was (the room's, already running when the job asked)
        // says nothing of it: binding a session from it would bind one that may have left, and
        // whose departure would then send the leave although a newer session joined meanwhile
        // (that join came before the job, which cannot have counted it). The job's own listing
        // follows.
        if let Phase::Waiting { join_deadline } = self.phase
            && at < join_deadline.saturating_sub(self.timing.join_timeout)
        {
            return;
        }
        let asked = self.probe_expires.take().is_some();
        // LiveKit lists a departing session for a moment: one we saw leave is not there, and
        // one we stopped counting on is back only if the listing started after that.
        let present: Vec<Session> = present
            .into_iter()
            .filter(|s| {
                !self.dead_sids.iter().any(|d| *d == s.sid)
                    && !self.gone_sids.iter().any(|(sid, t)| *sid == s.sid && at < *t)
            })
            .collect();
        if present.is_empty() {
            return self.on_absent(at, asked, now, out);
        }
        match &mut self.phase {
            Phase::Waiting { .. } | Phase::Grace { .. } => {
                self.bind(present.into_iter().map(Binding::of).collect(), now, out)
            }
            Phase::Connected { sessions } => {
                let mut changed = reconcile(sessions, &mut self.gone_sids, &present, at, now, &self.timing);
                // Listed sessions the job did not know: reconnections whose join it missed.
                for s in present {
                    changed |= admit(sessions, &mut self.gone_sids, Binding::of(s), now);
                }
                want_listing(&mut self.probe_at, next_listing(sessions, &self.timing), now);
                if changed {
                    out.push(Action::Persist);
                }
            }
            Phase::Sending { returned, .. } => {
                if !self.calls.started() {
                    self.bind(present.into_iter().map(Binding::of).collect(), now, out);
                } else {
                    let mut changed = false;
                    for s in present {
                        changed |= note_return(returned, Binding::of(s));
                    }
                    if changed {
                        out.push(Action::Persist);
                    }
                }
            }
            Phase::Done(_) => {}
        }
    }

    fn on_absent(&mut self, at: Millis, asked: bool, now: Millis, out: &mut Vec<Action>) {
        match &mut self.phase {
            Phase::Waiting { join_deadline } => {
                if at >= *join_deadline {
                    if self.absence_confirmed(at, now) {
                        self.start_sending(Trigger::NeverJoined, now, out);
                    } else {
                        out.push(Action::Persist); // the evidence, stored for the next holder
                    }
                } else if asked {
                    // Too early to prove anything: ask again at the deadline (or now, if our
                    // answer came from a listing started before it).
                    self.probe_at = Maybe::at(now.max(*join_deadline));
                }
            }
            Phase::Connected { sessions } => {
                let changed = reconcile(sessions, &mut self.gone_sids, &[], at, now, &self.timing);
                want_listing(&mut self.probe_at, next_listing(sessions, &self.timing), now);
                if sessions.is_empty() {
                    self.start_sending(Trigger::Reconciled, now, out);
                } else if changed {
                    out.push(Action::Persist);
                }
            }
            Phase::Grace { until, .. } => {
                if at >= *until {
                    if self.absence_confirmed(at, now) {
                        self.start_sending(Trigger::GraceExpired, now, out);
                    } else {
                        out.push(Action::Persist); // the evidence, stored for the next holder
                    }
                } else if asked && now >= *until {
                    self.probe_at = Maybe::at(now);
                }
            }
            Phase::Sending { .. } | Phase::Done(_) => {}
        }
    }

    /// Past a deadline (which gave the member its time already), a listing started at `at` found
    /// it absent: whether the absence is proven. If not, another listing is asked for as soon as
    /// it can add to the evidence.
    fn absence_confirmed(&mut self, at: Millis, now: Millis) -> bool {
        self.absent.note(at, &self.timing);
        match self.absent.next_listing(0, &self.timing) {
            None => true,
            Some(next) => {
                self.probe_at = Maybe::at(now.max(next));
                false
            }
        }
    }

    fn on_observation_failed(&mut self, now: Millis) {
        let asked = self.probe_expires.take().is_some();
        if !asked || self.probe_at.get().is_some() {
            return;
        }
        // Only a job that needs an answer asks again; periodic reconciliation covers the rest.
        let retry = now + self.timing.probe_retry;
        self.probe_at = Maybe::of(match self.phase {
            Phase::Waiting { join_deadline } => Some(retry.max(join_deadline)),
            Phase::Grace { until, .. } => Some(retry.max(until)),
            Phase::Connected { ref sessions } => next_listing(sessions, &self.timing).map(|t| t.max(retry)),
            _ => None,
        });
    }

    /// The shell starts call `call` now (it may have queued it). Returns whether the job still
    /// awaits that call; if not (the job moved on meanwhile), the shell drops it.
    pub fn call_started(&mut self, call: u64, now: Millis) -> bool {
        if !self.answers_current_call(call) || self.calls.expires.get().is_some() {
            return false;
        }
        // A restart must not wait for an answer past the point where a retry can still keep
        // the event alive: it waits at most half the time left until the last chance.
        let mut wait = self.timing.call_timeout;
        let last_chance = self.deadline.saturating_sub(self.delay / 10);
        if !matches!(self.phase, Phase::Sending { .. }) && last_chance > now {
            wait = wait.min((last_chance - now) / 2).max(1);
        }
        self.calls.expires = Maybe::at(now + wait);
        self.calls.unanswered = self.calls.unanswered.saturating_add(1);
        true
    }

    fn answers_current_call(&self, call: u64) -> bool {
        self.calls.in_flight && call == self.calls.count && !matches!(self.phase, Phase::Done(_))
    }

    fn on_restarted(&mut self, answer: HsAnswer, now: Millis, out: &mut Vec<Action>) {
        if matches!(self.phase, Phase::Sending { .. }) {
            return; // cannot happen: starting to send abandons the restart call
        }
        self.calls.in_flight = false;
        match answer {
            HsAnswer::Ok => {
                let issued = self.calls.issued_at;
                self.deadline = issued + self.delay;
                self.calls.failures = 0;
                self.calls.next_at = issued + self.restart_interval();
            }
            HsAnswer::Gone => self.finish(Outcome::Gone, out),
            HsAnswer::RetryAfter(wait) => self.retry_at(now, wait),
            HsAnswer::Failed => self.back_off(now),
        }
    }

    /// A restart given up on as too slow was carried out after all: the event runs at least
    /// from when it was `started`. (Ignored, it let the job believe the event had fired while
    /// the homeserver kept it alive.) The homeserver answers: a backoff planned after the calls
    /// that failed meanwhile gives way to the next restart the longer deadline calls for, and
    /// never past its last chance (kept, a long backoff let that deadline pass unrestarted and
    /// the job take the event for fired by the homeserver's timer). A job sending keeps its
    /// sends' pace: the event going out by the homeserver's timer is what it wants anyway.
    fn on_late_restart(&mut self, started: Millis, now: Millis) {
        if started + self.delay <= self.deadline {
            return;
        }
        self.deadline = started + self.delay;
        if matches!(self.phase, Phase::Sending { .. }) {
            return;
        }
        self.calls.failures = 0;
        let next = self.calls.next_at.min(started + self.restart_interval());
        self.plan_retry(now, next);
    }

    /// How long after a restart is started the next one is: with several instances, enough of
    /// the delay stays in hand for another one to take over if this one dies right before it.
    fn restart_interval(&self) -> Millis {
        let in_hand = self.delay.saturating_sub(self.timing.failover_headroom) as f64;
        (self.delay as f64 * (self.timing.restart_fraction - self.timing.restart_jitter * self.jitter()))
            .min(in_hand)
            .max(1.0) as Millis
    }

    fn on_send_answered(&mut self, answer: HsAnswer, now: Millis, out: &mut Vec<Action>) {
        let Phase::Sending { trigger, since, returned } = &mut self.phase else {
            return; // cannot happen: only a Sending job sends
        };
        self.calls.in_flight = false;
        match answer {
            // The event went out (or had already): the job is over, even if the member came
            // back meanwhile; a client that reconnects publishes a new membership.
            HsAnswer::Ok | HsAnswer::Gone => {
                let outcome = Outcome::Sent { trigger: *trigger, latency: now.saturating_sub(*since) };
                self.finish(outcome, out)
            }
            // It did not go out, and the member is back: keep it alive instead.
            HsAnswer::RetryAfter(_) | HsAnswer::Failed if !returned.is_empty() => {
                let returned = std::mem::take(returned).into_vec();
                self.bind(returned, now, out);
            }
            HsAnswer::RetryAfter(wait) => self.retry_at(now, wait),
            HsAnswer::Failed => self.back_off(now),
        }
    }

    /// Binds the job to `sessions` (not empty), the member's live sessions. A session the job is
    /// waiting on to return (Grace) stays counted too: another session showing up does not mean
    /// the migrating one will not come back; listings prune it if it does not.
    fn bind(&mut self, sessions: Vec<Binding>, now: Millis, out: &mut Vec<Action>) {
        debug_assert!(!sessions.is_empty());
        self.absent = Absences::default();
        // Sized exactly: a job is usually bound to one session, and a Vec grown by push would
        // reserve room for four (400 bytes per member).
        let mut live = Vec::with_capacity(sessions.len() + usize::from(matches!(self.phase, Phase::Grace { .. })));
        if let Phase::Grace { binding, since, .. } = &self.phase {
            live.push(Live { binding: (**binding).clone(), since: *since, absent: Absences::default() });
        }
        for b in sessions {
            admit(&mut live, &mut self.gone_sids, b, now);
        }
        if matches!(self.phase, Phase::Sending { .. }) {
            // Back to keeping the event alive, right away.
            self.calls = Calls { count: self.calls.count, unanswered: self.calls.unanswered, ..Calls::due_now(now) };
        }
        self.phase = Phase::Connected { sessions: live };
        self.probe_at = Maybe::NONE;
        out.push(Action::Persist);
    }

    fn start_sending(&mut self, trigger: Trigger, now: Millis, out: &mut Vec<Action>) {
        // A migrating session the job gave up on is no proof of return in a listing started
        // before now. (Sessions counted live reach here only through a final departure or after
        // `prune`, which noted them.)
        if let Phase::Grace { binding, .. } = &self.phase {
            note_gone(&mut self.gone_sids, &binding.sid, now);
        }
        self.phase = Phase::Sending { trigger, since: now, returned: Few::default() };
        self.probe_at = Maybe::NONE;
        // Send now even if a restart is in flight: its answer is ignored from here on.
        self.calls.in_flight = false;
        self.calls.failures = 0;
        self.calls.next_at = now;
        out.push(Action::Persist);
    }

    fn finish(&mut self, outcome: Outcome, out: &mut Vec<Action>) {
        self.phase = Phase::Done(outcome);
        self.probe_at = Maybe::NONE;
        out.push(Action::Finish(outcome));
    }

    /// After a 429: the wait the homeserver asked for, within the deadline policy of
    /// [`Job::plan_retry`].
    fn retry_at(&mut self, now: Millis, wait: Millis) {
        self.calls.failures += 1;
        self.plan_retry(now, now + wait);
    }

    /// Jittered exponential backoff after a failure.
    fn back_off(&mut self, now: Millis) {
        let exp = 1.5f64.powi(self.calls.failures.min(30) as i32);
        let base = (self.timing.backoff_initial as f64 * exp).min(self.timing.backoff_max as f64);
        let wait = (base * (0.5 + self.jitter())) as Millis;
        self.calls.failures += 1;
        self.plan_retry(now, now + wait.max(1));
    }

    /// Plans the next call at `at`, never past the event's deadline: one last attempt a tenth of
    /// the delay before it is worth more than one after it, even against a `Retry-After` (the
    /// alternative is the member's certain removal). Past the deadline, nothing can be done but
    /// noticing it has passed, or, while a call given up on may still have kept the event alive,
    /// going on trying at the pace of the backoff.
    fn plan_retry(&mut self, now: Millis, mut at: Millis) {
        let last_chance = self.deadline.saturating_sub(self.delay / 10);
        if at > last_chance && now < last_chance {
            at = last_chance;
        } else if at > self.deadline && now <= self.deadline {
            at = at.min(self.deadline + 1);
        }
        self.calls.next_at = at;
    }

    /// A deterministic pseudo-random number in [0, 1) for this job and call (splitmix64).
    fn jitter(&self) -> f64 {
        let mut z = self.seed ^ self.calls.count.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests;
