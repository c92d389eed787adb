//! Who may get a LiveKit token, or hand over a delayed leave, for a Matrix room: a user joined to
//! it, checked with a homeserver whenever the bridge can see the room.
//!
//! * Users of the appservice's homeserver are checked as themselves (the appservice acts as any
//!   user of its namespace): always decisive.
//! * Other users (everyone, in OpenID mode) through the membership bot, if one is configured,
//!   in rooms the bot is in. A remote user's join may reach the bot's homeserver a moment after
//!   the user's own: a "not joined" is asked again twice within 1.5 s before it is believed.
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
use crate::config::{Appservice, MembershipBot};
use crate::homeserver::membership::{MembershipError, Seen, Viewer, membership};
use crate::metrics::MembershipCheckLabels;

/// Waits before asking again about a remote user the bot does not see joined yet.
const CATCH_UP: [Duration; 2] = [Duration::from_millis(500), Duration::from_secs(1)];

/// How room membership is checked, from the configuration.
pub struct MembershipChecks {
    /// The appservice's homeserver and `as_token`: its users are checked as themselves.
    appservice: Option<(String, String)>,
    bot: Option<MembershipBot>,
    timeout: Duration,
}

impl MembershipChecks {
    pub fn new(appservice: Option<&Appservice>, bot: Option<MembershipBot>, timeout: Duration) -> Self {
        let appservice = appservice.map(|a| (a.server_name.clone(), a.as_token.clone()));
        MembershipChecks { appservice, bot, timeout }
    }

    /// What is checked, for the log at start.
    pub fn describe(&self) -> String {
        let others = match &self.bot {
            Some(bot) => format!("through the membership bot of {} in rooms it is in", bot.server_name),
            None => "not checked (no RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_*)".to_owned(),
        };
        match &self.appservice {
            Some((server, _)) => format!("users of {server} as themselves (appservice); other users {others}"),
            None => format!("users {others}"),
        }
    }
}

fn count(state: &AppState, via: &'static str, outcome: &'static str) {
    state.metrics.membership_checks.get_or_create(&MembershipCheckLabels { via, outcome }).inc();
}

/// `Ok` if `user` may have a token (or a delegation) for `room`: joined, or not checkable.
pub async fn require_joined(
    state: &AppState,
    endpoint: &'static str,
    user: &ruma::UserId,
    room: &str,
) -> Result<(), MatrixError> {
    let checks = &state.membership;
    let own = checks.appservice.as_ref().filter(|(server, _)| server == user.server_name().as_str());
    let (via, server, viewer) = match (own, &checks.bot) {
        (Some((server, as_token)), _) => ("appservice", server, Viewer::AsUser { as_token, user_id: user.as_str() }),
        (None, Some(bot)) => ("bot", &bot.server_name, Viewer::Bot { access_token: &bot.access_token }),
        (None, None) => {
            count(state, "none", "unchecked");
            return Ok(());
        }
    };
    let unavailable =
        || MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "cannot check room membership now");
    let _slot = super::member::check_slot(state, endpoint, server).await?;
    let cs = state.discovery.client_server_api(server).await.map_err(|e| {
        count(state, via, "failed");
        warn!(server, user = %user, room, error = %e, "cannot locate the homeserver to check room membership");
        unavailable()
    })?;
    let http = cs.client(state.discovery.clients());
    // Only another homeserver's view can lag behind the user's own.
    let mut waits = CATCH_UP.iter().filter(|_| user.server_name().as_str() != server.as_str());
    let seen = loop {
        let seen = membership(http, &cs.base, room, user.as_str(), viewer, checks.timeout).await;
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
            Err(MatrixError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "you are not joined to this room"))
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
            Err(unavailable())
        }
        Err(MembershipError::Unavailable(detail)) => {
            count(state, via, "failed");
            warn!(server, user = %user, room, via, detail, "cannot check room membership: homeserver unreachable");
            Err(unavailable())
        }
    }
}
