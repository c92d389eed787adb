//! Who may get a LiveKit token, or hand over a delayed leave, for a Matrix room: a user joined to
//! it, checked with a homeserver whenever the bridge can see the room.
//!
//! * Users of the appservice's homeserver are checked as themselves (the appservice acts as any
//!   user of its namespace): always decisive.
//! * Users of other homeservers, in appservice mode, in the list of the room's joined members as
//!   the appservice sees it (any room one of its users is in).
//! * Other users (everyone, in OpenID mode) through the membership bot, if one is configured,
//!   in rooms the bot is in. A remote user's join may reach this side a moment after the user's
//!   own homeserver has it: a "not joined" seen from here is asked again twice within 1.5 s
//!   before it is believed.
//! * Otherwise the room cannot be seen: the request goes on unchecked (counted, and said at
//!   start), as lk-jwt-service does.
//!
//! A user found not joined gets `403 M_FORBIDDEN` before anything else happens (no LiveKit room
//! is opened, nothing stored). A check that cannot be made now (homeserver unreachable, or
//! refusing the appservice or the bot) gets `503`: a token is never issued on a guess.

use std::time::Duration;

use axum::http::StatusCode;
use tracing::{debug, error, info, warn};

use super::{AppState, MatrixError};
use crate::homeserver::membership::{MembershipError, RoomView, Seen};
use crate::metrics::MembershipCheckLabels;

/// Waits before asking again about a remote user the bot does not see joined yet.
const CATCH_UP: [Duration; 2] = [Duration::from_millis(500), Duration::from_secs(1)];

/// `403 M_FORBIDDEN`: the user is not joined to the room.
fn not_joined() -> MatrixError {
    MatrixError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "you are not joined to this room")
}

/// `503`: the check cannot be made now.
fn cannot_check() -> MatrixError {
    MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "cannot check room membership now")
}

fn count(state: &AppState, via: &'static str, outcome: &'static str) {
    state.metrics.membership_checks.get_or_create(&MembershipCheckLabels { purpose: "token", via, outcome }).inc();
}

/// `Ok` if `user` may have a token (or a delegation) for `room`: joined, or not checkable.
pub async fn require_joined(
    state: &AppState,
    endpoint: &'static str,
    user: &ruma::UserId,
    room: &str,
) -> Result<(), MatrixError> {
    // A user of another homeserver: the appservice sees every room its users are in, with
    // everyone joined to it.
    if let Some(server) = state.views.appservice_server().filter(|s| *s != user.server_name().as_str()) {
        if let Some(result) = through_the_room(state, endpoint, server, user, room).await? {
            return result;
        }
    }
    let Some(view) = state.views.of(user.as_str()) else {
        count(state, "none", "unchecked");
        return Ok(());
    };
    let (via, server) = (view.via, view.server);
    let _slot = super::member::check_slot(state, endpoint, server).await?;
    // Only another homeserver's view can lag behind the user's own.
    let mut waits = CATCH_UP.iter().filter(|_| user.server_name().as_str() != server);
    let seen = loop {
        let seen = state.views.ask(&view, room, user.as_str()).await;
        if let (Ok(Seen::Not(_)), Some(wait)) = (&seen, waits.next()) {
            tokio::time::sleep(*wait).await;
            continue;
        }
        break seen;
    };
    match seen {
        Ok(Seen::Joined) => {
            count(state, via, "joined");
            Ok(())
        }
        Ok(Seen::Not(membership)) => {
            count(state, via, "not_joined");
            info!(user = %user, room, membership, via, endpoint, "refused: the user is not joined to the room");
            Err(not_joined())
        }
        Ok(Seen::Hidden) => {
            count(state, via, "unchecked");
            debug!(user = %user, room, via, "room membership not checked: the bot is not in the room");
            Ok(())
        }
        Err(MembershipError::Refused(detail)) => {
            count(state, via, "failed");
            error!(server, user = %user, room, via, detail,
                "the homeserver refused a membership check: check the as_token and the users namespace, or the bot's token");
            Err(cannot_check())
        }
        Err(MembershipError::Unavailable(detail)) => {
            count(state, via, "failed");
            warn!(server, user = %user, room, via, detail, "cannot check room membership: homeserver unreachable");
            Err(cannot_check())
        }
    }
}

/// `user` (of another homeserver) checked in the list of `room`'s joined members, as the
/// appservice sees it: `Ok(None)` if it does not see the room (none of its users is in it).
async fn through_the_room(
    state: &AppState,
    endpoint: &'static str,
    server: &str,
    user: &ruma::UserId,
    room: &str,
) -> Result<Option<Result<(), MatrixError>>, MatrixError> {
    let _slot = super::member::check_slot(state, endpoint, server).await?;
    // The user's join may reach this homeserver a moment after their own.
    let mut waits = CATCH_UP.iter();
    loop {
        match state.views.room(room).await {
            Ok(RoomView::Members(joined)) if joined.contains(user.as_str()) => {
                count(state, "appservice", "joined");
                return Ok(Some(Ok(())));
            }
            Ok(RoomView::Members(_)) => match waits.next() {
                Some(wait) => tokio::time::sleep(*wait).await,
                None => {
                    count(state, "appservice", "not_joined");
                    info!(user = %user, room, via = "appservice", endpoint, "refused: the user is not joined to the room");
                    return Ok(Some(Err(not_joined())));
                }
            },
            Ok(RoomView::NoLocalMember | RoomView::Unseen) => return Ok(None),
            Err(e) => {
                count(state, "appservice", "failed");
                warn!(server, user = %user, room, error = %e, "cannot check room membership: homeserver unreachable");
                return Ok(Some(Err(cannot_check())));
            }
        }
    }
}
