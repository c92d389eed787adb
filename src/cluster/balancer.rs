//! Which shards this instance should acquire or give up, from one look at the cluster: the live
//! instances and who holds each shard. A pure function; every instance computes it for itself on
//! every renewal, and together they converge on every shard held, each instance holding its fair
//! share (the counts differ by one at most).
//!
//! Rule: with `n` live instances in name order, the instance at position `i` aims at
//! `SHARDS / n` shards, plus one if `i < SHARDS % n` — so the aims add up to [`SHARDS`]. Above its
//! aim it releases (first the shards whose home is elsewhere; shard `s`'s home is the instance
//! at position `s % n`), **one per look**: an instance that comes back (a restart, a crash loop)
//! takes its share back a shard at a time from each of the others, not in one storm of
//! handovers, each of which restarts every job of the shard and asks LiveKit about every room.
//! Below its aim it acquires free shards (its homes first) as many as it lacks: those are
//! shards nobody drives. A shard is free when no lease names it: released, or its holder stopped
//! renewing for a lease period.

use std::collections::BTreeSet;

use super::{SHARDS, Shard};

/// The cluster as one look at Redis shows it.
#[derive(Debug, Clone)]
pub struct View {
    /// Names of the live instances (those whose heartbeat has not run out).
    pub instances: Vec<String>,
    /// For each shard, the instance holding its lease, if any.
    pub holders: Vec<Option<String>>,
}

/// Shards an instance above its aim gives up per look.
pub const RELEASES_PER_LOOK: usize = 1;

/// What to do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub acquire: Vec<Shard>,
    pub release: Vec<Shard>,
}

/// `me`'s position among `instances` (with `me` counted even if its heartbeat is not yet seen)
/// in name order, and how many they are.
fn place(me: &str, instances: &[String]) -> (usize, usize) {
    let mut all: Vec<&str> = instances.iter().map(String::as_str).collect();
    all.push(me);
    all.sort_unstable();
    all.dedup();
    (all.iter().position(|i| *i == me).unwrap_or(0), all.len())
}

/// How many shards instance `me` should hold among `instances`.
pub fn aim(me: &str, instances: &[String]) -> usize {
    let (position, n) = place(me, instances);
    SHARDS as usize / n + usize::from(position < SHARDS as usize % n)
}

/// The plan of instance `me`, holding `held`, given `view`.
pub fn plan(me: &str, held: &BTreeSet<Shard>, view: &View) -> Plan {
    let (position, n) = place(me, &view.instances);
    let aim = aim(me, &view.instances);
    let home = |s: &Shard| s.0 as usize % n == position;
    let mut plan = Plan::default();
    if held.len() > aim {
        // Shards homed elsewhere go first, so that repeated rebalancing moves few of them.
        let mut order: Vec<Shard> = held.iter().copied().collect();
        order.sort_by_key(|s| (home(s), std::cmp::Reverse(*s)));
        plan.release = order.into_iter().take(RELEASES_PER_LOOK.min(held.len() - aim)).collect();
    } else if held.len() < aim {
        let mut free: Vec<Shard> = Shard::all()
            .filter(|s| !held.contains(s))
            .filter(|s| view.holders.get(s.0 as usize).is_some_and(Option::is_none))
            .collect();
        free.sort_by_key(|s| (!home(s), *s));
        plan.acquire = free.into_iter().take(aim - held.len()).collect();
    }
    plan
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// Instances looking at a shared lease table one at a time, in the given order.
    struct Cluster {
        leases: Vec<Option<String>>,
        live: Vec<String>,
    }

    impl Cluster {
        fn new(names: &[&str]) -> Self {
            Cluster { leases: vec![None; SHARDS as usize], live: names.iter().map(|s| s.to_string()).collect() }
        }

        fn held(&self, me: &str) -> BTreeSet<Shard> {
            Shard::all().filter(|s| self.leases[s.0 as usize].as_deref() == Some(me)).collect()
        }

        fn look(&mut self, me: &str) {
            let view = View { instances: self.live.clone(), holders: self.leases.clone() };
            let p = plan(me, &self.held(me), &view);
            for s in p.release {
                self.leases[s.0 as usize] = None;
            }
            for s in p.acquire {
                assert!(self.leases[s.0 as usize].is_none(), "acquired a held shard");
                self.leases[s.0 as usize] = Some(me.to_owned());
            }
        }

        /// A dead instance's leases run out.
        fn kill(&mut self, me: &str) {
            self.live.retain(|l| l != me);
            for l in &mut self.leases {
                if l.as_deref() == Some(me) {
                    *l = None;
                }
            }
        }

        fn counts(&self) -> BTreeMap<String, usize> {
            let mut counts: BTreeMap<String, usize> = self.live.iter().map(|l| (l.clone(), 0)).collect();
            for l in self.leases.iter().flatten() {
                *counts.get_mut(l).expect("only live instances hold shards") += 1;
            }
            counts
        }

        fn assert_balanced(&self) {
            assert!(self.leases.iter().all(Option::is_some), "a shard is not held: {:?}", self.leases);
            let counts = self.counts();
            let (min, max) = (counts.values().min().unwrap(), counts.values().max().unwrap());
            assert!(max - min <= 1, "uneven: {counts:?}");
        }
    }

    #[test]
    fn aims_add_up_to_every_shard() {
        for n in 1..=70 {
            let names: Vec<String> = (0..n).map(|i| format!("i{i:03}")).collect();
            let total: usize = names.iter().map(|me| aim(me, &names)).sum();
            assert_eq!(total, SHARDS as usize, "{n} instances");
        }
    }

    #[test]
    fn a_lone_instance_takes_every_free_shard_and_keeps_them() {
        let mut c = Cluster::new(&["a"]);
        c.look("a");
        assert_eq!(c.held("a").len(), SHARDS as usize);
        let view = View { instances: c.live.clone(), holders: c.leases.clone() };
        assert_eq!(plan("a", &c.held("a"), &view), Plan::default(), "nothing to do once balanced");
    }

    #[test]
    fn a_joining_instance_gets_its_share_and_a_dead_ones_shards_are_taken_over() {
        let mut c = Cluster::new(&["a"]);
        c.look("a");
        c.live.push("b".into());
        c.look("b"); // nothing free yet
        assert!(c.held("b").is_empty());
        for _ in 0..32 {
            c.look("a"); // gives up one shard per look
            c.look("b");
        }
        c.assert_balanced();
        assert_eq!(c.held("b").len(), 32);
        c.live.push("c".into());
        for _ in 0..22 {
            for me in ["c", "a", "b"] {
                c.look(me);
            }
        }
        c.assert_balanced();
        c.kill("a");
        for me in ["b", "c"] {
            c.look(me);
        }
        c.assert_balanced();
        assert_eq!(c.held("b").len() + c.held("c").len(), SHARDS as usize);
    }

    /// Shards go home: an instance above its aim gives up the shards homed elsewhere first,
    /// one below takes its homes first; so after a join the split is the homes', and repeated
    /// rebalancing moves the same few shards rather than any.
    #[test]
    fn shards_go_home() {
        let mut c = Cluster::new(&["a"]);
        c.look("a");
        c.live.push("b".into());
        for _ in 0..40 {
            c.look("a");
            c.look("b");
        }
        c.assert_balanced();
        // Two instances: "a" (position 0) is home to the even shards, "b" to the odd ones.
        let evens: BTreeSet<Shard> = Shard::all().filter(|s| s.0 % 2 == 0).collect();
        let odds: BTreeSet<Shard> = Shard::all().filter(|s| s.0 % 2 == 1).collect();
        assert_eq!((c.held("a"), c.held("b")), (evens, odds));
    }

    /// Shards freed by a death go to their homes first.
    #[test]
    fn freed_shards_are_taken_by_their_homes_first() {
        let mut c = Cluster::new(&["a", "b", "c"]);
        for _ in 0..30 {
            for me in ["a", "b", "c"] {
                c.look(me);
            }
        }
        let before = c.held("a");
        c.kill("c");
        c.look("a");
        let taken: Vec<Shard> = c.held("a").difference(&before).copied().collect();
        assert!(!taken.is_empty());
        // With "a" and "b" left, "a" is home to the even shards; enough of them were freed.
        assert!(taken.iter().all(|s| s.0 % 2 == 0), "took shards homed elsewhere first: {taken:?}");
    }

    /// More instances than shards: those whose aim is none give up what they hold, one per look.
    #[test]
    fn instances_beyond_the_shards_hold_none() {
        let names: Vec<String> = (0..70).map(|i| format!("i{i:03}")).collect();
        let last = names.last().unwrap().clone();
        assert_eq!(aim(&last, &names), 0);
        let holders = vec![None; SHARDS as usize];
        let held = BTreeSet::from([Shard(3), Shard(5)]);
        let p = plan(&last, &held, &View { instances: names, holders });
        assert_eq!((p.release.len(), p.acquire.len()), (1, 0));
    }

    /// An instance back after a restart takes its share back lazily: each of the others gives
    /// up one shard per look, so no look moves more shards than there are other instances.
    #[test]
    fn a_returning_instance_takes_its_share_back_a_shard_per_look_from_each() {
        let mut c = Cluster::new(&["a", "b", "c"]);
        for _ in 0..30 {
            for me in ["a", "b", "c"] {
                c.look(me);
            }
        }
        c.assert_balanced();
        c.kill("c");
        for me in ["a", "b"] {
            c.look(me);
        }
        c.assert_balanced();
        c.live.push("c".into());
        let mut rounds = 0;
        while c.held("c").len() < aim("c", &c.live) {
            let before = c.held("c").len();
            for me in ["a", "b", "c"] {
                c.look(me);
            }
            assert!(c.held("c").len() - before <= 2, "more than one shard from each in one round");
            rounds += 1;
            assert!(rounds <= SHARDS, "never balanced");
        }
        c.assert_balanced();
        assert!(rounds >= 10, "taken back in {rounds} rounds: not lazily");
    }

    proptest! {
        /// Any sequence of joins, deaths and looks in any order: once every live instance has
        /// looked often enough after the last change (one shard released per look), every shard
        /// is held, by live instances, evenly.
        #[test]
        fn converges_whatever_the_order(
            steps in proptest::collection::vec((0u8..3, 0usize..6), 1..40),
            finish in proptest::collection::vec(0usize..6, 0..12),
        ) {
            let names = ["a", "b", "c", "d", "e", "f"];
            let mut c = Cluster::new(&["a"]);
            for (what, who) in steps {
                let name = names[who];
                match what {
                    0 if !c.live.iter().any(|l| l == name) => c.live.push(name.into()),
                    1 if c.live.len() > 1 => c.kill(name),
                    _ => if c.live.iter().any(|l| l == name) { c.look(name) },
                }
            }
            for who in finish {
                if c.live.iter().any(|l| l == names[who]) {
                    c.look(names[who]);
                }
            }
            for _ in 0..=SHARDS {
                for me in c.live.clone() {
                    c.look(&me);
                }
            }
            c.assert_balanced();
        }
    }
}
