//! The embedded default store: one SQLite database in WAL mode under the data directory.
//!
//! Durability per kind of change:
//! * a commit that stores a delegation is `synchronous = FULL`: once `200 {}` is answered, the
//!   delegation survives a crash of the process *or of the machine*;
//! * a commit of phase changes only (webhook effects) is `synchronous = NORMAL`: it survives a
//!   crash of the process (`kill -9`), and the next FULL commit or checkpoint makes it durable
//!   against power loss too. A power loss may forget the last moments of phase changes; resuming
//!   reconciles every job with LiveKit before trusting its phase, which re-derives them.
//!
//! This keeps an fsync off the webhook path, where LiveKit waits for our answer with one request
//! in flight per room.
//!
//! Where statements run: a thread of the store's own runs every piece of work, in order, except
//! a small commit of phase changes, which [`Store::start_commit`] runs on the caller's thread when
//! the connection is free at that moment ([`INLINE_OPS`]). Such a commit writes a few WAL frames
//! into the OS page cache, no fsync: 34 µs on average for 6–7 changes under the ingest bench.
//! Handing it to the thread and being told back took 124 µs, and its two thread wake-ups per
//! commit cost a fifth of the bridge's CPU per tracked webhook. The engine hands over one commit
//! at a time, so commits still apply in its order. Such a commit never waits for a lock: if
//! another connection holds the write lock (an operator's `sqlite3` in a write transaction), it
//! goes to the store's thread, which waits. What it can wait on is the write itself: on a disk
//! that hangs, the engine hangs with it — as it would writing its log lines to that disk — where
//! a store's thread alone would leave the engine restarting members' delayed leaves.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::{CommitDone, Fence, JobRecord, Seat, Store, StoreError, StoreOp};
use crate::delegation::JobId;

pub struct SqliteStore {
    /// To the store's thread, which runs every piece of work in order.
    jobs: std::sync::mpsc::Sender<Work>,
    /// The connection: the store's thread takes it for each piece of work; a small commit of
    /// phase changes is run by its caller if it is free ([`SqliteStore::start_commit`]).
    db: Arc<Mutex<Db>>,
    /// Held while the store exists: the checkpoint thread stops when it is gone.
    _alive: Arc<()>,
}

/// One piece of work for the store's thread.
type Work = Box<dyn FnOnce(&mut Db) + Send>;

/// A commit of phase changes with at most this many changes is run on the caller's thread when
/// the connection is free: at ~5 µs a change (34 µs for 6–7 under the ingest bench), it keeps
/// the engine's turn well under a millisecond. A larger one (a reconciliation moving many jobs
/// at once) goes to the store's thread, as does every commit that stores a delegation (its
/// fsync takes milliseconds).
const INLINE_OPS: usize = 64;

/// How long a statement waits for a lock another connection holds.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The connection, and its `synchronous` setting (set again only when it changes).
struct Db {
    conn: Connection,
    synchronous: &'static str,
}

impl Db {
    fn set_synchronous(&mut self, mode: &'static str) -> Result<(), StoreError> {
        if self.synchronous != mode {
            self.conn.pragma_update(None, "synchronous", mode).map_err(err)?;
            self.synchronous = mode;
        }
        Ok(())
    }
}

impl std::ops::Deref for Db {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// The connection, even if a statement panicked while it was held: every commit first ends a
/// transaction left open ([`commit_now`]).
fn lock(db: &Mutex<Db>) -> MutexGuard<'_, Db> {
    db.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Like [`lock`], if no one holds the connection right now.
fn lock_if_free(db: &Mutex<Db>) -> Option<MutexGuard<'_, Db>> {
    match db.try_lock() {
        Ok(held) => Some(held),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) `jobs.sqlite3` in `dir`.
    /// Claims `dir` for this process: a second instance on the same data directory would drive
    /// the same jobs twice (several instances need Redis). Held until the returned file is
    /// dropped (or the process ends, however it ends: the lock is the kernel's).
    pub fn claim(dir: &Path) -> Result<std::fs::File, StoreError> {
        use std::os::fd::AsRawFd as _;
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError(format!("cannot create data dir {}: {e}", dir.display())))?;
        let path = dir.join("instance.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError(format!(
                "another instance is running on {}: several instances must share Redis (LIVEKIT_REDIS_URL)",
                dir.display()
            )));
        }
        Ok(file)
    }

    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError(format!("cannot create data dir {}: {e}", dir.display())))?;
        let path = dir.join("jobs.sqlite3");
        let conn = Connection::open(&path).map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY,
                delegation TEXT NOT NULL,
                state TEXT NOT NULL,
                updated_at_ms INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS seats (
                livekit_room TEXT NOT NULL,
                identity TEXT NOT NULL,
                room_id TEXT NOT NULL,
                user_id TEXT NOT NULL,
                expires_at_ms INTEGER NOT NULL,
                PRIMARY KEY (livekit_room, identity)
            );
            CREATE INDEX IF NOT EXISTS seats_by_member ON seats (room_id, user_id);",
        )
        .map_err(err)?;
        // Checkpoints (copying the WAL into the database, with fsyncs) run on their own thread
        // and connection, never in a commit the engine waits for.
        conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(err)?;
        let checkpointer = Connection::open(&path).map_err(err)?;
        checkpointer.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        let alive = Arc::new(());
        let watch = Arc::downgrade(&alive);
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, watch))
            .map_err(err)?;
        // Statements run on a thread of the store's: a piece of work costs a message to it and
        // one back, not a tokio worker handing its tasks over to another thread
        // (block_in_place) or a hop through the blocking pool. It ends with the store.
        let db = Arc::new(Mutex::new(Db { conn, synchronous: "NORMAL" }));
        let (jobs, queue) = std::sync::mpsc::channel::<Work>();
        let held = db.clone();
        std::thread::Builder::new()
            .name("sqlite".into())
            .spawn(move || {
                for work in queue {
                    // A statement that panics fails its own call (its answer is dropped), not
                    // every later one.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&mut lock(&held))));
                }
            })
            .map_err(err)?;
        Ok(SqliteStore { jobs, db, _alive: alive })
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let work: Work = Box::new(move |db| {
            let _ = reply.send(f(db));
        });
        self.jobs.send(work).map_err(|_| StoreError("the store's thread has stopped".into()))?;
        answer.await.map_err(|_| StoreError("the store's thread has stopped".into()))?
    }
}

/// Once a second, a passive checkpoint (it never blocks the writer), for as long as the store
/// (`alive`) exists.
fn checkpoint_loop(conn: Connection, alive: std::sync::Weak<()>) {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        if alive.strong_count() == 0 {
            return;
        }
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
        }
    }
}

/// Applies a commit's changes inside its transaction. Each statement is taken from the
/// connection's cache once per commit, not once per change (the lookup hashes its SQL).
fn apply_ops(conn: &Connection, ops: Vec<StoreOp>) -> Result<(), StoreError> {
    let now = crate::delegation::now_unix_ms() as i64;
    let (mut insert, mut set_state, mut delete) = (None, None, None);
    for op in ops {
        match op {
            StoreOp::Insert(r) => {
                let delegation = serde_json::to_string(&r.delegation).map_err(err)?;
                let state = serde_json::to_string(&r.state).map_err(err)?;
                statement(
                    &mut insert,
                    conn,
                    "INSERT OR REPLACE INTO jobs (id, delegation, state, updated_at_ms) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![r.id.to_string(), delegation, state, now])
                .map_err(err)?;
            }
            StoreOp::SetState(id, state) => {
                let state = serde_json::to_string(&state).map_err(err)?;
                statement(&mut set_state, conn, "UPDATE jobs SET state = ?2, updated_at_ms = ?3 WHERE id = ?1")?
                    .execute(params![id.to_string(), state, now])
                    .map_err(err)?;
            }
            StoreOp::Delete(id) => {
                statement(&mut delete, conn, "DELETE FROM jobs WHERE id = ?1")?
                    .execute(params![id.to_string()])
                    .map_err(err)?;
            }
            // A single instance has no inbox: requests reach its engine directly.
            StoreOp::Consumed { .. } => {}
        }
    }
    Ok(())
}

/// The statement in `slot`, taken from `conn`'s cache the first time.
fn statement<'s, 'c>(
    slot: &'s mut Option<rusqlite::CachedStatement<'c>>,
    conn: &'c Connection,
    sql: &str,
) -> Result<&'s mut rusqlite::CachedStatement<'c>, StoreError> {
    match slot {
        Some(statement) => Ok(statement),
        None => Ok(slot.insert(conn.prepare_cached(sql).map_err(err)?)),
    }
}

/// Whether a commit of `ops` stores a delegation, and so must survive a power loss.
fn stores_delegation(ops: &[StoreOp]) -> bool {
    ops.iter().any(|op| matches!(op, StoreOp::Insert(_)))
}

/// Commits `ops` in one transaction: `synchronous = FULL` when it stores a delegation, else
/// `NORMAL` (see the module's doc). Waits up to the busy timeout for the write lock.
fn commit_now(db: &mut Db, ops: Vec<StoreOp>) -> Result<(), StoreError> {
    if ops.is_empty() {
        return Ok(());
    }
    prepare(db, if stores_delegation(&ops) { "FULL" } else { "NORMAL" })?;
    // BEGIN and COMMIT prepared once, like every statement here (a Transaction parses them
    // again on each commit).
    db.prepare_cached("BEGIN").map_err(err)?.execute([]).map_err(err)?;
    apply_and_commit(db, ops)
}

/// Like [`commit_now`] for phase changes, but without waiting for the write lock: when another
/// connection holds it (an operator's `sqlite3` in a write transaction, say), `ops` are handed
/// back untouched, for the store's thread to commit once it can.
fn commit_if_unlocked(db: &mut Db, ops: Vec<StoreOp>) -> Result<Result<(), StoreError>, Vec<StoreOp>> {
    if ops.is_empty() {
        return Ok(Ok(()));
    }
    if let Err(e) = prepare(db, "NORMAL") {
        return Ok(Err(e));
    }
    let begun = (|| {
        db.busy_timeout(std::time::Duration::ZERO)?;
        let begun = db.prepare_cached("BEGIN IMMEDIATE").and_then(|mut begin| begin.execute([]));
        db.busy_timeout(BUSY_TIMEOUT)?;
        begun
    })();
    match begun {
        Ok(_) => Ok(apply_and_commit(db, ops)),
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DatabaseBusy => Err(ops),
        Err(e) => Ok(Err(err(e))),
    }
}

/// Ends a transaction left open (by a commit that panicked, or whose rollback failed), then sets
/// `synchronous` (which a transaction would hold back).
fn prepare(db: &mut Db, synchronous: &'static str) -> Result<(), StoreError> {
    if !db.is_autocommit() {
        db.execute_batch("ROLLBACK").map_err(err)?;
    }
    db.set_synchronous(synchronous)
}

/// Applies `ops` in the transaction just begun and commits it; rolls it back on failure.
fn apply_and_commit(conn: &Connection, ops: Vec<StoreOp>) -> Result<(), StoreError> {
    let applied = apply_ops(conn, ops).and_then(|()| {
        conn.prepare_cached("COMMIT").map_err(err)?.execute([]).map_err(err)?;
        Ok(())
    });
    if applied.is_err() && !conn.is_autocommit() {
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "rollback of a failed commit failed");
        }
    }
    applied
}

fn seat_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<Seat> {
    Ok(Seat {
        room_id: row.get(0)?,
        user_id: row.get(1)?,
        livekit_room: row.get(2)?,
        identity: row.get(3)?,
        expires_at_ms: row.get::<_, i64>(4)? as u64,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn load(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare("SELECT id, delegation, state FROM jobs").map_err(err)?;
            let rows = stmt
                .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?)))
                .map_err(err)?;
            let mut jobs = Vec::new();
            for row in rows {
                let (id, delegation, state) = row.map_err(err)?;
                let record = (|| -> Result<JobRecord, String> {
                    Ok(JobRecord {
                        id: id.parse::<JobId>().map_err(|e| e.to_string())?,
                        delegation: serde_json::from_str(&delegation).map_err(|e| e.to_string())?,
                        state: serde_json::from_str(&state).map_err(|e| e.to_string())?,
                    })
                })();
                match record {
                    Ok(r) => jobs.push(r),
                    // Never dropped silently, never fatal: the row stays for an operator to see.
                    Err(e) => tracing::error!(job = %id, error = %e, "unreadable stored job skipped"),
                }
            }
            Ok(jobs)
        })
        .await
    }

    async fn commit(&self, ops: Vec<StoreOp>) -> Result<(), StoreError> {
        self.with_conn(move |db| commit_now(db, ops)).await
    }

    /// This is the engine's hot path: every webhook that changes a job waits for its commit.
    /// A small commit of phase changes is run here and now if the connection is free (see the
    /// module's doc); any other is handed to the store's thread, which tells `done` as soon as
    /// it ends (no task is woken in between).
    fn start_commit(self: Arc<Self>, mut ops: Vec<StoreOp>, fence: Option<Fence>, done: CommitDone) {
        if fence.is_some() {
            return done(Err(StoreError("this store is not shared: it takes no fenced commits".into())));
        }
        if ops.len() <= INLINE_OPS && !stores_delegation(&ops) {
            if let Some(mut db) = lock_if_free(&self.db) {
                // As on the store's thread, a panic fails this commit alone: `done` is dropped
                // unanswered (its owner counts the commit as failed), the connection's open
                // transaction is ended by the next commit.
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commit_if_unlocked(&mut db, ops)));
                drop(db);
                match outcome {
                    Ok(Ok(outcome)) => return done(outcome),
                    Err(_panicked) => return,
                    // Another connection holds the write lock: the store's thread waits for it.
                    Ok(Err(untouched)) => ops = untouched,
                }
            }
        }
        // Should the thread be gone, the work (and `done` with it) is dropped unanswered: its
        // owner counts that as a failed commit.
        let _ = self.jobs.send(Box::new(move |db| done(commit_now(db, ops))));
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).optional().map_err(err)?;
            Ok(())
        })
        .await
    }

    /// Written `synchronous = NORMAL` (a seat lost to a power cut leaves a user who leaves the
    /// room in the call until their token expires, as without the bridge).
    async fn add_seat(&self, seat: &Seat) -> Result<(), StoreError> {
        let seat = seat.clone();
        self.with_conn(move |db| {
            db.set_synchronous("NORMAL")?;
            db.prepare_cached(
                "INSERT OR REPLACE INTO seats (livekit_room, identity, room_id, user_id, expires_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(err)?
            .execute(params![seat.livekit_room, seat.identity, seat.room_id, seat.user_id, seat.expires_at_ms as i64])
            .map_err(err)?;
            Ok(())
        })
        .await
    }

    async fn seats(&self, room_id: &str, user: Option<&str>, now_ms: u64) -> Result<Vec<Seat>, StoreError> {
        let (room_id, user) = (room_id.to_owned(), user.map(str::to_owned));
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT room_id, user_id, livekit_room, identity, expires_at_ms FROM seats
                     WHERE room_id = ?1 AND (?2 IS NULL OR user_id = ?2) AND expires_at_ms > ?3
                     ORDER BY user_id, livekit_room, identity",
                )
                .map_err(err)?;
            let rows = stmt.query_map(params![room_id, user, now_ms as i64], seat_of).map_err(err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(err)
        })
        .await
    }

    async fn seated_rooms(&self, now_ms: u64) -> Result<Vec<String>, StoreError> {
        self.with_conn(move |conn| {
            conn.prepare_cached("DELETE FROM seats WHERE expires_at_ms <= ?1")
                .map_err(err)?
                .execute(params![now_ms as i64])
                .map_err(err)?;
            let mut stmt = conn.prepare_cached("SELECT DISTINCT room_id FROM seats ORDER BY room_id").map_err(err)?;
            let rows = stmt.query_map([], |row| row.get::<_, String>(0)).map_err(err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_instance_on_the_same_data_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let held = SqliteStore::claim(dir.path()).unwrap();
        let second = SqliteStore::claim(dir.path()).unwrap_err();
        assert!(second.0.contains("LIVEKIT_REDIS_URL"), "{second}");
        drop(held);
        SqliteStore::claim(dir.path()).expect("free once the first one is gone");
    }
    use crate::delegation::Delegation;
    use crate::lifecycle::{Binding, Durable};

    fn record(id: u64) -> JobRecord {
        JobRecord {
            id: JobId(id),
            delegation: Delegation {
                room_id: "!r:hs".into(),
                slot_id: "m.call#ROOM".into(),
                user_id: "@a:hs".into(),
                device_id: "DEV".into(),
                member_id: "m1".into(),
                delay_id: format!("syd_{id}").into(),
                delay_ms: 8_000,
                cs_api_url: "https://hs".into(),
                created_at_ms: 1,
                mode: crate::delegation::Mode::Appservice,
                identity: None,
            },
            state: Durable::WAITING,
        }
    }

    fn binding() -> Binding {
        Binding { identity: "i".into(), sid: "PA_1".into(), joined_at_ms: 3_000, room_sid: "RM".into() }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conforms_to_the_store_suite() {
        crate::store::conformance::run(|| {
            let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
            Box::new(move || {
                let dir = dir.clone();
                Box::pin(async move { Box::new(SqliteStore::open(dir.path()).unwrap()) as Box<dyn Store> })
            })
        })
        .await;
    }

    /// A fenced commit is for shared stores: refused, told so, nothing written.
    #[tokio::test]
    async fn a_fenced_commit_is_refused_and_told() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let fence = Fence { instance: "a".into(), epochs: vec![] };
        let ops = vec![StoreOp::Insert(Box::new(record(1)))];
        store.clone().start_commit(ops, Some(fence), Box::new(move |result| tx.send(result).unwrap()));
        assert!(rx.await.unwrap().is_err());
        assert!(store.load().await.unwrap().is_empty());
    }

    /// Starts a commit of `ops`; what it answers: the outcome, and the thread that told it.
    fn started(store: &Arc<SqliteStore>, ops: Vec<StoreOp>) -> std::sync::mpsc::Receiver<Told> {
        let (tx, rx) = std::sync::mpsc::channel();
        store.clone().start_commit(ops, None, Box::new(move |r| tx.send((std::thread::current().id(), r)).unwrap()));
        rx
    }
    type Told = (std::thread::ThreadId, Result<(), StoreError>);

    /// Returns once the store's thread has let go of the connection (it answers a piece of work
    /// a moment before it does).
    fn idle(store: &SqliteStore) {
        while lock_if_free(&store.db).is_none() {
            std::thread::yield_now();
        }
    }

    fn connected() -> Durable {
        Durable::Connected { binding: binding(), others: vec![], absent: vec![] }
    }

    #[tokio::test]
    async fn a_small_commit_of_phase_changes_is_made_before_start_commit_returns() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let here = std::thread::current().id();
        // Delegations: on the store's thread (their fsync takes milliseconds).
        let (by, outcome) =
            started(&store, vec![StoreOp::Insert(Box::new(record(1))), StoreOp::Insert(Box::new(record(2)))])
                .recv()
                .unwrap();
        outcome.unwrap();
        assert_ne!(by, here, "a commit storing a delegation is made on the store's thread");
        // Phase changes: made and told before start_commit returns, on this thread.
        idle(&store);
        let told = started(&store, vec![StoreOp::SetState(JobId(1), connected()), StoreOp::Delete(JobId(2))]);
        let (by, outcome) = told.try_recv().expect("told before start_commit returned");
        outcome.unwrap();
        assert_eq!(by, here);
        // More of them than INLINE_OPS: on the store's thread.
        let many = (0..=INLINE_OPS).map(|_| StoreOp::SetState(JobId(1), Durable::WAITING)).collect();
        let (by, outcome) = started(&store, many).recv().unwrap();
        outcome.unwrap();
        assert_ne!(by, here, "a large commit is made on the store's thread");
        let jobs = store.load().await.unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!((jobs[0].id, &jobs[0].state), (JobId(1), &Durable::WAITING));
    }

    /// Another connection's write transaction is not waited for on the caller's thread either.
    #[tokio::test]
    async fn a_commit_finding_the_database_locked_by_another_connection_is_made_on_the_stores_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        store.commit(vec![StoreOp::Insert(Box::new(record(1)))]).await.unwrap();
        let other = Connection::open(dir.path().join("jobs.sqlite3")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let started_at = std::time::Instant::now();
        let told = started(&store, vec![StoreOp::SetState(JobId(1), connected())]);
        assert!(started_at.elapsed() < BUSY_TIMEOUT / 10, "start_commit waited for the lock");
        assert!(told.try_recv().is_err(), "made while another connection held the write lock");
        other.execute_batch("COMMIT").unwrap();
        let (by, outcome) = told.recv().unwrap();
        outcome.unwrap();
        assert_ne!(by, std::thread::current().id());
        assert_eq!(store.load().await.unwrap()[0].state, connected());
        // With the lock free again, the next one is made at once.
        idle(&store);
        let told = started(&store, vec![StoreOp::SetState(JobId(1), Durable::WAITING)]);
        assert_eq!(told.try_recv().unwrap().0, std::thread::current().id());
    }

    /// The connection is never waited for on the caller's thread: a commit finding it busy goes
    /// to the store's thread, after the work already there.
    #[tokio::test]
    async fn a_commit_finding_the_connection_busy_is_made_on_the_stores_thread_in_turn() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        store.commit(vec![StoreOp::Insert(Box::new(record(1)))]).await.unwrap();
        // The store's thread holds the connection until released.
        let (inside, holding) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        store
            .jobs
            .send(Box::new(move |_db| {
                inside.send(()).unwrap();
                released.recv().unwrap();
            }))
            .unwrap();
        holding.recv().unwrap();
        let told = started(&store, vec![StoreOp::SetState(JobId(1), connected())]);
        assert!(told.try_recv().is_err(), "made while the connection was held");
        release.send(()).unwrap();
        let (by, outcome) = told.recv().unwrap();
        outcome.unwrap();
        assert_ne!(by, std::thread::current().id());
        assert_eq!(store.load().await.unwrap()[0].state, connected());
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SqliteStore::open(dir.path()).unwrap();
            store
                .commit(vec![StoreOp::Insert(Box::new(record(1))), StoreOp::Insert(Box::new(record(2)))])
                .await
                .unwrap();
            let binding = binding();
            store
                .commit(vec![
                    StoreOp::SetState(JobId(1), Durable::Connected { binding, others: vec![], absent: vec![] }),
                    StoreOp::Delete(JobId(2)),
                ])
                .await
                .unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        let jobs = store.load().await.unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].id, JobId(1));
        assert!(matches!(jobs[0].state, Durable::Connected { .. }));
        assert_eq!(jobs[0].delegation, record(1).delegation);
        store.ping().await.unwrap();
    }

    #[tokio::test]
    async fn a_commit_that_fails_part_way_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.commit(vec![StoreOp::Insert(Box::new(record(1))), StoreOp::Insert(Box::new(record(2)))]).await.unwrap();
        // The last op of the next commit fails inside the database.
        Connection::open(dir.path().join("jobs.sqlite3"))
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE DELETE ON jobs WHEN old.id = '0000000000000002'
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        assert_eq!(JobId(2).to_string(), "0000000000000002", "the trigger names job 2");
        let binding = binding();
        let failed = store
            .commit(vec![
                StoreOp::Insert(Box::new(record(3))),
                StoreOp::SetState(JobId(1), Durable::Connected { binding, others: vec![], absent: vec![] }),
                StoreOp::Delete(JobId(2)),
            ])
            .await;
        assert!(failed.unwrap_err().0.contains("refused"));
        let mut jobs = store.load().await.unwrap();
        jobs.sort_by_key(|j| j.id.0);
        assert_eq!(jobs.iter().map(|j| j.id.0).collect::<Vec<_>>(), vec![1, 2], "job 3 inserted anyway");
        assert_eq!(jobs[0].state, Durable::WAITING, "job 1's phase changed anyway");
        // The store is still usable.
        store.commit(vec![StoreOp::Insert(Box::new(record(3)))]).await.unwrap();
        assert_eq!(store.load().await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn delegations_are_committed_with_full_sync_and_phase_changes_with_normal() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        async fn synchronous(store: &SqliteStore) -> Result<i64, StoreError> {
            store.with_conn(|c| c.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0)).map_err(err)).await
        }
        const NORMAL: i64 = 1;
        const FULL: i64 = 2;
        assert_eq!(synchronous(&store).await.unwrap(), NORMAL);
        store.commit(vec![StoreOp::Insert(Box::new(record(1)))]).await.unwrap();
        assert_eq!(synchronous(&store).await.unwrap(), FULL, "a delegation must survive a power loss");
        store
            .commit(vec![StoreOp::SetState(
                JobId(1),
                Durable::Sending { trigger: crate::lifecycle::Trigger::Departed, returned: vec![] },
            )])
            .await
            .unwrap();
        assert_eq!(synchronous(&store).await.unwrap(), NORMAL, "no fsync on the webhook path");
        store.commit(vec![StoreOp::Delete(JobId(1)), StoreOp::Insert(Box::new(record(2)))]).await.unwrap();
        assert_eq!(synchronous(&store).await.unwrap(), FULL, "a replacement stores a delegation");
        let journal: String =
            store.with_conn(|c| c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).map_err(err)).await.unwrap();
        assert_eq!(journal, "wal");
    }
}
