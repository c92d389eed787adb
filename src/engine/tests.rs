//! The engine task with fake ports: a store that fails or blocks, a homeserver that records
//! calls and can panic, a LiveKit that lists whom it is told.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use async_trait::async_trait;

use super::*;
use crate::lifecycle::{Durable, HsAnswer};
use crate::livekit::{Departure, Participant, SfuEventKind};
use crate::ports::{DelayedAction, Unobserved};
use crate::store::{JobRecord, StoreOp};

/// An in-memory store that can be made to fail or to block (like SQLite under a lock: the
/// thread waits), and keeps every commit it applied.
#[derive(Default)]
struct FakeStore {
    jobs: Mutex<HashMap<JobId, JobRecord>>,
    commits: Mutex<Vec<Vec<StoreOp>>>,
    down: AtomicBool,
    /// Milliseconds each commit blocks its thread.
    block_ms: AtomicU64,
    blocked_commits: AtomicUsize,
}

#[async_trait]
impl Store for FakeStore {
    async fn load(&self) -> Result<Vec<JobRecord>, StoreError> {
        Ok(self.jobs.lock().unwrap().values().cloned().collect())
    }
    async fn commit(&self, ops: Vec<StoreOp>) -> Result<(), StoreError> {
        let block = self.block_ms.load(Ordering::SeqCst);
        if block > 0 {
            self.blocked_commits.fetch_add(1, Ordering::SeqCst);
            tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(block)));
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError("disk on fire".into()));
        }
        self.commits.lock().unwrap().push(ops.clone());
        let mut jobs = self.jobs.lock().unwrap();
        for op in ops {
            match op {
                StoreOp::Insert(r) => {
                    jobs.insert(r.id, *r);
                }
                StoreOp::SetState(id, state) => {
                    if let Some(r) = jobs.get_mut(&id) {
                        r.state = state;
                    }
                }
                StoreOp::Delete(id) => {
                    jobs.remove(&id);
                }
                StoreOp::Consumed { .. } => {}
            }
        }
        Ok(())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A homeserver that answers every call at once with 200, and records it; its first
/// `panics` calls panic instead; while `held`, calls wait. With a `latency`, it carries a call
/// out as it arrives but answers only that long after, and refuses (as a timeout would) a call
/// that arrives while another of the same event is still being answered.
#[derive(Default)]
struct FakeHomeserver {
    calls: Mutex<Vec<(String, DelayedAction, Instant)>>,
    /// The calls answered 200, by delay id, with when they arrived: what keeps an event alive.
    accepted: Mutex<Vec<(String, DelayedAction, Instant)>>,
    panics: AtomicUsize,
    held: AtomicBool,
    release: tokio::sync::Notify,
    latency_ms: AtomicU64,
    busy: Mutex<std::collections::HashSet<String>>,
}

impl FakeHomeserver {
    fn calls_of(&self, delay_id: &str) -> Vec<(DelayedAction, Instant)> {
        self.calls.lock().unwrap().iter().filter(|c| c.0 == delay_id).map(|c| (c.1, c.2)).collect()
    }
}

#[async_trait]
impl DelayedEvents for FakeHomeserver {
    async fn call(&self, d: &Delegation, action: DelayedAction) -> HsAnswer {
        let arrived = Instant::now();
        self.calls.lock().unwrap().push((d.delay_id.to_string(), action, arrived));
        while self.held.load(Ordering::SeqCst) {
            let released = self.release.notified();
            if !self.held.load(Ordering::SeqCst) {
                break;
            }
            released.await;
        }
        if self.panics.load(Ordering::SeqCst) > 0 {
            self.panics.fetch_sub(1, Ordering::SeqCst);
            panic!("a bug in the homeserver adapter");
        }
        let latency = Duration::from_millis(self.latency_ms.load(Ordering::SeqCst));
        if latency.is_zero() {
            self.accepted.lock().unwrap().push((d.delay_id.to_string(), action, arrived));
            return HsAnswer::Ok;
        }
        if !self.busy.lock().unwrap().insert(d.delay_id.to_string()) {
            tokio::time::sleep(latency).await;
            return HsAnswer::Failed;
        }
        self.accepted.lock().unwrap().push((d.delay_id.to_string(), action, arrived));
        tokio::time::sleep(latency).await;
        self.busy.lock().unwrap().remove(d.delay_id.as_str());
        HsAnswer::Ok
    }
}

/// A LiveKit whose rooms hold whom the test put there.
#[derive(Default)]
struct FakeLiveKit {
    rooms: Mutex<HashMap<String, Vec<Participant>>>,
}

#[async_trait]
impl Presence for FakeLiveKit {
    async fn participants(&self, room: &str) -> Result<Vec<Participant>, Unobserved> {
        Ok(self.rooms.lock().unwrap().get(room).cloned().unwrap_or_default())
    }
}

struct Fakes {
    store: Arc<FakeStore>,
    hs: Arc<FakeHomeserver>,
    livekit: Arc<FakeLiveKit>,
    metrics: Arc<Metrics>,
}

impl Fakes {
    fn new() -> Self {
        Fakes { store: Arc::default(), hs: Arc::default(), livekit: Arc::default(), metrics: Arc::new(Metrics::new()) }
    }

    async fn engine(&self) -> EngineHandle {
        let config = EngineConfig {
            timing: Timing::default(),
            reconcile_interval: Duration::from_secs(3600),
            // Many test members share one user.
            limits: Limits { jobs_per_user: usize::MAX, ..Limits::default() },
            instance: None,
            appservice_server: None,
        };
        let ports = Ports {
            store: self.store.clone(),
            homeserver: self.hs.clone(),
            presence: self.livekit.clone(),
            metrics: self.metrics.clone(),
            gate: Arc::new(crate::ports::Sole),
        };
        start(config, ports).await.unwrap().0
    }

    /// A member with delay `delay_ms` connected to LiveKit (session `PA_1`), then delegated to
    /// `engine`; when it was delegated, from which on it must be kept alive.
    async fn connected_and_delegated(
        &self,
        engine: &EngineHandle,
        delay_id: &str,
        delay_ms: u64,
    ) -> (Delegation, Instant) {
        let d = Delegation { delay_ms, ..delegation(delay_id, "DEV") };
        self.livekit.rooms.lock().unwrap().insert(d.livekit_room(), vec![participant(&d, "PA_1")]);
        let since = Instant::now();
        engine.delegate(d.clone()).await.unwrap();
        (d, since)
    }
}

fn delegation(delay_id: &str, device: &str) -> Delegation {
    Delegation {
        room_id: "!r:hs.test".into(),
        slot_id: "m.call#ROOM".into(),
        user_id: "@a:hs.test".into(),
        device_id: device.into(),
        member_id: format!("m.{device}").into(),
        delay_id: delay_id.into(),
        delay_ms: 60_000,
        cs_api_url: "https://hs.test/".into(),
        created_at_ms: 0,
        mode: crate::delegation::Mode::OpenId,
        identity: None,
    }
}

fn participant(d: &Delegation, sid: &str) -> Participant {
    Participant { identity: d.identities()[0].clone(), sid: sid.into(), joined_at_ms: 1_000 }
}

fn joined(d: &Delegation, sid: &str, id: &str) -> SfuEvent {
    SfuEvent {
        id: id.into(),
        room: d.livekit_room(),
        room_sid: "RM_1".into(),
        kind: SfuEventKind::ParticipantJoined(participant(d, sid)),
    }
}

#[tokio::test]
async fn webhooks_are_acknowledged_only_once_durable_and_retries_are_not_lost() {
    let fakes = Fakes::new();
    let engine = fakes.engine().await;
    let store = &fakes.store;
    let d = delegation("syd_1", "DEV");
    let id = engine.delegate(d.clone()).await.unwrap();
    assert_eq!(store.jobs.lock().unwrap()[&id].state, Durable::WAITING);

    store.down.store(true, Ordering::SeqCst);
    let e = joined(&d, "PA_1", "EV_1");
    assert!(matches!(engine.webhook(e.clone()).await, Err(EngineError::Store(_))), "503 for LiveKit to retry");
    // A delegation while the store is down changes nothing.
    assert!(engine.delegate(delegation("syd_2", "DEV2")).await.is_err());

    store.down.store(false, Ordering::SeqCst);
    // LiveKit's retry of the same event: applied (not a duplicate), and now durable.
    assert_eq!(engine.webhook(e.clone()).await.unwrap(), WebhookOutcome::Applied);
    assert!(matches!(store.jobs.lock().unwrap()[&id].state, Durable::Connected { .. }));
    assert_eq!(store.jobs.lock().unwrap().len(), 1, "the refused delegation was not stored");
    // Once acknowledged, a further delivery is a duplicate.
    assert_eq!(engine.webhook(e).await.unwrap(), WebhookOutcome::Duplicate);
}

#[tokio::test]
async fn a_newer_delegation_replaces_the_older_in_one_commit_and_repeats_are_idempotent() {
    let fakes = Fakes::new();
    let engine = fakes.engine().await;
    let old = engine.delegate(delegation("syd_old", "DEV")).await.unwrap();
    assert_eq!(engine.delegate(delegation("syd_old", "DEV")).await.unwrap(), old, "repeat is idempotent");
    let new = engine.delegate(delegation("syd_new", "DEV")).await.unwrap();
    let jobs = fakes.store.jobs.lock().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[&new].delegation.delay_id, "syd_new");
    assert!(!jobs.contains_key(&old));
    // The new delegation and the deletion of the old one are in the same commit: no crash
    // can leave both (the old delay id would be resumed and could be sent) or neither.
    let commits = fakes.store.commits.lock().unwrap();
    let stored_new: Vec<&Vec<StoreOp>> =
        commits.iter().filter(|ops| ops.iter().any(|op| matches!(op, StoreOp::Insert(r) if r.id == new))).collect();
    assert_eq!(stored_new.len(), 1, "{commits:?}");
    assert!(stored_new[0].contains(&StoreOp::Delete(old)), "{commits:?}");
    let deleting_old = commits.iter().filter(|ops| ops.contains(&StoreOp::Delete(old))).count();
    assert_eq!(deleting_old, 1, "{commits:?}");
}

#[tokio::test]
async fn stored_jobs_are_resumed() {
    let fakes = Fakes::new();
    let d = delegation("syd_1", "DEV");
    let id = {
        let engine = fakes.engine().await;
        let id = engine.delegate(d.clone()).await.unwrap();
        engine.webhook(joined(&d, "PA_1", "EV_1")).await.unwrap();
        engine.shutdown(Duration::from_millis(500)).await;
        id
    };
    let engine = fakes.engine().await;
    // The resumed job is bound: a departure of its session sends (moves it to Sending).
    let left = SfuEvent {
        kind: SfuEventKind::ParticipantLeft {
            participant: participant(&d, "PA_1"),
            departure: Departure::Final("CLIENT_INITIATED".into()),
            aborted: false,
        },
        ..joined(&d, "PA_1", "EV_2")
    };
    assert_eq!(engine.webhook(left).await.unwrap(), WebhookOutcome::Applied);
    for _ in 0..100 {
        if fakes.hs.calls_of(&d.delay_id).iter().any(|c| c.0 == DelayedAction::Send) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(fakes.hs.calls_of(&d.delay_id).iter().any(|c| c.0 == DelayedAction::Send), "the leave was sent");
    engine.shutdown(Duration::from_secs(1)).await;
    assert!(!fakes.store.jobs.lock().unwrap().contains_key(&id), "and the job ended");
}

/// The restarts each delay id got, checked against its deadline: from the first restart on,
/// every gap between restarts (and from the last to `until`) is shorter than the delay.
/// Delay id `d` was kept alive from its delegation at `since` until `until`, judged per job: only
/// restarts the homeserver accepted count, the first came within the delay of the delegation,
/// every next one within the delay of the one before, and the delay had not run out at `until`.
/// (A job never restarted, or restarted late the first time, fails.)
fn assert_kept_alive(hs: &FakeHomeserver, d: &Delegation, since: Instant, until: Instant) {
    let calls = hs.calls_of(&d.delay_id);
    assert!(calls.iter().all(|c| c.0 == DelayedAction::Restart), "{}: {calls:?}", d.delay_id);
    let accepted: Vec<Instant> =
        hs.accepted.lock().unwrap().iter().filter(|c| c.0 == d.delay_id).map(|c| c.2).collect();
    assert!(!accepted.is_empty(), "{}: never restarted", d.delay_id);
    let times: Vec<Instant> = [since].into_iter().chain(accepted).chain([until]).collect();
    for pair in times.windows(2) {
        let gap = pair[1].saturating_duration_since(pair[0]);
        assert!(gap < Duration::from_millis(d.delay_ms), "{}: {gap:?} without an accepted restart", d.delay_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_blocked_for_ten_seconds_delays_no_restart() {
    let fakes = Fakes::new();
    let engine = fakes.engine().await;
    let delegations: Vec<Delegation> = (0..1_000)
        .map(|i| Delegation { delay_ms: 3_000, ..delegation(&format!("syd_{i}"), &format!("DEV{i}")) })
        .collect();
    // All connected in one room, as LiveKit lists them.
    let room = delegations[0].livekit_room();
    let listed = delegations.iter().enumerate().map(|(i, d)| participant(d, &format!("PA_{i}"))).collect();
    fakes.livekit.rooms.lock().unwrap().insert(room, listed);
    let since = Instant::now();
    let started = futures::future::join_all(delegations.iter().map(|d| engine.delegate(d.clone()))).await;
    assert!(started.iter().all(Result::is_ok));
    // From now on every commit holds its thread for 12 s. A second session of member 0 is a
    // change to commit (whatever the listings already bound), so the webhook must wait. It is
    // watched for 10 s: the answer comes 12 s after its commit began at the earliest, so a
    // wake-up of the test's timer made late by a loaded machine cannot see it (`timeout` polls
    // the answer before its timer).
    fakes.store.block_ms.store(12_000, Ordering::SeqCst);
    let mut second = joined(&delegations[0], "PA_second", "EV_1");
    if let SfuEventKind::ParticipantJoined(p) = &mut second.kind {
        p.joined_at_ms = 2_000; // a newer session than the listed one
    }
    let webhook = engine.webhook(second);
    let stuck = tokio::time::timeout(Duration::from_secs(10), webhook).await;
    assert!(stuck.is_err(), "the webhook's answer waits for the store");
    let until = Instant::now();
    assert!(fakes.store.blocked_commits.load(Ordering::SeqCst) >= 1, "the store was blocked");
    for d in &delegations {
        assert_kept_alive(&fakes.hs, d, since, until);
    }
    assert_eq!(fakes.metrics.late_restarts.get(), 0);
    let restarts = fakes.hs.calls.lock().unwrap().len();
    assert!(restarts >= 1_000 * 4, "every member restarted through the stall: {restarts}");
}

#[tokio::test]
async fn a_call_task_that_panics_does_not_stop_the_restarts() {
    let fakes = Fakes::new();
    fakes.hs.panics.store(1, Ordering::SeqCst);
    let engine = fakes.engine().await;
    let (d, since) = fakes.connected_and_delegated(&engine, "syd_1", 3_000).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let calls = fakes.hs.calls_of(&d.delay_id);
    assert!(calls.len() >= 2, "the restart was retried after the panic: {calls:?}");
    assert_kept_alive(&fakes.hs, &d, since, Instant::now());
    assert_eq!(engine.jobs().await.unwrap().len(), 1, "the job lives on");
}

/// A homeserver that carries restarts out at once but answers them more slowly than the job
/// waits (a loaded one), refusing the retries that arrive meanwhile: the late 200s keep the job
/// going, and the member alive, cycle after cycle. (Taken for failures, they once made a job
/// believe the homeserver's timer had fired and stop restarting a connected member.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_answered_late_keep_a_member_alive() {
    let fakes = Fakes::new();
    fakes.hs.latency_ms.store(2_000, Ordering::SeqCst);
    let engine = fakes.engine().await;
    let (d, since) = fakes.connected_and_delegated(&engine, "syd_slow", 6_000).await;
    tokio::time::sleep(Duration::from_secs(16)).await;
    let calls = fakes.hs.calls_of(&d.delay_id);
    let accepted = fakes.hs.accepted.lock().unwrap().len();
    assert!(calls.len() > accepted, "some restarts were refused meanwhile: {calls:?}");
    assert_kept_alive(&fakes.hs, &d, since, Instant::now());
    let jobs = engine.jobs().await.unwrap();
    assert_eq!(jobs.len(), 1, "the job lives on");
    let metrics = fakes.metrics.encode();
    let expired = metrics.lines().find(|l| l.contains("jobs_finished") && l.contains("outcome=\"expired\"")).unwrap();
    assert!(expired.ends_with(" 0"), "taken for expired: {expired}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_with_100k_due_jobs_runs_no_more_tasks_than_the_limits() {
    let fakes = Fakes::new();
    fakes.hs.held.store(true, Ordering::SeqCst);
    {
        let mut jobs = fakes.store.jobs.lock().unwrap();
        for i in 0..100_000u64 {
            let d = Delegation { delay_ms: 600_000, ..delegation(&format!("syd_{i}"), &format!("DEV{i}")) };
            jobs.insert(JobId(i + 1), JobRecord { id: JobId(i + 1), delegation: d, state: Durable::WAITING });
        }
    }
    let before = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let engine = fakes.engine().await;
    let limits = Limits { jobs_per_user: usize::MAX, ..Limits::default() };
    let calls = || fakes.hs.calls.lock().unwrap().len();
    // Every job of one homeserver: as many in flight as its own cap allows.
    let cap = limits.per_homeserver.min(limits.restarts);
    for _ in 0..200 {
        if calls() >= cap {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(calls(), cap, "as many restarts started as the limit allows");
    let tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks() - before;
    // The engine, its calls and at most its listings; not a task per due job.
    assert!(tasks <= 1 + cap + limits.listings, "{tasks} tasks alive");
    // Released, every job gets its restart.
    fakes.hs.held.store(false, Ordering::SeqCst);
    fakes.hs.release.notify_waiters();
    for _ in 0..500 {
        if calls() >= 100_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(calls(), 100_000);
    assert_eq!(engine.jobs().await.unwrap().len(), 100_000);
}

#[test]
fn a_stored_appservice_job_of_another_homeserver_is_not_resumed() {
    use crate::delegation::Mode;
    let record = |user: &str, mode: Mode, n: u64| JobRecord {
        id: JobId(n),
        delegation: Delegation { user_id: user.into(), mode, ..delegation(&format!("syd_{n}"), "DEV") },
        state: Durable::WAITING,
    };
    let records = vec![
        record("@a:hs.test", Mode::Appservice, 1),
        record("@b:evil.test", Mode::Appservice, 2),
        record("@c:evil.test", Mode::OpenId, 3),
    ];
    let kept: Vec<u64> = super::loadable(records.clone(), Some("hs.test")).iter().map(|r| r.id.0).collect();
    assert_eq!(kept, [1, 3], "an appservice job must belong to the appservice's homeserver");
    assert_eq!(super::loadable(records, None).len(), 3, "no appservice configured: nothing to guard");
}
