//! Who leaves the Matrix room leaves the call: the decisions, as a synchronous state machine
//! (changes and answers in, actions out; no I/O, no clock). The shell that feeds it and carries
//! its actions out is [`driver`].
//!
//! Inputs are membership changes in the order the homeserver streamed them (each with its
//! [`Order`], a position in that stream: the appservice's transactions are sent one after the
//! other, so the order they arrive in is the homeserver's), suspicions from polling (a user
//! with seats who did not appear joined), the homeserver's answers to checks, and the end of
//! removals.
//!
//! The rules, for each (room, user):
//! * a departure (leave, kick, ban) or a suspicion starts a **check**: the homeserver is asked
//!   whether the user is joined *now*. Nothing is ever removed on an event alone: events can be
//!   replayed, and a suspicion is a guess;
//! * only "not joined" leads to a **removal** — and only if no change newer than the check's start
//!   has come meanwhile: a join means the answer is stale (nothing is done), a newer departure
//!   means it is checked again;
//! * "joined", or an answer that says nothing (homeserver unreachable, refusing), removes nobody:
//!   the user is looked at again by the next poll (at once, if a poll suspected them while the
//!   check was under way and the homeserver said "joined");
//! * a change that arrives while a removal runs is looked at once it has ended.
//!
//! Only (room, user) pairs with work in flight are remembered: memory is bounded by the work, not
//! by the homeserver's traffic.

pub mod driver;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};

/// A position in the homeserver's stream of membership changes (the shell numbers them as they
/// arrive); polls are given the position they started at.
pub type Order = u64;

/// Why a user is removed: the change that made them leave the room, or `Gone` when polling found
/// them no longer joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Left,
    Kicked,
    Banned,
    Gone,
}

impl Reason {
    pub const ALL: [Reason; 4] = [Reason::Left, Reason::Kicked, Reason::Banned, Reason::Gone];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Left => "left",
            Reason::Kicked => "kicked",
            Reason::Banned => "banned",
            Reason::Gone => "gone",
        }
    }
}

/// A membership change of `user` in `room`: joined, or departed for `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub room: String,
    pub user: String,
    /// `None`: joined.
    pub departed: Option<Reason>,
    pub order: Order,
}

/// What the homeserver answered to a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Joined,
    NotJoined,
    /// Unreachable, refusing, or no way to see the room: nobody is removed on it.
    Unsure,
}

/// Identifies one check or removal, so that a late answer to an older one is told apart.
pub type Ticket = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask the homeserver whether `user` is joined to `room` now, and answer with
    /// [`Follower::checked`].
    Check { room: String, user: String, ticket: Ticket },
    /// Remove `user`'s LiveKit participants of `room`'s call (its seats), and report with
    /// [`Follower::removed`]. `checked_at_ms`: when the check that decided it was made (tokens
    /// issued before it are revoked).
    Remove { room: String, user: String, reason: Reason, ticket: Ticket, checked_at_ms: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `since`: the latest order when the check started.
    Checking {
        ticket: Ticket,
        since: Order,
    },
    Removing {
        ticket: Ticket,
        since: Order,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    /// The latest change seen while work was in flight (0: none).
    latest: Order,
    /// Whether that change was a join.
    joined: bool,
    reason: Reason,
    phase: Phase,
    /// A poll suspected the user while the work was in flight: its answer may predate what the
    /// poll saw (a departure whose change was lost), so it is looked at once more.
    suspected: bool,
}

type Key = (String, String);

/// The decisions of membership following, for every room (see the module's rules).
#[derive(Debug, Default)]
pub struct Follower {
    entries: HashMap<Key, Entry>,
    /// The latest order seen, of any room.
    clock: Order,
    next_ticket: Ticket,
    actions: VecDeque<Action>,
}

impl Follower {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next action to carry out, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// (room, user) pairs with a check or a removal in flight.
    pub fn in_flight(&self) -> usize {
        self.entries.len()
    }

    fn ticket(&mut self) -> Ticket {
        self.next_ticket += 1;
        self.next_ticket
    }

    fn check(&mut self, key: Key, reason: Reason, latest: Order) {
        let ticket = self.ticket();
        let since = self.clock;
        self.actions.push_back(Action::Check { room: key.0.clone(), user: key.1.clone(), ticket });
        let phase = Phase::Checking { ticket, since };
        self.entries.insert(key, Entry { latest, joined: false, reason, phase, suspected: false });
    }

    /// A membership change, in the homeserver's order.
    pub fn changed(&mut self, change: Change) {
        self.clock = self.clock.max(change.order);
        let key = (change.room, change.user);
        match (self.entries.get_mut(&key), change.departed) {
            (Some(entry), _) if change.order <= entry.latest => {} // replayed or older: seen
            (Some(entry), departed) => {
                entry.latest = change.order;
                entry.joined = departed.is_none();
                if let Some(reason) = departed {
                    entry.reason = reason;
                }
            }
            (None, None) => {} // a join with nothing in flight: nothing to do
            (None, Some(reason)) => self.check(key, reason, change.order),
        }
    }

    /// Polling at `order` did not find `user` among `room`'s joined members, though it has seats.
    pub fn suspect(&mut self, room: String, user: String, order: Order) {
        self.clock = self.clock.max(order);
        let key = (room, user);
        match self.entries.get_mut(&key) {
            Some(entry) => entry.suspected = true,
            None => self.check(key, Reason::Gone, 0),
        }
    }

    /// The homeserver's answer to check `ticket`, made at `checked_at_ms`.
    pub fn checked(&mut self, room: String, user: String, ticket: Ticket, answer: Answer, checked_at_ms: u64) {
        let key = (room, user);
        let Some(entry) = self.entries.get(&key) else { return };
        let Phase::Checking { ticket: current, since } = entry.phase else { return };
        if current != ticket {
            return;
        }
        let (latest, joined, reason, suspected) = (entry.latest, entry.joined, entry.reason, entry.suspected);
        if latest > since {
            // A change came while the homeserver was asked: the answer may predate it. After a
            // join, only a poll's suspicion since is worth another look.
            self.entries.remove(&key);
            if !joined || suspected {
                self.check(key, if joined { Reason::Gone } else { reason }, latest);
            }
            return;
        }
        match answer {
            Answer::NotJoined => {
                let ticket = self.ticket();
                let since = self.clock;
                self.actions.push_back(Action::Remove {
                    room: key.0.clone(),
                    user: key.1.clone(),
                    reason,
                    ticket,
                    checked_at_ms,
                });
                if let Some(entry) = self.entries.get_mut(&key) {
                    entry.phase = Phase::Removing { ticket, since };
                }
            }
            Answer::Joined => {
                self.entries.remove(&key);
                if suspected {
                    self.check(key, Reason::Gone, latest);
                }
            }
            // Asked again by the next poll, not at once: the homeserver may be down.
            Answer::Unsure => {
                self.entries.remove(&key);
            }
        }
    }

    /// Removal `ticket` has ended (done, or failed: the next poll looks again either way).
    pub fn removed(&mut self, room: String, user: String, ticket: Ticket) {
        let key = (room, user);
        let Some(entry) = self.entries.get(&key) else { return };
        let Phase::Removing { ticket: current, since } = entry.phase else { return };
        if current != ticket {
            return;
        }
        let (latest, joined, reason, suspected) = (entry.latest, entry.joined, entry.reason, entry.suspected);
        self.entries.remove(&key);
        // A departure that came meanwhile may have followed a rejoin with a new token, which the
        // removal may have missed: looked at again.
        if (latest > since && !joined) || suspected {
            self.check(key, reason, latest);
        }
    }
}
