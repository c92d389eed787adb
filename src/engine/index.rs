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

enum Ids {
    One(JobId),
    Many(Vec<JobId>),
}

pub struct HashIndex {
    keys: RandomState,
    map: HashMap<u64, Ids, BuildHasherDefault<PassThrough>>,
}

impl Default for HashIndex {
    fn default() -> Self {
        HashIndex { keys: RandomState::new(), map: HashMap::default() }
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
        match self.map.get_mut(&h) {
            None => {
                self.map.insert(h, Ids::One(id));
            }
            Some(Ids::One(other)) => {
                let other = *other;
                self.map.insert(h, Ids::Many(vec![other, id]));
            }
            Some(Ids::Many(ids)) => ids.push(id),
        }
    }

    pub fn remove(&mut self, key: &impl Hash, id: JobId) {
        let h = self.hash(key);
        let now_empty = match self.map.get_mut(&h) {
            Some(Ids::One(other)) => *other == id,
            Some(Ids::Many(ids)) => {
                ids.retain(|j| *j != id);
                if let [last] = ids[..] {
                    self.map.insert(h, Ids::One(last));
                }
                false
            }
            None => false,
        };
        if now_empty {
            self.map.remove(&h);
        }
    }

    /// The jobs that may be named by `key` (a superset: check each).
    pub fn candidates(&self, key: &impl Hash) -> &[JobId] {
        match self.map.get(&self.hash(key)) {
            None => &[],
            Some(Ids::One(id)) => std::slice::from_ref(id),
            Some(Ids::Many(ids)) => ids,
        }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
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
    }
}
