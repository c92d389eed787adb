//! Checking a member's OpenID token with its homeserver (federation `openid/userinfo`).
//! The token is a secret: it is never logged, and errors are stripped of the URL carrying it.

use super::discovery::{Discovery, DiscoveryError};

#[derive(Debug, thiserror::Error)]
pub enum OpenIdError {
    /// The homeserver says the token is not valid.
    #[error("OpenID token rejected by {0}")]
    Rejected(String),
    /// The homeserver could not be asked (or gave an answer we cannot read).
    #[error("cannot check the OpenID token with {server}: {reason}")]
    Unavailable { server: String, reason: String },
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
}

/// Returns the Matrix user id (`sub`) the token belongs to.
pub async fn userinfo(discovery: &Discovery, server: &str, access_token: &str) -> Result<String, OpenIdError> {
    let endpoint = discovery.federation_api(server).await?;
    let mut url = super::api_url(&endpoint.base, "/_matrix/federation/v1/openid/userinfo");
    url.query_pairs_mut().append_pair("access_token", access_token);
    let unavailable = |reason: String| OpenIdError::Unavailable { server: server.into(), reason };
    let resp =
        endpoint.client(discovery.clients()).get(url).send().await.map_err(|e| unavailable(super::describe(e)))?;
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED
        || status == reqwest::StatusCode::FORBIDDEN
        || status == reqwest::StatusCode::NOT_FOUND
    {
        return Err(OpenIdError::Rejected(server.into()));
    }
    if !status.is_success() {
        return Err(unavailable(format!("status {status}")));
    }
    #[derive(serde::Deserialize)]
    struct UserInfo {
        sub: String,
    }
    let info: UserInfo = super::read_json(resp).await.map_err(unavailable)?;
    Ok(info.sub)
}
