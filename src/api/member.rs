//! Who a client request comes from, in OpenID mode: the request carries an OpenID token that the
//! member's own homeserver vouches for (federation `openid/userinfo`). Shared by the delegation
//! and token endpoints. The token is a secret: never logged.

use std::time::Instant;

use axum::http::StatusCode;
use serde::Deserialize;
use tracing::warn;

use super::{AppState, MatrixError, invalid};
use crate::homeserver::discovery::DiscoveryError;
use crate::homeserver::openid::{self, OpenIdError};
use crate::metrics::HomeserverLabel;

/// `openid_token` of a request, as `POST /_matrix/client/v3/user/{userId}/openid/request_token`
/// gave it to the client.
#[derive(Deserialize)]
pub struct OpenIdToken {
    pub access_token: String,
    #[serde(default)]
    #[allow(dead_code)]
    pub token_type: Option<String>,
    pub matrix_server_name: String,
    #[serde(default)]
    #[allow(dead_code)]
    pub expires_in: Option<i64>,
}

impl OpenIdToken {
    /// The homeserver that issued it, checked for syntax.
    pub fn server(&self) -> Result<&str, MatrixError> {
        let server = self.matrix_server_name.as_str();
        ruma::ServerName::parse(server).map_err(|e| invalid(format!("openid_token.matrix_server_name: {e}")))?;
        if self.access_token.is_empty() {
            return Err(invalid("openid_token.access_token is empty"));
        }
        Ok(server)
    }
}

/// The user the token belongs to, as its homeserver says: a user of that homeserver, and the one
/// the request claims to be, if it claims one (`401 M_UNAUTHORIZED` otherwise). The check takes
/// one of the homeserver's slots ([`super::limits`]), and the verified request one request of the
/// user's and the homeserver's budgets (`429` over any of them).
pub async fn verified_user(
    state: &AppState,
    endpoint: &'static str,
    token: &OpenIdToken,
    claimed: Option<&ruma::UserId>,
) -> Result<ruma::OwnedUserId, MatrixError> {
    let server = token.server()?;
    let unauthorized = |why: &str| MatrixError::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", why);
    if claimed.is_some_and(|user| user.server_name().as_str() != server) {
        return Err(unauthorized("member.claimed_user_id does not belong to openid_token.matrix_server_name"));
    }
    let slot = check_slot(state, endpoint, server).await?;
    let started = Instant::now();
    let result = openid::userinfo(&state.discovery, server, &token.access_token).await;
    drop(slot);
    state
        .metrics
        .openid_check_duration
        .get_or_create(&HomeserverLabel { homeserver: state.metrics.homeserver_label(server) })
        .observe(started.elapsed().as_secs_f64());
    let sub = result.map_err(|e| upstream_error(server, e))?;
    let user = ruma::OwnedUserId::try_from(sub.as_str()).map_err(|_| {
        warn!(server, "OpenID token refused: the homeserver named no valid user");
        unauthorized("the OpenID token names no valid user")
    })?;
    if user.server_name().as_str() != server {
        warn!(server, user = %user, "OpenID token refused: the homeserver vouched for a user of another server");
        return Err(unauthorized("the OpenID token belongs to a user of another homeserver"));
    }
    if claimed.is_some_and(|c| c != user) {
        warn!(server, claimed = %claimed.map(|c| c.to_string()).unwrap_or_default(),
            "request refused: OpenID token belongs to another user");
        return Err(unauthorized("OpenID token does not belong to the member"));
    }
    take_budget(state, endpoint, &user)?;
    Ok(user)
}

/// One of `server`'s slots for a request towards it (an OpenID check, a discovery), or `429`.
pub async fn check_slot(
    state: &AppState,
    endpoint: &'static str,
    server: &str,
) -> Result<super::limits::Slot, MatrixError> {
    state.limits.check_slot(server).await.map_err(|l| super::limited(state, endpoint, server, None, l))
}

/// One request of authenticated `user`'s budget and of its homeserver's, or `429`.
pub fn take_budget(state: &AppState, endpoint: &'static str, user: &ruma::UserId) -> Result<(), MatrixError> {
    let server = user.server_name().as_str();
    state
        .limits
        .take(user.as_str(), server, Instant::now())
        .map_err(|l| super::limited(state, endpoint, server, Some(user.as_str()), l))
}

/// A homeserver that cannot be asked, or that refuses: why, as the client should see it.
pub fn upstream_error(server: &str, e: OpenIdError) -> MatrixError {
    match e {
        OpenIdError::Rejected(_) => {
            warn!(server, "request refused: OpenID token rejected by its homeserver");
            MatrixError::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", "OpenID token rejected by the homeserver")
        }
        OpenIdError::Discovery(DiscoveryError::InvalidServerName(s)) => invalid(format!("invalid server name {s:?}")),
        OpenIdError::Discovery(e @ DiscoveryError::Forbidden { .. }) => {
            warn!(server, error = %e, "request refused: homeserver address not allowed");
            MatrixError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "the homeserver's address is not allowed")
        }
        e => {
            warn!(server, error = %e, "request failed: homeserver unreachable");
            MatrixError::new(StatusCode::BAD_GATEWAY, "M_UNKNOWN", format!("cannot reach homeserver {server}"))
        }
    }
}
