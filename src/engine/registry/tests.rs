//! The registry without tokio: every input is a call, every effect is looked at.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::delegation::Mode;

const DELAY: Millis = 10_000;

fn delegation(user: &str, device: &str, delay_id: &str) -> Delegation {
    Delegation {
        room_id: "!r:hs.test".into(),
        slot_id: "m.call#ROOM".into(),
        user_id: format!("@{user}:hs.test").into(),
        device_id: device.into(),
        member_id: format!("m.{user}.{device}").into(),
        delay_id: delay_id.into(),
        delay_ms: DELAY,
        cs_api_url: "https://hs.test/".into(),
        created_at_ms: 0,
        mode: Mode::OpenId,
        identity: None,
    }
}

fn participant(d: &Delegation, sid: &str) -> Participant {
    Participant { identity: d.identities()[0].clone(), sid: sid.into(), joined_at_ms: 1_000 }
}

fn event(d: &Delegation, id: &str, kind: SfuEventKind) -> SfuEvent {
    SfuEvent { id: id.into(), room: d.livekit_room(), room_sid: "RM_1".into(), kind }
}

fn joined(d: &Delegation, sid: &str, id: &str) -> SfuEvent {
    event(d, id, SfuEventKind::ParticipantJoined(participant(d, sid)))
}

fn left(d: &Delegation, sid: &str, id: &str) -> SfuEvent {
    let departure = Departure::Final("CLIENT_INITIATED".into());
    event(d, id, SfuEventKind::ParticipantLeft { participant: participant(d, sid), departure, aborted: false })
}

/// A registry and everything it asked for, sorted by kind.
struct Rig {
    r: Registry,
    now: Millis,
    calls: Vec<(JobId, CallRef, DelayedAction, Arc<Delegation>)>,
    lists: Vec<(Arc<str>, Millis)>,
    commits: Vec<Vec<StoreOp>>,
    fences: Vec<Option<Vec<(Shard, u64)>>>,
    delegated: Vec<(Ticket, Result<JobId, super::Refusal>)>,
    webhooks: Vec<(Ticket, Result<WebhookOutcome, StoreError>)>,
    watched: Vec<(Arc<str>, bool, usize)>,
    /// Looks at an inbox asked for and not answered yet.
    looks: Vec<(Shard, u64)>,
    next_ticket: u64,
}

impl Rig {
    fn new() -> Self {
        Rig::with(Limits::default())
    }
    fn with(limits: Limits) -> Self {
        Rig {
            r: Registry::new(Timing::default(), limits, Arc::new(Metrics::new())).with_ids_from(0),
            now: 0,
            calls: Vec::new(),
            lists: Vec::new(),
            commits: Vec::new(),
            fences: Vec::new(),
            delegated: Vec::new(),
            webhooks: Vec::new(),
            watched: Vec::new(),
            looks: Vec::new(),
            next_ticket: 0,
        }
    }
    fn ticket(&mut self) -> Ticket {
        self.next_ticket += 1;
        Ticket(self.next_ticket)
    }
    fn flush(&mut self) {
        self.r.flush(self.now);
        while let Some(e) = self.r.poll_effect() {
            match e {
                Effect::Call { call, action, delegation, .. } => self.calls.push((call.job, call, action, delegation)),
                Effect::List { room, at } => self.lists.push((room, at)),
                Effect::Commit { ops, fence } => {
                    self.commits.push(ops);
                    self.fences.push(fence);
                }
                Effect::Delegated { ticket, result } => self.delegated.push((ticket, result)),
                Effect::WebhookHandled { ticket, result } => self.webhooks.push((ticket, result)),
                // With the number of delegations answered by then.
                Effect::Watch { room, watched } => self.watched.push((room, watched, self.delegated.len())),
                Effect::LookAtInbox { shard, epoch } => self.looks.push((shard, epoch)),
            }
        }
    }
    fn delegate(&mut self, d: &Delegation) -> Ticket {
        let t = self.ticket();
        self.r.delegate(d.clone(), t);
        self.flush();
        t
    }
    fn webhook(&mut self, e: SfuEvent) -> Ticket {
        let t = self.ticket();
        self.r.webhook(e, t, self.now);
        self.flush();
        t
    }
    fn commit(&mut self, result: Result<(), StoreError>) {
        self.r.committed(result, self.now);
        self.flush();
    }
    /// Delegates `d` and commits it; returns its job.
    fn tracked(&mut self, d: &Delegation) -> JobId {
        let t = self.delegate(d);
        self.commit(Ok(()));
        self.answer_of(t).unwrap()
    }
    fn answer_of(&self, t: Ticket) -> Option<JobId> {
        self.delegated.iter().find(|(x, _)| *x == t).map(|(_, r)| *r.as_ref().unwrap())
    }
    fn webhook_answer(&self, t: Ticket) -> Option<&Result<WebhookOutcome, StoreError>> {
        self.webhooks.iter().find(|(x, _)| *x == t).map(|(_, r)| r)
    }
    fn answer_calls(&mut self, answer: HsAnswer) {
        for (_, call, action, _) in std::mem::take(&mut self.calls) {
            self.r.call_answered(call, action, answer, self.now);
        }
        self.flush();
    }
    fn advance(&mut self, to: Millis) {
        while let Some(due) = self.r.poll_timeout().filter(|t| *t <= to) {
            self.now = self.now.max(due);
            self.r.handle_timeout(self.now);
            self.flush();
        }
        self.now = to;
        self.flush();
    }
    /// Answers every look at an inbox asked for: its latest entry is `latest`.
    fn answer_looks(&mut self, latest: Option<EntryId>) {
        for (shard, epoch) in std::mem::take(&mut self.looks) {
            self.r.inbox_looked(shard, epoch, Ok(latest));
        }
        self.flush();
    }
    fn sends(&self) -> Vec<JobId> {
        self.calls.iter().filter(|c| c.2 == DelayedAction::Send).map(|c| c.0).collect()
    }
}

#[test]
fn a_delegation_takes_effect_only_once_committed() {
    let mut rig = Rig::new();
    let d = delegation("a", "DEV", "syd_1");
    let t = rig.delegate(&d);
    assert_eq!(rig.commits.len(), 1);
    assert!(matches!(&rig.commits[0][..], [StoreOp::Insert(r)] if r.delegation == d && r.state == Durable::WAITING));
    assert!(rig.delegated.is_empty() && rig.calls.is_empty() && rig.r.is_empty(), "nothing before the commit");
    rig.commit(Ok(()));
    let id = rig.answer_of(t).unwrap();
    assert_eq!(rig.calls.len(), 1, "restarted at once");
    assert_eq!((rig.calls[0].0, rig.calls[0].2), (id, DelayedAction::Restart));
    assert_eq!(rig.lists.len(), 1, "LiveKit asked at once");
    assert_eq!(rig.commits.len(), 1, "its first state was stored with it: no second commit");
}

/// Found by the property tests: a join delivered while the member's delegation was still being
/// stored concerned no job and was answered "ignored", but remembered as handled; delivered again
/// once the job existed (LiveKit retries what it did not see answered), it was dropped as a
/// duplicate, and the job never counted that session.
#[test]
fn a_webhook_ignored_before_the_delegation_took_effect_counts_when_delivered_again() {
    let mut rig = Rig::new();
    let d = delegation("a", "DEV", "syd_a");
    rig.delegate(&d);
    let early = rig.webhook(joined(&d, "PA_1", "EV_1"));
    rig.commit(Ok(()));
    assert_eq!(rig.webhook_answer(early).unwrap().as_ref().unwrap(), &WebhookOutcome::Ignored);
    rig.answer_calls(HsAnswer::Ok);
    let again = rig.webhook(joined(&d, "PA_1", "EV_1"));
    rig.commit(Ok(()));
    assert_eq!(rig.webhook_answer(again).unwrap().as_ref().unwrap(), &WebhookOutcome::Applied);
    assert_eq!(rig.r.jobs.values().next().unwrap().job.kind(), crate::lifecycle::PhaseKind::Connected);
}

/// The shell answers webhooks for rooms without jobs by itself: it must hear of a room before
/// the client whose delegation opened it is answered (the client joins LiveKit after that), and
/// must not forget it while one of its jobs lives.
#[test]
fn a_room_is_watched_from_its_first_job_until_its_last_one_ends() {
    let mut rig = Rig::new();
    let (a, b) = (delegation("a", "DEV", "syd_a"), delegation("b", "DEV", "syd_b"));
    let room: Arc<str> = a.livekit_room().into();
    assert_eq!(b.livekit_room(), *room);
    rig.delegate(&a);
    assert!(rig.watched.is_empty(), "not before its commit");
    rig.commit(Ok(()));
    assert_eq!(rig.watched, [(room.clone(), true, 0)], "announced before the delegation is answered");
    assert_eq!(rig.r.rooms().collect::<Vec<_>>(), std::slice::from_ref(&room));
    rig.tracked(&b);
    rig.answer_calls(HsAnswer::Ok);
    assert_eq!(rig.watched.len(), 1, "a second job in the room changes nothing");
    for (d, sid) in [(&a, "PA_a"), (&b, "PA_b")] {
        rig.webhook(joined(d, sid, &format!("EV_j{sid}")));
        rig.commit(Ok(()));
        rig.webhook(left(d, sid, &format!("EV_l{sid}")));
        rig.commit(Ok(()));
        assert_eq!(rig.sends().len(), 1, "{sid} left: its leave is sent");
        rig.answer_calls(HsAnswer::Ok);
        rig.commit(Ok(()));
        let last = std::ptr::eq(d, &b);
        assert_eq!(rig.watched.len(), 1 + usize::from(last), "{sid} ended; the room's last job: {last}");
    }
    assert_eq!((rig.watched[1].0.clone(), rig.watched[1].1), (room, false));
    assert!(rig.r.is_empty() && rig.r.rooms().next().is_none());
}

#[test]
fn a_refused_commit_refuses_the_delegation_and_retries_job_changes_first() {
    let mut rig = Rig::new();
    let a = delegation("a", "DEV", "syd_a");
    let id = rig.tracked(&a);
    rig.answer_calls(HsAnswer::Ok);
    let (w, t) = (rig.ticket(), rig.ticket());
    rig.r.webhook(joined(&a, "PA_1", "EV_1"), w, rig.now);
    rig.r.delegate(delegation("b", "DEV", "syd_b"), t);
    rig.flush();
    assert_eq!(rig.commits.len(), 2, "one commit for both");
    rig.commit(Err(StoreError("disk on fire".into())));
    assert!(rig.delegated.iter().any(|(x, r)| *x == t && r.is_err()), "the delegation is refused");
    assert!(rig.webhook_answer(w).unwrap().is_err(), "503: LiveKit retries");
    assert_eq!(rig.commits.len(), 2, "no retry before the back-off");
    // A change made meanwhile goes after the failed one.
    rig.webhook(left(&a, "PA_1", "EV_2"));
    rig.advance(rig.now + 500);
    assert_eq!(rig.commits.len(), 3);
    let ops = &rig.commits[2];
    assert!(
        matches!(&ops[..], [StoreOp::SetState(x, Durable::Connected { .. }), StoreOp::SetState(y, Durable::Sending { .. })] if *x == id && *y == id),
        "{ops:?}"
    );
    assert!(!ops.iter().any(|op| matches!(op, StoreOp::Insert(_))), "the refused delegation is gone");
}

#[test]
fn a_delegation_staged_during_the_back_off_is_committed_after_it() {
    let mut rig = Rig::new();
    let t = rig.delegate(&delegation("a", "DEV", "syd_a"));
    rig.commit(Err(StoreError("disk on fire".into())));
    assert!(rig.delegated.iter().any(|(x, r)| *x == t && r.is_err()));
    rig.now = 100;
    let t = rig.delegate(&delegation("b", "DEV", "syd_b"));
    assert_eq!(rig.commits.len(), 1, "not before the back-off ends");
    assert_eq!(rig.r.poll_timeout(), Some(Limits::default().commit_retry), "but a timer is set for it");
    rig.advance(Limits::default().commit_retry);
    assert_eq!(rig.commits.len(), 2);
    rig.commit(Ok(()));
    assert!(rig.answer_of(t).is_some());
}

#[test]
fn webhooks_are_answered_once_durable_and_duplicates_after() {
    let mut rig = Rig::new();
    let a = delegation("a", "DEV", "syd_a");
    rig.tracked(&a);
    let w = rig.webhook(joined(&a, "PA_1", "EV_1"));
    assert!(rig.webhook_answer(w).is_none(), "waits for its commit");
    // Another webhook without effects waits for the commit in flight, too.
    let other = rig.webhook(event(&a, "EV_X", SfuEventKind::Other("track_published".into())));
    assert!(rig.webhook_answer(other).is_none());
    rig.commit(Ok(()));
    assert_eq!(rig.webhook_answer(w).unwrap().as_ref().unwrap(), &WebhookOutcome::Applied);
    assert_eq!(rig.webhook_answer(other).unwrap().as_ref().unwrap(), &WebhookOutcome::Ignored);
    let again = rig.webhook(joined(&a, "PA_1", "EV_1"));
    assert_eq!(rig.webhook_answer(again).unwrap().as_ref().unwrap(), &WebhookOutcome::Duplicate);
    // With nothing in flight and no effects, the answer is immediate.
    let idle = rig.webhook(event(&a, "EV_Y", SfuEventKind::Other("egress_started".into())));
    assert!(rig.webhook_answer(idle).is_some());
}

#[test]
fn a_hash_collision_in_the_indexes_never_routes_one_members_event_to_another() {
    /// Every index key on this thread collides until the test ends, however it ends.
    struct Collide;
    impl Drop for Collide {
        fn drop(&mut self) {
            crate::engine::index::COLLIDE.set(false);
        }
    }
    crate::engine::index::COLLIDE.set(true);
    let _collide = Collide;
    let mut rig = Rig::new();
    let (a, b) = (delegation("a", "DEV", "syd_a"), delegation("b", "DEV", "syd_b"));
    let (id_a, id_b) = (rig.tracked(&a), rig.tracked(&b));
    rig.answer_calls(HsAnswer::Ok);
    // Both index hits for a's session name both jobs: only a's may take it.
    rig.webhook(joined(&a, "PA_a", "EV_1"));
    rig.commit(Ok(()));
    let state = |rig: &Rig, id: JobId| {
        rig.r.summaries(rig.now).into_iter().find(|s| s.id == id.to_string()).map(|s| (s.state, s.identity))
    };
    assert_eq!(state(&rig, id_a), Some(("connected".to_owned(), Some(a.identities()[0].clone()))));
    assert_eq!(state(&rig, id_b), Some(("waiting".to_owned(), None)), "b never joined");
    rig.webhook(left(&a, "PA_a", "EV_2"));
    assert_eq!(rig.sends(), vec![id_a], "a's departure sends a's leave only");
}

#[test]
fn webhook_outcomes_carry_the_labels_the_readme_documents() {
    // `webhooks_total{outcome}`: the README's metrics table and the shipped dashboard name them.
    let labels: Vec<&str> =
        [WebhookOutcome::Applied, WebhookOutcome::Ignored, WebhookOutcome::Duplicate, WebhookOutcome::Queued]
            .into_iter()
            .map(WebhookOutcome::as_str)
            .collect();
    assert_eq!(labels, ["accepted", "ignored", "duplicate", "queued"]);
}

#[test]
fn restarts_and_sends_never_wait_for_the_store() {
    let mut rig = Rig::new();
    let a = delegation("a", "DEV", "syd_a");
    let id = rig.tracked(&a);
    rig.answer_calls(HsAnswer::Ok);
    rig.webhook(joined(&a, "PA_1", "EV_1"));
    assert_eq!(rig.commits.len(), 2, "the binding is being committed (and never answered)");
    // The store is stuck: restarts still go out on time, and the departure's send at once.
    for _ in 0..5 {
        let next = rig.r.summaries(rig.now)[0].next_call_in_ms.unwrap() as Millis + rig.now;
        rig.advance(next);
        assert_eq!(rig.calls.len(), 1, "restart at {next}");
        rig.answer_calls(HsAnswer::Ok);
    }
    rig.webhook(left(&a, "PA_1", "EV_2"));
    assert_eq!(rig.sends(), vec![id]);
    assert_eq!(rig.commits.len(), 2, "one commit at a time");
}

#[test]
fn a_repeat_while_its_commit_is_in_flight_gets_the_same_job() {
    let mut rig = Rig::new();
    let d = delegation("a", "DEV", "syd_a");
    let t1 = rig.delegate(&d);
    let t2 = rig.delegate(&d);
    rig.commit(Ok(()));
    assert_eq!(rig.commits.len(), 1, "stored once");
    assert_eq!(rig.answer_of(t1), rig.answer_of(t2));
    let t3 = rig.delegate(&d);
    assert_eq!(rig.answer_of(t3), rig.answer_of(t1), "tracked: answered at once");
}

#[test]
fn a_newer_delegation_supersedes_in_one_commit_and_deletes_once() {
    let mut rig = Rig::new();
    let old = rig.tracked(&delegation("a", "DEV", "syd_old"));
    let new = rig.tracked(&delegation("a", "DEV", "syd_new"));
    let ops = &rig.commits[1];
    assert!(ops.iter().any(|op| matches!(op, StoreOp::Insert(r) if r.id == new)));
    assert!(ops.contains(&StoreOp::Delete(old)));
    // Whatever happens next, the old job is never deleted (or sent) again.
    rig.answer_calls(HsAnswer::Ok);
    rig.advance(60_000);
    let deletes = rig.commits.iter().flatten().filter(|op| **op == StoreOp::Delete(old)).count();
    assert_eq!(deletes, 1, "{:?}", rig.commits);
    assert!(rig.calls.iter().all(|c| c.0 != old));
    // A replacement staged while its predecessor's commit is in flight replaces that one.
    let t = rig.delegate(&delegation("b", "DEV", "syd_1"));
    let t2 = rig.delegate(&delegation("b", "DEV", "syd_2"));
    rig.commit(Ok(()));
    rig.commit(Ok(()));
    let (first, second) = (rig.answer_of(t).unwrap(), rig.answer_of(t2).unwrap());
    assert!(rig.commits.last().unwrap().contains(&StoreOp::Delete(first)));
    let summaries = rig.r.summaries(rig.now);
    assert!(summaries.iter().any(|s| s.id == second.to_string()));
    assert!(!summaries.iter().any(|s| s.id == first.to_string() || s.id == old.to_string()));
}

#[test]
fn a_cold_start_starts_calls_up_to_the_limits_and_sends_never_queue_behind_restarts() {
    let limits = Limits { restarts: 10, sends: 2, ..Limits::default() };
    let mut rig = Rig::with(limits);
    let mut ids = Vec::new();
    for i in 0..100 {
        let d = delegation(&format!("u{i}"), "DEV", &format!("syd_{i}"));
        let id = JobId(i + 1);
        rig.r.resume(JobRecord { id, delegation: d, state: Durable::WAITING }, 0);
        ids.push(id);
    }
    let resumed_sending = JobId(1_000);
    let d = delegation("gone", "DEV", "syd_gone");
    let state = Durable::Sending { trigger: Trigger::Departed, returned: vec![] };
    rig.r.resume(JobRecord { id: resumed_sending, delegation: d, state }, 0);
    rig.flush();
    assert_eq!(rig.calls.len(), 11, "10 restarts and the send");
    assert_eq!(rig.sends(), vec![resumed_sending], "the send did not queue behind 100 restarts");
    assert_eq!(rig.lists.len(), 1, "one listing for the shared room");
    let mut answered = 0;
    while !rig.calls.is_empty() {
        assert!(rig.r.calls_in_flight() <= 12);
        answered += rig.calls.len();
        rig.answer_calls(HsAnswer::Ok);
    }
    assert_eq!(answered, 101, "every job called once");
}

/// 600 members of a homeserver that never answers, 20 of another: the other's restarts start at
/// once, every time, whatever the slow one's queue.
#[test]
fn a_homeserver_that_never_answers_delays_only_its_own_members() {
    let limits = Limits { per_homeserver: 32, restarts: 64, ..Limits::default() };
    let mut rig = Rig::with(limits);
    for i in 0..600 {
        let d = Delegation {
            user_id: format!("@h{i}:hostile.test").into(),
            delay_id: format!("syd_h{i}").into(),
            ..delegation("x", "DEV", "unused")
        };
        rig.r.resume(JobRecord { id: JobId(10_000 + i), delegation: d, state: Durable::WAITING }, 0);
    }
    let good: Vec<JobId> = (0..20).map(|i| JobId(i + 1)).collect();
    for (i, id) in good.iter().enumerate() {
        let d = delegation(&format!("g{i}"), "DEV", &format!("syd_g{i}"));
        rig.r.resume(JobRecord { id: *id, delegation: d, state: Durable::WAITING }, 0);
    }
    rig.flush();
    let hostile_started = |rig: &Rig| rig.calls.iter().filter(|c| c.3.user_id.ends_with(":hostile.test")).count();
    assert_eq!(hostile_started(&rig), 32, "the hostile homeserver gets its own cap, no more");
    // A minute: the good homeserver answers every call at once, the hostile one never.
    let mut starts: HashMap<JobId, Vec<Millis>> = HashMap::new();
    while rig.now < 60_000 {
        let (good_calls, hostile): (Vec<_>, Vec<_>) =
            std::mem::take(&mut rig.calls).into_iter().partition(|c| c.3.user_id.ends_with(":hs.test"));
        rig.calls = hostile;
        for (id, call, action, _) in good_calls {
            assert_eq!(action, DelayedAction::Restart);
            starts.entry(id).or_default().push(rig.now);
            rig.r.call_answered(call, action, HsAnswer::Ok, rig.now);
        }
        rig.flush();
        if rig.calls.iter().any(|c| c.3.user_id.ends_with(":hs.test")) {
            continue;
        }
        let next = rig.r.poll_timeout().unwrap_or(60_000).max(rig.now + 1).min(60_000);
        rig.advance(next);
    }
    let every = (DELAY as f64 * Timing::default().restart_fraction) as Millis;
    for id in &good {
        let s = &starts[id];
        assert_eq!(s[0], 0, "{id}: restarted at once");
        assert!(s.windows(2).all(|w| w[1] - w[0] <= every), "{id}: a restart came late: {s:?}");
        assert!(s.len() as u64 >= 60_000 / every, "{id}: {} restarts in a minute", s.len());
    }
    assert_eq!(hostile_started(&rig), 32, "no hostile call started beyond its cap meanwhile");
}

#[test]
fn a_user_has_a_bounded_number_of_live_jobs_and_replacing_its_own_is_free() {
    let mut rig = Rig::with(Limits { jobs_per_user: 3, ..Limits::default() });
    for i in 0..3 {
        rig.tracked(&delegation("a", &format!("DEV{i}"), &format!("syd_{i}")));
    }
    // A fourth device, staged or not: refused, nothing stored.
    let commits = rig.commits.len();
    let t = rig.delegate(&delegation("a", "DEV3", "syd_3"));
    assert!(matches!(rig.delegated.iter().find(|(x, _)| *x == t), Some((_, Err(super::Refusal::TooManyJobs(3))))));
    assert_eq!(rig.commits.len(), commits, "nothing committed for it");
    // The same device delegating anew replaces its job: allowed.
    let t = rig.delegate(&delegation("a", "DEV0", "syd_new"));
    rig.commit(Ok(()));
    assert!(rig.answer_of(t).is_some());
    // Another user is not affected.
    rig.tracked(&delegation("b", "DEV", "syd_b"));
    assert_eq!(rig.r.len(), 4);
}

#[test]
fn a_delay_id_tracked_for_one_member_is_not_taken_for_another() {
    let mut rig = Rig::new();
    let a = rig.tracked(&delegation("a", "DEV", "syd_1"));
    // The same delay id from another member (of the same homeserver): refused, the first kept.
    let t = rig.delegate(&delegation("b", "DEV", "syd_1"));
    assert!(matches!(rig.delegated.iter().find(|(x, _)| *x == t), Some((_, Err(super::Refusal::Conflict)))));
    // Staged (not yet committed) likewise.
    let t1 = rig.delegate(&delegation("c", "DEV", "syd_2"));
    let t2 = rig.delegate(&delegation("d", "DEV", "syd_2"));
    assert!(matches!(rig.delegated.iter().find(|(x, _)| *x == t2), Some((_, Err(super::Refusal::Conflict)))));
    rig.commit(Ok(()));
    assert!(rig.answer_of(t1).is_some());
    // The first member's own repeat is still answered with its job.
    let again = rig.delegate(&delegation("a", "DEV", "syd_1"));
    assert_eq!(rig.answer_of(again), Some(a));
}

#[test]
fn due_jobs_are_handled_in_bounded_batches() {
    let mut rig = Rig::with(Limits { timeouts: 7, ..Limits::default() });
    for i in 0..20 {
        let mut d = delegation(&format!("u{i}"), "DEV", &format!("syd_{i}"));
        d.delay_ms = 1_000_000;
        let binding = crate::lifecycle::Binding {
            identity: d.identities()[0].as_str().into(),
            sid: format!("PA_{i}").into(),
            joined_at_ms: 1_000,
            room_sid: Default::default(),
        };
        let state = Durable::Connected { binding, others: Vec::new(), absent: Vec::new() };
        rig.r.resume(JobRecord { id: JobId(i + 1), delegation: d, state }, 0);
    }
    rig.flush();
    rig.answer_calls(HsAnswer::Ok);
    rig.advance(100_000); // the unanswered first listing times out
    // Every job's next restart falls due; one timeout handles at most 7 of them.
    let due = rig.r.poll_timeout().unwrap().max(800_000);
    rig.r.handle_timeout(due);
    rig.r.flush(due);
    let mut started = 0;
    while let Some(e) = rig.r.poll_effect() {
        started += usize::from(matches!(e, Effect::Call { .. }));
    }
    assert_eq!(started, 7);
    assert!(rig.r.poll_timeout().unwrap() <= due, "the rest are still due");
}

/// A town hall's members keep arriving, each job asking for a listing: the room is listed
/// again only once its spacing (10 µs per job) has passed since the last listing started, so
/// that applying listings does not take all the engine's time.
#[test]
fn a_big_room_asked_for_again_is_listed_again_only_after_its_spacing() {
    let mut rig = Rig::new();
    let ds: Vec<Delegation> = (0..300).map(|i| delegation(&format!("u{i}"), "DEV", &format!("syd_{i}"))).collect();
    for d in &ds {
        rig.delegate(d);
    }
    rig.commit(Ok(()));
    rig.commit(Ok(()));
    assert_eq!(rig.r.jobs.len(), 300);
    let (room, at) = rig.lists.last().cloned().unwrap();
    let listed = rig.lists.len();
    rig.r.reconcile();
    rig.flush();
    assert_eq!(rig.lists.len(), listed, "asked again while one runs: after it");
    rig.now = at + 1;
    rig.r.listed(room.clone(), at, Ok(vec![]), rig.now);
    rig.flush();
    assert_eq!(rig.lists.len(), listed, "not before 3 ms after the last one started");
    assert!(rig.r.poll_timeout().is_some_and(|t| t <= at + 3), "the engine is woken for it");
    rig.advance(at + 3);
    assert_eq!(rig.lists.len(), listed + 1);
    assert_eq!(rig.lists[listed], (room, at + 3));
}

#[test]
fn a_listing_asked_for_while_one_runs_runs_once_more_after_it() {
    let mut rig = Rig::new();
    let a = delegation("a", "DEV", "syd_a");
    rig.tracked(&a);
    assert_eq!(rig.lists.len(), 1);
    rig.r.reconcile();
    rig.r.reconcile();
    rig.flush();
    assert_eq!(rig.lists.len(), 1, "one at a time per room");
    let (room, at) = rig.lists.remove(0);
    rig.now = 100;
    rig.r.listed(room, at, Ok(vec![]), rig.now);
    rig.flush();
    assert_eq!(rig.lists.len(), 1, "once more, started after the asking");
    assert_eq!(rig.lists[0].1, 100);
}

#[test]
fn a_failed_call_is_retried_before_the_deadline() {
    let mut rig = Rig::new();
    let a = delegation("a", "DEV", "syd_a");
    let id = rig.tracked(&a);
    // The call's task panicked: the shell reports a failure.
    rig.answer_calls(HsAnswer::Failed);
    assert!(rig.calls.is_empty());
    let retry = rig.r.poll_timeout().unwrap();
    assert!(retry < DELAY, "{retry}");
    rig.advance(retry);
    assert_eq!(rig.calls.len(), 1);
    assert_eq!(rig.calls[0].0, id);
}

/// Members (user, device) of one room's jobs.
type Members = Vec<(u8, u8)>;
/// Listed sessions (user, device, sid number).
type Listed = Vec<(u8, u8, u16)>;

/// Jobs of one room and a listing of its participants, as the property test draws them.
fn room_case() -> impl Strategy<Value = (Members, Listed)> {
    (
        proptest::collection::vec((0u8..6, 0u8..3), 0..12),
        proptest::collection::vec((0u8..8, 0u8..4, any::<u16>()), 0..20),
    )
}

proptest! {
    /// A listing gives each job exactly the listed sessions of its member's identities, as
    /// checking every job against every participant would.
    #[test]
    fn a_listing_reaches_each_job_with_exactly_its_members_sessions((members, listed) in room_case()) {
        let mut rig = Rig::new();
        let mut jobs: BTreeMap<JobId, Delegation> = BTreeMap::new();
        for (i, (user, device)) in members.iter().enumerate() {
            let d = delegation(&format!("u{user}"), &format!("D{device}"), &format!("syd_{i}"));
            if jobs.values().any(|o| o.member_key() == d.member_key()) {
                continue;
            }
            let id = JobId(i as u64 + 1);
            rig.r.resume(JobRecord { id, delegation: d.clone(), state: Durable::WAITING }, 0);
            jobs.insert(id, d);
        }
        rig.flush();
        rig.answer_calls(HsAnswer::Ok);
        let participants: Vec<Participant> = listed
            .iter()
            .map(|(user, device, n)| Participant {
                identity: delegation(&format!("u{user}"), &format!("D{device}"), "x").identities()[0].clone(),
                sid: format!("PA_{n}"),
                joined_at_ms: i64::from(*n),
            })
            .collect();
        let Some((room, at)) = rig.lists.pop() else { return Ok(()) };
        rig.r.listed(room, at, Ok(participants.clone()), 10);
        for (id, d) in &jobs {
            let expected = participants.iter().any(|p| d.watch().matches(&p.identity, &d.user_id, &d.device_id));
            let bound = rig.r.jobs[id].job.binding().is_some();
            prop_assert_eq!(bound, expected, "job {} of {}", id, d.user_id);
            if let Some(b) = rig.r.jobs[id].job.binding() {
                prop_assert!(d.watch().matches(&b.identity.to_string(), &d.user_id, &d.device_id));
            }
        }
    }
}

// ---- property test: members of one room under any ordering of inputs ---------------------------

#[derive(Debug, Clone)]
enum Op {
    Connect(usize),
    Disconnect(usize),
    Deliver(usize),
    Duplicate(usize),
    Lose(usize),
    FinishListing(usize, bool),
    Answer(usize, u8),
    Commit(bool),
    Advance(u16),
    Reconcile,
    /// With shards: the reader takes in up to this many inbox entries.
    Read(u8),
    /// With shards: the shard's lease runs out and this instance takes it again (new epoch).
    Handover,
    /// With shards: the looks at the inbox asked for are answered (its latest entry), or fail.
    Look(bool),
    /// One instance: killed and started again on its store; whether the commit in flight landed.
    Crash(bool),
}

/// One instance killed and restarted at any moment, besides every other input.
fn crashing_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        14 => op(),
        1 => any::<bool>().prop_map(Op::Crash),
    ]
}

/// With shards, besides every input of one instance: the inbox read in any rhythm, and the shard
/// given up and taken again at any moment.
fn sharded_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => op(),
        4 => (1u8..6).prop_map(Op::Read),
        2 => Just(Op::Handover),
        3 => any::<bool>().prop_map(Op::Look),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0usize..3).prop_map(Op::Connect),
        2 => (0usize..3).prop_map(Op::Disconnect),
        4 => any::<usize>().prop_map(Op::Deliver),
        1 => any::<usize>().prop_map(Op::Duplicate),
        1 => any::<usize>().prop_map(Op::Lose),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Op::FinishListing(i, ok)),
        3 => (any::<usize>(), any::<u8>()).prop_map(|(i, k)| Op::Answer(i, k)),
        3 => any::<bool>().prop_map(Op::Commit),
        2 => (0u16..15_000).prop_map(Op::Advance),
        1 => Just(Op::Reconcile),
    ]
}

/// The registry, LiveKit's truth, and a store that applies what is committed.
struct World {
    rig: Rig,
    members: Vec<Delegation>,
    /// Each member's connected session, if any.
    connected: Vec<Option<String>>,
    /// Sessions each member's job has been told of (a delivered join, a listing), and not told
    /// since that they left for good.
    known: Vec<Vec<String>>,
    webhooks: Vec<SfuEvent>,
    next: u32,
    /// Listings started, with who was connected when they started.
    listings: Vec<Started>,
    stored: BTreeMap<JobId, Durable>,
    /// Every webhook ticket handed out, and how often each was answered.
    tickets: BTreeMap<Ticket, usize>,
    /// Sends already checked when they were issued.
    checked: HashSet<CallRef>,
    /// With shards: the room's shard and its inbox.
    holding: Option<Holding>,
    /// The delegations of the stored jobs.
    delegations: BTreeMap<JobId, Delegation>,
    /// One instance: the webhook behind each ticket not answered yet (LiveKit delivers it
    /// again if the instance dies first).
    unanswered: BTreeMap<Ticket, SfuEvent>,
    crashes: u64,
    /// Delay ids a send was issued for, by any holder.
    sent: HashSet<String>,
}

/// A listing started: its room and start, who was connected then, and which job (incarnation)
/// each member had then: only that job is told what the listing finds.
type Started = (Arc<str>, Millis, Vec<Participant>, Vec<Option<u32>>);

/// The one shard of the room, as a sharded instance holds it, and its side of the store.
struct Holding {
    shard: Shard,
    epoch: u64,
    inbox: Vec<(EntryId, Inbound)>,
    /// The reader's position: entries after it are read next.
    read: EntryId,
    /// The position committed in the store.
    applied: EntryId,
}

impl World {
    fn new(sharded: bool) -> Self {
        let mut rig = Rig::new();
        let members: Vec<Delegation> =
            (0..3).map(|i| delegation(&format!("u{i}"), "DEV", &format!("syd_{i}"))).collect();
        let holding = sharded.then(|| Holding {
            shard: shard_of(&members[0].livekit_room()),
            epoch: 1,
            inbox: Vec::new(),
            read: entry(0),
            applied: entry(0),
        });
        let mut w = World {
            rig: Rig::new(),
            connected: vec![None; 3],
            known: vec![Vec::new(); 3],
            webhooks: Vec::new(),
            next: 0,
            listings: Vec::new(),
            stored: BTreeMap::new(),
            tickets: BTreeMap::new(),
            checked: HashSet::new(),
            members: members.clone(),
            holding,
            delegations: BTreeMap::new(),
            unanswered: BTreeMap::new(),
            crashes: 0,
            sent: HashSet::new(),
        };
        match &w.holding {
            Some(h) => {
                rig.r = Registry::new(Timing::default(), Limits::default(), Arc::new(Metrics::new()))
                    .sharded()
                    .with_ids_from(0);
                rig.r.adopt(h.shard, h.epoch, h.applied, Vec::new(), 0);
                std::mem::swap(&mut w.rig, &mut rig);
                for d in members {
                    w.push(Inbound::Delegation(d));
                }
                w.read(3);
            }
            None => {
                for d in &members {
                    rig.delegate(d);
                }
                std::mem::swap(&mut w.rig, &mut rig);
            }
        }
        w.settle_commit(true);
        w.take_effects();
        w
    }

    /// With shards: appends to the shard's inbox (answered at once: nothing to wait for).
    fn push(&mut self, inbound: Inbound) {
        let h = self.holding.as_mut().expect("sharded");
        let id = entry(h.inbox.len() as u64 + 1);
        h.inbox.push((id, inbound));
    }

    /// With shards: the reader hands up to `n` entries after its position to the registry.
    fn read(&mut self, n: usize) {
        let Some(h) = &mut self.holding else { return };
        let next: Vec<(EntryId, Inbound)> = h.inbox.iter().filter(|(id, _)| *id > h.read).take(n).cloned().collect();
        let (shard, epoch) = (h.shard, h.epoch);
        for (id, inbound) in next {
            if let Inbound::Webhook(e) = &inbound {
                self.told(e);
            }
            self.holding.as_mut().unwrap().read = id;
            self.rig.r.consume(shard, epoch, id, inbound, self.rig.now);
            self.rig.flush();
            // Checked as they are issued: a send is judged by what the jobs were told so far.
            self.take_effects();
        }
    }

    /// With shards: answers the looks at the inbox asked for, with its latest entry now, or a
    /// failure.
    fn answer_looks(&mut self, ok: bool) {
        let Some(h) = &self.holding else { return };
        let latest = h.inbox.last().map(|(id, _)| *id);
        for (shard, epoch) in std::mem::take(&mut self.rig.looks) {
            let result = if ok { Ok(latest) } else { Err(StoreError("down".into())) };
            self.rig.r.inbox_looked(shard, epoch, result);
        }
        self.rig.flush();
        self.take_effects();
    }

    /// With shards: the lease runs out; the shard is given up, then taken again under a new
    /// epoch, from what the store holds; the reader starts again from the committed position.
    fn hand_over(&mut self) {
        let Some(h) = &mut self.holding else { return };
        self.rig.r.release(h.shard);
        h.epoch += 1;
        h.read = h.applied;
        let (shard, epoch, applied) = (h.shard, h.epoch, h.applied);
        let records = self.resumed_from_store();
        self.rig.r.adopt(shard, epoch, applied, records, self.rig.now);
        self.rig.flush();
    }

    /// One instance, killed (-9) and started again on its store: everything in flight is gone
    /// (the commit in flight landed or not), LiveKit delivers again every webhook left
    /// unanswered, and the jobs are resumed from the store.
    fn crash(&mut self, landed: bool) {
        if self.holding.is_some() {
            return;
        }
        if landed && !self.rig.commits.is_empty() {
            let ops = self.rig.commits.remove(0);
            self.apply(ops);
        }
        for (ticket, event) in std::mem::take(&mut self.unanswered) {
            self.tickets.remove(&ticket);
            self.webhooks.push(event);
        }
        self.crashes += 1;
        let mut rig = Rig::new();
        rig.r =
            Registry::new(Timing::default(), Limits::default(), Arc::new(Metrics::new())).with_ids_from(self.crashes);
        (rig.now, rig.next_ticket) = (self.rig.now, self.rig.next_ticket);
        self.rig = rig;
        self.listings.clear();
        self.checked.clear();
        for record in self.resumed_from_store() {
            self.rig.r.resume(record, self.rig.now);
        }
        self.rig.flush();
    }

    /// The stored jobs, to resume; what their jobs know of becomes what was stored.
    fn resumed_from_store(&mut self) -> Vec<JobRecord> {
        let records: Vec<JobRecord> = self
            .stored
            .iter()
            .map(|(id, state)| JobRecord { id: *id, delegation: self.delegations[id].clone(), state: state.clone() })
            .collect();
        for (m, d) in self.members.iter().enumerate() {
            self.known[m] = records
                .iter()
                .filter(|r| r.delegation == *d)
                .flat_map(|r| match &r.state {
                    Durable::Connected { binding, others, .. } => {
                        others.iter().chain([binding]).map(|b| b.sid.to_string()).collect()
                    }
                    Durable::Grace { binding, .. } => vec![binding.sid.to_string()],
                    Durable::Sending { returned, .. } => returned.iter().map(|b| b.sid.to_string()).collect(),
                    Durable::Waiting { .. } => Vec::new(),
                })
                .collect();
        }
        records
    }

    /// The incarnation of member `m`'s job, if it has one.
    fn incarnation_of(&self, m: usize) -> Option<u32> {
        self.rig.r.jobs.values().find(|e| *e.delegation == self.members[m]).map(|e| e.incarnation)
    }

    fn member_of(&self, identity: &str) -> Option<usize> {
        self.members.iter().position(|d| d.identities()[0] == identity)
    }

    /// Looks at what the registry asked for since the last look.
    fn take_effects(&mut self) {
        for (job, call, action, d) in &self.rig.calls {
            if *action != DelayedAction::Send || !self.checked.insert(*call) {
                continue;
            }
            let m = self.member_of(&d.identities()[0]).unwrap();
            if let Some(sid) = &self.connected[m] {
                assert!(!self.known[m].contains(sid), "job {job} sent a leave while its member is connected as {sid}");
            }
            self.sent.insert(d.delay_id.to_string());
        }
        for (room, at) in std::mem::take(&mut self.rig.lists) {
            let present = (0..3)
                .filter_map(|m| self.connected[m].as_ref().map(|sid| participant(&self.members[m], sid)))
                .collect();
            let jobs = (0..3).map(|m| self.incarnation_of(m)).collect();
            self.listings.push((room, at, present, jobs));
        }
        for (ticket, _) in std::mem::take(&mut self.rig.webhooks) {
            if ticket == Ticket::INBOX {
                continue; // answered when it was queued
            }
            *self.tickets.get_mut(&ticket).expect("a ticket handed out") += 1;
            self.unanswered.remove(&ticket);
        }
        let calls = self.rig.r.calls_in_flight();
        assert!(calls <= Limits::default().restarts + Limits::default().sends);
    }

    /// Answers the commit in flight, if any.
    fn settle_commit(&mut self, ok: bool) {
        if self.rig.commits.is_empty() {
            return;
        }
        let ops = self.rig.commits.remove(0);
        let fence = self.rig.fences.remove(0);
        assert!(self.rig.commits.is_empty(), "one commit at a time");
        if let Some(h) = &self.holding {
            assert!(fence.as_ref().is_some_and(|f| f.iter().all(|(s, _)| *s == h.shard)), "{fence:?}");
            // Fenced: refused if the lease it names was lost meanwhile.
            if fence != Some(vec![(h.shard, h.epoch)]) {
                self.rig.commit(Err(StoreError("FENCED".into())));
                return;
            }
        }
        if !ok {
            self.rig.commit(Err(StoreError("down".into())));
            return;
        }
        self.apply(ops);
        self.rig.commit(Ok(()));
    }

    /// Applies committed changes to the store.
    fn apply(&mut self, ops: Vec<StoreOp>) {
        for op in ops {
            match op {
                StoreOp::Insert(r) => {
                    self.stored.insert(r.id, r.state);
                    self.delegations.insert(r.id, r.delegation);
                }
                StoreOp::SetState(id, s) => {
                    if let Some(x) = self.stored.get_mut(&id) {
                        *x = s;
                    }
                }
                StoreOp::Delete(id) => {
                    self.stored.remove(&id);
                    self.delegations.remove(&id);
                }
                StoreOp::Consumed { shard, entry } => {
                    let h = self.holding.as_mut().expect("positions only with shards");
                    assert_eq!(shard, h.shard);
                    h.applied = h.applied.max(entry);
                }
            }
        }
    }

    fn deliver(&mut self, e: SfuEvent) {
        if self.holding.is_some() {
            // Queued; it reaches the jobs when it is read.
            self.push(Inbound::Webhook(e));
            return;
        }
        self.told(&e);
        let t = self.rig.ticket();
        self.tickets.insert(t, 0);
        self.unanswered.insert(t, e.clone());
        self.rig.r.webhook(e, t, self.rig.now);
        self.rig.flush();
    }

    /// Keeps track of the sessions the jobs are told of (a member without a job yet, its
    /// delegation not yet in effect, is told nothing).
    fn told(&mut self, e: &SfuEvent) {
        match &e.kind {
            SfuEventKind::ParticipantJoined(p) => {
                let m = self.member_of(&p.identity).unwrap();
                if self.incarnation_of(m).is_some() {
                    self.known[m].push(p.sid.clone());
                }
            }
            SfuEventKind::ParticipantLeft { participant: p, .. } => {
                let m = self.member_of(&p.identity).unwrap();
                self.known[m].retain(|s| *s != p.sid);
            }
            _ => {}
        }
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Connect(m) if self.connected[m].is_none() => {
                self.next += 1;
                let sid = format!("PA_{}", self.next);
                self.webhooks.push(joined(&self.members[m], &sid, &format!("EV_{}", self.next)));
                self.connected[m] = Some(sid);
            }
            Op::Disconnect(m) => {
                if let Some(sid) = self.connected[m].take() {
                    self.next += 1;
                    self.webhooks.push(left(&self.members[m], &sid, &format!("EV_{}", self.next)));
                }
            }
            Op::Deliver(i) if !self.webhooks.is_empty() => {
                let e = self.webhooks.remove(i % self.webhooks.len());
                self.deliver(e);
            }
            Op::Duplicate(i) if !self.webhooks.is_empty() => {
                let e = self.webhooks[i % self.webhooks.len()].clone();
                self.deliver(e);
            }
            Op::Lose(i) if !self.webhooks.is_empty() => {
                self.webhooks.remove(i % self.webhooks.len());
            }
            Op::FinishListing(i, ok) if !self.listings.is_empty() => {
                let (room, at, present, jobs) = self.listings.remove(i % self.listings.len());
                if ok {
                    for p in &present {
                        let m = self.member_of(&p.identity).unwrap();
                        if jobs[m].is_some() && jobs[m] == self.incarnation_of(m) && !self.known[m].contains(&p.sid) {
                            self.known[m].push(p.sid.clone());
                        }
                    }
                }
                let result = if ok { Ok(present) } else { Err(Unobserved) };
                self.rig.r.listed(room, at, result, self.rig.now);
                self.rig.flush();
            }
            Op::Answer(i, kind) if !self.rig.calls.is_empty() => {
                let (_, call, action, _) = self.rig.calls.remove(i % self.rig.calls.len());
                let answer = match kind % 6 {
                    0 => HsAnswer::Failed,
                    1 => HsAnswer::RetryAfter(u64::from(kind) * 10),
                    _ => HsAnswer::Ok,
                };
                self.rig.r.call_answered(call, action, answer, self.rig.now);
                self.rig.flush();
            }
            Op::Commit(ok) => self.settle_commit(ok),
            Op::Advance(ms) => {
                // Restarts in flight are answered as time passes (a healthy homeserver).
                let (restarts, others): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut self.rig.calls).into_iter().partition(|c| c.2 == DelayedAction::Restart);
                self.rig.calls = others;
                for (_, call, action, _) in restarts {
                    self.rig.r.call_answered(call, action, HsAnswer::Ok, self.rig.now);
                }
                self.rig.flush();
                let to = self.rig.now + Millis::from(ms);
                self.rig.advance(to);
            }
            Op::Reconcile => {
                self.rig.r.reconcile();
                self.rig.flush();
            }
            Op::Read(n) => self.read(usize::from(n)),
            Op::Handover => self.hand_over(),
            Op::Look(ok) => self.answer_looks(ok),
            Op::Crash(landed) => self.crash(landed),
            _ => {}
        }
        self.take_effects();
    }
}

/// Runs `ops`, then lets the store work and the reader catch up until nothing is left to do;
/// checks every property along the way and at the end.
fn run_world(sharded: bool, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut w = World::new(sharded);
    for op in ops {
        w.step(op);
    }
    // The store works again: let everything be read and committed. A failed commit (the store
    // was down, or the fence refused it) is retried after the retry interval: only then does
    // time pass.
    let retry = Limits::default().commit_retry;
    w.rig.advance(w.rig.now + retry);
    w.take_effects();
    for _ in 0..20 {
        w.read(usize::MAX);
        w.answer_looks(true);
        w.read(usize::MAX);
        if w.rig.commits.is_empty() {
            if w.rig.r.pending.is_empty() && w.rig.r.staged.is_empty() {
                break;
            }
            w.rig.advance(w.rig.now + retry);
        } else {
            w.settle_commit(true);
        }
        w.take_effects();
    }
    prop_assert!(w.rig.commits.is_empty() && w.rig.r.pending.is_empty() && w.rig.r.staged.is_empty());
    for (t, n) in &w.tickets {
        prop_assert_eq!(*n, 1, "webhook ticket {:?} answered {} times", t, n);
    }
    if let Some(h) = &w.holding {
        let last = h.inbox.last().map_or(entry(0), |(id, _)| *id);
        prop_assert_eq!(h.applied, last, "every inbox entry applied, its position committed");
    }
    let live: BTreeMap<JobId, Durable> =
        w.rig.r.jobs.iter().filter_map(|(id, e)| e.job.durable().map(|s| (*id, s))).collect();
    prop_assert_eq!(&w.stored, &live);
    w.everybody_leaves()
}

impl World {
    /// Liveness, through whatever handovers and crashes came before: from now on LiveKit and the
    /// homeserver answer everything, promptly and truthfully; every connected member leaves (its
    /// departure delivered). Every job still alive whose event can still be kept alive (its last
    /// chance to restart it, as the job knows its deadline, still ahead) ends with a send of its
    /// delay id, within the time the slowest proof takes.
    fn everybody_leaves(&mut self) -> Result<(), TestCaseError> {
        for m in 0..self.members.len() {
            self.step(Op::Disconnect(m));
        }
        while !self.webhooks.is_empty() {
            self.step(Op::Deliver(0));
        }
        // What was due fires first (a job whose event the homeserver fired ends here).
        let now = self.rig.now;
        self.rig.advance(now);
        self.take_effects();
        let expected: Vec<(JobId, String)> = self
            .rig
            .r
            .jobs
            .iter()
            // Its last chance to be restarted (a tenth of the delay before its deadline) still
            // ahead: after that, a homeserver that failed it lets it fire.
            .filter(|(_, e)| e.job.deadline().saturating_sub(e.delegation.delay_ms / 10) > now)
            .map(|(id, e)| (*id, e.delegation.delay_id.to_string()))
            .collect();
        let timing = Timing::default();
        let end = now + timing.join_timeout.max(timing.grace) + timing.unconfirmed_limit + 60_000;
        let mut next_reconcile = now;
        let mut last_seen: BTreeMap<JobId, (Millis, String)> = BTreeMap::new();
        while self.rig.now < end && !self.rig.r.jobs.is_empty() {
            for (id, e) in &self.rig.r.jobs {
                last_seen.insert(*id, (self.rig.now, format!("{:?} deadline {}", e.job.kind(), e.job.deadline())));
            }
            self.read(usize::MAX);
            self.answer_looks(true);
            self.settle_commit(true);
            self.take_effects();
            let calls = std::mem::take(&mut self.rig.calls);
            for (_, call, action, _) in calls {
                self.rig.r.call_answered(call, action, HsAnswer::Ok, self.rig.now);
            }
            self.rig.flush();
            while !self.listings.is_empty() {
                self.step(Op::FinishListing(0, true));
            }
            if self.rig.now >= next_reconcile {
                self.step(Op::Reconcile);
                next_reconcile = self.rig.now + 5_000;
            }
            let to = self.rig.now + 250;
            self.rig.advance(to);
            self.take_effects();
        }
        for (id, delay_id) in expected {
            prop_assert!(
                self.sent.contains(&delay_id),
                "job {} ({}) never sent its leave after everybody left (from {}); still tracked: {}; last seen {:?}",
                id,
                delay_id,
                now,
                self.rig.r.jobs.contains_key(&id),
                last_seen.get(&id)
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Whatever the order of webhooks, listings, homeserver answers and store outcomes, for
    /// several members of one room: no leave goes out for a member connected in a session its
    /// job was told of; every webhook is answered exactly once once the store works; and then
    /// what is stored is exactly what every live job would store. And liveness: once everybody
    /// has left and LiveKit and the homeserver answer, every job whose event is still alive
    /// sends its leave (so also through the handovers and crashes of the two properties below).
    #[test]
    fn any_ordering_keeps_members_safe_and_the_store_exact(ops in proptest::collection::vec(op(), 0..150)) {
        run_world(false, ops)?;
    }

    /// The same with shards: requests reach the jobs through the shard's inbox, read in any
    /// rhythm, and the shard is given up and taken again (new epoch, jobs resumed from the
    /// store, inbox read again from the committed position) at any moment, commits of the
    /// earlier holding refused by the fence. Also: in the end every entry is applied once and
    /// its position committed.
    #[test]
    fn any_ordering_with_handovers_keeps_members_safe_and_the_store_exact(ops in proptest::collection::vec(sharded_op(), 0..150)) {
        run_world(true, ops)?;
    }

    /// One instance (the default deployment, on SQLite) killed and started again at any
    /// moment: the commit in flight lands or not, LiveKit delivers again every webhook left
    /// unanswered, the jobs are resumed from the store.
    #[test]
    fn any_ordering_with_crashes_keeps_members_safe_and_the_store_exact(ops in proptest::collection::vec(crashing_op(), 0..150)) {
        run_world(false, ops)?;
    }
}

// ---- several instances: shards, inboxes, fencing ---------------------------------------------

fn entry(ms: u64) -> EntryId {
    EntryId { ms, seq: 0 }
}

/// A registry of one of several instances, holding the shard of room `!r:hs.test` under epoch 3.
fn sharded() -> (Rig, Shard) {
    let mut rig = Rig::new();
    rig.r = Registry::new(Timing::default(), Limits::default(), Arc::new(Metrics::new())).sharded().with_ids_from(0);
    let shard = shard_of(&delegation("a", "DEV", "x").livekit_room());
    rig.r.adopt(shard, 3, entry(0), Vec::new(), 0);
    (rig, shard)
}

fn consume(rig: &mut Rig, shard: Shard, epoch: u64, at: u64, inbound: Inbound) {
    rig.r.consume(shard, epoch, entry(at), inbound, rig.now);
    rig.flush();
}

/// Job `id` of member `d` as stored connected in session `PA_1`.
fn stored_connected(id: JobId, d: &Delegation) -> JobRecord {
    let binding = crate::lifecycle::Binding {
        identity: d.identities()[0].as_str().into(),
        sid: "PA_1".into(),
        joined_at_ms: 1_000,
        room_sid: "RM_1".into(),
    };
    JobRecord { id, delegation: d.clone(), state: Durable::Connected { binding, others: vec![], absent: vec![] } }
}

/// Member `d` delegated through the inbox (entry 1), its first restart answered, then joined as
/// `PA_1` (entry 2, its commit started but not answered).
fn delegated_and_joining(rig: &mut Rig, shard: Shard, d: &Delegation) {
    consume(rig, shard, 3, 1, Inbound::Delegation(d.clone()));
    rig.commit(Ok(()));
    rig.answer_calls(HsAnswer::Ok);
    consume(rig, shard, 3, 2, Inbound::Webhook(joined(d, "PA_1", "EV_1")));
}

#[test]
fn an_inbox_entry_takes_effect_once_and_its_position_is_committed_with_its_effects() {
    let (mut rig, shard) = sharded();
    let a = delegation("a", "DEV", "syd_a");
    consume(&mut rig, shard, 3, 5, Inbound::Delegation(a.clone()));
    assert_eq!(rig.commits.len(), 1);
    let ops = &rig.commits[0];
    assert!(
        matches!(&ops[..], [StoreOp::Insert(r), StoreOp::Consumed { shard: s, entry: e }] if *s == shard && *e == entry(5) && r.delegation == a),
        "{ops:?}"
    );
    assert_eq!(rig.fences[0], Some(vec![(shard, 3)]), "fenced with the shard's epoch");
    // Durable in the inbox already: in effect at once, restarted at once.
    assert_eq!(rig.r.len(), 1);
    assert_eq!(rig.calls.len(), 1);
    rig.commit(Ok(()));
    // The same entry again (read twice), or an entry read under an earlier holding: nothing.
    consume(&mut rig, shard, 3, 5, Inbound::Delegation(delegation("a", "DEV", "syd_other")));
    consume(&mut rig, shard, 2, 6, Inbound::Delegation(delegation("a", "DEV", "syd_other")));
    assert_eq!(rig.commits.len(), 1, "nothing to commit");
    // An entry of a shard not held: left for its holder.
    let other = Shard((shard.0 + 1) % crate::cluster::SHARDS);
    consume(&mut rig, other, 3, 7, Inbound::Delegation(delegation("b", "DEV", "syd_b")));
    assert_eq!(rig.commits.len(), 1);
    // A webhook entry: its effects and its position in one commit.
    consume(&mut rig, shard, 3, 8, Inbound::Webhook(joined(&a, "PA_1", "EV_1")));
    assert_eq!(rig.commits.len(), 2);
    assert!(
        matches!(&rig.commits[1][..], [StoreOp::SetState(_, Durable::Connected { .. }), StoreOp::Consumed { entry: e, .. }] if *e == entry(8)),
        "{:?}",
        rig.commits[1]
    );
}

/// Found by the real-LiveKit chaos run: a member hung up and called again at once; the instance
/// that took the new delegation stored it in the shard's inbox and answered, and the shard's
/// holder, before taking that entry in, proved the old call's departure and sent its delay id —
/// the one that, sent after the newer delegation, overwrites the new membership with a leave.
/// A send now waits for a look at the inbox started after it was decided, and for the entries up
/// to the latest it found: a newer delegation there supersedes the job and the send is dropped.
#[test]
fn a_send_waits_until_the_inbox_holds_no_newer_delegation_of_its_member() {
    // Member `a` connected, then departed (entry 3): its leave is to be sent.
    let departed = |a: &Delegation| {
        let (mut rig, shard) = sharded();
        delegated_and_joining(&mut rig, shard, a);
        rig.commit(Ok(()));
        consume(&mut rig, shard, 3, 3, Inbound::Webhook(left(a, "PA_1", "EV_2")));
        (rig, shard)
    };
    let a = delegation("a", "DEV", "syd_a");
    let (mut rig, shard) = departed(&a);
    let old = rig.r.jobs.keys().copied().next().unwrap();
    assert!(rig.sends().is_empty(), "not before a look at the inbox");
    assert_eq!(rig.looks, [(shard, 3)]);
    // The member called again meanwhile: its newer delegation is entry 4, not taken in yet.
    rig.answer_looks(Some(entry(4)));
    assert!(rig.sends().is_empty(), "not before the entries the look found are taken in");
    let newer = delegation("a", "DEV", "syd_a2");
    consume(&mut rig, shard, 3, 4, Inbound::Delegation(newer.clone()));
    rig.advance(rig.now + 10 * DELAY);
    assert!(!rig.calls.iter().any(|c| c.0 == old && c.2 == DelayedAction::Send), "the older delay id is never sent");
    assert!(rig.r.jobs.values().any(|e| *e.delegation == newer), "the newer delegation is tracked");
    assert!(rig.looks.is_empty(), "no send, no look");

    // Nothing newer in the inbox: sent as soon as the look says so.
    let (mut rig, _) = departed(&a);
    rig.answer_looks(Some(entry(3)));
    assert_eq!(rig.sends().len(), 1);

    // A look that fails is made again; the send waits for it.
    let (mut rig, shard) = departed(&a);
    for (s, epoch) in std::mem::take(&mut rig.looks) {
        rig.r.inbox_looked(s, epoch, Err(StoreError("Redis down".into())));
    }
    rig.flush();
    assert!(rig.sends().is_empty());
    assert_eq!(rig.looks, [(shard, 3)], "looked at again");
    // An answer to a look of an earlier holding of the shard changes nothing.
    rig.r.inbox_looked(shard, 2, Ok(None));
    rig.flush();
    assert!(rig.sends().is_empty());
    rig.answer_looks(None);
    assert_eq!(rig.sends().len(), 1, "an empty inbox holds nothing newer");
}

#[test]
fn a_failed_commit_retries_an_inbox_delegation_instead_of_refusing_it() {
    let (mut rig, shard) = sharded();
    let a = delegation("a", "DEV", "syd_a");
    consume(&mut rig, shard, 3, 5, Inbound::Delegation(a.clone()));
    rig.commit(Err(StoreError("FENCED or down".into())));
    assert!(rig.delegated.iter().all(|(t, _)| *t == Ticket::INBOX), "nobody waits for an inbox entry's answer");
    rig.advance(Limits::default().commit_retry);
    assert_eq!(rig.commits.len(), 2, "retried");
    let ops = &rig.commits[1];
    assert!(ops.iter().any(|op| matches!(op, StoreOp::Insert(r) if r.delegation == a)), "{ops:?}");
    assert!(ops.iter().any(|op| matches!(op, StoreOp::Consumed { entry: e, .. } if *e == entry(5))), "{ops:?}");
    rig.commit(Ok(()));
    assert_eq!(rig.r.len(), 1);
}

#[test]
fn a_released_shard_is_forgotten_without_a_call_and_its_changes_are_not_committed() {
    let (mut rig, shard) = sharded();
    let a = delegation("a", "DEV", "syd_a");
    let record = stored_connected(JobId(7), &a);
    rig.r.release(shard);
    rig.r.adopt(shard, 4, entry(9), vec![record], rig.now);
    rig.flush();
    assert_eq!(rig.r.len(), 1);
    assert_eq!(rig.calls.len(), 1, "a taken-over job restarts at once");
    assert_eq!(rig.lists.len(), 1, "and is reconciled with LiveKit");
    rig.answer_calls(HsAnswer::Ok);
    // A departure is applied, its send queued; the commit of its phase is in flight.
    consume(&mut rig, shard, 4, 10, Inbound::Webhook(left(&a, "PA_1", "EV_2")));
    assert_eq!(rig.looks, [(shard, 4)], "the send waits for a look at the inbox");
    rig.answer_looks(Some(entry(10)));
    let sends_before = rig.sends().len();
    assert_eq!(sends_before, 1);
    let commits = rig.commits.len();
    // A second departure piles a change up behind the commit in flight; then the shard is lost.
    consume(&mut rig, shard, 4, 11, Inbound::Webhook(joined(&a, "PA_2", "EV_3")));
    rig.r.release(shard);
    assert!(rig.r.is_empty());
    rig.commit(Err(StoreError("FENCED shard".into())));
    rig.advance(rig.now + 10 * DELAY);
    assert_eq!(rig.commits.len(), commits, "nothing of the shard is committed any more");
    assert_eq!(rig.sends().len(), sends_before, "no further call");
    // The answer to the call made before comes back: ignored.
    rig.answer_calls(HsAnswer::Ok);
    assert!(rig.r.is_empty() && rig.calls.is_empty());
}

/// Found by the Redis outage test: while Redis was down, a departure was read from the inbox and
/// applied, its commit waiting for a retry; the shard's lease had run out meanwhile, so it was
/// released and taken again under a new epoch. Releasing it emptied the changes to commit, and
/// the departure's webhook id, left with nothing to wait for, was remembered as handled: read
/// again under the new epoch, the departure was dropped as a duplicate and the leave not sent.
#[test]
fn an_entry_applied_but_not_committed_is_applied_again_when_its_shard_is_held_again() {
    let (mut rig, shard) = sharded();
    let a = delegation("a", "DEV", "syd_a");
    delegated_and_joining(&mut rig, shard, &a);
    rig.commit(Ok(()));
    // Redis down: a commit fails; the departure, read once Redis answers again, waits for the
    // retry behind it; the shard's lease ran out meanwhile, so it is released before the retry.
    consume(&mut rig, shard, 3, 3, Inbound::Webhook(joined(&a, "PA_1", "EV_2")));
    rig.commit(Err(StoreError("store unavailable".into())));
    consume(&mut rig, shard, 3, 4, Inbound::Webhook(left(&a, "PA_1", "EV_3")));
    let commits = rig.commits.len();
    rig.r.release(shard);
    rig.flush();
    assert_eq!(rig.commits.len(), commits, "nothing of the shard committed");
    // Held again: the job as committed (connected), and the entries after the position.
    let record = stored_connected(JobId(1), &a);
    rig.r.adopt(shard, 4, entry(2), vec![record], rig.now);
    rig.flush();
    rig.answer_calls(HsAnswer::Ok);
    let sends = rig.sends().len();
    consume(&mut rig, shard, 4, 3, Inbound::Webhook(joined(&a, "PA_1", "EV_2")));
    consume(&mut rig, shard, 4, 4, Inbound::Webhook(left(&a, "PA_1", "EV_3")));
    rig.answer_looks(Some(entry(4)));
    assert_eq!(rig.sends().len(), sends + 1, "the departure read again is applied: the leave is sent");
}

/// A commit in flight when its shard is given up and taken again by this instance (a lease that
/// ran out while Redis was away, say): if it fails, its changes belong to the earlier holding and
/// are not retried under the new one, whose jobs and position start again from the store.
#[test]
fn a_failed_commit_of_an_earlier_holding_is_not_retried_under_the_next() {
    let (mut rig, shard) = sharded();
    let a = delegation("a", "DEV", "syd_a");
    delegated_and_joining(&mut rig, shard, &a);
    let commits = rig.commits.len();
    rig.r.release(shard);
    let stored = JobRecord { id: JobId(1), delegation: a.clone(), state: Durable::WAITING };
    rig.r.adopt(shard, 4, entry(1), vec![stored], rig.now);
    rig.commit(Err(StoreError("FENCED shard".into())));
    rig.advance(Limits::default().commit_retry);
    assert_eq!(rig.commits.len(), commits, "nothing of the earlier holding retried");
    // The entry read again under the new holding: its effects and position committed now.
    consume(&mut rig, shard, 4, 2, Inbound::Webhook(joined(&a, "PA_1", "EV_1")));
    assert_eq!(rig.commits.len(), commits + 1);
    assert_eq!(rig.fences.last().unwrap(), &Some(vec![(shard, 4)]));
    assert!(
        matches!(&rig.commits[commits][..], [StoreOp::SetState(..), StoreOp::Consumed { entry: e, .. }] if *e == entry(2)),
        "{:?}",
        rig.commits[commits]
    );
}

/// A job given up with a restart in flight and taken over again by this instance keeps its id
/// and counts its calls from zero again: the late answer to the earlier holding's call must not
/// be taken for the answer to the new one.
#[test]
fn a_late_answer_to_a_call_of_an_earlier_holding_is_not_taken_for_the_next_ones() {
    let (mut rig, shard) = sharded();
    let a = delegation("a", "DEV", "syd_a");
    let stored = || JobRecord { id: JobId(7), delegation: a.clone(), state: Durable::WAITING };
    rig.r.release(shard);
    rig.r.adopt(shard, 4, entry(0), vec![stored()], rig.now);
    rig.flush();
    let earlier = std::mem::take(&mut rig.calls);
    assert_eq!(earlier.len(), 1, "restarted at once");
    rig.r.release(shard);
    rig.r.adopt(shard, 5, entry(0), vec![stored()], rig.now);
    rig.flush();
    assert_eq!(rig.calls.len(), 1, "restarted at once again");
    assert_ne!(rig.calls[0].1, earlier[0].1, "another call");
    // The earlier call's answer (404: as seen then) comes back late: not this holding's call.
    rig.r.call_answered(earlier[0].1, earlier[0].2, HsAnswer::Gone, rig.now);
    rig.flush();
    assert_eq!(rig.r.len(), 1, "still tracked");
    rig.answer_calls(HsAnswer::Ok);
    assert_eq!(rig.r.len(), 1);
    assert!(rig.calls.is_empty() && rig.r.calls_in_flight() == 0, "its own answer taken");
}

/// Found by the chaos suite: a client refreshed its delayed leave (new delegation, in the inbox)
/// and then hung up; the departure, queued after the delegation, was applied to the old job
/// while the new one waited for its commit — and the superseded delay id was sent.
#[test]
fn an_inbox_delegation_takes_effect_before_the_departure_queued_after_it() {
    let (mut rig, shard) = sharded();
    let old = delegation("a", "DEV", "syd_old");
    delegated_and_joining(&mut rig, shard, &old);
    rig.commit(Ok(()));
    // The refresh, then the hang-up, one right after the other in the inbox; a commit is in
    // flight meanwhile.
    let new = delegation("a", "DEV", "syd_new");
    consume(&mut rig, shard, 3, 3, Inbound::Delegation(new.clone()));
    consume(&mut rig, shard, 3, 4, Inbound::Webhook(left(&new, "PA_1", "EV_2")));
    let sent: Vec<&str> =
        rig.calls.iter().filter(|c| c.2 == DelayedAction::Send).map(|c| c.3.delay_id.as_str()).collect();
    assert!(!sent.contains(&"syd_old"), "the superseded delay id was sent: {sent:?}");
    assert_eq!(rig.r.len(), 1);
}

/// Mutation testing found these untested: a webhook with effects of its own, arriving while
/// another's commit is in flight, must be answered only once *its* effects are durable.
#[test]
fn a_webhook_with_effects_waits_for_its_own_commit_not_the_one_in_flight() {
    let mut rig = Rig::new();
    let (a, b) = (delegation("a", "DEV", "syd_a"), delegation("b", "DEV", "syd_b"));
    rig.tracked(&a);
    rig.tracked(&b);
    rig.answer_calls(HsAnswer::Ok);
    let first = rig.webhook(joined(&a, "PA_1", "EV_1"));
    let commits = rig.commits.len();
    let second = rig.webhook(joined(&b, "PA_2", "EV_2"));
    assert_eq!(rig.commits.len(), commits, "one commit in flight at a time");
    rig.commit(Ok(()));
    assert_eq!(rig.webhook_answer(first).unwrap().as_ref().unwrap(), &WebhookOutcome::Applied);
    assert!(rig.webhook_answer(second).is_none(), "answered before its own effects were durable");
    assert_eq!(rig.commits.len(), commits + 1, "its own commit follows");
    rig.commit(Ok(()));
    assert_eq!(rig.webhook_answer(second).unwrap().as_ref().unwrap(), &WebhookOutcome::Applied);
}

/// The ids of applied webhooks are remembered up to the limit, the oldest forgotten first.
#[test]
fn webhook_ids_are_remembered_up_to_the_limit_oldest_forgotten_first() {
    let mut rig = Rig::with(Limits { seen_webhooks: 3, ..Limits::default() });
    let ds: Vec<Delegation> = (0..4).map(|i| delegation(&format!("u{i}"), "DEV", &format!("syd_{i}"))).collect();
    for d in &ds {
        rig.tracked(d);
    }
    rig.answer_calls(HsAnswer::Ok);
    let deliver = |rig: &mut Rig, i: usize| {
        let t = rig.webhook(joined(&ds[i], &format!("PA_{i}"), &format!("EV_{i}")));
        rig.commit(Ok(()));
        *rig.webhook_answer(t).unwrap().as_ref().unwrap()
    };
    for i in 0..3 {
        assert_eq!(deliver(&mut rig, i), WebhookOutcome::Applied);
    }
    assert_eq!(deliver(&mut rig, 0), WebhookOutcome::Duplicate, "as many as the limit are remembered");
    assert_eq!(deliver(&mut rig, 3), WebhookOutcome::Applied);
    assert_ne!(deliver(&mut rig, 0), WebhookOutcome::Duplicate, "the oldest is forgotten first");
    assert_eq!(deliver(&mut rig, 2), WebhookOutcome::Duplicate, "the others are kept");
}
