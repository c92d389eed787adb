//! Homeserver calls waiting to start and in flight, shared fairly between homeservers: one queue
//! per homeserver, taken in turn (round-robin), each homeserver with its own cap of calls in
//! flight under the instance's total cap. A slow or hostile homeserver fills only its own slots
//! and delays only its own members: the others' calls never wait behind its queue.
//!
//! Pure bookkeeping, no clock: the registry pushes the calls its jobs issue, pops them when it
//! may start one, and says when one is answered.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// The calls of one action (restarts, or sends) for every homeserver.
#[derive(Debug)]
pub struct FairQueues<T> {
    /// Calls in flight at most, for each homeserver.
    per_server: usize,
    /// Calls in flight at most, in all.
    total: usize,
    servers: HashMap<Arc<str>, Server<T>>,
    /// The homeservers that have calls waiting and room under their cap, in turn.
    turns: VecDeque<Arc<str>>,
    in_flight: usize,
    waiting: usize,
}

#[derive(Debug)]
struct Server<T> {
    queue: VecDeque<T>,
    in_flight: usize,
    /// In [`FairQueues::turns`].
    has_turn: bool,
}

impl<T> FairQueues<T> {
    pub fn new(per_server: usize, total: usize) -> Self {
        FairQueues {
            per_server: per_server.max(1),
            total: total.max(1),
            servers: HashMap::new(),
            turns: VecDeque::new(),
            in_flight: 0,
            waiting: 0,
        }
    }

    /// Queues `item` for `server`; returns the homeserver's name as kept here (one allocation
    /// per homeserver, shared by its calls).
    pub fn push(&mut self, server: &str, item: T) -> Arc<str> {
        let key = match self.servers.get_key_value(server) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = server.into();
                self.servers.insert(k.clone(), Server { queue: VecDeque::new(), in_flight: 0, has_turn: false });
                k
            }
        };
        let s = self.servers.get_mut(&key).expect("inserted above");
        s.queue.push_back(item);
        self.waiting += 1;
        if !s.has_turn && s.in_flight < self.per_server {
            s.has_turn = true;
            self.turns.push_back(key.clone());
        }
        key
    }

    /// The next call to start, from the next homeserver in turn, counted in flight (give it back
    /// with [`FairQueues::finished`] once answered, or at once if it is not started after all);
    /// `None` when nothing waits or the total cap is reached.
    pub fn pop(&mut self) -> Option<(Arc<str>, T)> {
        if self.in_flight >= self.total {
            return None;
        }
        while let Some(key) = self.turns.pop_front() {
            let Some(s) = self.servers.get_mut(&key) else { continue };
            let Some(item) = s.queue.pop_front() else {
                s.has_turn = false;
                continue;
            };
            s.in_flight += 1;
            self.in_flight += 1;
            self.waiting -= 1;
            if !s.queue.is_empty() && s.in_flight < self.per_server {
                self.turns.push_back(key.clone());
            } else {
                s.has_turn = false;
            }
            return Some((key, item));
        }
        None
    }

    /// A call of `server` popped earlier is over (answered, or not started after all).
    pub fn finished(&mut self, server: &str) {
        let Some((key, _)) = self.servers.get_key_value(server) else { return };
        let key = key.clone();
        let per_server = self.per_server;
        let s = self.servers.get_mut(&key).expect("looked up above");
        s.in_flight = s.in_flight.saturating_sub(1);
        self.in_flight = self.in_flight.saturating_sub(1);
        if s.queue.is_empty() {
            // A homeserver's entry lives only while it has calls (one with a turn has some waiting).
            if s.in_flight == 0 {
                self.servers.remove(&key);
            }
        } else if !s.has_turn && s.in_flight < per_server {
            s.has_turn = true;
            self.turns.push_back(key);
        }
    }

    /// Calls in flight, in all.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Calls waiting to start, in all.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Calls in flight for `server`.
    #[cfg(test)]
    pub fn in_flight_for(&self, server: &str) -> usize {
        self.servers.get(server).map_or(0, |s| s.in_flight)
    }

    /// Homeservers with calls waiting or in flight.
    #[cfg(test)]
    pub fn servers(&self) -> usize {
        self.servers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_homeserver_with_a_long_queue_does_not_delay_another() {
        let mut q = FairQueues::new(4, 6);
        for i in 0..600 {
            q.push("hostile.test", i);
        }
        q.push("good.test", 1000);
        q.push("good.test", 1001);
        let started: Vec<(Arc<str>, i32)> = std::iter::from_fn(|| q.pop()).collect();
        // The hostile server gets its cap; the good one its calls, at once.
        assert_eq!(started.iter().filter(|(s, _)| &**s == "hostile.test").count(), 4);
        assert_eq!(
            started.iter().filter(|(s, _)| &**s == "good.test").map(|(_, i)| *i).collect::<Vec<_>>(),
            [1000, 1001]
        );
        assert_eq!(q.in_flight(), 6);
        assert_eq!(q.waiting(), 596);
        // A slot of the good server frees up: the hostile one is at its cap, so nothing starts.
        q.finished("good.test");
        assert!(q.pop().is_none());
        q.push("good.test", 1002);
        assert_eq!(q.pop().map(|(s, i)| (s.to_string(), i)), Some(("good.test".into(), 1002)));
        // A hostile call answered: the next hostile one starts.
        q.finished("hostile.test");
        assert_eq!(q.pop().map(|(s, _)| s.to_string()), Some("hostile.test".into()));
    }

    #[test]
    fn under_the_total_cap_homeservers_take_turns() {
        let mut q = FairQueues::new(100, 3);
        for i in 0..10 {
            q.push("a.test", i);
        }
        for i in 0..10 {
            q.push("b.test", i);
        }
        q.push("c.test", 0);
        let first: Vec<String> = std::iter::from_fn(|| q.pop()).map(|(s, _)| s.to_string()).collect();
        assert_eq!(first, ["a.test", "b.test", "c.test"]);
        for s in &first {
            q.finished(s);
        }
        let next: Vec<String> = std::iter::from_fn(|| q.pop()).map(|(s, _)| s.to_string()).collect();
        assert_eq!(next, ["a.test", "b.test", "a.test"], "c has nothing left; a and b alternate");
    }

    #[test]
    fn a_homeserver_is_forgotten_once_it_has_no_call() {
        let mut q = FairQueues::new(2, 10);
        q.push("a.test", 1);
        let (s, _) = q.pop().unwrap();
        assert_eq!(q.servers(), 1);
        q.finished(&s);
        assert_eq!(q.servers(), 0);
        assert_eq!((q.in_flight(), q.waiting()), (0, 0));
        q.finished("never.test"); // harmless
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u8),
        Pop,
        Finish(usize),
    }

    proptest! {
        /// Whatever the order: no homeserver ever has more than its cap in flight, the total cap
        /// holds, every call pushed is popped exactly once, and whenever a call waits whose
        /// homeserver is under its cap while the total cap is not reached, pop starts something.
        #[test]
        fn caps_hold_and_nothing_is_lost_or_stuck(ops in proptest::collection::vec(
            prop_oneof![
                (0u8..4).prop_map(Op::Push),
                Just(Op::Pop),
                (0usize..64).prop_map(Op::Finish),
            ], 0..300)) {
            let (per, total) = (3, 5);
            let mut q = FairQueues::new(per, total);
            let mut next = 0u32;
            let mut started: Vec<(Arc<str>, u32)> = Vec::new();
            let mut popped = std::collections::HashSet::new();
            let mut pushed = 0u32;
            for op in ops {
                match op {
                    Op::Push(s) => { q.push(&format!("hs{s}.test"), next); next += 1; pushed += 1; }
                    Op::Pop => {
                        if let Some((s, i)) = q.pop() {
                            prop_assert!(popped.insert(i), "popped twice");
                            started.push((s, i));
                        }
                    }
                    Op::Finish(k) => {
                        if !started.is_empty() {
                            let (s, _) = started.remove(k % started.len());
                            q.finished(&s);
                        }
                    }
                }
                prop_assert!(q.in_flight() <= total);
                prop_assert_eq!(q.in_flight(), started.len());
                for s in ["hs0.test", "hs1.test", "hs2.test", "hs3.test"] {
                    prop_assert!(q.in_flight_for(s) <= per);
                    prop_assert_eq!(q.in_flight_for(s), started.iter().filter(|(x, _)| &**x == s).count());
                }
                prop_assert_eq!(q.waiting() + popped.len(), pushed as usize);
            }
            // Drain: everything waiting eventually starts as calls finish.
            loop {
                while let Some((s, i)) = q.pop() {
                    prop_assert!(popped.insert(i));
                    started.push((s, i));
                }
                let Some((s, _)) = started.pop() else { break };
                q.finished(&s);
            }
            prop_assert_eq!(popped.len(), pushed as usize);
            prop_assert_eq!(q.waiting(), 0);
        }
    }
}
