//! Redis (or Valkey) as the store, for several instances sharing their jobs
//! (`LIVEKIT_REDIS_URL`; every key under a prefix, so that LiveKit's own Redis can be shared).
//!
//! Layout: `{prefix}delegations` and `{prefix}states`, two hashes from a job id (16 hex digits)
//! to the JSON of its delegation and of its durable phase. A commit is one Lua script: Redis runs
//! it atomically, and it checks everything it needs before it writes anything, so it applies all
//! of its changes or none. A phase change of a job that no longer exists writes nothing.
//!
//! Durability is Redis's: a commit is answered once Redis has applied it, which with AOF and
//! `appendfsync always` means once it is on disk (no loss on a crash of Redis or its machine);
//! with `appendfsync everysec`, up to a second of changes can be lost with the machine.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{JobRecord, Store, StoreError, StoreOp};
use crate::delegation::JobId;

/// Applies a commit's operations, given as ARGV triples (`I`/`S`/`D`, id, JSON or empty) with
/// `KEYS` = delegations, states.
const COMMIT: &str = r#"
-- Everything is checked before anything is written: a script is not rolled back.
for i = 1, #ARGV, 3 do
  local op, payload = ARGV[i], ARGV[i + 2]
  if op == 'I' then
    if not string.find(payload, '\n', 1, true) then
      return redis.error_reply('insert without a state')
    end
  elseif op ~= 'S' and op ~= 'D' then
    return redis.error_reply('unknown operation ' .. tostring(op))
  end
end
for i = 1, #ARGV, 3 do
  local op, id, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 'I' then
    local sep = string.find(payload, '\n', 1, true)
    redis.call('HSET', KEYS[1], id, string.sub(payload, 1, sep - 1))
    redis.call('HSET', KEYS[2], id, string.sub(payload, sep + 1))
  elseif op == 'S' then
    if redis.call('HEXISTS', KEYS[1], id) == 1 then
      redis.call('HSET', KEYS[2], id, payload)
    end
  else
    redis.call('HDEL', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  end
end
return #ARGV / 3
"#;

/// Entries read per `HSCAN` round trip when loading.
const SCAN_BATCH: usize = 1_000;

pub struct RedisStore {
    conn: ConnectionManager,
    delegations: String,
    states: String,
    commit: redis::Script,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl RedisStore {
    /// Connects to `url` (`redis://` or `rediss://`, with password and database if any); every
    /// key starts with `prefix`. Fails if Redis cannot be reached now.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError(format!("LIVEKIT_REDIS_URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| StoreError(format!("cannot reach Redis: {e}")))?;
        Ok(RedisStore {
            conn,
            delegations: format!("{prefix}delegations"),
            states: format!("{prefix}states"),
            commit: redis::Script::new(COMMIT),
        })
    }

    /// Every field of hash `key`, read in batches (a large hash never blocks Redis for long).
    async fn scan_hash(&self, key: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut all = Vec::new();
        loop {
            let (next, batch): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                .arg(key)
                .arg(cursor)
                .arg("COUNT")
                .arg(SCAN_BATCH)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            all.extend(batch);
            if next == 0 {
                return Ok(all);
            }
            cursor = next;
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn load(&self) -> Result<Vec<JobRecord>, StoreError> {
        let delegations = self.scan_hash(&self.delegations).await?;
        let mut states: std::collections::HashMap<String, String> =
            self.scan_hash(&self.states).await?.into_iter().collect();
        let mut jobs = Vec::with_capacity(delegations.len());
        for (id, delegation) in delegations {
            let state = states.remove(&id);
            let record = (|| -> Result<JobRecord, String> {
                Ok(JobRecord {
                    id: id.parse::<JobId>().map_err(|e| e.to_string())?,
                    delegation: serde_json::from_str(&delegation).map_err(|e| e.to_string())?,
                    state: serde_json::from_str(state.as_deref().ok_or("no state")?).map_err(|e| e.to_string())?,
                })
            })();
            match record {
                Ok(r) => jobs.push(r),
                // Never dropped silently, never fatal: the entry stays for an operator to see.
                Err(e) => tracing::error!(job = %id, error = %e, "unreadable stored job skipped"),
            }
        }
        Ok(jobs)
    }

    async fn commit(&self, ops: Vec<StoreOp>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut invocation = self.commit.prepare_invoke();
        invocation.key(&self.delegations).key(&self.states);
        for op in &ops {
            match op {
                StoreOp::Insert(r) => {
                    // serde_json escapes newlines inside strings: the first one separates the two.
                    let delegation = serde_json::to_string(&r.delegation).map_err(err)?;
                    let state = serde_json::to_string(&r.state).map_err(err)?;
                    invocation.arg("I").arg(r.id.to_string()).arg(format!("{delegation}\n{state}"));
                }
                StoreOp::SetState(id, state) => {
                    invocation.arg("S").arg(id.to_string()).arg(serde_json::to_string(state).map_err(err)?);
                }
                StoreOp::Delete(id) => {
                    invocation.arg("D").arg(id.to_string()).arg("");
                }
            }
        }
        let mut conn = self.conn.clone();
        let _: i64 = invocation.invoke_async(&mut conn).await.map_err(err)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: () = conn.ping().await.map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::store::conformance;

    /// A throwaway `redis-server` (Debian's package; `scripts/test.sh` installs it).
    struct TestRedis {
        child: Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl TestRedis {
        async fn start() -> TestRedis {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            TestRedis::on(port).await
        }

        async fn on(port: u16) -> TestRedis {
            let dir = tempfile::tempdir().unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server is installed (Debian package redis-server; scripts/test.sh installs it)");
            // Owned (and so killed when dropped) before anything can fail.
            let redis = TestRedis { child, port, _dir: dir };
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    return redis;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("redis-server did not start on port {port}");
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    async fn store(url: &str, prefix: &str) -> RedisStore {
        RedisStore::connect(url, prefix, Duration::from_secs(2)).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conforms_to_the_store_suite() {
        let redis = TestRedis::start().await;
        let url = redis.url();
        let runs = AtomicU64::new(0);
        conformance::run(|| {
            // Each check gets a prefix of its own: an empty store on the same server.
            let (url, prefix) = (url.clone(), format!("check{}:", runs.fetch_add(1, Ordering::SeqCst)));
            Box::new(move || {
                let (url, prefix) = (url.clone(), prefix.clone());
                Box::pin(async move { Box::new(store(&url, &prefix).await) as Box<dyn Store> })
            })
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_stay_under_the_prefix_and_unreadable_entries_are_skipped() {
        let redis = TestRedis::start().await;
        let (a, b) = (store(&redis.url(), "a:").await, store(&redis.url(), "b:").await);
        a.commit(vec![StoreOp::Insert(Box::new(conformance::record(1)))]).await.unwrap();
        assert!(b.load().await.unwrap().is_empty(), "another prefix sees nothing");
        let mut raw = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut raw).await.unwrap();
        assert!(keys.iter().all(|k| k.starts_with("a:")), "{keys:?}");
        let _: () = raw.hset("a:delegations", "0000000000000002", "not json").await.unwrap();
        let _: () = raw.hset("a:states", "0000000000000002", "\"waiting\"").await.unwrap();
        let jobs = a.load().await.unwrap();
        assert_eq!(jobs.iter().map(|j| j.id.0).collect::<Vec<_>>(), vec![1], "the unreadable one skipped, not fatal");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_fails_commits_and_its_return_heals_them() {
        let redis = TestRedis::start().await;
        let port = redis.port;
        let s = store(&redis.url(), "p:").await;
        s.commit(vec![StoreOp::Insert(Box::new(conformance::record(1)))]).await.unwrap();
        drop(redis);
        let started = std::time::Instant::now();
        assert!(s.commit(vec![StoreOp::Delete(JobId(1))]).await.is_err());
        assert!(s.ping().await.is_err());
        assert!(started.elapsed() < Duration::from_secs(10), "failures are prompt: {:?}", started.elapsed());
        // Back (empty: this one kept nothing on disk): the same handle works again.
        let _back = TestRedis::on(port).await;
        let mut healed = false;
        for _ in 0..50 {
            if s.commit(vec![StoreOp::Insert(Box::new(conformance::record(2)))]).await.is_ok() {
                healed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(healed, "no reconnection");
        assert_eq!(s.load().await.unwrap().len(), 1);
    }
}
