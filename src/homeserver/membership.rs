//! A user's membership of a Matrix room, as a homeserver shows it to someone allowed to read the
//! room's state: the user themselves (the appservice acting as one of its homeserver's users) or
//! a bot account the operator put in the room. One request: `GET
//! /_matrix/client/v3/rooms/{room}/state/m.room.member/{user}`.
//!
//! A user who left (or was kicked, or banned) still reads the room's state as it was when they
//! left, so asking as the user says `leave` or `ban`; one who never joined (or is only invited)
//! cannot read it at all (`403`), which this tells apart from an appservice the homeserver does
//! not let act as that user by asking who it is acting as (`/account/whoami`).
//!
//! Also a room's joined members ([`Views::room`]), as the appservice itself — Synapse lets it list
//! any room one of its namespace's users is in, and refuses ("Appservice not in room") once none
//! is — or as the bot. [`Views`] says who sees what, from the configuration: the `as_token` only
//! ever goes to the appservice's own homeserver, the bot's token only to the bot's.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use super::discovery::Discovery;
use super::{api_url, describe, read_json};
use crate::config::{Appservice, MembershipBot};

/// Through whom rooms are seen, from the configuration: the appservice acts as the users of its
/// homeserver; a bot account sees the rooms it is in.
pub struct Views {
    /// The appservice's homeserver and `as_token`.
    appservice: Option<(String, String)>,
    bot: Option<MembershipBot>,
    pub discovery: Arc<Discovery>,
    pub timeout: Duration,
}

/// How a user's membership can be asked: who asks, at which homeserver, and how to label it.
pub struct View<'a> {
    pub via: &'static str,
    pub server: &'a str,
    pub viewer: Viewer<'a>,
}

impl Views {
    pub fn new(
        appservice: Option<&Appservice>,
        bot: Option<MembershipBot>,
        discovery: Arc<Discovery>,
        timeout: Duration,
    ) -> Self {
        let appservice = appservice.map(|a| (a.server_name.clone(), a.as_token.clone()));
        Views { appservice, bot, discovery, timeout }
    }

    /// Whether any room can be seen at all.
    pub fn any(&self) -> bool {
        self.appservice.is_some() || self.bot.is_some()
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

    /// Whether `user` belongs to the appservice's homeserver (the appservice can act as them).
    pub fn is_local(&self, user: &str) -> bool {
        self.appservice.as_ref().is_some_and(|(server, _)| user_server(user) == Some(server.as_str()))
    }

    /// How `user`'s membership is seen: as themselves if the appservice can act as them, else
    /// through the bot; `None` if neither.
    pub fn of<'a>(&'a self, user: &'a str) -> Option<View<'a>> {
        match (&self.appservice, &self.bot) {
            (Some((server, as_token)), _) if user_server(user) == Some(server.as_str()) => {
                Some(View { via: "appservice", server, viewer: Viewer::AsUser { as_token, user_id: user } })
            }
            (_, Some(bot)) => Some(View {
                via: "bot",
                server: &bot.server_name,
                viewer: Viewer::Bot { access_token: &bot.access_token },
            }),
            _ => None,
        }
    }

    /// `user`'s membership of `room`, seen through `view`.
    pub async fn ask(&self, view: &View<'_>, room: &str, user: &str) -> Result<Seen, MembershipError> {
        let cs = self
            .discovery
            .client_server_api(view.server)
            .await
            .map_err(|e| MembershipError::Unavailable(format!("cannot locate {}: {e}", view.server)))?;
        membership(cs.client(self.discovery.clients()), &cs.base, room, user, view.viewer, self.timeout).await
    }

    /// Who is joined to `room`, as the appservice itself (it may list the members of any room
    /// one of its namespace's users is in) or the bot sees it. An error only if neither could
    /// tell and one of them could not be asked.
    pub async fn room(&self, room: &str) -> Result<RoomView, MembershipError> {
        let mut no_local_member = false;
        let mut failed = None;
        let appservice =
            self.appservice.as_ref().map(|(server, as_token)| ("appservice", server, Viewer::Service { as_token }));
        let bot = self.bot.as_ref().map(|b| ("bot", &b.server_name, Viewer::Bot { access_token: &b.access_token }));
        for (via, server, viewer) in appservice.into_iter().chain(bot) {
            let answer = match self.discovery.client_server_api(server).await {
                Ok(cs) => {
                    joined_members(cs.client(self.discovery.clients()), &cs.base, room, viewer, self.timeout).await
                }
                Err(e) => Err(MembershipError::Unavailable(format!("cannot locate {server}: {e}"))),
            };
            match answer {
                Ok(Some(members)) => return Ok(RoomView::Members(members)),
                Ok(None) => no_local_member |= via == "appservice",
                Err(e) => {
                    tracing::debug!(room, via, error = %e, "cannot list a room's joined members");
                    failed.get_or_insert(e);
                }
            }
        }
        match (failed, no_local_member) {
            (Some(e), _) => Err(e),
            (None, true) => Ok(RoomView::NoLocalMember),
            (None, false) => Ok(RoomView::Unseen),
        }
    }

    /// Whether the appservice's homeserver is `server`.
    pub fn appservice_server(&self) -> Option<&str> {
        self.appservice.as_ref().map(|(server, _)| server.as_str())
    }
}

/// Who is joined to a room, as far as the bridge can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomView {
    /// Every joined member.
    Members(HashSet<String>),
    /// The appservice's homeserver refuses to list it because none of the users in the
    /// appservice's namespace is joined: with a namespace of every local user, the homeserver
    /// has left the room.
    NoLocalMember,
    /// Nobody here can see it.
    Unseen,
}

fn user_server(user: &str) -> Option<&str> {
    user.split_once(':').map(|(_, server)| server)
}

/// `GET /rooms/{room}/joined_members` as `viewer`: the user ids joined; `None` if the viewer
/// cannot see the room (not joined to it).
pub async fn joined_members(
    http: &reqwest::Client,
    base: &Url,
    room: &str,
    viewer: Viewer<'_>,
    timeout: Duration,
) -> Result<Option<HashSet<String>>, MembershipError> {
    let mut url = api_url(base, "/_matrix/client/v3/rooms");
    url.path_segments_mut().expect("http(s) base URLs have paths").extend([room, "joined_members"]);
    let resp = authorized(http, url, viewer).timeout(timeout).send().await;
    let resp = resp.map_err(|e| MembershipError::Unavailable(describe(e)))?;
    match resp.status().as_u16() {
        200 => {}
        403 => return Ok(None),
        401 => return Err(MembershipError::Refused("401".into())),
        status => return Err(MembershipError::Unavailable(format!("status {status}"))),
    }
    // A big room's list is larger than the usual answer cap: up to 16 MiB (some 150 000 members).
    let body = super::read_capped(resp, 16 << 20).await.map_err(MembershipError::Unavailable)?;
    #[derive(serde::Deserialize)]
    struct Joined {
        joined: std::collections::HashMap<String, serde::de::IgnoredAny>,
    }
    let joined: Joined =
        serde_json::from_slice(&body).map_err(|e| MembershipError::Unavailable(format!("unreadable answer: {e}")))?;
    Ok(Some(joined.joined.into_keys().collect()))
}

/// A GET of `url` as `viewer`.
fn authorized(http: &reqwest::Client, mut url: Url, viewer: Viewer<'_>) -> reqwest::RequestBuilder {
    match viewer {
        Viewer::AsUser { as_token, user_id } => {
            url.query_pairs_mut().append_pair("user_id", user_id);
            http.get(url).bearer_auth(as_token)
        }
        Viewer::Service { as_token: token } | Viewer::Bot { access_token: token } => http.get(url).bearer_auth(token),
    }
}

/// Who reads the room's state.
#[derive(Debug, Clone, Copy)]
pub enum Viewer<'a> {
    /// The appservice, acting as `user_id` (whose membership is asked).
    AsUser { as_token: &'a str, user_id: &'a str },
    /// The appservice itself (its sender): may list the members of rooms its users are in.
    Service { as_token: &'a str },
    /// A bot account, with its access token.
    Bot { access_token: &'a str },
}

/// What the viewer sees of the user's membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Joined,
    /// Any other membership (`leave`, `ban`, `invite`, `knock`), or `none` for a user who never
    /// had one.
    Not(String),
    /// The viewer cannot read the room's state (it is not in the room).
    Hidden,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// The homeserver refuses the viewer itself (a wrong token, a user outside the appservice's
    /// namespace): the operator has to fix it.
    #[error("the homeserver refused the viewer: {0}")]
    Refused(String),
    /// The homeserver could not be asked, or gave an answer that says nothing.
    #[error("cannot ask the homeserver: {0}")]
    Unavailable(String),
}

/// `user`'s membership of `room` as `viewer` sees it, asking the client-server API at `base`.
pub async fn membership(
    http: &reqwest::Client,
    base: &Url,
    room: &str,
    user: &str,
    viewer: Viewer<'_>,
    timeout: Duration,
) -> Result<Seen, MembershipError> {
    let mut url = api_url(base, "/_matrix/client/v3/rooms");
    url.path_segments_mut().expect("http(s) base URLs have paths").extend([room, "state", "m.room.member", user]);
    let (status, body) = get(http, url, viewer, timeout).await?;
    match classify(status, &body)? {
        Seen::Hidden if matches!(viewer, Viewer::AsUser { .. }) => {
            // Not in the room, or not allowed to act as the user at all: whoami tells which.
            let (status, body) = get(http, api_url(base, "/_matrix/client/v3/account/whoami"), viewer, timeout).await?;
            match status {
                200 if body.get("user_id").and_then(|u| u.as_str()) == Some(user) => Ok(Seen::Not("none".into())),
                200 | 401 | 403 => Err(MembershipError::Refused(format!("whoami as {user}: {status} {body}"))),
                _ => Err(MembershipError::Unavailable(format!("whoami: {status} {body}"))),
            }
        }
        seen => Ok(seen),
    }
}

async fn get(
    http: &reqwest::Client,
    url: Url,
    viewer: Viewer<'_>,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), MembershipError> {
    let resp = authorized(http, url, viewer)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| MembershipError::Unavailable(describe(e)))?;
    let status = resp.status().as_u16();
    // Only the status and errcode matter for errors: an unreadable body reads as empty.
    let body = read_json(resp).await.unwrap_or_default();
    Ok((status, body))
}

/// What an answer to the state request says (pure, for tests).
pub fn classify(status: u16, body: &serde_json::Value) -> Result<Seen, MembershipError> {
    let errcode = body.get("errcode").and_then(|e| e.as_str()).unwrap_or_default();
    match status {
        200 => match body.get("membership").and_then(|m| m.as_str()) {
            Some("join") => Ok(Seen::Joined),
            Some(other) => Ok(Seen::Not(other.to_owned())),
            None => Err(MembershipError::Unavailable(format!("a member event without membership: {body}"))),
        },
        // The viewer reads the room's state and there is no member event for the user.
        404 if errcode == "M_NOT_FOUND" => Ok(Seen::Not("none".into())),
        403 => Ok(Seen::Hidden),
        401 => Err(MembershipError::Refused(format!("{status} {body}"))),
        _ => Err(MembershipError::Unavailable(format!("{status} {body}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_a_join_is_joined_and_only_a_clear_answer_decides() {
        assert_eq!(classify(200, &json!({"membership": "join"})), Ok(Seen::Joined));
        for m in ["leave", "ban", "invite", "knock"] {
            assert_eq!(classify(200, &json!({"membership": m})), Ok(Seen::Not(m.into())));
        }
        assert_eq!(classify(404, &json!({"errcode": "M_NOT_FOUND"})), Ok(Seen::Not("none".into())));
        assert_eq!(classify(403, &json!({"errcode": "M_FORBIDDEN"})), Ok(Seen::Hidden));
        // Nothing that could be a passing fault decides anything.
        for (status, body) in [
            (200, json!({})),
            (404, json!({"errcode": "M_UNRECOGNIZED"})),
            (404, json!(null)),
            (429, json!({"errcode": "M_LIMIT_EXCEEDED"})),
            (500, json!({})),
            (502, json!(null)),
        ] {
            assert!(matches!(classify(status, &body), Err(MembershipError::Unavailable(_))), "{status} {body}");
        }
        assert!(matches!(classify(401, &json!({"errcode": "M_UNKNOWN_TOKEN"})), Err(MembershipError::Refused(_))));
    }
}
