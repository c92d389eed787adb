//! What one user or one homeserver may ask of the bridge's public endpoints: token and
//! delegation requests per user and per homeserver (token buckets, [`RateLimiter`]), and OpenID
//! checks and discovery requests in flight towards one homeserver ([`InFlight`]: a request waits
//! up to [`CHECK_WAIT`] for a slot, so that a burst of a busy homeserver's users is served). A
//! request over a limit is answered `429 M_LIMIT_EXCEEDED` with `Retry-After`, and nothing else
//! is done for it.
//!
//! Rates are counted only for authenticated requests (the user and its homeserver vouched for by
//! that homeserver): an unauthenticated client naming someone else's homeserver cannot spend that
//! homeserver's budget. What it can take is that homeserver's checks in flight, each bounded by
//! the request timeout — and only while the homeserver answers slowly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::MatrixError;
use crate::config::Rate;

/// Keys remembered at most by one limiter; a key whose bucket is full again is forgotten first.
const MAX_KEYS: usize = 100_000;

/// OpenID checks and discovery requests in flight in all, whatever the homeserver: anyone may
/// name any number of servers.
const CHECKS_IN_ALL: usize = 1_024;

/// How long a request waits for one of its homeserver's slots before `429`.
pub const CHECK_WAIT: Duration = Duration::from_secs(5);

/// One token bucket per key (a user, a homeserver): `requests` tokens at most, refilled at
/// `requests / per`.
pub struct RateLimiter {
    capacity: f64,
    per_second: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    pub fn new(rate: Rate) -> Self {
        let capacity = f64::from(rate.requests);
        RateLimiter { capacity, per_second: capacity / rate.per.as_secs_f64(), buckets: Mutex::default() }
    }

    /// Takes one request of `key`'s budget at `now`, or says how long until one is available.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            let (capacity, rate) = (self.capacity, self.per_second);
            buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < capacity);
        }
        let b = buckets.entry(key.to_owned()).or_insert(Bucket { tokens: self.capacity, at: now });
        let refilled = now.saturating_duration_since(b.at).as_secs_f64() * self.per_second;
        b.tokens = (b.tokens + refilled).min(self.capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - b.tokens) / self.per_second))
    }
}

/// Requests in flight per key (a homeserver), under a cap per key and a cap in all; a request
/// waits a bounded time for a slot. A key's entry lives only while it has requests in flight or
/// waiting.
pub struct InFlight {
    per_key: usize,
    total: Arc<Semaphore>,
    keys: Mutex<HashMap<String, Arc<Semaphore>>>,
    wait: Duration,
}

/// A request counted in flight until dropped.
pub struct Slot {
    owner: Arc<InFlight>,
    key: String,
    permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl InFlight {
    pub fn new(per_key: usize, wait: Duration) -> Arc<Self> {
        Arc::new(InFlight { per_key, total: Arc::new(Semaphore::new(CHECKS_IN_ALL)), keys: Mutex::default(), wait })
    }

    /// A slot for `key`, waiting up to the owner's wait for one; `None` if none came.
    pub async fn acquire(self: &Arc<Self>, key: &str) -> Option<Slot> {
        let semaphore = {
            let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            keys.entry(key.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(self.per_key))).clone()
        };
        let permits = tokio::time::timeout(self.wait, async {
            let own = semaphore.clone().acquire_owned().await.ok()?;
            let total = self.total.clone().acquire_owned().await.ok()?;
            Some((own, total))
        })
        .await
        .ok()
        .flatten();
        drop(semaphore);
        // Dropped without permits, it forgets an idle key.
        let slot = Slot { owner: self.clone(), key: key.to_owned(), permits };
        slot.permits.is_some().then_some(slot)
    }

    /// Forgets `key` if nothing holds or waits for one of its slots.
    fn forget_if_idle(&self, key: &str) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        // Every permit and every waiter holds the semaphore too: only the map's reference left.
        if keys.get(key).is_some_and(|s| Arc::strong_count(s) == 1) {
            keys.remove(key);
        }
    }

    /// Requests in flight for `key`.
    #[cfg(test)]
    fn count(&self, key: &str) -> usize {
        let keys = self.keys.lock().unwrap();
        keys.get(key).map_or(0, |s| self.per_key - s.available_permits())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permits.take());
        self.owner.forget_if_idle(&self.key);
    }
}

/// The limits of the public endpoints, shared by every handler.
pub struct Limits {
    pub per_user: RateLimiter,
    pub per_homeserver: RateLimiter,
    pub checks: Arc<InFlight>,
}

impl Limits {
    pub fn new(fairness: &crate::config::Fairness) -> Self {
        Limits {
            per_user: RateLimiter::new(fairness.user_rate),
            per_homeserver: RateLimiter::new(fairness.homeserver_rate),
            checks: InFlight::new(fairness.homeserver_checks, CHECK_WAIT),
        }
    }

    /// Counts an authenticated request of `user` (of homeserver `server`) at `now`: its user's
    /// budget first, then its homeserver's.
    pub fn take(&self, user: &str, server: &str, now: Instant) -> Result<(), Limited> {
        self.per_user.take(user, now).map_err(|retry_after| Limited { limit: "user_rate", retry_after })?;
        self.per_homeserver.take(server, now).map_err(|retry_after| Limited { limit: "homeserver_rate", retry_after })
    }

    /// A slot for an OpenID check or a discovery request towards `server`, waited for.
    pub async fn check_slot(&self, server: &str) -> Result<Slot, Limited> {
        let slot = self.checks.acquire(server).await;
        slot.ok_or(Limited { limit: "homeserver_busy", retry_after: Duration::from_secs(1) })
    }
}

/// Which limit a request hit, and how long its client should wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub limit: &'static str,
    pub retry_after: Duration,
}

impl Limited {
    /// `429 M_LIMIT_EXCEEDED` with `Retry-After` and `retry_after_ms`.
    pub fn into_error(self) -> MatrixError {
        let mut e = MatrixError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "M_LIMIT_EXCEEDED",
            match self.limit {
                "homeserver_busy" => "too many requests towards your homeserver in flight; try again shortly",
                "homeserver_rate" => "too many requests from users of your homeserver; try again later",
                _ => "too many requests; try again later",
            },
        );
        e.retry_after_ms = Some(self.retry_after.as_millis().max(1) as u64);
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let l = RateLimiter::new(Rate { requests: 3, per: Duration::from_secs(3) });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.take("@a:hs", t0), Ok(()));
        }
        let wait = l.take("@a:hs", t0).unwrap_err();
        assert!(wait > Duration::from_millis(990) && wait <= Duration::from_secs(1), "{wait:?}");
        assert_eq!(l.take("@b:hs", t0), Ok(()), "another key has its own budget");
        assert!(l.take("@a:hs", t0 + Duration::from_millis(500)).is_err());
        assert_eq!(l.take("@a:hs", t0 + Duration::from_millis(1_001)), Ok(()));
        // Refilled to its burst, never beyond.
        let later = t0 + Duration::from_secs(3_600);
        for _ in 0..3 {
            assert_eq!(l.take("@a:hs", later), Ok(()));
        }
        assert!(l.take("@a:hs", later).is_err());
    }

    #[test]
    fn the_user_budget_is_spent_before_the_homeservers() {
        let fairness = crate::config::Fairness {
            user_rate: Rate { requests: 2, per: Duration::from_secs(60) },
            homeserver_rate: Rate { requests: 3, per: Duration::from_secs(60) },
            homeserver_checks: 2,
            homeserver_calls: 1,
            jobs_per_user: 1,
        };
        let l = Limits::new(&fairness);
        let now = Instant::now();
        assert!(l.take("@a:hs", "hs", now).is_ok() && l.take("@a:hs", "hs", now).is_ok());
        assert_eq!(l.take("@a:hs", "hs", now).unwrap_err().limit, "user_rate");
        assert!(l.take("@b:hs", "hs", now).is_ok());
        assert_eq!(l.take("@c:hs", "hs", now).unwrap_err().limit, "homeserver_rate");
        assert!(l.take("@c:other", "other", now).is_ok(), "another homeserver is not affected");
        let e = l.take("@c:hs", "hs", now).unwrap_err().into_error();
        assert_eq!((e.status, e.errcode), (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"));
        assert!(e.retry_after_ms.unwrap() > 0);
    }

    #[tokio::test]
    async fn slots_are_capped_per_homeserver_waited_for_and_given_back_when_dropped() {
        let f = InFlight::new(2, Duration::from_millis(100));
        let a1 = f.acquire("slow.test").await.unwrap();
        let _a2 = f.acquire("slow.test").await.unwrap();
        let started = Instant::now();
        assert!(f.acquire("slow.test").await.is_none(), "a third check towards the same homeserver");
        assert!(started.elapsed() >= Duration::from_millis(100), "it waited for a slot first");
        let _b = f.acquire("good.test").await.expect("another homeserver has its own slots");
        // A slot given back while another request waits: that one gets it.
        let waiting = {
            let f = f.clone();
            tokio::spawn(async move { f.acquire("slow.test").await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a1);
        assert!(waiting.await.unwrap());
        assert_eq!(f.count("slow.test"), 1, "the waiter's slot went back when its task ended");
    }

    #[tokio::test]
    async fn slots_are_capped_in_all_and_idle_homeservers_forgotten() {
        let f = InFlight::new(1, Duration::from_millis(50));
        let mut slots = Vec::new();
        for i in 0..CHECKS_IN_ALL {
            slots.push(f.acquire(&format!("hs{i}.test")).await.unwrap());
        }
        assert!(f.acquire("one-more.test").await.is_none());
        drop(slots);
        assert!(f.acquire("one-more.test").await.is_some());
        assert!(f.keys.lock().unwrap().is_empty(), "every homeserver forgotten once idle");
    }

    #[test]
    fn a_limiter_forgets_full_buckets_when_it_holds_too_many_keys() {
        let l = RateLimiter::new(Rate { requests: 1, per: Duration::from_secs(1) });
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            l.take(&format!("k{i}"), t0).unwrap();
        }
        // A second later every bucket is full again: all forgotten to make room.
        l.take("new", t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(l.buckets.lock().unwrap().len(), 1);
    }
}
