//! Compact indexes from a key (a LiveKit room and identity, a member, a delay id) to the jobs it
//! names. Only a 64-bit hash of the key is kept — the engine checks every hit against the job
//! itself — and a key naming one job, the usual case, allocates nothing.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};

use crate::delegation::JobId;

/// The keys are already uniformly distributed hashes: use them as they are.
#[derive(Default)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Job ids are random 64-bit numbers the service drew itself: tables keyed by them hash them
/// as they are.
pub type JobIdHasher = BuildHasherDefault<PassThrough>;

/// Keys (by a keyed hash) to the jobs they name. Almost every hash names one job, kept in
/// `one` as 16 bytes an entry; a hash shared by several jobs (two delegations of one identity,
/// or a collision) has all of them in `many` instead. (An enum of one id or a list was 40 bytes
/// an entry: at five keys per job, 120 bytes per tracked member more than this.)
pub struct HashIndex {
    keys: RandomState,
    one: HashMap<u64, JobId, BuildHasherDefault<PassThrough>>,
    many: HashMap<u64, Vec<JobId>, BuildHasherDefault<PassThrough>>,
}

impl Default for HashIndex {
    fn default() -> Self {
        HashIndex { keys: RandomState::new(), one: HashMap::default(), many: HashMap::default() }
    }
}

#[cfg(test)]
thread_local! {
    /// Set by a test, before it builds anything: every key of every index on its thread then
    /// hashes alike, so the engine's check of each hit against its job is all that routes events.
    pub static COLLIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl HashIndex {
    fn hash(&self, key: &impl Hash) -> u64 {
        #[cfg(test)]
        if COLLIDE.get() {
            return 0;
        }
        self.keys.hash_one(key)
    }

    pub fn insert(&mut self, key: &impl Hash, id: JobId) {
        let h = self.hash(key);
        if let Some(ids) = self.many.get_mut(&h) {
            ids.push(id);
        } else if let Some(other) = self.one.remove(&h) {
            self.many.insert(h, vec![other, id]);
        } else {
            self.one.insert(h, id);
        }
    }

    pub fn remove(&mut self, key: &impl Hash, id: JobId) {
        let h = self.hash(key);
        if let Some(ids) = self.many.get_mut(&h) {
            ids.retain(|j| *j != id);
            if let [last] = ids[..] {
                self.many.remove(&h);
                self.one.insert(h, last);
            }
        } else if self.one.get(&h) == Some(&id) {
            self.one.remove(&h);
        }
    }

    /// The jobs that may be named by `key` (a superset: check each).
    pub fn candidates(&self, key: &impl Hash) -> &[JobId] {
        let h = self.hash(key);
        if let Some(ids) = self.many.get(&h) {
            return ids;
        }
        self.one.get(&h).map_or(&[], std::slice::from_ref)
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.one.is_empty() && self.many.is_empty()
    }
}

/// A count per key, by the key's keyed 64-bit hash (12 bytes an entry, nothing allocated per
/// key). Two keys sharing a hash would share a count: for 100,000 keys, a chance in 10^9.
pub struct HashCount {
    keys: RandomState,
    counts: HashMap<u64, u32, BuildHasherDefault<PassThrough>>,
}

impl Default for HashCount {
    fn default() -> Self {
        HashCount { keys: RandomState::new(), counts: HashMap::default() }
    }
}

impl HashCount {
    pub fn get(&self, key: &impl Hash) -> u32 {
        self.counts.get(&self.keys.hash_one(key)).copied().unwrap_or(0)
    }

    pub fn increment(&mut self, key: &impl Hash) {
        *self.counts.entry(self.keys.hash_one(key)).or_default() += 1;
    }

    pub fn decrement(&mut self, key: &impl Hash) {
        let h = self.keys.hash_one(key);
        if let Some(n) = self.counts.get_mut(&h) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_or_many_ids_per_key() {
        let mut index = HashIndex::default();
        index.insert(&("room", "alice"), JobId(1));
        index.insert(&("room", "bob"), JobId(2));
        index.insert(&("room", "alice"), JobId(3));
        assert_eq!(index.candidates(&("room", "alice")), &[JobId(1), JobId(3)]);
        assert_eq!(index.candidates(&("other", "alice")), &[] as &[JobId]);
        index.remove(&("room", "alice"), JobId(1));
        assert_eq!(index.candidates(&("room", "alice")), &[JobId(3)]);
        index.remove(&("room", "alice"), JobId(3));
        index.remove(&("room", "bob"), JobId(2));
        assert!(index.is_empty());
        // A job not in the index, or named by another key, is not removed.
        index.insert(&("room", "carol"), JobId(4));
        index.remove(&("room", "carol"), JobId(5));
        index.remove(&("room", "dave"), JobId(4));
        assert_eq!(index.candidates(&("room", "carol")), &[JobId(4)]);
    }

    #[test]
    fn counts_go_up_and_down_and_are_forgotten_at_zero() {
        let mut counts = HashCount::default();
        counts.increment(&"@a:hs");
        counts.increment(&"@a:hs");
        counts.increment(&"@b:hs");
        assert_eq!((counts.get(&"@a:hs"), counts.get(&"@b:hs"), counts.get(&"@c:hs")), (2, 1, 0));
        counts.decrement(&"@a:hs");
        counts.decrement(&"@b:hs");
        counts.decrement(&"@c:hs");
        assert_eq!((counts.get(&"@a:hs"), counts.get(&"@b:hs")), (1, 0));
        counts.decrement(&"@a:hs");
        assert!(counts.counts.is_empty());
    }
}
