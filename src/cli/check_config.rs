//! `rtc-leave-bridge check-config`: validates the whole configuration, then checks it against
//! the outside world: the store (data directory or Redis), LiveKit (reachable, accepts our key) and every
//! homeserver the configuration names. Exit 1 on any problem.

use std::process::ExitCode;

use super::{load, runtime};
use crate::config::{AllowedHomeservers, Config, Source};
use crate::homeserver::{Clients, Discovery, api_url};
use crate::livekit::room_service::{RoomService, RoomServiceError};

pub fn run(source: &Source) -> ExitCode {
    let config: Config = match load(source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    runtime().block_on(check_config(&config))
}

struct Report {
    problems: usize,
}

impl Report {
    fn ok(&mut self, what: &str, detail: impl std::fmt::Display) {
        println!("ok       {what}: {detail}");
    }
    fn problem(&mut self, what: &str, detail: impl std::fmt::Display) {
        self.problems += 1;
        println!("PROBLEM  {what}: {detail}");
    }
    /// Sends `request`: a success is `ok` with `detail`, anything else a problem naming the URL.
    async fn answers(&mut self, what: &str, request: reqwest::RequestBuilder, detail: String) {
        let url = request.try_clone().and_then(|r| r.build().ok()).map(|r| r.url().clone());
        let shown =
            url.as_ref().map(|u| format!("{}{}", u.origin().ascii_serialization(), u.path())).unwrap_or_default();
        match request.send().await {
            Ok(resp) if resp.status().is_success() => self.ok(what, detail),
            Ok(resp) => self.problem(what, format!("{shown} answered {}", resp.status())),
            Err(e) => self.problem(what, format!("{shown}: {}", e.without_url())),
        }
    }
}

/// Checks the data directory, LiveKit and every configured homeserver; exit 1 on any problem.
pub async fn check_config(config: &Config) -> ExitCode {
    let mut r = Report { problems: 0 };
    let hs = &config.homeservers;
    r.ok("configuration", "all settings valid");

    // The store: the data directory writable (SQLite), then the store the service would open
    // opens, and its jobs are readable.
    let dir = &config.storage.data_dir;
    let (what, shown) = match &config.storage.redis {
        Some(redis) => ("store", format!("Redis reachable (prefix {})", redis.prefix)),
        None => ("data dir", format!("{} writable", dir.display())),
    };
    let probe = dir.join(".rtc-leave-bridge-write-check");
    let writable = match config.storage.redis {
        Some(_) => Ok(()),
        None => std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&probe, b"ok")).map(|()| {
            let _ = std::fs::remove_file(&probe);
        }),
    };
    match writable {
        Ok(()) => match crate::service::open_store(config, std::time::Duration::ZERO).await {
            Ok(opened) => match opened.store.load().await {
                Ok(jobs) => r.ok(what, format!("{shown}; {} stored jobs", jobs.len())),
                Err(e) => r.problem(what, e),
            },
            Err(e) => r.problem(what, format!("{e:#}")),
        },
        Err(e) => r.problem(what, format!("{} not writable: {e}", dir.display())),
    }

    let clients = match Clients::new(hs.request_timeout, hs.insecure_skip_verify_tls, hs.allow_private) {
        Ok(c) => c,
        Err(e) => {
            r.problem("HTTP client", e);
            return ExitCode::FAILURE;
        }
    };

    // LiveKit: reachable, and it accepts our key (a room that does not exist lists as empty).
    match RoomService::new(
        clients.trusted.clone(),
        &config.livekit.api_base,
        &config.livekit.key,
        &config.livekit.secret,
        hs.request_timeout,
    ) {
        Ok(rs) => match rs.list_participants("rtc-leave-bridge-check-config").await {
            Ok(_) => {
                r.ok("livekit", format!("RoomService at {} accepts key {}", config.livekit.url, config.livekit.key))
            }
            Err(RoomServiceError::Refused { status, body }) => {
                r.problem("livekit", format!("RoomService refused key {} ({status}): {body}", config.livekit.key))
            }
            Err(e) => r.problem("livekit", e),
        },
        Err(e) => r.problem("livekit", e),
    }

    // Homeservers: every one the configuration names.
    let discovery =
        Discovery::new(clients.clone(), hs.cs_overrides.clone(), hs.federation_overrides.clone(), hs.allow_private);
    let mut servers: Vec<String> = hs.cs_overrides.keys().chain(hs.federation_overrides.keys()).cloned().collect();
    if let AllowedHomeservers::Only(allowed) = &hs.allowed {
        servers.extend(allowed.iter().cloned());
    }
    if let Some(a) = &config.appservice {
        servers.push(a.server_name.clone());
    }
    if let Some(bot) = &config.membership_bot {
        servers.push(bot.server_name.clone());
    }
    servers.sort();
    servers.dedup();
    if servers.is_empty() {
        r.ok("homeservers", "none named (any homeserver may delegate; each is discovered when it does)");
    }
    for server in &servers {
        let what = format!("homeserver {server}");
        match discovery.client_server_api(server).await {
            Ok(endpoint) => {
                let client = endpoint.client(discovery.clients());
                let versions = client.get(api_url(&endpoint.base, "/_matrix/client/versions"));
                r.answers(&what, versions, format!("client-server API at {}", endpoint.base)).await;
                if let Some(a) = config.appservice.as_ref().filter(|a| &a.server_name == server) {
                    let whoami = client.get(api_url(&endpoint.base, "/_matrix/client/v3/account/whoami"));
                    r.answers(&what, whoami.bearer_auth(&a.as_token), "accepts our as_token".to_owned()).await;
                }
                if let Some(bot) = config.membership_bot.as_ref().filter(|b| &b.server_name == server) {
                    let whoami = client.get(api_url(&endpoint.base, "/_matrix/client/v3/account/whoami"));
                    let shown = "accepts the membership bot's token".to_owned();
                    r.answers(&what, whoami.bearer_auth(&bot.access_token), shown).await;
                }
            }
            Err(e) => r.problem(&what, e),
        }
        if config.appservice.as_ref().is_none_or(|a| &a.server_name != server) {
            match discovery.federation_api(server).await {
                Ok(endpoint) => {
                    let version = endpoint
                        .client(discovery.clients())
                        .get(api_url(&endpoint.base, "/_matrix/federation/v1/version"));
                    r.answers(&what, version, format!("federation API (OpenID checks) at {}", endpoint.base)).await;
                }
                Err(e) => r.problem(&what, e),
            }
        }
    }

    if r.problems == 0 {
        println!("configuration OK");
        ExitCode::SUCCESS
    } else {
        println!("{} problem(s)", r.problems);
        ExitCode::FAILURE
    }
}
