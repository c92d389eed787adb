//! Entry points for the fuzz targets in `fuzz/` (cargo-afl) and for `cargo test`, which replays
//! every input kept in `fuzz/corpus/` and `fuzz/crashes/` through them. Each takes arbitrary
//! bytes and must return without panicking; what the input means is said per function.

use std::net::IpAddr;

use crate::config::{Config, Section, Source};
use crate::livekit::webhook::WebhookVerifier;

const KEY: &str = "fuzz-key";
const SECRET: &str = "fuzz-secret-that-is-long-enough-for-hs256";

fn verifier() -> WebhookVerifier {
    WebhookVerifier::new(&[(KEY.to_owned(), SECRET.to_owned())])
}

/// A webhook as an attacker sends it: the first line is the `Authorization` header, the rest
/// the body. Almost never authentic: this exercises the signature and token checks.
pub fn webhook_unsigned(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (auth, body) = text.split_once('\n').unwrap_or((&text, ""));
    let _ = verifier().verify(body.as_bytes(), Some(auth));
}

/// A webhook body signed with the right key: exercises decoding of arbitrary authentic bodies
/// (a newer LiveKit's, or a broken one).
pub fn webhook_signed(data: &[u8]) {
    use base64::Engine as _;
    use sha2::Digest as _;
    let body = String::from_utf8_lossy(data);
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(body.as_bytes()));
    let token = livekit_api::access_token::AccessToken::with_api_key(KEY, SECRET)
        .with_sha256(&hash)
        .to_jwt()
        .expect("signing never fails");
    let _ = verifier().verify(body.as_bytes(), Some(&token));
}

/// The delays the request targets accept (the service's defaults with one instance).
const DELAYS: crate::api::DelayRange = crate::api::DelayRange { min_ms: 1, max_ms: 24 * 3600 * 1000 };

/// A `POST /delegate_delayed_leave` body (OpenID mode): parsed and checked for shape and syntax
/// as the endpoint does before asking anyone.
pub fn delegation_body(data: &[u8]) {
    let _ = crate::api::delegation::check(data, &DELAYS);
}

/// A token request body: the first byte picks `/sfu/get` (odd) or `/get_token` (even), the rest
/// is the body, checked with its delayed leave as the endpoints do before asking anyone.
pub fn token_body(data: &[u8]) {
    let Some((first, body)) = data.split_first() else { return };
    let _ = crate::api::token::check_body(body, first % 2 == 1, &DELAYS);
}

/// A homeserver-proxied request (appservice mode) as the homeserver forwards it: the first line
/// is the `Authorization` header, the second `X-Matrix-User-Identifier`, the rest the body; the
/// hs_token checked, the member taken from the header, the body checked.
pub fn appservice_request(data: &[u8]) {
    use crate::api::appservice::{AppserviceState, TokenQuery, proxied};
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (auth, user, body) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut headers = axum::http::HeaderMap::new();
    for (name, value) in [("authorization", auth), ("x-matrix-user-identifier", user)] {
        if let Ok(value) = axum::http::HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    }
    let state = AppserviceState {
        config: crate::config::Appservice {
            as_token: "fuzz-as-token".into(),
            hs_token: "fuzz-hs-token".into(),
            server_name: "hs.test".into(),
        },
        livekit_url: "https://sfu.example.org".into(),
        path_styles: Default::default(),
        request_timeout: std::time::Duration::from_secs(1),
    };
    let _ = proxied(&state, &headers, &TokenQuery::default(), body.as_bytes());
}

/// Settings as `NAME=value` lines (only names the service knows are kept).
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let pairs: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let source = Source::from_pairs(pairs);
    let _ = Config::from_source(&source);
}

/// A server name as a client names it, and an address it might resolve to: grammar check,
/// the URLs built from it, and the SSRF guard's verdict.
pub fn server_name(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (name, ip) = text.split_once('\n').unwrap_or((&text, ""));
    if crate::homeserver::discovery::validate_server_name(name).is_ok() {
        if let Ok(base) = url::Url::parse(&format!("https://{name}")) {
            let _ = crate::homeserver::api_url(&base, "/_matrix/client/versions");
        }
    }
    if let Ok(ip) = ip.trim().parse::<IpAddr>() {
        let _ = crate::homeserver::discovery::is_public(ip);
    }
    let _ = crate::config::livekit_http_base(name);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Replays every kept input (the corpus the fuzzers grew, and any crash they found).
    #[test]
    fn every_kept_fuzz_input_runs_without_panicking() {
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 7] = [
            ("webhook_unsigned", super::webhook_unsigned),
            ("webhook_signed", super::webhook_signed),
            ("config", super::config),
            ("server_name", super::server_name),
            ("delegation_body", super::delegation_body),
            ("token_body", super::token_body),
            ("appservice_request", super::appservice_request),
        ];
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        for (name, target) in targets {
            let mut replayed = 0;
            for kind in ["corpus", "crashes"] {
                let Ok(entries) = std::fs::read_dir(root.join(kind).join(name)) else { continue };
                for entry in entries {
                    let path = entry.unwrap().path();
                    if path.is_file() {
                        target(&std::fs::read(&path).unwrap());
                        replayed += 1;
                    }
                }
            }
            assert!(replayed > 0, "the corpus of {name} is missing");
        }
    }
}
