//! The one ordered set of deadlines every job shares.
//!
//! Each job has at most one entry: the earliest time its state machine wants
//! [`crate::lifecycle::Job::handle_timeout`]. The engine's single task sleeps until
//! [`Scheduler::next_deadline`] and then drains [`Scheduler::pop_due`] in bounded batches; there is no timer or task
//! per member, so 100k members cost one `BTreeSet` entry each. As in mini-redis' `db.rs`, each
//! key's owner keeps the deadline it set (a job's entry does), so the set is all there is: a
//! map from key to deadline beside it cost every tracked member 22 bytes more.

use std::collections::BTreeSet;

use crate::lifecycle::Millis;

#[derive(Debug)]
pub struct Scheduler<K> {
    queue: BTreeSet<(Millis, K)>,
}

impl<K: Ord + Copy> Default for Scheduler<K> {
    fn default() -> Self {
        Scheduler { queue: BTreeSet::new() }
    }
}

impl<K: Ord + Copy> Scheduler<K> {
    /// Moves `key` from the deadline it had (`from`: what the caller set last, or `None`; a
    /// key popped by [`Scheduler::pop_due`] has none) to `to` (`None`: no deadline).
    pub fn set(&mut self, key: K, from: Option<Millis>, to: Option<Millis>) {
        if from == to {
            return;
        }
        if let Some(old) = from {
            let removed = self.queue.remove(&(old, key));
            debug_assert!(removed, "the key was not scheduled at {old}");
        }
        if let Some(at) = to {
            self.queue.insert((at, key));
        }
    }

    /// The earliest deadline, if any.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.queue.first().map(|(at, _)| *at)
    }

    /// Removes and returns the keys whose deadline is at or before `now`, earliest first, at
    /// most `max` of them (the rest stay due).
    pub fn pop_due(&mut self, now: Millis, max: usize) -> Vec<K> {
        let mut due = Vec::new();
        while let Some(&(at, key)) = self.queue.first() {
            if at > now || due.len() == max {
                break;
            }
            self.queue.pop_first();
            due.push(key);
        }
        due
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_one_deadline_per_key_in_order() {
        let mut s = Scheduler::default();
        s.set(1u64, None, Some(30));
        s.set(2, None, Some(10));
        s.set(1, Some(30), Some(5)); // replaces 30
        s.set(3, None, Some(20));
        s.set(3, Some(20), None);
        s.set(2, Some(10), Some(10));
        assert_eq!(s.len(), 2);
        assert_eq!(s.next_deadline(), Some(5));
        assert_eq!(s.pop_due(9, 10), vec![1]);
        assert_eq!(s.pop_due(9, 10), Vec::<u64>::new());
        assert_eq!(s.pop_due(100, 10), vec![2]);
        assert!(s.is_empty());
    }

    #[test]
    fn pops_due_keys_in_bounded_batches() {
        let mut s = Scheduler::default();
        for k in 0..5u64 {
            s.set(k, None, Some(k));
        }
        assert_eq!(s.pop_due(10, 2), vec![0, 1]);
        assert_eq!(s.next_deadline(), Some(2), "the rest stay due");
        assert_eq!(s.pop_due(10, 2), vec![2, 3]);
        assert_eq!(s.pop_due(10, 2), vec![4]);
    }
}
