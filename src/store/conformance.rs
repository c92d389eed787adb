//! The one conformance suite every [`Store`] passes (SQLite and Redis run it in their own test
//! modules): what the engine relies on, stated once.

use std::future::Future;
use std::pin::Pin;

use super::{JobRecord, Seat, Store, StoreOp};
use crate::delegation::{Delegation, JobId, Mode};
use crate::lifecycle::{Binding, Durable, Trigger};

/// Opens the store under test; every call opens a new handle on the same stored data (a restart
/// of the service).
pub type Open = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Box<dyn Store>>>>>;

pub fn record(id: u64) -> JobRecord {
    JobRecord {
        id: JobId(id),
        delegation: Delegation {
            // Rooms in several shards.
            room_id: format!("!r{}:hs", id % 3).into(),
            slot_id: "m.call#ROOM".into(),
            user_id: format!("@u{id}:hs").into(),
            device_id: "DEV".into(),
            member_id: format!("m{id}\nwith a newline").into(),
            delay_id: format!("syd_{id}").into(),
            delay_ms: 8_000,
            cs_api_url: "https://hs".into(),
            created_at_ms: 1,
            mode: Mode::OpenId,
            identity: (id % 2 == 0).then(|| format!("minted-{id}").into()),
        },
        state: Durable::WAITING,
    }
}

/// A connected job with an absence proof under way (stored so that the next holder continues it).
fn connected() -> Durable {
    let binding = Binding { identity: "i".into(), sid: "PA_1".into(), joined_at_ms: 3_000, room_sid: "RM".into() };
    let evidence = serde_json::from_str(r#"{"count": 2, "first": 1764800000000, "last": 1764800001500}"#).unwrap();
    Durable::Connected { binding, others: vec![], absent: vec![("PA_1".into(), evidence)] }
}

async fn sorted(store: &dyn Store) -> Vec<JobRecord> {
    let mut jobs = store.load().await.unwrap();
    jobs.sort_by_key(|j| j.id.0);
    jobs
}

/// Runs every check, each on an empty store from `open`.
pub async fn run(open: impl Fn() -> Open) {
    empty_then_survives_reopen(open()).await;
    phase_changes_of_missing_jobs_write_nothing(open()).await;
    a_replacement_deletes_and_inserts_in_one_commit(open()).await;
    inserting_an_existing_id_replaces_it(open()).await;
    many_jobs_round_trip(open()).await;
    seats_are_found_by_room_and_user_until_they_expire(open()).await;
    a_started_commit_is_told_once_applied(open()).await;
}

/// [`Store::start_commit`] applies as [`Store::commit`] does, and tells its outcome once the
/// changes are stored (the engine answers webhooks on it).
async fn a_started_commit_is_told_once_applied(open: Open) {
    let store: std::sync::Arc<dyn Store> = open().await.into();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ops = vec![StoreOp::Insert(Box::new(record(1))), StoreOp::Insert(Box::new(record(2)))];
    store.clone().start_commit(ops, None, Box::new(move |result| tx.send(result).unwrap()));
    rx.await.expect("the outcome is told").unwrap();
    assert_eq!(sorted(&*store).await, vec![record(1), record(2)]);
    assert_eq!(sorted(&*open().await).await, vec![record(1), record(2)], "and it survives a reopen");
}

async fn empty_then_survives_reopen(open: Open) {
    let store = open().await;
    assert!(store.load().await.unwrap().is_empty());
    store.ping().await.unwrap();
    store.commit(vec![]).await.unwrap();
    store.commit(vec![StoreOp::Insert(Box::new(record(1))), StoreOp::Insert(Box::new(record(2)))]).await.unwrap();
    store.commit(vec![StoreOp::SetState(JobId(1), connected()), StoreOp::Delete(JobId(2))]).await.unwrap();
    drop(store);
    let store = open().await;
    let jobs = sorted(&*store).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id, JobId(1));
    assert_eq!(jobs[0].state, connected());
    assert_eq!(jobs[0].delegation, record(1).delegation, "a delegation comes back exactly as stored");
}

async fn phase_changes_of_missing_jobs_write_nothing(open: Open) {
    let store = open().await;
    // A late phase change of a job deleted (or never stored) must not resurrect it.
    store.commit(vec![StoreOp::SetState(JobId(7), connected())]).await.unwrap();
    store.commit(vec![StoreOp::Insert(Box::new(record(8)))]).await.unwrap();
    store.commit(vec![StoreOp::Delete(JobId(8)), StoreOp::SetState(JobId(8), connected())]).await.unwrap();
    assert!(store.load().await.unwrap().is_empty());
}

async fn a_replacement_deletes_and_inserts_in_one_commit(open: Open) {
    let store = open().await;
    store.commit(vec![StoreOp::Insert(Box::new(record(1)))]).await.unwrap();
    store.commit(vec![StoreOp::Insert(Box::new(record(2))), StoreOp::Delete(JobId(1))]).await.unwrap();
    let jobs = sorted(&*store).await;
    assert_eq!(jobs.iter().map(|j| j.id.0).collect::<Vec<_>>(), vec![2]);
    // Ops apply in order: a phase change after its insert in the same commit holds.
    let sending = Durable::Sending { trigger: Trigger::Departed, returned: vec![] };
    store
        .commit(vec![StoreOp::Insert(Box::new(record(3))), StoreOp::SetState(JobId(3), sending.clone())])
        .await
        .unwrap();
    assert_eq!(sorted(&*store).await[1].state, sending);
}

async fn inserting_an_existing_id_replaces_it(open: Open) {
    let store = open().await;
    store.commit(vec![StoreOp::Insert(Box::new(record(1)))]).await.unwrap();
    let mut again = record(1);
    again.delegation.delay_id = "syd_other".into();
    again.state = connected();
    store.commit(vec![StoreOp::Insert(Box::new(again.clone()))]).await.unwrap();
    assert_eq!(store.load().await.unwrap(), vec![again]);
}

async fn many_jobs_round_trip(open: Open) {
    let store = open().await;
    let n = 5_000;
    for chunk in (1..=n).collect::<Vec<u64>>().chunks(500) {
        let ops = chunk.iter().map(|i| StoreOp::Insert(Box::new(record(*i)))).collect();
        store.commit(ops).await.unwrap();
    }
    let jobs = sorted(&*open().await).await;
    assert_eq!(jobs.len(), n as usize);
    assert!(jobs.iter().zip(1..).all(|(j, i)| j.id == JobId(i) && j.delegation == record(i).delegation));
}

fn seat(room: &str, user: &str, identity: &str, expires_at_ms: u64) -> Seat {
    Seat {
        room_id: room.into(),
        user_id: user.into(),
        livekit_room: format!("lk-{room}"),
        identity: identity.into(),
        expires_at_ms,
    }
}

async fn seats_are_found_by_room_and_user_until_they_expire(open: Open) {
    let store = open().await;
    assert_eq!(store.seated_rooms(0).await.unwrap(), Vec::<String>::new());
    let now = crate::delegation::now_unix_ms();
    let hour = now + 3_600_000;
    let a1 = seat("!a:hs", "@alice:hs", "id-a1", hour);
    let a2 = seat("!a:hs", "@alice:hs", "@alice:hs:DEV", hour + 1);
    let b = seat("!a:hs", "@bob:hs", "id-b", hour);
    let elsewhere = seat("!b:hs", "@alice:hs", "id-a1", now + 1_000);
    for s in [&a1, &a2, &b, &elsewhere] {
        store.add_seat(s).await.unwrap();
    }
    // A later token for the same identity replaces the seat (its expiry moves).
    let a1_later = seat("!a:hs", "@alice:hs", "id-a1", hour + 2);
    store.add_seat(&a1_later).await.unwrap();
    drop(store);
    let store = open().await;
    assert_eq!(store.seats("!a:hs", Some("@alice:hs"), now).await.unwrap(), vec![a2.clone(), a1_later.clone()]);
    assert_eq!(store.seats("!a:hs", Some("@bob:hs"), now).await.unwrap(), vec![b.clone()]);
    assert_eq!(store.seats("!a:hs", None, now).await.unwrap(), vec![a2, a1_later, b]);
    assert_eq!(store.seats("!c:hs", None, now).await.unwrap(), vec![]);
    assert_eq!(store.seated_rooms(now).await.unwrap(), vec!["!a:hs".to_owned(), "!b:hs".to_owned()]);
    // Once its token has expired, a seat is gone, and so is a room with no seat left.
    assert_eq!(store.seats("!b:hs", None, now + 1_000).await.unwrap(), vec![]);
    assert_eq!(store.seated_rooms(now + 1_000).await.unwrap(), vec!["!a:hs".to_owned()]);
}
