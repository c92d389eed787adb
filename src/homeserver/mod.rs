//! Everything about the members' homeservers: where to reach them ([`discovery`], with the SSRF
//! guard), checking a member's OpenID token ([`openid`]), whether a user is joined to a room
//! ([`membership`]), and restarting / sending delayed events ([`delayed_events`]).
//!
//! Requests go to addresses the operator configured (overrides: trusted) or that we discovered
//! from a server name (well-known: guarded, so that a client naming a server cannot make us call
//! into loopback, private or link-local networks unless the operator allows it).

pub mod delayed_events;
pub mod discovery;
pub mod membership;
pub mod openid;

use std::sync::Arc;
use std::time::Duration;

pub use discovery::Discovery;

pub use crate::config::Overrides;

/// The HTTP clients used towards homeservers.
#[derive(Clone)]
pub struct Clients {
    /// For operator-configured URLs.
    pub trusted: reqwest::Client,
    /// For discovered URLs: resolves names through the SSRF guard.
    pub guarded: reqwest::Client,
}

impl Clients {
    pub fn new(timeout: Duration, skip_tls_verify: bool, allow_private: bool) -> Result<Self, String> {
        install_crypto_provider();
        let build = |guard: bool| {
            let mut b = reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(5)))
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("rtc-leave-bridge/", env!("CARGO_PKG_VERSION")))
                .tls_danger_accept_invalid_certs(skip_tls_verify);
            if guard {
                // A proxy from the environment (HTTPS_PROXY) would resolve names itself, past the
                // guard: discovered addresses are always reached directly.
                b = b.no_proxy();
                if !allow_private {
                    b = b.dns_resolver(Arc::new(discovery::GuardedResolver));
                }
            }
            b.build().map_err(|e| e.to_string())
        };
        Ok(Clients { trusted: build(false)?, guarded: build(true)? })
    }
}

/// Largest answer read from a homeserver (discovery documents, OpenID userinfo, delayed-event
/// answers, `/versions`: each a few hundred bytes to a few KiB). Anyone can name a server, and a
/// hostile one may stream an endless body: nothing past this is ever held.
pub const RESPONSE_LIMIT: usize = 64 << 10;

/// `resp`'s body, at most `limit` bytes: refused at once if its `Content-Length` says more,
/// else read chunk by chunk and refused as soon as it grows past `limit`.
pub async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(format!("answer of {} bytes, over the {limit}-byte limit", resp.content_length().unwrap_or(0)));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(describe)? {
        if body.len() + chunk.len() > limit {
            return Err(format!("answer over the {limit}-byte limit"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `resp`'s body as JSON, read through [`read_capped`] with [`RESPONSE_LIMIT`].
pub async fn read_json<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> Result<T, String> {
    let body = read_capped(resp, RESPONSE_LIMIT).await?;
    serde_json::from_slice(&body).map_err(|e| format!("answer is not the JSON expected: {e}"))
}

/// reqwest is built without a default rustls crypto provider; install ring once per process.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A failed request, described with its causes (reqwest's own message alone, "error sending
/// request", does not say whether DNS, the SSRF guard, TLS or the connection failed), without the
/// URL (it may carry a token in its query).
pub fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The URL of API `path` (`/_matrix/…`) under a homeserver's `base` URL. A base may carry a path
/// prefix (`https://example.org/matrix`), which is kept — unlike `Url::join` with an absolute
/// path, which would drop it.
pub fn api_url(base: &url::Url, path: &str) -> url::Url {
    let mut url = base.clone();
    {
        let mut segments = url.path_segments_mut().expect("http(s) base URLs have paths");
        segments.pop_if_empty();
        for s in path.trim_start_matches('/').split('/') {
            segments.push(s);
        }
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_keep_the_base_path() {
        let prefixed = url::Url::parse("https://example.org/matrix/").unwrap();
        assert_eq!(
            api_url(&prefixed, "/_matrix/client/versions").as_str(),
            "https://example.org/matrix/_matrix/client/versions"
        );
        let bare = url::Url::parse("http://127.0.0.1:8008").unwrap();
        assert_eq!(
            api_url(&bare, "/_matrix/client/versions").as_str(),
            "http://127.0.0.1:8008/_matrix/client/versions"
        );
    }
}
