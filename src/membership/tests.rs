//! The follower against a model homeserver: users join and depart at any moment, their changes
//! reach the follower in the homeserver's order (or are lost), polls run at any moment, checks
//! are made at one moment and answered at a later one (after more changes, or "unsure"), and
//! actions are carried out in any order.
//!
//! Safety: a removal is only ever decided by a check made while the user was not joined, with
//! no join of theirs reaching the follower since that check started. Liveness: once the changes
//! are delivered (or a poll runs) and the homeserver answers, every user who is not joined has
//! been removed after their last departure.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

const ROOM: &str = "!r:hs";
const USERS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// User `u` joins if departed, else departs (left, kicked or banned by `how`).
    Flip(usize, u8),
    /// The next change reaches the follower.
    Deliver,
    /// The next change is lost (a transaction never delivered).
    Lose,
    /// A poll: every user with seats who is not joined now is suspected.
    Poll,
    /// Carry out the `i`-th outstanding action (a check is made now, answered later).
    Execute(usize),
    /// Answer the `i`-th check made (unsure when `unsure`).
    Answer(usize, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..USERS, 0u8..3).prop_map(|(u, h)| Op::Flip(u, h)),
        4 => Just(Op::Deliver),
        1 => Just(Op::Lose),
        1 => Just(Op::Poll),
        4 => (0usize..8).prop_map(Op::Execute),
        4 => ((0usize..8), proptest::bool::weighted(0.2)).prop_map(|(i, u)| Op::Answer(i, u)),
    ]
}

fn user(u: usize) -> String {
    format!("@u{u}:hs")
}

struct World {
    follower: Follower,
    /// The homeserver's truth, and the step of each user's last departure.
    joined: Vec<bool>,
    departed_at: Vec<Option<u64>>,
    pending: VecDeque<Change>,
    order: Order,
    /// The order of the last change delivered: where a poll stands (the shell numbers changes
    /// as they arrive).
    delivered: Order,
    step: u64,
    outstanding: Vec<Action>,
    /// Checks made, not yet answered: (room, user, ticket, joined when made, step made).
    made: Vec<(String, String, Ticket, bool)>,
    /// For each check ticket: when it was emitted, and whether the user was joined when it was
    /// made (`None` until made).
    checks: HashMap<Ticket, (u64, Option<bool>)>,
    /// Steps at which a join of each user reached the follower.
    joins_delivered: Vec<Vec<u64>>,
    /// Steps at which a removal of each user was carried out.
    removals: Vec<Vec<u64>>,
}

impl World {
    fn new() -> World {
        World {
            follower: Follower::new(),
            joined: vec![true; USERS],
            departed_at: vec![None; USERS],
            pending: VecDeque::new(),
            order: 0,
            delivered: 0,
            step: 0,
            outstanding: Vec::new(),
            made: Vec::new(),
            checks: HashMap::new(),
            joins_delivered: vec![Vec::new(); USERS],
            removals: vec![Vec::new(); USERS],
        }
    }

    fn index(u: &str) -> usize {
        u.trim_start_matches("@u").trim_end_matches(":hs").parse().unwrap()
    }

    /// Takes the follower's new actions, checking every removal decided.
    fn collect(&mut self, decided_by: Option<Ticket>) -> Result<(), TestCaseError> {
        while let Some(action) = self.follower.poll_action() {
            match &action {
                Action::Check { ticket, .. } => {
                    self.checks.insert(*ticket, (self.step, None));
                }
                Action::Remove { user, .. } => {
                    let check = decided_by.expect("a removal is decided by a check's answer");
                    let (emitted, joined) = self.checks[&check];
                    prop_assert_eq!(joined, Some(false), "removal decided by a check made while joined");
                    let u = World::index(user);
                    prop_assert!(
                        self.joins_delivered[u].iter().all(|&at| at < emitted),
                        "removal of {} decided though a join reached the follower after its check started",
                        user
                    );
                }
            }
            self.outstanding.push(action);
        }
        Ok(())
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        self.step += 1;
        match op {
            Op::Flip(u, how) => {
                self.order += 1;
                let departed = if self.joined[u] {
                    self.departed_at[u] = Some(self.step);
                    Some([Reason::Left, Reason::Kicked, Reason::Banned][how as usize])
                } else {
                    None
                };
                self.joined[u] = departed.is_none();
                self.pending.push_back(Change { room: ROOM.into(), user: user(u), departed, order: self.order });
            }
            Op::Deliver => {
                if let Some(change) = self.pending.pop_front() {
                    self.delivered = change.order;
                    if change.departed.is_none() {
                        self.joins_delivered[World::index(&change.user)].push(self.step);
                    }
                    self.follower.changed(change);
                    self.collect(None)?;
                }
            }
            Op::Lose => {
                self.pending.pop_front();
            }
            Op::Poll => {
                for u in 0..USERS {
                    if !self.joined[u] {
                        self.follower.suspect(ROOM.into(), user(u), self.delivered);
                    }
                }
                self.collect(None)?;
            }
            Op::Execute(i) => {
                if self.outstanding.is_empty() {
                    return Ok(());
                }
                let action = self.outstanding.remove(i % self.outstanding.len());
                match action {
                    Action::Check { room, user, ticket } => {
                        let joined = self.joined[World::index(&user)];
                        self.checks.get_mut(&ticket).unwrap().1 = Some(joined);
                        self.made.push((room, user, ticket, joined));
                    }
                    Action::Remove { room, user, ticket, .. } => {
                        self.removals[World::index(&user)].push(self.step);
                        self.follower.removed(room, user, ticket);
                        self.collect(None)?;
                    }
                }
            }
            Op::Answer(i, unsure) => {
                if self.made.is_empty() {
                    return Ok(());
                }
                let (room, user, ticket, joined) = self.made.remove(i % self.made.len());
                let answer = match (unsure, joined) {
                    (true, _) => Answer::Unsure,
                    (false, true) => Answer::Joined,
                    (false, false) => Answer::NotJoined,
                };
                self.follower.checked(room, user, ticket, answer, self.step);
                self.collect(Some(ticket))?;
            }
        }
        Ok(())
    }

    /// Every change delivered, a poll, then every action carried out and every check answered
    /// truly, until nothing is left.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        while !self.pending.is_empty() {
            self.apply(Op::Deliver)?;
        }
        self.apply(Op::Poll)?;
        for _ in 0..1_000 {
            if !self.outstanding.is_empty() {
                self.apply(Op::Execute(0))?;
            } else if !self.made.is_empty() {
                self.apply(Op::Answer(0, false))?;
            } else {
                break;
            }
        }
        prop_assert_eq!(self.follower.in_flight(), 0, "work left in flight");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    #[test]
    fn removals_follow_the_homeserver_and_never_a_stale_answer(ops in proptest::collection::vec(op(), 0..80)) {
        let mut w = World::new();
        for op in ops {
            w.apply(op)?;
        }
        w.settle()?;
        for u in 0..USERS {
            if !w.joined[u] {
                let departed = w.departed_at[u].unwrap();
                prop_assert!(
                    w.removals[u].iter().any(|&at| at > departed),
                    "user {u} departed at step {departed} and was never removed after: {:?}", w.removals[u]
                );
            }
        }
    }
}

#[test]
fn a_departure_is_checked_then_removed() {
    let mut f = Follower::new();
    f.changed(Change { room: ROOM.into(), user: user(0), departed: Some(Reason::Kicked), order: 1 });
    let Some(Action::Check { ticket, .. }) = f.poll_action() else { panic!("a check first") };
    assert_eq!(f.poll_action(), None, "nothing removed on the event alone");
    f.checked(ROOM.into(), user(0), ticket, Answer::NotJoined, 1_000);
    let Some(Action::Remove { reason, checked_at_ms, ticket, .. }) = f.poll_action() else { panic!("a removal") };
    assert_eq!((reason, checked_at_ms), (Reason::Kicked, 1_000));
    f.removed(ROOM.into(), user(0), ticket);
    assert_eq!(f.in_flight(), 0);
}

#[test]
fn a_join_during_the_check_makes_its_answer_stale() {
    let mut f = Follower::new();
    f.changed(Change { room: ROOM.into(), user: user(0), departed: Some(Reason::Left), order: 1 });
    let Some(Action::Check { ticket, .. }) = f.poll_action() else { panic!() };
    f.changed(Change { room: ROOM.into(), user: user(0), departed: None, order: 2 });
    f.checked(ROOM.into(), user(0), ticket, Answer::NotJoined, 5);
    assert_eq!(f.poll_action(), None, "the user rejoined meanwhile: nobody removed");
    assert_eq!(f.in_flight(), 0);
    // A replayed departure older than what was seen is a new departure only once forgotten:
    // it is checked, never acted on directly.
    f.changed(Change { room: ROOM.into(), user: user(0), departed: Some(Reason::Left), order: 1 });
    assert!(matches!(f.poll_action(), Some(Action::Check { .. })));
}

#[test]
fn unsure_and_joined_answers_remove_nobody() {
    for answer in [Answer::Unsure, Answer::Joined] {
        let mut f = Follower::new();
        f.suspect(ROOM.into(), user(1), 0);
        let Some(Action::Check { ticket, .. }) = f.poll_action() else { panic!() };
        f.checked(ROOM.into(), user(1), ticket, answer, 5);
        assert_eq!(f.poll_action(), None, "{answer:?}");
        assert_eq!(f.in_flight(), 0);
    }
}
