//! Several instances sharing one Redis: which instance drives which jobs, and how work reaches it.
//!
//! Jobs are split into [`SHARDS`] shards by their LiveKit room ([`shard_of`]), so a room's
//! members, its webhooks and its listings all belong to one shard. Each shard is driven by exactly
//! one instance at a time, the holder of its lease (a Redis key naming the instance and an epoch
//! that grows with every acquisition). Requests reach any instance: it appends them to the
//! shard's inbox (a Redis stream) and answers once Redis has them; the shard's holder applies
//! the inbox in order and stores, in the same atomic commit as their effects, how far it got —
//! so every entry takes effect exactly once, whoever holds the shard when. A request is answered
//! before its holder has it: a send waits until a look at its shard's inbox shows no newer
//! delegation of its member left to take in (the registry's held sends).
//!
//! Layout: [`balancer`] (which shards this instance should take or give up: a pure function of
//! what Redis says), [`leases`] (what this instance holds and until when; the gate every
//! homeserver call passes), [`intake`] (where the HTTP handlers send requests), [`driver`] (the loop that renews, acquires, releases, loads shards
//! into the engine and feeds it their inboxes). The Redis side of all this is
//! [`crate::store::redis`].

pub mod balancer;
pub mod driver;
pub mod intake;
pub mod leases;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::delegation::Delegation;
use crate::livekit::SfuEvent;

/// How many shards jobs are split into. Fixed: it is part of the stored layout.
pub const SHARDS: u16 = 64;

/// One of the [`SHARDS`] shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Shard(pub u16);

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Shard {
    pub fn all() -> impl Iterator<Item = Shard> {
        (0..SHARDS).map(Shard)
    }
}

/// The shard of a LiveKit room: FNV-1a (64 bits) of its name, modulo [`SHARDS`]. Every instance
/// and every version must agree on it: it decides where jobs are stored.
pub fn shard_of(livekit_room: &str) -> Shard {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in livekit_room.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Shard((hash % u64::from(SHARDS)) as u16)
}

/// The id of an inbox entry (a Redis stream id, `milliseconds-sequence`): entries of a shard are
/// applied in this order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl std::str::FromStr for EntryId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s.split_once('-').ok_or_else(|| format!("{s:?} is not a stream id"))?;
        Ok(EntryId {
            ms: ms.parse().map_err(|_| format!("{s:?} is not a stream id"))?,
            seq: seq.parse().map_err(|_| format!("{s:?} is not a stream id"))?,
        })
    }
}

/// What an inbox entry asks the shard's holder to apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Inbound {
    /// A validated delegation (authenticated by the instance that received it).
    Delegation(Delegation),
    /// A verified webhook.
    Webhook(SfuEvent),
    /// An entry that could not be read (logged where it was read): consumed without effect, so
    /// that it cannot block its shard.
    Unreadable,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        // Part of the stored layout: these must never change.
        assert_eq!(shard_of(""), Shard((0xcbf2_9ce4_8422_2325u64 % 64) as u16));
        assert_eq!(shard_of("a"), Shard(12), "FNV-1a(\"a\") = 0xaf63dc4c8601ec8c");
        let mut counts = [0u32; SHARDS as usize];
        for i in 0..64_000 {
            counts[shard_of(&format!("!room{i}:example.org")).0 as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 800 && *max < 1_200, "uneven: {min}..{max}");
    }

    #[test]
    fn entry_ids_order_like_redis() {
        let a: EntryId = "1700000000000-5".parse().unwrap();
        let b: EntryId = "1700000000000-12".parse().unwrap();
        let c: EntryId = "1700000000001-0".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-12");
        assert!("12".parse::<EntryId>().is_err());
    }

    #[test]
    fn shards_show_as_their_number() {
        // As logs and errors name them, and operators find them in Redis keys.
        assert_eq!(Shard(7).to_string(), "7");
        assert_eq!(format!("shard {}", Shard(63)), "shard 63");
    }
}
