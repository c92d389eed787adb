//! The shards this instance holds, with the epoch of each lease and until when it is surely
//! still ours; the gate every homeserver call passes ([`crate::ports::CallGate`]).
//!
//! "Surely ours": a lease renewed by a request sent at `t` lasts in Redis until at least
//! `t + lease` (Redis starts counting later, when the request arrives), so this side's clock only
//! errs towards giving up early. A call needs half a lease left: a paused or partitioned
//! instance stops calling well before another can take its shards over.
//!
//! One exception, for when Redis is unreachable while this instance is alive and trying: its
//! members are still restarted from memory (keeping a member alive never removes anyone; a
//! takeover elsewhere would only restart them too), but nothing is sent. "Alive and trying": the
//! last look at Redis failed and the latest one started less than two leases ago. The window is
//! generous on purpose — refusing restarts while Redis is down would let the homeserver remove
//! connected members — and still closed to an instance that was paused: the look it had failed
//! before, and the look it starts on waking, says whether Redis is reachable before it calls.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Shard;
use crate::ports::{CallGate, DelayedAction};

#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    until: Instant,
}

#[derive(Debug)]
struct State {
    held: HashMap<Shard, Held>,
    /// When the latest look at Redis started, and whether the last one to end failed.
    last_start: Instant,
    unreachable: bool,
}

#[derive(Debug)]
pub struct Leases {
    lease: Duration,
    state: Mutex<State>,
}

impl Leases {
    pub fn new(lease: Duration) -> Self {
        let state = State { held: HashMap::new(), last_start: Instant::now(), unreachable: false };
        Leases { lease, state: Mutex::new(state) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `shard`'s lease (epoch `epoch`) was acquired or renewed by a request sent at `asked_at`.
    pub fn renewed(&self, shard: Shard, epoch: u64, asked_at: Instant) {
        self.state().held.insert(shard, Held { epoch, until: asked_at + self.lease });
    }

    /// `shard` is no longer ours.
    pub fn forget(&self, shard: Shard) {
        self.state().held.remove(&shard);
    }

    /// A look at Redis starts now.
    pub fn looking(&self) {
        self.state().last_start = Instant::now();
    }

    /// A look at Redis ended, successfully or not.
    pub fn looked(&self, reachable: bool) {
        self.state().unreachable = !reachable;
    }

    /// The shards held, with their epochs.
    pub fn held(&self) -> BTreeMap<Shard, u64> {
        self.state().held.iter().map(|(s, h)| (*s, h.epoch)).collect()
    }

    fn allows(&self, shard: Shard, action: DelayedAction, now: Instant) -> bool {
        let state = self.state();
        let Some(held) = state.held.get(&shard) else { return false };
        if held.until >= now + self.lease / 2 {
            return true;
        }
        action == DelayedAction::Restart
            && state.unreachable
            && now.saturating_duration_since(state.last_start) <= 2 * self.lease
    }
}

impl CallGate for Leases {
    fn may_call(&self, shard: Shard, action: DelayedAction) -> bool {
        self.allows(shard, action, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(2);

    #[test]
    fn calls_need_half_a_lease_left() {
        let leases = Leases::new(LEASE);
        let t0 = Instant::now();
        assert!(!leases.allows(Shard(3), DelayedAction::Restart, t0), "not held");
        leases.renewed(Shard(3), 7, t0);
        leases.looked(true);
        assert!(leases.allows(Shard(3), DelayedAction::Send, t0 + Duration::from_millis(900)));
        assert!(!leases.allows(Shard(3), DelayedAction::Send, t0 + Duration::from_millis(1_100)));
        assert!(!leases.allows(Shard(3), DelayedAction::Restart, t0 + Duration::from_millis(1_100)));
        assert!(!leases.allows(Shard(4), DelayedAction::Restart, t0));
        assert_eq!(leases.held(), BTreeMap::from([(Shard(3), 7)]));
        leases.forget(Shard(3));
        assert!(!leases.allows(Shard(3), DelayedAction::Restart, t0));
    }

    #[test]
    fn the_gate_answers_for_now() {
        let leases = Leases::new(LEASE);
        assert!(!leases.may_call(Shard(9), DelayedAction::Restart), "not held");
        leases.renewed(Shard(9), 1, Instant::now());
        leases.looked(true);
        assert!(leases.may_call(Shard(9), DelayedAction::Send));
    }

    /// "Alive and trying" counts from the latest look's start, not from any earlier one.
    #[test]
    fn an_unreachable_redis_window_runs_from_the_latest_look() {
        let leases = Leases::new(LEASE);
        leases.renewed(Shard(1), 1, Instant::now());
        std::thread::sleep(Duration::from_millis(100));
        let look = Instant::now();
        leases.looking();
        leases.looked(false);
        let late = look + 2 * LEASE - Duration::from_millis(50);
        assert!(leases.allows(Shard(1), DelayedAction::Restart, late), "within two leases of the latest look");
        assert!(!leases.allows(Shard(1), DelayedAction::Restart, look + 2 * LEASE + Duration::from_millis(50)));
    }

    #[test]
    fn while_redis_is_unreachable_restarts_go_on_and_sends_stop() {
        let leases = Leases::new(LEASE);
        let t0 = Instant::now();
        leases.renewed(Shard(1), 1, t0);
        leases.looking();
        leases.looked(false);
        // The lease is no longer sure, the last (failed) look was recent.
        let unsure = t0 + Duration::from_millis(1_200);
        assert!(leases.allows(Shard(1), DelayedAction::Restart, unsure));
        assert!(!leases.allows(Shard(1), DelayedAction::Send, unsure));
        // Looks keep failing (each starting anew): restarts go on, however long Redis is down.
        leases.looking();
        leases.looked(false);
        assert!(leases.allows(Shard(1), DelayedAction::Restart, Instant::now() + LEASE / 2));
        // A process paused past its lease: its latest look started long ago.
        assert!(!leases.allows(
            Shard(1),
            DelayedAction::Restart,
            Instant::now() + 2 * LEASE + Duration::from_millis(100)
        ));
        // Redis back and the lease renewed: calls again.
        let t1 = Instant::now();
        leases.renewed(Shard(1), 1, t1);
        leases.looked(true);
        assert!(leases.allows(Shard(1), DelayedAction::Send, t1));
    }
}
