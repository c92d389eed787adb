//! The operator commands besides `serve`: `healthcheck` (for container health checks),
//! `check-config` (validates the configuration against the outside world) and `jobs` (lists the
//! delegations a running instance tracks).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use livekit_api::access_token::{AccessToken, VideoGrants};

use crate::config::Config;
use crate::engine::JobSummary;
use crate::homeserver::{Clients, Discovery, api_url};
use crate::livekit::room_service::{RoomService, RoomServiceError};
use crate::store::Store;
use crate::store::sqlite::SqliteStore;

/// Where a client on this machine reaches a server bound to `bind`: a wildcard address is
/// reached through the loopback address of its family (`:8080` and `0.0.0.0:8080` both mean
/// `127.0.0.1:8080`; `[::]:8080` means `[::1]:8080`).
pub fn local_address(bind: SocketAddr) -> SocketAddr {
    let ip = match bind.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bind.port())
}

fn local_url(config: &Config, path: &str) -> String {
    format!("http://{}{path}", local_address(config.bind))
}

fn http_client() -> reqwest::Client {
    crate::homeserver::install_crypto_provider();
    reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("HTTP client")
}

/// Exit 0 if the local service answers `/healthz`, else 1.
pub async fn healthcheck(config: &Config) -> ExitCode {
    let url = local_url(config, "/healthz");
    match http_client().get(&url).send().await {
        Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("unhealthy: {url} answered {}", r.status());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: {url}: {}", e.without_url());
            ExitCode::FAILURE
        }
    }
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
    r.ok("configuration", "all settings valid");

    // The data directory: writable, and the store opens.
    let probe = config.data_dir.join(".rtc-leave-bridge-write-check");
    match std::fs::create_dir_all(&config.data_dir).and_then(|()| std::fs::write(&probe, b"ok")) {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            match SqliteStore::open(&config.data_dir) {
                Ok(store) => match store.load().await {
                    Ok(jobs) => {
                        r.ok("data dir", format!("{} writable; {} stored jobs", config.data_dir.display(), jobs.len()))
                    }
                    Err(e) => r.problem("data dir", e),
                },
                Err(e) => r.problem("data dir", e),
            }
        }
        Err(e) => r.problem("data dir", format!("{} not writable: {e}", config.data_dir.display())),
    }

    let clients =
        match Clients::new(config.request_timeout, config.insecure_skip_verify_tls, config.allow_private_homeservers) {
            Ok(c) => c,
            Err(e) => {
                r.problem("HTTP client", e);
                return ExitCode::FAILURE;
            }
        };

    // LiveKit: reachable, and it accepts our key (a room that does not exist lists as empty).
    match RoomService::new(
        clients.trusted.clone(),
        &config.livekit_url,
        &config.livekit_key,
        &config.livekit_secret,
        config.request_timeout,
    ) {
        Ok(rs) => match rs.list_participants("rtc-leave-bridge-check-config").await {
            Ok(_) => {
                r.ok("livekit", format!("RoomService at {} accepts key {}", config.livekit_url, config.livekit_key))
            }
            Err(RoomServiceError::Refused { status, body }) => {
                r.problem("livekit", format!("RoomService refused key {} ({status}): {body}", config.livekit_key))
            }
            Err(e) => r.problem("livekit", e),
        },
        Err(e) => r.problem("livekit", e),
    }

    // Homeservers: every one the configuration names.
    let discovery = Discovery::new(
        clients.clone(),
        config.cs_overrides.clone(),
        config.federation_overrides.clone(),
        config.allow_private_homeservers,
    );
    let mut servers: Vec<String> =
        config.cs_overrides.keys().chain(config.federation_overrides.keys()).cloned().collect();
    if let crate::api::AllowedHomeservers::Only(allowed) = &config.allowed {
        servers.extend(allowed.iter().cloned());
    }
    if let Some(a) = &config.appservice {
        servers.push(a.server_name.clone());
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

/// Lists the delegations the local service tracks.
pub async fn jobs(config: &Config, json: bool) -> ExitCode {
    let token = AccessToken::with_api_key(&config.livekit_key, &config.livekit_secret)
        .with_identity("rtc-leave-bridge-cli")
        .with_ttl(Duration::from_secs(60))
        .with_grants(VideoGrants { room_admin: true, room_list: true, ..Default::default() })
        .to_jwt();
    let token = match token {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot sign the request: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url = local_url(config, "/admin/jobs");
    let resp = match http_client().get(&url).bearer_auth(token).send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{url}: {} (is the service running with this configuration?)", e.without_url());
            return ExitCode::FAILURE;
        }
    };
    if !resp.status().is_success() {
        eprintln!("{url} answered {}: {}", resp.status(), resp.text().await.unwrap_or_default());
        return ExitCode::FAILURE;
    }
    let jobs: Vec<JobSummary> = match resp.json().await {
        Ok(j) => j,
        Err(e) => {
            eprintln!("unreadable answer: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&jobs).expect("serialisable"));
        return ExitCode::SUCCESS;
    }
    print!("{}", table(&jobs, crate::delegation::now_unix_ms()));
    ExitCode::SUCCESS
}

/// The human listing of `rtc-leave-bridge jobs`.
fn table(jobs: &[JobSummary], now_ms: u64) -> String {
    let mut rows = vec![[
        "JOB".to_owned(),
        "ROOM".to_owned(),
        "MEMBER".to_owned(),
        "DELAY".to_owned(),
        "IDENTITY".to_owned(),
        "STATE".to_owned(),
        "NEXT CALL".to_owned(),
        "AGE".to_owned(),
    ]];
    for j in jobs {
        let member = if j.device_id.is_empty() {
            format!("{} ({})", j.user_id, j.member_id)
        } else {
            format!("{} {}", j.user_id, j.device_id)
        };
        let next =
            j.next_call_in_ms.map(|ms| format!("{:.1}s", ms as f64 / 1000.0)).unwrap_or_else(|| "in flight".into());
        let age = now_ms.saturating_sub(j.created_at_ms) / 1000;
        rows.push([
            j.id.clone(),
            j.room_id.clone(),
            member,
            j.delay_ref.clone(),
            j.identity.clone().unwrap_or_else(|| "-".into()),
            j.state.clone(),
            next,
            format!("{}m{:02}s", age / 60, age % 60),
        ]);
    }
    let widths: Vec<usize> = (0..8).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!("{} job(s)\n", jobs.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bind_form_has_a_local_address() {
        let cases = [
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("[::]:8080", "[::1]:8080"),
            ("127.0.0.1:9000", "127.0.0.1:9000"),
            ("192.0.2.7:80", "192.0.2.7:80"),
        ];
        for (bind, local) in cases {
            assert_eq!(local_address(bind.parse().unwrap()), local.parse().unwrap(), "{bind}");
        }
    }

    #[test]
    fn lists_jobs_as_a_table() {
        let job = JobSummary {
            id: "00000000000000ab".into(),
            room_id: "!r:hs".into(),
            livekit_room: "x".into(),
            user_id: "@a:hs".into(),
            device_id: "DEV".into(),
            member_id: "m".into(),
            delay_ref: "#00000000".into(),
            mode: crate::delegation::Mode::OpenId,
            state: "connected".into(),
            identity: Some("ID".into()),
            next_call_in_ms: Some(2_500),
            created_at_ms: 1_000,
        };
        let t = table(&[job], 126_000);
        assert!(t.starts_with("JOB"), "{t}");
        assert!(
            t.contains("00000000000000ab  !r:hs  @a:hs DEV  #00000000  ID        connected  2.5s       2m05s"),
            "{t}"
        );
        assert!(t.ends_with("1 job(s)\n"));
    }
}
