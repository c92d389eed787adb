//! A user's membership of a Matrix room, as a homeserver shows it to someone allowed to read the
//! room's state: the user themselves (the appservice acting as one of its homeserver's users) or
//! a bot account the operator put in the room. One request: `GET
//! /_matrix/client/v3/rooms/{room}/state/m.room.member/{user}`.
//!
//! A user who left (or was kicked, or banned) still reads the room's state as it was when they
//! left, so asking as the user says `leave` or `ban`; one who never joined (or is only invited)
//! cannot read it at all (`403`), which this tells apart from an appservice the homeserver does
//! not let act as that user by asking who it is acting as (`/account/whoami`).

use std::time::Duration;

use url::Url;

use super::{api_url, describe, read_json};

/// Who reads the room's state.
#[derive(Debug, Clone, Copy)]
pub enum Viewer<'a> {
    /// The appservice, acting as `user_id` (whose membership is asked).
    AsUser { as_token: &'a str, user_id: &'a str },
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
    mut url: Url,
    viewer: Viewer<'_>,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), MembershipError> {
    let token = match viewer {
        Viewer::AsUser { as_token, user_id } => {
            url.query_pairs_mut().append_pair("user_id", user_id);
            as_token
        }
        Viewer::Bot { access_token } => access_token,
    };
    let resp = http
        .get(url)
        .bearer_auth(token)
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
