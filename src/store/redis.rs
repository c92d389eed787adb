//! Redis (or Valkey) as the store, shared by every instance using the same key prefix
//! (`LIVEKIT_REDIS_URL`, `RTC_LEAVE_BRIDGE_REDIS_PREFIX`, so that LiveKit's own Redis can be
//! shared), and the Redis side of [`crate::cluster`]: leases, heartbeats and shard inboxes.
//!
//! Layout, for each shard `S` of [`crate::cluster::SHARDS`]:
//! * `{prefix}shard:S:delegations`, `{prefix}shard:S:states`: hashes from a job id (16 hex
//!   digits) to the JSON of its delegation and of its durable phase;
//! * `{prefix}shard:S:inbox`: a stream of requests for the shard's holder (at most 50 000 not yet
//!   applied; past that, requests for the shard are refused); `…:applied` the id of
//!   the last entry applied (written by the same commit as the entry's effects);
//! * `{prefix}shard:S:lease`: `"<instance> <epoch>"`, expiring unless renewed; `…:epoch` the
//!   counter behind the epochs;
//!
//! and `{prefix}job-shards` (job id → its shard, for changes that name only the job),
//! `{prefix}instances` (a sorted set of live instances, scored by when their heartbeat runs out),
//! `{prefix}seats:{room id}` (a hash of the room's [`Seat`]s, by user, LiveKit room and
//! identity; it expires with the last of them) and `{prefix}seated` (the rooms with seats, scored
//! by when their last seat expires).
//!
//! A commit is one Lua script: Redis runs it atomically, and it checks everything it needs (the
//! operations' shape, and for a fenced commit that every shard touched is still leased to this
//! instance under the epoch it names) before it writes anything, so it applies all of its
//! changes or none. A phase change of a job that no longer exists writes nothing.
//!
//! Durability is Redis's: a commit or an inbox entry is answered once Redis has applied it, which
//! with AOF and `appendfsync always` means once it is on disk (no loss on a crash of Redis or its
//! machine); with `appendfsync everysec`, up to a second of changes can be lost with the machine.
//! Keys are not hash-tagged: a single Redis (or a primary with replicas / Sentinel), not Redis
//! Cluster.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Fence, JobRecord, Seat, Store, StoreError, StoreOp};
use crate::cluster::{EntryId, Inbound, SHARDS, Shard, shard_of};
use crate::delegation::JobId;

/// Applies a commit. `KEYS[1]` = the job → shard index; `ARGV` = prefix, instance (empty for an
/// unfenced commit), fence (`shard:epoch` pairs), then one quadruple per operation: `I`/`S`/`D`/`C`,
/// job id (or inbox entry id), shard (inserts and consumptions; others are looked up), payload.
/// Entries an inbox holds at most (entries are trimmed as they are applied): past it, requests
/// for the shard are refused (503; LiveKit and clients retry) rather than piling up in Redis
/// while no instance applies them.
const INBOX_MAX: usize = 50_000;

/// Appends an entry to an inbox (KEYS[1]) unless it holds ARGV[1] entries already; its id, or
/// false.
const PUSH: &str = r"
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'i', ARGV[2])
";

/// Records a seat: `KEYS[1]` the room's seats, `KEYS[2]` the seated rooms; `ARGV` = field,
/// seat, its expiry (Unix ms), room id. Both keys live as long as the room's last seat.
const ADD_SEAT: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local at = tonumber(ARGV[3])
local last = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[4]) or '0')
if at > last or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('ZADD', KEYS[2], math.max(at, last), ARGV[4])
  redis.call('PEXPIREAT', KEYS[1], math.max(at, last))
end
return 1
";

const COMMIT: &str = r#"
local prefix, me, fence = ARGV[1], ARGV[2], ARGV[3]
local function key(shard, what) return prefix .. 'shard:' .. shard .. ':' .. what end
local epochs = {}
for s, e in string.gmatch(fence, '(%d+):(%d+)') do epochs[s] = e end
-- Everything is checked before anything is written: a script is not rolled back.
local shards, inserted, checked = {}, {}, {}
for i = 4, #ARGV, 4 do
  local op, id, shard, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if op == 'I' then
    if not string.find(payload, '\n', 1, true) then return redis.error_reply('insert without a state') end
    inserted[id] = shard
  elseif op == 'S' or op == 'D' then
    shard = inserted[id] or redis.call('HGET', KEYS[1], id)
  elseif op ~= 'C' then
    return redis.error_reply('unknown operation ' .. tostring(op))
  end
  shards[i] = shard
  if shard and me ~= '' and not checked[shard] then
    local epoch = epochs[shard]
    if not epoch or redis.call('GET', key(shard, 'lease')) ~= me .. ' ' .. epoch then
      return redis.error_reply('FENCED shard ' .. shard .. ' is no longer leased to ' .. me)
    end
    checked[shard] = true
  end
end
local function newer(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
for i = 4, #ARGV, 4 do
  local op, id, payload, shard = ARGV[i], ARGV[i + 1], ARGV[i + 3], shards[i]
  if op == 'I' then
    local sep = string.find(payload, '\n', 1, true)
    redis.call('HSET', key(shard, 'delegations'), id, string.sub(payload, 1, sep - 1))
    redis.call('HSET', key(shard, 'states'), id, string.sub(payload, sep + 1))
    redis.call('HSET', KEYS[1], id, shard)
  elseif op == 'S' then
    if shard and redis.call('HEXISTS', key(shard, 'delegations'), id) == 1 then
      redis.call('HSET', key(shard, 'states'), id, payload)
    end
  elseif op == 'D' then
    if shard then
      redis.call('HDEL', key(shard, 'delegations'), id)
      redis.call('HDEL', key(shard, 'states'), id)
      redis.call('HDEL', KEYS[1], id)
    end
  else
    local applied = redis.call('GET', key(shard, 'applied'))
    if not applied or newer(id, applied) then
      redis.call('SET', key(shard, 'applied'), id)
      redis.call('XTRIM', key(shard, 'inbox'), 'MINID', id)
    end
  end
end
return (#ARGV - 3) / 4
"#;

/// One look at the cluster: heartbeat, renewal of the leases held, who is alive and who holds
/// what. `KEYS[1]` = instances; `ARGV` = instance, heartbeat ms, lease ms, prefix, shard count,
/// then `shard, epoch` pairs held. Returns live instances, 1/0 per pair, holder per shard.
const TICK: &str = r#"
local me, heartbeat, lease, prefix, shards = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + heartbeat, me)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
local renewed = {}
for i = 6, #ARGV, 2 do
  local key = prefix .. 'shard:' .. ARGV[i] .. ':lease'
  if redis.call('GET', key) == me .. ' ' .. ARGV[i + 1] then
    redis.call('PEXPIRE', key, lease)
    renewed[#renewed + 1] = 1
  else
    renewed[#renewed + 1] = 0
  end
end
local holders = {}
for s = 0, shards - 1 do
  holders[#holders + 1] = redis.call('GET', prefix .. 'shard:' .. s .. ':lease') or ''
end
return {live, renewed, holders}
"#;

/// Takes a free shard: `KEYS` = lease, epoch counter; `ARGV` = instance, lease ms. Returns the
/// new epoch, or 0 if the shard is held.
const ACQUIRE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. epoch, 'PX', ARGV[2])
return epoch
"#;

/// Gives a shard up if it is still ours: `KEYS[1]` = lease; `ARGV[1]` = `"<instance> <epoch>"`.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Entries read per `HSCAN` round trip when loading.
const SCAN_BATCH: usize = 1_000;

pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    index: String,
    commit: redis::Script,
    /// [`INBOX_MAX`]; lower in tests.
    inbox_max: usize,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

async fn manager(client: &redis::Client, timeout: Duration) -> Result<ConnectionManager, StoreError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    client.get_connection_manager_with_config(config).await.map_err(|e| StoreError(format!("cannot reach Redis: {e}")))
}

impl RedisStore {
    /// Connects to `url` (`redis://` or `rediss://`, with password and database if any); every
    /// key starts with `prefix`. Fails if Redis cannot be reached now.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError(format!("LIVEKIT_REDIS_URL: {e}")))?;
        let conn = manager(&client, timeout).await?;
        let store = RedisStore {
            client,
            conn,
            prefix: prefix.to_owned(),
            index: format!("{prefix}job-shards"),
            commit: redis::Script::new(COMMIT),
            inbox_max: INBOX_MAX,
        };
        store.upgrade_layout().await?;
        Ok(store)
    }

    fn key(&self, shard: Shard, what: &str) -> String {
        format!("{}shard:{}:{}", self.prefix, shard.0, what)
    }

    /// Moves jobs stored by a version without shards (two hashes, `{prefix}delegations` and
    /// `{prefix}states`) into their shards, once.
    async fn upgrade_layout(&self) -> Result<(), StoreError> {
        let (old_delegations, old_states) = (format!("{}delegations", self.prefix), format!("{}states", self.prefix));
        let mut conn = self.conn.clone();
        let exists: bool = conn.exists(&old_delegations).await.map_err(err)?;
        if !exists {
            return Ok(());
        }
        let records = self.read_jobs(&old_delegations, &old_states).await?;
        let count = records.len();
        for chunk in records.chunks(500) {
            self.commit(chunk.iter().map(|r| StoreOp::Insert(Box::new(r.clone()))).collect()).await?;
        }
        let _: () = redis::pipe().del(&old_delegations).del(&old_states).query_async(&mut conn).await.map_err(err)?;
        tracing::info!(jobs = count, "moved the jobs of the unsharded layout into their shards");
        Ok(())
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

    /// The jobs of a delegations hash and its states hash.
    async fn read_jobs(&self, delegations: &str, states: &str) -> Result<Vec<JobRecord>, StoreError> {
        let delegations = self.scan_hash(delegations).await?;
        let mut states: HashMap<String, String> = self.scan_hash(states).await?.into_iter().collect();
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

    /// The jobs of `shard`, and how far its inbox has been applied.
    pub async fn load_shard(&self, shard: Shard) -> Result<(Vec<JobRecord>, EntryId), StoreError> {
        let jobs = self.read_jobs(&self.key(shard, "delegations"), &self.key(shard, "states")).await?;
        let mut conn = self.conn.clone();
        let applied: Option<String> = conn.get(self.key(shard, "applied")).await.map_err(err)?;
        let applied = applied.map(|a| a.parse::<EntryId>()).transpose().map_err(err)?.unwrap_or_default();
        Ok((jobs, applied))
    }

    async fn run_commit(&self, ops: Vec<StoreOp>, fence: Option<&Fence>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut invocation = self.commit.prepare_invoke();
        invocation.key(&self.index).arg(&self.prefix);
        match fence {
            Some(f) => {
                let pairs: Vec<String> = f.epochs.iter().map(|(s, e)| format!("{}:{e}", s.0)).collect();
                invocation.arg(&f.instance).arg(pairs.join(","));
            }
            None => {
                invocation.arg("").arg("");
            }
        }
        for op in &ops {
            match op {
                StoreOp::Insert(r) => {
                    // serde_json escapes newlines inside strings: the first one separates the two.
                    let delegation = serde_json::to_string(&r.delegation).map_err(err)?;
                    let state = serde_json::to_string(&r.state).map_err(err)?;
                    let shard = shard_of(&r.delegation.livekit_room());
                    invocation.arg("I").arg(r.id.to_string()).arg(shard.0).arg(format!("{delegation}\n{state}"));
                }
                StoreOp::SetState(id, state) => {
                    let state = serde_json::to_string(state).map_err(err)?;
                    invocation.arg("S").arg(id.to_string()).arg("").arg(state);
                }
                StoreOp::Delete(id) => {
                    invocation.arg("D").arg(id.to_string()).arg("").arg("");
                }
                StoreOp::Consumed { shard, entry } => {
                    invocation.arg("C").arg(entry.to_string()).arg(shard.0).arg("");
                }
            }
        }
        let mut conn = self.conn.clone();
        let _: i64 = invocation.invoke_async(&mut conn).await.map_err(err)?;
        Ok(())
    }

    /// Appends `inbound` to its shard's inbox; answered once Redis has it.
    pub async fn push(&self, shard: Shard, inbound: &Inbound) -> Result<EntryId, StoreError> {
        let payload = serde_json::to_string(inbound).map_err(err)?;
        let mut conn = self.conn.clone();
        let id: Option<String> = redis::Script::new(PUSH)
            .key(self.key(shard, "inbox"))
            .arg(self.inbox_max)
            .arg(payload)
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        let id = id.ok_or_else(|| {
            StoreError(format!("the inbox of shard {shard} holds {} entries nobody applied; refused", self.inbox_max))
        })?;
        id.parse().map_err(err)
    }

    /// A handle for the cluster's own round trips, on a connection of its own (so that a slow
    /// commit never delays a renewal) with its own timeout.
    pub async fn coordination(&self, timeout: Duration) -> Result<Coordination, StoreError> {
        Ok(Coordination {
            conn: manager(&self.client, timeout).await?,
            prefix: self.prefix.clone(),
            instances: format!("{}instances", self.prefix),
            tick: redis::Script::new(TICK),
            acquire: redis::Script::new(ACQUIRE),
            release: redis::Script::new(RELEASE),
        })
    }

    /// A reader of inboxes, on a connection of its own: a blocking read holds its connection.
    pub async fn inbox_reader(&self, block: Duration) -> Result<InboxReader, StoreError> {
        Ok(InboxReader {
            conn: manager(&self.client, block + Duration::from_secs(5)).await?,
            prefix: self.prefix.clone(),
            block,
        })
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn load(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut all = Vec::new();
        for shard in Shard::all() {
            all.extend(self.load_shard(shard).await?.0);
        }
        Ok(all)
    }

    async fn commit(&self, ops: Vec<StoreOp>) -> Result<(), StoreError> {
        self.run_commit(ops, None).await
    }

    async fn commit_fenced(&self, ops: Vec<StoreOp>, fence: &Fence) -> Result<(), StoreError> {
        self.run_commit(ops, Some(fence)).await
    }

    async fn latest_in_inbox(&self, shard: Shard) -> Result<Option<EntryId>, StoreError> {
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply =
            conn.xrevrange_count(self.key(shard, "inbox"), "+", "-", 1).await.map_err(err)?;
        reply.ids.first().map(|e| e.id.parse()).transpose().map_err(err)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: () = conn.ping().await.map_err(err)?;
        Ok(())
    }

    async fn add_seat(&self, seat: &Seat) -> Result<(), StoreError> {
        let field = format!("{}\n{}\n{}", seat.user_id, seat.livekit_room, seat.identity);
        let value = serde_json::to_string(seat).map_err(err)?;
        let mut conn = self.conn.clone();
        let _: i64 = redis::Script::new(ADD_SEAT)
            .key(self.seats_key(&seat.room_id))
            .key(format!("{}seated", self.prefix))
            .arg(field)
            .arg(value)
            .arg(seat.expires_at_ms)
            .arg(&seat.room_id)
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn seats(&self, room_id: &str, user: Option<&str>, now_ms: u64) -> Result<Vec<Seat>, StoreError> {
        let mut seats = Vec::new();
        for (field, value) in self.scan_hash(&self.seats_key(room_id)).await? {
            if user.is_some_and(|u| field.split('\n').next() != Some(u)) {
                continue;
            }
            match serde_json::from_str::<Seat>(&value) {
                Ok(seat) if seat.expires_at_ms > now_ms => seats.push(seat),
                Ok(_) => {}
                Err(e) => tracing::error!(room = %room_id, error = %e, "unreadable stored seat skipped"),
            }
        }
        seats.sort_by(|a, b| {
            (&a.user_id, &a.livekit_room, &a.identity).cmp(&(&b.user_id, &b.livekit_room, &b.identity))
        });
        Ok(seats)
    }

    async fn seated_rooms(&self, now_ms: u64) -> Result<Vec<String>, StoreError> {
        let key = format!("{}seated", self.prefix);
        let mut conn = self.conn.clone();
        let _: i64 = conn.zrembyscore(&key, "-inf", now_ms).await.map_err(err)?;
        let mut rooms: Vec<String> = conn.zrange(&key, 0, -1).await.map_err(err)?;
        rooms.sort_unstable();
        Ok(rooms)
    }
}

impl RedisStore {
    fn seats_key(&self, room_id: &str) -> String {
        format!("{}seats:{room_id}", self.prefix)
    }
}

/// What one look at the cluster found.
#[derive(Debug, Clone)]
pub struct Look {
    /// Live instances (including this one).
    pub instances: Vec<String>,
    /// Of the leases held, those renewed; the others are lost.
    pub renewed: BTreeMap<Shard, bool>,
    /// The instance holding each shard, if any.
    pub holders: Vec<Option<String>>,
}

/// The cluster's round trips: heartbeat and renewals, acquisitions, releases.
pub struct Coordination {
    conn: ConnectionManager,
    prefix: String,
    instances: String,
    tick: redis::Script,
    acquire: redis::Script,
    release: redis::Script,
}

impl Coordination {
    fn lease_key(&self, shard: Shard) -> String {
        format!("{}shard:{}:lease", self.prefix, shard.0)
    }

    /// Beats `instance`'s heartbeat (live for `heartbeat`), renews the leases `held` for `lease`,
    /// and reads who is alive and who holds what.
    pub async fn look(
        &self,
        instance: &str,
        heartbeat: Duration,
        lease: Duration,
        held: &BTreeMap<Shard, u64>,
    ) -> Result<Look, StoreError> {
        let mut invocation = self.tick.prepare_invoke();
        invocation
            .key(&self.instances)
            .arg(instance)
            .arg(heartbeat.as_millis() as u64)
            .arg(lease.as_millis() as u64)
            .arg(&self.prefix)
            .arg(SHARDS);
        for (shard, epoch) in held {
            invocation.arg(shard.0).arg(*epoch);
        }
        let mut conn = self.conn.clone();
        let (instances, renewed, holders): (Vec<String>, Vec<i64>, Vec<String>) =
            invocation.invoke_async(&mut conn).await.map_err(err)?;
        let renewed = held.keys().copied().zip(renewed.into_iter().map(|r| r == 1)).collect();
        let holders = holders
            .into_iter()
            .map(|h| h.rsplit_once(' ').map(|(name, _)| name.to_owned()).filter(|n| !n.is_empty()))
            .collect();
        Ok(Look { instances, renewed, holders })
    }

    /// Takes `shard` if it is free: its new epoch, or `None` if another instance holds it.
    pub async fn acquire(&self, shard: Shard, instance: &str, lease: Duration) -> Result<Option<u64>, StoreError> {
        let mut conn = self.conn.clone();
        let epoch: u64 = self
            .acquire
            .key(self.lease_key(shard))
            .key(format!("{}shard:{}:epoch", self.prefix, shard.0))
            .arg(instance)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        Ok((epoch > 0).then_some(epoch))
    }

    /// Gives `shard` up, if it is still held under `epoch`.
    pub async fn release(&self, shard: Shard, instance: &str, epoch: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .release
            .key(self.lease_key(shard))
            .arg(format!("{instance} {epoch}"))
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Removes `instance` from the live ones (a graceful stop).
    pub async fn leave(&self, instance: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.zrem(&self.instances, instance).await.map_err(err)?;
        Ok(())
    }
}

/// Reads shard inboxes, blocking until something arrives or the block time is up.
pub struct InboxReader {
    conn: ConnectionManager,
    prefix: String,
    block: Duration,
}

impl InboxReader {
    /// Entries after `from` of each listed shard, in order per shard, at most `count` per shard.
    pub async fn read(
        &mut self,
        from: &BTreeMap<Shard, EntryId>,
        count: usize,
    ) -> Result<Vec<(Shard, EntryId, Inbound)>, StoreError> {
        if from.is_empty() {
            tokio::time::sleep(self.block).await;
            return Ok(Vec::new());
        }
        let keys: Vec<String> = from.keys().map(|s| format!("{}shard:{}:inbox", self.prefix, s.0)).collect();
        let ids: Vec<String> = from.values().map(EntryId::to_string).collect();
        let options = redis::streams::StreamReadOptions::default().count(count).block(self.block.as_millis() as usize);
        let reply: Option<redis::streams::StreamReadReply> =
            self.conn.xread_options(&keys, &ids, &options).await.map_err(err)?;
        let mut entries = Vec::new();
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            let Some(shard) = keys.iter().position(|k| *k == stream.key).and_then(|i| from.keys().nth(i)) else {
                continue;
            };
            for entry in stream.ids {
                let Ok(id) = entry.id.parse::<EntryId>() else {
                    tracing::error!(shard = %shard, entry = %entry.id, "inbox entry with an unreadable id skipped");
                    continue;
                };
                let inbound = entry
                    .get::<String>("i")
                    .ok_or_else(|| "no payload".to_owned())
                    .and_then(|text| serde_json::from_str::<Inbound>(&text).map_err(|e| e.to_string()))
                    .unwrap_or_else(|e| {
                        tracing::error!(shard = %shard, entry = %id, error = %e, "unreadable inbox entry; consumed without effect");
                        Inbound::Unreadable
                    });
                entries.push((*shard, id, inbound));
            }
        }
        Ok(entries)
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

    /// The shard of [`conformance::record`] `n`.
    fn shard_of_record(n: u64) -> Shard {
        shard_of(&conformance::record(n).delegation.livekit_room())
    }

    fn fence(instance: &str, shard: Shard, epoch: u64) -> Fence {
        Fence { instance: instance.into(), epochs: vec![(shard, epoch)] }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fenced_commit_is_refused_whole_once_another_instance_holds_a_shard_it_touches() {
        let redis = TestRedis::start().await;
        let s = store(&redis.url(), "p:").await;
        let c = s.coordination(Duration::from_secs(2)).await.unwrap();
        let lease = Duration::from_secs(30);
        let shard = shard_of_record(1);
        let a = c.acquire(shard, "a", lease).await.unwrap().expect("free");
        assert_eq!(c.acquire(shard, "b", lease).await.unwrap(), None, "held by a");
        s.commit_fenced(vec![StoreOp::Insert(Box::new(conformance::record(1)))], &fence("a", shard, a)).await.unwrap();
        // a's lease runs out (here: is released) and b takes the shard: a's epoch is stale.
        c.release(shard, "a", a).await.unwrap();
        let b = c.acquire(shard, "b", lease).await.unwrap().expect("free again");
        assert!(b > a, "epochs grow");
        let stale = s
            .commit_fenced(
                vec![
                    StoreOp::SetState(
                        JobId(1),
                        crate::lifecycle::Durable::Sending {
                            trigger: crate::lifecycle::Trigger::Departed,
                            returned: vec![],
                        },
                    ),
                    StoreOp::Delete(JobId(1)),
                ],
                &fence("a", shard, a),
            )
            .await;
        assert!(stale.unwrap_err().0.contains("FENCED"), "refused");
        assert_eq!(s.load().await.unwrap(), vec![conformance::record(1)], "nothing written");
        // Not even under a's name with b's epoch, nor by a commit that names no epoch for it.
        assert!(s.commit_fenced(vec![StoreOp::Delete(JobId(1))], &fence("a", shard, b)).await.is_err());
        let other = Shard((shard.0 + 1) % crate::cluster::SHARDS);
        assert!(s.commit_fenced(vec![StoreOp::Delete(JobId(1))], &fence("b", other, b)).await.is_err());
        s.commit_fenced(vec![StoreOp::Delete(JobId(1))], &fence("b", shard, b)).await.unwrap();
        assert!(s.load().await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_inbox_refuses_entries_until_some_are_applied() {
        let redis = TestRedis::start().await;
        let mut s = store(&redis.url(), "p:").await;
        s.inbox_max = 3;
        let shard = shard_of_record(1);
        let mut ids = Vec::new();
        for n in 1..=3 {
            ids.push(s.push(shard, &Inbound::Delegation(conformance::record(n).delegation)).await.unwrap());
        }
        let refused = s.push(shard, &Inbound::Delegation(conformance::record(4).delegation)).await;
        assert!(refused.unwrap_err().0.contains("refused"));
        // Applied (and so trimmed): room again.
        let c = s.coordination(Duration::from_secs(2)).await.unwrap();
        let epoch = c.acquire(shard, "a", Duration::from_secs(30)).await.unwrap().unwrap();
        s.commit_fenced(vec![StoreOp::Consumed { shard, entry: ids[2] }], &fence("a", shard, epoch)).await.unwrap();
        s.push(shard, &Inbound::Delegation(conformance::record(4).delegation)).await.unwrap();
    }

    #[tokio::test]
    async fn inbox_entries_are_read_in_order_and_their_consumption_commits_with_their_effects() {
        let redis = TestRedis::start().await;
        let s = store(&redis.url(), "p:").await;
        let shard = shard_of_record(1);
        assert_eq!(s.latest_in_inbox(shard).await.unwrap(), None, "an empty inbox");
        let mut ids = Vec::new();
        for n in 1..=3 {
            ids.push(s.push(shard, &Inbound::Delegation(conformance::record(n).delegation)).await.unwrap());
            assert_eq!(s.latest_in_inbox(shard).await.unwrap(), ids.last().copied(), "the latest entry");
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        let mut reader = s.inbox_reader(Duration::from_millis(100)).await.unwrap();
        let from = BTreeMap::from([(shard, EntryId::default())]);
        let read = reader.read(&from, 2).await.unwrap();
        assert_eq!(read.iter().map(|(_, id, _)| *id).collect::<Vec<_>>(), ids[..2], "in order, at most 2");
        assert!(matches!(&read[0].2, Inbound::Delegation(d) if *d == conformance::record(1).delegation));
        // Applied up to the second: the job and the position in one commit.
        let c = s.coordination(Duration::from_secs(2)).await.unwrap();
        let epoch = c.acquire(shard, "a", Duration::from_secs(30)).await.unwrap().unwrap();
        let ops = vec![StoreOp::Insert(Box::new(conformance::record(1))), StoreOp::Consumed { shard, entry: ids[1] }];
        s.commit_fenced(ops, &fence("a", shard, epoch)).await.unwrap();
        let (jobs, applied) = s.load_shard(shard).await.unwrap();
        assert_eq!((jobs.len(), applied), (1, ids[1]));
        // An older position never moves it back; the stream keeps only what is not applied yet
        // (and the last applied entry).
        s.commit_fenced(vec![StoreOp::Consumed { shard, entry: ids[0] }], &fence("a", shard, epoch)).await.unwrap();
        assert_eq!(s.load_shard(shard).await.unwrap().1, ids[1]);
        let rest = reader.read(&BTreeMap::from([(shard, applied)]), 10).await.unwrap();
        assert_eq!(rest.iter().map(|(_, id, _)| *id).collect::<Vec<_>>(), ids[2..]);
        let mut raw = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let len: usize = raw.xlen(format!("p:shard:{}:inbox", shard.0)).await.unwrap();
        assert_eq!(len, 2);
        assert_eq!(s.latest_in_inbox(shard).await.unwrap(), Some(ids[2]), "still the latest once some are applied");
        // Nothing there: the read waits its block time and returns nothing.
        let started = std::time::Instant::now();
        assert!(reader.read(&BTreeMap::from([(shard, ids[2])]), 10).await.unwrap().is_empty());
        assert!(started.elapsed() >= Duration::from_millis(90));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_look_beats_the_heartbeat_renews_what_is_held_and_shows_every_holder() {
        let redis = TestRedis::start().await;
        let s = store(&redis.url(), "p:").await;
        let c = s.coordination(Duration::from_secs(2)).await.unwrap();
        let lease = Duration::from_millis(400);
        let epoch = c.acquire(Shard(5), "a", lease).await.unwrap().unwrap();
        c.acquire(Shard(9), "b-with space", lease).await.unwrap().unwrap();
        let held = BTreeMap::from([(Shard(5), epoch), (Shard(6), 1)]);
        let look = c.look("a", Duration::from_secs(1), lease, &held).await.unwrap();
        assert_eq!(look.instances, vec!["a".to_owned()]);
        assert_eq!(look.renewed, BTreeMap::from([(Shard(5), true), (Shard(6), false)]));
        assert_eq!(look.holders[5].as_deref(), Some("a"));
        assert_eq!(look.holders[9].as_deref(), Some("b-with space"));
        assert_eq!(look.holders.iter().flatten().count(), 2);
        // Renewed leases outlive their first term; unrenewed ones and stale heartbeats run out.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.look("a", Duration::from_secs(1), lease, &BTreeMap::from([(Shard(5), epoch)])).await.unwrap();
        }
        let look = c.look("z", Duration::from_secs(1), lease, &BTreeMap::new()).await.unwrap();
        assert_eq!(look.holders[5].as_deref(), Some("a"), "renewed");
        assert_eq!(look.holders[9], None, "ran out");
        assert_eq!(look.instances, vec!["a".to_owned(), "z".to_owned()]);
        c.leave("a").await.unwrap();
        let look = c.look("z", Duration::from_secs(1), lease, &BTreeMap::new()).await.unwrap();
        assert_eq!(look.instances, vec!["z".to_owned()], "left");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_of_the_unsharded_layout_are_moved_into_their_shards() {
        let redis = TestRedis::start().await;
        let mut raw = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        for n in 1..=3 {
            let r = conformance::record(n);
            let _: () = raw
                .hset("p:delegations", r.id.to_string(), serde_json::to_string(&r.delegation).unwrap())
                .await
                .unwrap();
            let _: () = raw.hset("p:states", r.id.to_string(), serde_json::to_string(&r.state).unwrap()).await.unwrap();
        }
        let s = store(&redis.url(), "p:").await;
        let mut jobs = s.load().await.unwrap();
        jobs.sort_by_key(|j| j.id);
        assert_eq!(jobs, (1..=3).map(conformance::record).collect::<Vec<_>>());
        let (jobs, _) = s.load_shard(shard_of_record(2)).await.unwrap();
        assert_eq!(jobs, vec![conformance::record(2)]);
        let old: bool = raw.exists("p:delegations").await.unwrap();
        assert!(!old, "the old hashes are gone");
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
