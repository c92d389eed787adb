//! The loop that keeps this instance's part of the cluster: every renewal interval it looks at
//! Redis (heartbeat, renewals, who holds what), gives up the shards it lost or should hand over,
//! acquires its share of the free ones, loads each acquired shard's jobs into the engine; and a
//! second task that reads the held shards' inboxes and hands their entries to the engine.
//!
//! Order matters, and is kept here:
//! * a shard is handed to the engine (its jobs resumed) before the reader starts on its inbox,
//!   and every entry carries the epoch it was read under, so that entries read for an earlier
//!   holding of the same shard are dropped by the engine instead of applied out of order;
//! * giving a shard up closes the call gate first, then empties the engine of its jobs, then
//!   deletes the lease, so that no call for its jobs starts here once another instance can hold
//!   it.
//!
//! On shutdown, after the engine has drained, every lease is released and the instance leaves:
//! the others take its shards over at their next look.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use super::balancer::{self, View};
use super::leases::Leases;
use super::{EntryId, Shard};
use crate::engine::EngineHandle;
use crate::metrics::{KindLabel, Metrics, OutcomeLabel, RedisOpLabel};
use crate::store::redis::{Coordination, RedisStore};

/// Inbox entries read per shard per round trip.
const READ_BATCH: usize = 256;

/// The settings of one instance in the cluster.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This instance's name (unique: a random suffix is added per process).
    pub instance: String,
    pub lease: Duration,
    pub renew_interval: Duration,
}

/// For each shard the reader should read: the epoch it is held under and where to start.
type Positions = BTreeMap<Shard, (u64, EntryId)>;

pub struct Cluster {
    stop: Option<oneshot::Sender<()>>,
    draining: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Cluster {
    /// From now on only renews what is held, and no longer counts as an instance: no shard is
    /// acquired or handed over while the engine drains (it starts nothing any more), and the
    /// others take every shard freed meanwhile.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Stops acquiring and reading, releases every shard and leaves the cluster. Call once the
    /// engine has drained.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.task.await;
    }
}

struct Driver {
    settings: Settings,
    store: Arc<RedisStore>,
    coordination: Coordination,
    engine: EngineHandle,
    leases: Arc<Leases>,
    metrics: Arc<Metrics>,
    positions: watch::Sender<Positions>,
    /// Consecutive failed looks.
    failures: Failures,
    draining: Arc<AtomicBool>,
}

/// Starts the driver and the inbox reader.
pub async fn start(
    settings: Settings,
    store: Arc<RedisStore>,
    engine: EngineHandle,
    leases: Arc<Leases>,
    metrics: Arc<Metrics>,
) -> Result<Cluster, crate::store::StoreError> {
    // A look that takes longer than this is of no use: the lease may have run out meanwhile.
    let coordination = store.coordination(settings.renew_interval * 2).await?;
    let reader = store.inbox_reader(settings.renew_interval).await?;
    let (positions, positions_rx) = watch::channel(Positions::new());
    let (stop, stop_rx) = oneshot::channel();
    info!(instance = %settings.instance, lease = ?settings.lease, "joining the cluster of instances sharing this Redis prefix");
    let draining = Arc::new(AtomicBool::new(false));
    let mut driver = Driver {
        settings,
        store,
        coordination,
        engine: engine.clone(),
        leases,
        metrics: metrics.clone(),
        positions,
        failures: Failures::default(),
        draining: draining.clone(),
    };
    // Before taking anything: a heartbeat, then a renewal interval for instances started at the
    // same time to show theirs, so that they split the shards at once instead of the first one
    // taking them all and handing most over again.
    let s = &driver.settings;
    let beat = driver.coordination.look(&s.instance, s.lease, s.lease, &BTreeMap::new()).await;
    if let Err(e) = beat {
        warn!(error = %e, "Redis unreachable at start; shards are taken once it answers");
    }
    tokio::time::sleep(driver.settings.renew_interval).await;
    // A first look before requests are served: alone, or first up, this instance holds its
    // shards (and their jobs are resumed) by the time it answers.
    driver.look().await;
    let reading = tokio::spawn(read_inboxes(reader, positions_rx, engine, metrics));
    let task = tokio::spawn(async move {
        driver.run(stop_rx).await;
        reading.abort();
    });
    Ok(Cluster { stop: Some(stop), draining, task })
}

impl Driver {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let mut every = tokio::time::interval(self.settings.renew_interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.look().await,
                _ = &mut stop => break,
            }
        }
        self.leave().await;
    }

    fn timed(&self, op: &'static str, started: Instant) {
        self.metrics.redis_duration.get_or_create(&RedisOpLabel { op }).observe(started.elapsed().as_secs_f64());
    }

    async fn look(&mut self) {
        let asked = Instant::now();
        self.leases.looking();
        let held = self.leases.held();
        let s = &self.settings;
        // A draining instance no longer counts as one (its heartbeat ends now): the others aim
        // at every shard, and take at once any freed meanwhile (by a crash) instead of once this
        // one is gone. It still renews what it holds.
        let heartbeat = if self.draining.load(Ordering::SeqCst) { Duration::ZERO } else { s.lease };
        let look = self.coordination.look(&s.instance, heartbeat, s.lease, &held).await;
        self.timed("tick", asked);
        let look = match look {
            Ok(look) => look,
            Err(e) => {
                self.leases.looked(false);
                self.metrics
                    .lease_renewals
                    .get_or_create(&OutcomeLabel { outcome: "failed" })
                    .inc_by(held.len() as u64);
                if self.failures.failed() {
                    error!(error = %e, shards = held.len(),
                        "Redis unreachable: leases not renewed; held members are restarted from memory, nothing is sent");
                }
                return;
            }
        };
        self.leases.looked(true);
        if let Some(failed) = self.failures.succeeded() {
            info!(failed_looks = failed, "Redis reachable again");
        }
        self.metrics.instances.set(look.instances.len() as i64);
        for (&shard, &renewed) in &look.renewed {
            if renewed {
                self.leases.renewed(shard, held[&shard], asked);
                self.metrics.lease_renewals.get_or_create(&OutcomeLabel { outcome: "renewed" }).inc();
            } else {
                warn!(shard = %shard, epoch = held[&shard], holder = look.holders[shard.0 as usize].as_deref().unwrap_or("nobody"),
                    "lease on a shard lost (it ran out); its jobs are no longer driven here");
                self.metrics.lease_renewals.get_or_create(&OutcomeLabel { outcome: "lost" }).inc();
                self.metrics.handovers.get_or_create(&KindLabel { kind: "lost" }).inc();
                self.drop_shard(shard).await;
            }
        }
        if self.draining.load(Ordering::SeqCst) {
            return;
        }
        let mine: BTreeSet<Shard> = self.leases.held().into_keys().collect();
        let view = View { instances: look.instances, holders: look.holders };
        let plan = balancer::plan(&self.settings.instance, &mine, &view);
        for shard in plan.release {
            self.hand_over(shard).await;
        }
        for shard in plan.acquire {
            self.take(shard).await;
        }
        self.metrics.shards_owned.set(self.leases.held().len() as i64);
    }

    /// Closes the gate on `shard`, then empties the engine of its jobs and stops reading it.
    async fn drop_shard(&mut self, shard: Shard) {
        self.leases.forget(shard);
        self.positions.send_modify(|p| {
            p.remove(&shard);
        });
        if self.draining.load(Ordering::SeqCst) {
            return; // the engine takes no commands; the closed gate is enough
        }
        if self.engine.release(shard).await.is_err() {
            warn!(shard = %shard, "engine stopped while a shard was given up");
        }
    }

    /// Gives `shard` up on purpose (another instance should hold it).
    async fn hand_over(&mut self, shard: Shard) {
        let Some(&epoch) = self.leases.held().get(&shard) else { return };
        self.drop_shard(shard).await;
        let started = Instant::now();
        let released = self.coordination.release(shard, &self.settings.instance, epoch).await;
        self.timed("release", started);
        match released {
            Ok(()) => {
                self.metrics.handovers.get_or_create(&KindLabel { kind: "released" }).inc();
                info!(shard = %shard, epoch, "shard handed over");
            }
            // It runs out by itself within a lease.
            Err(e) => warn!(shard = %shard, error = %e, "could not release a shard's lease; it runs out by itself"),
        }
    }

    /// Acquires `shard` if it is still free, and loads its jobs into the engine.
    async fn take(&mut self, shard: Shard) {
        let asked = Instant::now();
        let acquired = self.coordination.acquire(shard, &self.settings.instance, self.settings.lease).await;
        self.timed("acquire", asked);
        let epoch = match acquired {
            Ok(Some(epoch)) => epoch,
            Ok(None) => return, // another instance was faster
            Err(e) => {
                warn!(shard = %shard, error = %e, "could not acquire a shard");
                return;
            }
        };
        self.leases.renewed(shard, epoch, asked);
        let started = Instant::now();
        let loaded = self.store.load_shard(shard).await;
        self.timed("load", started);
        let (records, applied) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                error!(shard = %shard, error = %e, "could not load an acquired shard; giving it up");
                self.leases.forget(shard);
                let _ = self.coordination.release(shard, &self.settings.instance, epoch).await;
                return;
            }
        };
        if self.engine.adopt(shard, epoch, applied, records).await.is_err() {
            self.leases.forget(shard);
            return;
        }
        self.positions.send_modify(|p| {
            p.insert(shard, (epoch, applied));
        });
        self.metrics.handovers.get_or_create(&KindLabel { kind: "acquired" }).inc();
    }

    /// Releases every shard and leaves (the engine has drained: nothing is started any more).
    async fn leave(&mut self) {
        let held = self.leases.held();
        for (&shard, &epoch) in &held {
            self.leases.forget(shard);
            if let Err(e) = self.coordination.release(shard, &self.settings.instance, epoch).await {
                warn!(shard = %shard, error = %e, "could not release a shard's lease on shutdown; it runs out by itself");
            }
        }
        if let Err(e) = self.coordination.leave(&self.settings.instance).await {
            warn!(error = %e, "could not leave the cluster; this instance's heartbeat runs out by itself");
        }
        self.metrics.shards_owned.set(0);
        info!(shards = held.len(), "left the cluster; shards released to the other instances");
    }
}

/// Reads the inboxes of the shards held, in order, and hands every entry to the engine with the
/// epoch it was read under.
async fn read_inboxes(
    mut reader: crate::store::redis::InboxReader,
    mut positions: watch::Receiver<Positions>,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
) {
    let mut reading = Positions::new();
    let mut failures = Failures::default();
    loop {
        follow(&mut reading, &positions.borrow_and_update());
        let from: BTreeMap<Shard, EntryId> = reading.iter().map(|(s, (_, at))| (*s, *at)).collect();
        let started = Instant::now();
        let read = reader.read(&from, READ_BATCH).await;
        metrics
            .redis_duration
            .get_or_create(&RedisOpLabel { op: "inbox_read" })
            .observe(started.elapsed().as_secs_f64());
        match read {
            Ok(entries) => {
                if let Some(failed) = failures.succeeded() {
                    info!(failed_reads = failed, "inbox reads work again");
                }
                for (shard, entry, inbound) in entries {
                    let Some((epoch, at)) = reading.get_mut(&shard) else { continue };
                    *at = entry;
                    if engine.consume(shard, *epoch, entry, inbound).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                if failures.failed() {
                    warn!(error = %e, "cannot read the inboxes; retrying");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Where the reader goes on from, given the shards held now (`wanted`): a shard newly held, or
/// held again under a new epoch, from where its commit left it (entries past that were read for
/// an earlier holding, and the engine dropped them); the others from where the reader got to.
fn follow(reading: &mut Positions, wanted: &Positions) {
    reading.retain(|s, _| wanted.contains_key(s));
    for (shard, &(epoch, applied)) in wanted {
        match reading.get(shard) {
            Some((e, _)) if *e == epoch => {}
            _ => {
                reading.insert(*shard, (epoch, applied));
            }
        }
    }
}

/// A run of consecutive failures of one kind of round trip to Redis: its first is logged, and
/// its end with how many there were, not each.
#[derive(Debug, Default)]
struct Failures(u32);

impl Failures {
    /// Counts one; `true` if it starts a run.
    fn failed(&mut self) -> bool {
        self.0 += 1;
        self.0 == 1
    }

    /// Ends the run, if any: how many failed.
    fn succeeded(&mut self) -> Option<u32> {
        (self.0 > 0).then(|| std::mem::take(&mut self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> EntryId {
        EntryId { ms, seq: 0 }
    }

    #[test]
    fn the_reader_keeps_its_progress_on_a_shard_held_on() {
        let mut reading = Positions::new();
        let wanted = Positions::from([(Shard(1), (4, at(10)))]);
        follow(&mut reading, &wanted);
        assert_eq!(reading, wanted, "a shard newly held is read from its committed position");
        reading.get_mut(&Shard(1)).unwrap().1 = at(25); // entries read since
        follow(&mut reading, &wanted);
        assert_eq!(reading[&Shard(1)], (4, at(25)), "read again from its commit: entries applied twice");
    }

    #[test]
    fn a_shard_held_again_under_a_new_epoch_is_read_from_its_commit() {
        let mut reading = Positions::from([(Shard(1), (4, at(25))), (Shard(2), (9, at(40)))]);
        // Shard 1 was lost and taken back (its new holding's commit at 20) between two reads,
        // without the reader seeing it go; shard 2 held on, shard 3 new, shard 4 gone.
        let wanted = Positions::from([(Shard(1), (6, at(20))), (Shard(2), (9, at(30))), (Shard(3), (1, at(5)))]);
        follow(&mut reading, &wanted);
        assert_eq!(
            reading,
            Positions::from([(Shard(1), (6, at(20))), (Shard(2), (9, at(40))), (Shard(3), (1, at(5)))])
        );
        follow(&mut reading, &Positions::from([(Shard(3), (1, at(5)))]));
        assert_eq!(reading, Positions::from([(Shard(3), (1, at(5)))]), "shards given up are no longer read");
    }

    #[test]
    fn a_run_of_failures_is_told_at_its_start_and_its_end() {
        let mut f = Failures::default();
        assert_eq!(f.succeeded(), None, "nothing to tell without failures");
        assert!(f.failed());
        assert!(!f.failed());
        assert!(!f.failed());
        assert_eq!(f.succeeded(), Some(3));
        assert_eq!(f.succeeded(), None);
        assert!(f.failed(), "a new run starts");
        assert_eq!(f.succeeded(), Some(1));
    }
}
