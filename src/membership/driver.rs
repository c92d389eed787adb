//! The shell of membership following: one task that numbers the membership changes the
//! appservice's transactions bring, in the order they come, feeds them to the [`Follower`] with
//! the answers of the work it spawned, and carries out its actions:
//!
//! * a **check** looks up the user's seats in this room (nothing to do without one, and no
//!   homeserver request) and asks the homeserver whether the user is joined now — as the user
//!   (the appservice acts as its homeserver's users), through the membership bot, or through
//!   the joined-member list of a seated local user of the room;
//! * a **removal** disconnects every seat of the user in the room through RoomService
//!   (`RemoveParticipant`, tokens issued before the check revoked where LiveKit supports it).
//!   LiveKit then reports the participant gone, and a delegated leave is sent as for any
//!   departure;
//! * a **poll**, every `RTC_LEAVE_BRIDGE_MEMBERSHIP_POLL_INTERVAL` and whenever a transaction
//!   could not be read, lists the joined members of every room with seats and suspects the
//!   seated users missing from it: the backstop for lost transactions, for OpenID mode with a
//!   bot, and for a token used after its user left;
//! * a participant connecting under an identity removed here before (its seat not expired: an
//!   old token that LiveKit did not revoke, or a user let back in) is suspected at once.
//!
//! With `RTC_LEAVE_BRIDGE_CLOSE_ABANDONED_ROOMS`, a poll that finds the homeserver gone from a
//! room (the appservice sees none of its users in it, and every seated local user confirms it
//! as themselves) closes the room's LiveKit rooms (`DeleteRoom`).
//!
//! With several instances, only the seats whose LiveKit room's shard this instance holds are
//! acted on: each removal is made once, by the shard's holder.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use super::{Action, Answer, Change, Follower, Order, Reason, Ticket};
use crate::cluster::shard_of;
use crate::delegation::now_unix_ms;
use crate::homeserver::membership::{MembershipError, RoomView, Seen, Views};
use crate::livekit::room_service::RoomService;
use crate::metrics::{MembershipCheckLabels, Metrics, ReasonLabel};
use crate::ports::{CallGate, DelayedAction};
use crate::store::{Seat, Store};

/// Checks and removals under way at most.
const CONCURRENCY: usize = 32;

/// A membership change as a transaction shows it (numbered here, in arrival order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub room: String,
    pub user: String,
    /// `None`: joined.
    pub departed: Option<Reason>,
}

enum Input {
    Observed(Vec<Observed>),
    PollNow,
    Connected { livekit_room: String, identity: String },
}

enum Report {
    Checked {
        room: String,
        user: String,
        ticket: Ticket,
        answer: Answer,
        at_ms: u64,
    },
    /// With the seats it tried to disconnect.
    Removed {
        room: String,
        user: String,
        ticket: Ticket,
        seats: Vec<Seat>,
    },
    Polled {
        order: Order,
        suspects: Vec<(String, String)>,
    },
}

/// Where the appservice's transactions hand their membership changes.
#[derive(Clone)]
pub struct Following {
    tx: mpsc::Sender<Input>,
}

impl Following {
    /// The membership changes of one transaction, in its order. Returns once they are taken, so
    /// that the next transaction's come after them.
    pub async fn observed(&self, changes: Vec<Observed>) {
        if !changes.is_empty() {
            let _ = self.tx.send(Input::Observed(changes)).await;
        }
    }

    /// Changes may have been missed: every room with seats is looked at now.
    pub async fn poll_now(&self) {
        let _ = self.tx.send(Input::PollNow).await;
    }

    /// LiveKit reports `identity` connected in `livekit_room` (never waits: when following is
    /// busy, the next poll looks instead).
    pub fn connected(&self, livekit_room: &str, identity: &str) {
        let connected = Input::Connected { livekit_room: livekit_room.to_owned(), identity: identity.to_owned() };
        let _ = self.tx.try_send(connected);
    }
}

/// What the follower's actions need.
pub struct Ports {
    pub store: Arc<dyn Store>,
    pub views: Arc<Views>,
    pub room_service: RoomService,
    pub gate: Arc<dyn CallGate>,
    pub metrics: Arc<Metrics>,
    /// Close (`DeleteRoom`) the LiveKit rooms of a Matrix room the homeserver has left.
    pub close_abandoned: bool,
}

impl Ports {
    /// `room`'s seats (of `user`, or everyone's) that this instance acts on.
    async fn seats(&self, room: &str, user: Option<&str>) -> Result<Vec<Seat>, ()> {
        match self.store.seats(room, user, now_unix_ms()).await {
            Ok(seats) => Ok(seats
                .into_iter()
                .filter(|s| self.gate.may_call(shard_of(&s.livekit_room), DelayedAction::Send))
                .collect()),
            Err(e) => {
                warn!(room, error = %e, "cannot read seats; membership looked at again by the next poll");
                Err(())
            }
        }
    }

    fn counted(&self, via: &'static str, outcome: &'static str) {
        self.metrics.membership_checks.get_or_create(&MembershipCheckLabels { purpose: "call", via, outcome }).inc();
    }

    /// Whether `user` is joined to `room` now, if anyone can tell.
    async fn check(&self, room: &str, user: &str) -> Answer {
        let Ok(seats) = self.seats(room, Some(user)).await else { return Answer::Unsure };
        if seats.is_empty() {
            return Answer::Unsure; // nothing of theirs to remove here
        }
        if let Some(view) = self.views.of(user) {
            match self.views.ask(&view, room, user).await {
                Ok(Seen::Joined) => {
                    self.counted(view.via, "joined");
                    return Answer::Joined;
                }
                Ok(Seen::Not(membership)) => {
                    self.counted(view.via, "not_joined");
                    debug!(room, user, membership, via = view.via, "seated user no longer joined to the room");
                    return Answer::NotJoined;
                }
                Ok(Seen::Hidden) => {} // the bot is not in the room: perhaps a local member sees it
                Err(e) => {
                    self.counted(view.via, "failed");
                    match e {
                        MembershipError::Refused(_) => {
                            tracing::error!(room, user, via = view.via, error = %e, "the homeserver refused a membership check")
                        }
                        MembershipError::Unavailable(_) => {
                            warn!(room, user, via = view.via, error = %e, "cannot check room membership; nobody removed")
                        }
                    }
                    return Answer::Unsure;
                }
            }
        }
        // Through the list of the room's joined members, if the appservice or the bot sees it.
        match self.views.room(room).await {
            Ok(RoomView::Members(joined)) if joined.contains(user) => Answer::Joined,
            Ok(RoomView::Members(_)) => Answer::NotJoined,
            Ok(RoomView::NoLocalMember | RoomView::Unseen) => {
                self.counted("none", "unchecked");
                Answer::Unsure
            }
            Err(e) => {
                warn!(room, user, error = %e, "cannot list the room's members; nobody removed");
                Answer::Unsure
            }
        }
    }

    /// Disconnects every seat of `user` in `room`; tokens issued before `checked_at_ms` revoked.
    /// Returns the seats.
    async fn remove(&self, room: &str, user: &str, reason: Reason, checked_at_ms: u64) -> Vec<Seat> {
        let Ok(seats) = self.seats(room, Some(user)).await else { return Vec::new() };
        for seat in &seats {
            let revoke_before = (checked_at_ms / 1_000) as i64;
            match self.room_service.remove_participant(&seat.livekit_room, &seat.identity, revoke_before).await {
                Ok(true) => {
                    info!(room, user, livekit_room = %seat.livekit_room, identity = %seat.identity, reason = reason.as_str(),
                        "removed from the call: no longer joined to the Matrix room");
                    self.metrics.membership_removals.get_or_create(&ReasonLabel { reason: reason.as_str() }).inc();
                }
                Ok(false) => {
                    debug!(room, user, livekit_room = %seat.livekit_room, identity = %seat.identity, "seat not connected")
                }
                Err(e) => {
                    warn!(room, user, livekit_room = %seat.livekit_room, identity = %seat.identity, error = %e,
                        "cannot remove a participant who left the Matrix room; the next poll tries again")
                }
            }
        }
        seats
    }

    /// The seated users of every room with seats here who are not among its joined members.
    async fn poll(&self) -> Vec<(String, String)> {
        let rooms = match self.store.seated_rooms(now_unix_ms()).await {
            Ok(rooms) => rooms,
            Err(e) => {
                warn!(error = %e, "cannot list the rooms with seats; polled again later");
                return Vec::new();
            }
        };
        let mut suspects = Vec::new();
        let mut abandoned = Vec::new();
        for room in rooms {
            let Ok(seats) = self.seats(&room, None).await else { continue };
            let users: BTreeSet<&str> = seats.iter().map(|s| s.user_id.as_str()).collect();
            if users.is_empty() {
                continue;
            }
            let locals: Vec<&str> = users.iter().copied().filter(|u| self.views.is_local(u)).collect();
            let missing: Vec<&str> = match self.views.room(&room).await {
                Ok(RoomView::Members(joined)) => users.into_iter().filter(|u| !joined.contains(*u)).collect(),
                // The homeserver has no user left in the room: its seated users are checked as
                // themselves, and the LiveKit rooms closed once they all confirm it (if asked).
                Ok(RoomView::NoLocalMember) => {
                    if self.close_abandoned && !locals.is_empty() {
                        abandoned.push((room.clone(), seats.clone()));
                    }
                    locals
                }
                // Nobody here sees the room (or it could not be asked): its local users can still
                // be asked as themselves.
                Ok(RoomView::Unseen) | Err(_) => locals,
            };
            suspects.extend(missing.into_iter().map(|u| (room.clone(), u.to_owned())));
        }
        for (room, seats) in abandoned {
            self.close_if_abandoned(&room, &seats).await;
        }
        suspects
    }

    /// Closes `room`'s LiveKit rooms (of `seats`) if every seated local user confirms, as
    /// themselves, that they are no longer joined: with the appservice seeing none of its users
    /// in the room, two independent signals that the homeserver has left it.
    async fn close_if_abandoned(&self, room: &str, seats: &[Seat]) {
        let locals: BTreeSet<&str> =
            seats.iter().map(|s| s.user_id.as_str()).filter(|u| self.views.is_local(u)).collect();
        for user in &locals {
            let Some(view) = self.views.of(user) else { return };
            if !matches!(self.views.ask(&view, room, user).await, Ok(Seen::Not(_))) {
                return; // still joined, or cannot be told: the room stays
            }
        }
        let livekit_rooms: BTreeSet<&str> = seats.iter().map(|s| s.livekit_room.as_str()).collect();
        for livekit_room in livekit_rooms {
            match self.room_service.delete_room(livekit_room).await {
                Ok(closed) => {
                    if closed {
                        self.metrics.membership_rooms_closed.inc();
                    }
                    info!(room, livekit_room, closed, "the homeserver has left the room: its LiveKit room is closed");
                }
                Err(e) => {
                    warn!(room, livekit_room, error = %e, "cannot close the LiveKit room of an abandoned room; tried again at the next poll")
                }
            }
        }
    }
}

/// Starts following; `poll_interval` apart, every room with seats is polled.
pub fn start(poll_interval: Duration, ports: Ports) -> (Following, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(run(poll_interval, Arc::new(ports), rx));
    (Following { tx }, task)
}

async fn run(poll_interval: Duration, ports: Arc<Ports>, mut inputs: mpsc::Receiver<Input>) {
    let mut follower = Follower::new();
    let mut order: Order = 0;
    let (report, mut reports) = mpsc::unbounded_channel::<Report>();
    let limit = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tick = tokio::time::interval(poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: nothing has seats yet at start
    let mut polling = false;
    // Seats removed here, until their token expires: (LiveKit room, identity) → (room, user, expiry).
    let mut removed: HashMap<(String, String), (String, String, u64)> = HashMap::new();
    loop {
        let poll = tokio::select! {
            input = inputs.recv() => match input {
                None => return,
                Some(Input::Observed(changes)) => {
                    for o in changes {
                        order += 1;
                        count_change(&ports.metrics, o.departed);
                        follower.changed(Change { room: o.room, user: o.user, departed: o.departed, order });
                    }
                    false
                }
                Some(Input::PollNow) => true,
                Some(Input::Connected { livekit_room, identity }) => {
                    let back = removed.get(&(livekit_room, identity)).filter(|(.., until)| *until > now_unix_ms());
                    if let Some((room, user, _)) = back {
                        debug!(room = %room, user = %user, "a participant removed before connected again; checked");
                        follower.suspect(room.clone(), user.clone(), order);
                    }
                    false
                }
            },
            _ = tick.tick() => true,
            Some(r) = reports.recv() => {
                match r {
                    Report::Checked { room, user, ticket, answer, at_ms } => follower.checked(room, user, ticket, answer, at_ms),
                    Report::Removed { room, user, ticket, seats } => {
                        for seat in seats {
                            removed.insert(
                                (seat.livekit_room, seat.identity),
                                (room.clone(), user.clone(), seat.expires_at_ms),
                            );
                        }
                        follower.removed(room, user, ticket);
                    }
                    Report::Polled { order, suspects } => {
                        polling = false;
                        for (room, user) in suspects {
                            follower.suspect(room, user, order);
                        }
                    }
                }
                false
            }
        };
        if poll && !polling {
            polling = true;
            let now = now_unix_ms();
            removed.retain(|_, (.., until)| *until > now);
            let (ports, report, at) = (ports.clone(), report.clone(), order);
            tokio::spawn(async move {
                let suspects = ports.poll().await;
                let _ = report.send(Report::Polled { order: at, suspects });
            });
        }
        while let Some(action) = follower.poll_action() {
            let (ports, report, limit) = (ports.clone(), report.clone(), limit.clone());
            tokio::spawn(async move {
                let _permit = limit.acquire_owned().await;
                let done = match action {
                    Action::Check { room, user, ticket } => {
                        let at_ms = now_unix_ms();
                        let answer = ports.check(&room, &user).await;
                        Report::Checked { room, user, ticket, answer, at_ms }
                    }
                    Action::Remove { room, user, reason, ticket, checked_at_ms } => {
                        let seats = ports.remove(&room, &user, reason, checked_at_ms).await;
                        Report::Removed { room, user, ticket, seats }
                    }
                };
                let _ = report.send(done);
            });
        }
    }
}

fn count_change(metrics: &Metrics, departed: Option<Reason>) {
    let change = departed.map_or("joined", Reason::as_str);
    metrics.membership_changes.get_or_create(&crate::metrics::ChangeLabel { change }).inc();
}
