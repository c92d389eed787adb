//! Configuration: environment variables with the names lk-jwt-service operators already use, plus
//! our own `RTC_LEAVE_BRIDGE_*` knobs; optionally a TOML file with the same names as keys
//! (environment wins). [`SETTINGS`] is the one table of names, defaults and meanings (`--help`
//! and the README show it); typed sections each read and validate their settings, every duration
//! within bounds, and an error names the setting. A command loads only the sections it needs
//! (`healthcheck`: [`Listen`] alone).
//!
//! A leaf: this module imports nothing else of the crate, and every other module may read it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

/// Every setting we read, with its default (if any) and meaning; the README's table mirrors it.
pub const SETTINGS: &[(&str, &str, &str)] = &[
    ("LIVEKIT_URL", "(required)", "LiveKit SFU URL clients connect to (ws/wss/http/https), given out with every token"),
    (
        "RTC_LEAVE_BRIDGE_LIVEKIT_API_URL",
        "",
        "where this service calls LiveKit's RoomService, if not at LIVEKIT_URL (e.g. http://livekit:7880 inside compose); path kept",
    ),
    ("LIVEKIT_KEY", "", "LiveKit API key (webhook verification, RoomService)"),
    ("LIVEKIT_SECRET", "", "LiveKit API secret"),
    (
        "LIVEKIT_KEY_FILE",
        "",
        "LiveKit's key file: `key: secret` lines (instead of LIVEKIT_KEY/LIVEKIT_SECRET); the first signs, any verifies",
    ),
    ("LIVEKIT_KEY_FROM_FILE", "", "file holding the API key"),
    ("LIVEKIT_SECRET_FROM_FILE", "", "file holding the API secret"),
    ("LIVEKIT_JWT_BIND", ":8080", "listen address: `:port`, `host:port` or `[v6]:port`"),
    ("LIVEKIT_JWT_PORT", "", "deprecated: port to listen on all interfaces, if LIVEKIT_JWT_BIND is unset"),
    (
        "RTC_LEAVE_BRIDGE_OPERATOR_BIND",
        "",
        "where `/metrics` and `/admin/jobs` are served (and `/healthz`, `/readyz` too), off the public listener: `:port`, `host:port`; unset: on LIVEKIT_JWT_BIND",
    ),
    (
        "RTC_LEAVE_BRIDGE_HEADER_TIMEOUT",
        "10s",
        "a client must send a request's headers within this (slow-header connections are closed) (1s–5m)",
    ),
    (
        "RTC_LEAVE_BRIDGE_HTTP_TIMEOUT",
        "60s",
        "a request must be read and answered within this, else 503 and the connection is closed (5s–10m)",
    ),
    (
        "RTC_LEAVE_BRIDGE_MAX_CONNECTIONS",
        "4096",
        "client connections open at most on the public listener, and its accept queue's length (capped by net.core.somaxconn); more are closed at once (16–1000000)",
    ),
    (
        "RTC_LEAVE_BRIDGE_USER_RATE",
        "30/m",
        "token and delegation requests per Matrix user: `N/s`, `N/m` or `N/h`, in bursts of up to N; more get 429",
    ),
    (
        "RTC_LEAVE_BRIDGE_HOMESERVER_RATE",
        "3000/m",
        "token and delegation requests of all users of one homeserver, likewise",
    ),
    (
        "RTC_LEAVE_BRIDGE_HOMESERVER_CHECKS",
        "32",
        "OpenID checks and discovery requests in flight at most towards one homeserver; more wait up to 5 s, then get 429 (1–1024)",
    ),
    (
        "RTC_LEAVE_BRIDGE_HOMESERVER_CALLS",
        "128",
        "restarts (and, apart, sends) in flight at most towards one homeserver; homeservers take turns, so a slow one delays only its own members (1–4096)",
    ),
    (
        "RTC_LEAVE_BRIDGE_JOBS_PER_USER",
        "50",
        "delegated leaves in effect at most for one Matrix user (a device replacing its own does not count twice; with Redis, per instance) (1–100000)",
    ),
    (
        "LIVEKIT_FULL_ACCESS_HOMESERVERS",
        "(required)",
        "comma-separated server names whose users may open LiveKit rooms and delegate; `*` = any homeserver on the internet (warned about)",
    ),
    ("LIVEKIT_CS_API_URL_OVERRIDES", "", "`server=url,…`: client-server API base per homeserver (else well-known)"),
    ("LIVEKIT_FEDERATION_URL_OVERRIDES", "", "`server=url,…`: federation API base per homeserver, for OpenID checks"),
    ("LIVEKIT_AS_REGISTRATION_FILE", "", "appservice mode: the registration YAML (source of as_token and hs_token)"),
    ("LIVEKIT_AS_TOKEN", "", "appservice mode: as_token (instead of the registration file)"),
    ("LIVEKIT_HS_TOKEN", "", "appservice mode: hs_token (instead of the registration file)"),
    ("LIVEKIT_HS_SERVER_NAME", "", "appservice mode: server name of the one homeserver this appservice belongs to"),
    (
        "RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_SERVER",
        "",
        "server name of a bot account's homeserver: room membership is checked through it for users the appservice cannot act as (in OpenID mode: everyone), in rooms the bot is in",
    ),
    ("RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_TOKEN", "", "that bot's access token"),
    (
        "RTC_LEAVE_BRIDGE_CLOSE_ABANDONED_ROOMS",
        "false",
        "appservice mode: close (DeleteRoom) the LiveKit rooms of a Matrix room your homeserver has left (no user of it joined any more), disconnecting everyone, remote users included",
    ),
    (
        "RTC_LEAVE_BRIDGE_MEMBERSHIP_POLL_INTERVAL",
        "30s",
        "how often the joined members of every room with tokens in use are compared with those tokens' users, behind the appservice's pushed changes (1s–1h)",
    ),
    ("RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_TOKEN_FROM_FILE", "", "file holding that bot's access token"),
    ("LIVEKIT_INSECURE_SKIP_VERIFY_TLS", "", "`YES_I_KNOW_WHAT_I_AM_DOING` disables TLS certificate checks"),
    ("LIVEKIT_LOG_LEVEL", "info", "error, warn, info, debug or trace"),
    ("RTC_LEAVE_BRIDGE_LOG_FORMAT", "text", "`text` or `json`"),
    (
        "RTC_LEAVE_BRIDGE_DATA_DIR",
        "./data",
        "directory of the SQLite database (the store unless LIVEKIT_REDIS_URL is set)",
    ),
    (
        "LIVEKIT_REDIS_URL",
        "",
        "redis:// or rediss:// URL (password, database) of a Redis or Valkey to keep jobs in instead of SQLite",
    ),
    ("RTC_LEAVE_BRIDGE_REDIS_PREFIX", "rtc-leave-bridge:", "prefix of every key in Redis (to share LiveKit's Redis)"),
    (
        "RTC_LEAVE_BRIDGE_LEASE",
        "2s",
        "with Redis: how long an instance's claim on its shards of jobs lasts unrenewed, i.e. how soon the others take over from a dead one (1s–10s)",
    ),
    (
        "RTC_LEAVE_BRIDGE_INSTANCE",
        "(host name)",
        "with Redis: this instance's name in logs, metrics and Redis (a random suffix is added per process)",
    ),
    (
        "RTC_LEAVE_BRIDGE_RESTART_AT",
        "0.8",
        "restart the delayed event when this fraction of its delay has elapsed (0.1–0.95)",
    ),
    (
        "RTC_LEAVE_BRIDGE_JOIN_TIMEOUT",
        "30s",
        "how long a delegated member may take to connect before LiveKit is asked (1s–1h)",
    ),
    ("RTC_LEAVE_BRIDGE_GRACE", "10s", "how long a migrating / shut-down session may take to reappear (0–10m)"),
    (
        "RTC_LEAVE_BRIDGE_UNCONFIRMED_LIMIT",
        "5m",
        "how long a member LiveKit must confirm is kept alive while LiveKit cannot be asked; then the homeserver's timer decides (10s–24h)",
    ),
    (
        "RTC_LEAVE_BRIDGE_RECONCILE_INTERVAL",
        "30s",
        "how often rooms with jobs are listed through RoomService (100ms–1h)",
    ),
    ("RTC_LEAVE_BRIDGE_REQUEST_TIMEOUT", "10s", "timeout of each homeserver and LiveKit request (100ms–5m)"),
    (
        "RTC_LEAVE_BRIDGE_SHUTDOWN_TIMEOUT",
        "10s",
        "how long SIGTERM waits for in-flight homeserver calls and the store (0–10m)",
    ),
    ("RTC_LEAVE_BRIDGE_TOKEN_TTL", "1h", "lifetime of the LiveKit tokens issued (1m–24h)"),
    (
        "RTC_LEAVE_BRIDGE_ROOM_EMPTY_TIMEOUT",
        "5m",
        "a LiveKit room created for a full-access user closes after being empty this long (0–24h)",
    ),
    (
        "RTC_LEAVE_BRIDGE_ROOM_DEPARTURE_TIMEOUT",
        "20s",
        "a LiveKit room created for a full-access user closes this long after its last participant left (0–1h)",
    ),
    ("RTC_LEAVE_BRIDGE_MAX_DELAY", "24h", "largest delay_timeout accepted from a client (1s–7d)"),
    (
        "RTC_LEAVE_BRIDGE_MIN_DELAY",
        "5s",
        "smallest delay_timeout accepted from a client: a delay shorter than a few seconds leaves no room for a slow answer; with Redis at least lease × 1.25 + 2s, so that a dead instance's members are taken over before their delay runs out (1s–1h)",
    ),
    (
        "RTC_LEAVE_BRIDGE_ALLOW_PRIVATE_HOMESERVERS",
        "false",
        "allow discovered homeserver addresses in loopback/private/link-local ranges",
    ),
];

#[derive(Debug, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct ConfigError {
    pub setting: String,
    pub reason: String,
}

fn bad(setting: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError { setting: setting.into(), reason: reason.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `server=url,server=url` as in `LIVEKIT_CS_API_URL_OVERRIDES`.
pub type Overrides = HashMap<String, Url>;

/// Which homeservers' users may delegate (`LIVEKIT_FULL_ACCESS_HOMESERVERS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedHomeservers {
    Any,
    Only(HashSet<String>),
}

impl AllowedHomeservers {
    pub fn allows(&self, server: &str) -> bool {
        match self {
            AllowedHomeservers::Any => true,
            AllowedHomeservers::Only(set) => set.contains(server),
        }
    }
}

/// A typed group of settings that reads and validates itself.
pub trait Section: Sized {
    fn from_source(src: &Source) -> Result<Self, ConfigError>;
}

/// Where the service listens, and what a connection may take (`healthcheck` needs nothing
/// else).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    pub bind: SocketAddr,
    /// The operator endpoints' own listener, if they have one.
    pub operator_bind: Option<SocketAddr>,
    /// A request's headers must arrive within this.
    pub header_timeout: Duration,
    /// A request must be read and answered within this.
    pub request_timeout: Duration,
    /// Connections open at most on the public listener.
    pub max_connections: usize,
}

impl Section for Listen {
    fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let bind = match (src.get("LIVEKIT_JWT_BIND"), src.get("LIVEKIT_JWT_PORT")) {
            (None, Some(port)) => parse_bind("LIVEKIT_JWT_PORT", &format!(":{port}"))?,
            _ => parse_bind("LIVEKIT_JWT_BIND", src.get_or_default("LIVEKIT_JWT_BIND"))?,
        };
        let operator_bind = src
            .get("RTC_LEAVE_BRIDGE_OPERATOR_BIND")
            .map(|b| parse_bind("RTC_LEAVE_BRIDGE_OPERATOR_BIND", b))
            .transpose()?;
        if operator_bind.is_some_and(|o| o.port() == bind.port() && o.port() != 0) {
            return Err(bad("RTC_LEAVE_BRIDGE_OPERATOR_BIND", "must differ from LIVEKIT_JWT_BIND's port"));
        }
        Ok(Listen {
            bind,
            operator_bind,
            header_timeout: src.duration("RTC_LEAVE_BRIDGE_HEADER_TIMEOUT", ms(1_000), ms(300_000))?,
            request_timeout: src.duration("RTC_LEAVE_BRIDGE_HTTP_TIMEOUT", ms(5_000), ms(600_000))?,
            max_connections: src.count("RTC_LEAVE_BRIDGE_MAX_CONNECTIONS", 16, 1_000_000)?,
        })
    }
}

/// What one user or one homeserver may ask of the bridge: request rates, OpenID checks in
/// flight, homeserver calls in flight, live jobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fairness {
    pub user_rate: Rate,
    pub homeserver_rate: Rate,
    /// OpenID checks and discovery requests in flight towards one homeserver.
    pub homeserver_checks: usize,
    /// Restarts (and, apart, sends) in flight towards one homeserver.
    pub homeserver_calls: usize,
    pub jobs_per_user: usize,
}

impl Section for Fairness {
    fn from_source(src: &Source) -> Result<Self, ConfigError> {
        Ok(Fairness {
            user_rate: src.rate("RTC_LEAVE_BRIDGE_USER_RATE")?,
            homeserver_rate: src.rate("RTC_LEAVE_BRIDGE_HOMESERVER_RATE")?,
            homeserver_checks: src.count("RTC_LEAVE_BRIDGE_HOMESERVER_CHECKS", 1, 1_024)?,
            homeserver_calls: src.count("RTC_LEAVE_BRIDGE_HOMESERVER_CALLS", 1, 4_096)?,
            jobs_per_user: src.count("RTC_LEAVE_BRIDGE_JOBS_PER_USER", 1, 100_000)?,
        })
    }
}

/// `N` requests per `per`, in bursts of up to `N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub requests: u32,
    pub per: Duration,
}

impl Rate {
    /// `30/m`, `5/s`, `1000/h`.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let (n, unit) = text.trim().split_once('/').ok_or_else(|| format!("{text:?} is not like 30/m"))?;
        let requests: u32 = n.trim().parse().map_err(|_| format!("{text:?}: {n:?} is not a whole number"))?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => return Err(format!("{text:?}: unit {other:?} is not s, m or h")),
        };
        if requests == 0 {
            return Err(format!("{text:?}: at least 1 request"));
        }
        Ok(Rate { requests, per })
    }
}

/// The LiveKit SFU and its API key.
#[derive(Clone)]
pub struct LiveKit {
    /// As configured: the URL clients connect to, given out with every token.
    pub url: String,
    /// Where RoomService is called: `RTC_LEAVE_BRIDGE_LIVEKIT_API_URL`, else `url`, in http(s)
    /// form, path kept, no trailing slash.
    pub api_base: Url,
    /// The key this service signs with (tokens, RoomService): the first of `keys`.
    pub key: String,
    pub secret: String,
    /// Every key a webhook or operator token may be signed with (`LIVEKIT_KEY_FILE` may name
    /// several, to rotate keys); the first is `key`.
    pub keys: Vec<(String, String)>,
}

impl fmt::Debug for LiveKit {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveKit").field("url", &self.url).field("key", &self.key).finish_non_exhaustive()
    }
}

impl Section for LiveKit {
    fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let url = src.get("LIVEKIT_URL").ok_or_else(|| bad("LIVEKIT_URL", "required"))?.to_owned();
        let mut api_base = livekit_http_base(&url).map_err(|e| bad("LIVEKIT_URL", e))?;
        if let Some(api) = src.get("RTC_LEAVE_BRIDGE_LIVEKIT_API_URL") {
            api_base = livekit_http_base(api).map_err(|e| bad("RTC_LEAVE_BRIDGE_LIVEKIT_API_URL", e))?;
        }
        let mut keys = Vec::new();
        let (key, secret) = if let Some(path) = src.get("LIVEKIT_KEY_FILE") {
            let text = read_file("LIVEKIT_KEY_FILE", path)?;
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                let (k, s) =
                    line.split_once(':').ok_or_else(|| bad("LIVEKIT_KEY_FILE", "expected lines `key: secret`"))?;
                let (k, s) = (k.trim().to_owned(), s.trim().to_owned());
                if k.is_empty() || s.is_empty() {
                    return Err(bad("LIVEKIT_KEY_FILE", "a key or a secret is empty"));
                }
                if keys.iter().any(|(other, _)| *other == k) {
                    return Err(bad("LIVEKIT_KEY_FILE", format!("key {k} appears twice")));
                }
                keys.push((k, s));
            }
            keys.first().cloned().ok_or_else(|| bad("LIVEKIT_KEY_FILE", "expected lines `key: secret`"))?
        } else {
            let key = match src.get("LIVEKIT_KEY_FROM_FILE") {
                Some(p) => read_file("LIVEKIT_KEY_FROM_FILE", p)?,
                None => src.get("LIVEKIT_KEY").unwrap_or_default().to_owned(),
            };
            let secret = match src.get("LIVEKIT_SECRET_FROM_FILE") {
                Some(p) => read_file("LIVEKIT_SECRET_FROM_FILE", p)?,
                None => src.get("LIVEKIT_SECRET").unwrap_or_default().to_owned(),
            };
            (key, secret)
        };
        if key.is_empty() {
            return Err(bad("LIVEKIT_KEY", "required (or LIVEKIT_KEY_FILE / LIVEKIT_KEY_FROM_FILE)"));
        }
        if secret.is_empty() {
            return Err(bad("LIVEKIT_SECRET", "required (or LIVEKIT_KEY_FILE / LIVEKIT_SECRET_FROM_FILE)"));
        }
        if keys.is_empty() {
            keys.push((key.clone(), secret.clone()));
        }
        Ok(LiveKit { url, api_base, key, secret, keys })
    }
}

/// The HTTP(S) base of a LiveKit URL given as ws(s) or http(s), path kept, no trailing slash.
pub fn livekit_http_base(livekit_url: &str) -> Result<Url, String> {
    let mut url = Url::parse(livekit_url).map_err(|e| format!("{livekit_url:?}: {e}"))?;
    let scheme = match url.scheme() {
        "ws" | "http" => "http",
        "wss" | "https" => "https",
        other => return Err(format!("{livekit_url:?}: unsupported scheme {other:?}")),
    };
    url.set_scheme(scheme).map_err(|_| format!("{livekit_url:?}: cannot use scheme {scheme}"))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{livekit_url:?}: no host"));
    }
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&path);
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// The LiveKit tokens this service issues, and the rooms it opens for full-access users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ttl: Duration,
    pub room_empty_timeout: Duration,
    pub room_departure_timeout: Duration,
}

impl Section for Tokens {
    fn from_source(src: &Source) -> Result<Self, ConfigError> {
        Ok(Tokens {
            ttl: src.duration("RTC_LEAVE_BRIDGE_TOKEN_TTL", ms(60_000), hours(24))?,
            room_empty_timeout: src.duration("RTC_LEAVE_BRIDGE_ROOM_EMPTY_TIMEOUT", ms(0), hours(24))?,
            room_departure_timeout: src.duration("RTC_LEAVE_BRIDGE_ROOM_DEPARTURE_TIMEOUT", ms(0), hours(1))?,
        })
    }
}

/// The members' homeservers: who may delegate, how they are reached.
#[derive(Debug, Clone)]
pub struct Homeservers {
    pub allowed: AllowedHomeservers,
    pub cs_overrides: Overrides,
    pub federation_overrides: Overrides,
    pub insecure_skip_verify_tls: bool,
    pub allow_private: bool,
    /// Timeout of each homeserver (and LiveKit) request.
    pub request_timeout: Duration,
    /// Largest `delay_timeout` accepted from a client.
    pub max_delay: Duration,
    /// Smallest `delay_timeout` accepted from a client (raised to what failover needs with Redis:
    /// see [`Config`]).
    pub min_delay: Duration,
}

impl Section for Homeservers {
    fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let allowed_text = src.get("LIVEKIT_FULL_ACCESS_HOMESERVERS").ok_or_else(|| {
            bad(
                "LIVEKIT_FULL_ACCESS_HOMESERVERS",
                "required: the server names whose users may open LiveKit rooms and delegate (`*` for any homeserver on the internet)",
            )
        })?;
        let names: Vec<&str> = allowed_text.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        let allowed = if names.contains(&"*") {
            AllowedHomeservers::Any
        } else {
            for n in &names {
                validate_server_name("LIVEKIT_FULL_ACCESS_HOMESERVERS", n)?;
            }
            if names.is_empty() {
                return Err(bad("LIVEKIT_FULL_ACCESS_HOMESERVERS", "empty: nobody could delegate"));
            }
            AllowedHomeservers::Only(names.iter().map(|s| s.to_string()).collect())
        };
        let insecure_skip_verify_tls = match src.get("LIVEKIT_INSECURE_SKIP_VERIFY_TLS") {
            None => false,
            Some("YES_I_KNOW_WHAT_I_AM_DOING") => true,
            Some(other) => {
                return Err(bad(
                    "LIVEKIT_INSECURE_SKIP_VERIFY_TLS",
                    format!("{other:?}: only YES_I_KNOW_WHAT_I_AM_DOING enables it"),
                ));
            }
        };
        Ok(Homeservers {
            allowed,
            cs_overrides: parse_overrides("LIVEKIT_CS_API_URL_OVERRIDES", src.get("LIVEKIT_CS_API_URL_OVERRIDES"))?,
            federation_overrides: parse_overrides(
                "LIVEKIT_FEDERATION_URL_OVERRIDES",
                src.get("LIVEKIT_FEDERATION_URL_OVERRIDES"),
            )?,
            insecure_skip_verify_tls,
            allow_private: src.flag("RTC_LEAVE_BRIDGE_ALLOW_PRIVATE_HOMESERVERS")?,
            request_timeout: request_timeout(src)?,
            max_delay: src.duration("RTC_LEAVE_BRIDGE_MAX_DELAY", ms(1_000), hours(24 * 7))?,
            min_delay: src.duration("RTC_LEAVE_BRIDGE_MIN_DELAY", ms(1_000), hours(1))?,
        })
    }
}

fn request_timeout(src: &Source) -> Result<Duration, ConfigError> {
    src.duration("RTC_LEAVE_BRIDGE_REQUEST_TIMEOUT", ms(100), ms(300_000))
}

/// Logging.
#[derive(Debug, Clone)]
pub struct Logging {
    pub level: String,
    pub format: LogFormat,
}

impl Section for Logging {
    fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let level = src.get_or_default("LIVEKIT_LOG_LEVEL").to_ascii_lowercase();
        if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
            return Err(bad("LIVEKIT_LOG_LEVEL", format!("{level:?}: use error, warn, info, debug or trace")));
        }
        let format = match src.get_or_default("RTC_LEAVE_BRIDGE_LOG_FORMAT") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(bad("RTC_LEAVE_BRIDGE_LOG_FORMAT", format!("{other:?}: use text or json"))),
        };
        Ok(Logging { level, format })
    }
}

/// Where durable state lives: SQLite under `data_dir`, unless `redis` is set.
#[derive(Debug, Clone)]
pub struct Storage {
    pub data_dir: PathBuf,
    pub redis: Option<Redis>,
}

/// A Redis (or Valkey) store, shared by every instance using the same prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct Redis {
    /// May carry a password: never printed.
    pub url: String,
    pub prefix: String,
    /// How long a claim on a shard lasts unrenewed.
    pub lease: Duration,
    /// This instance's name (a random suffix is added per process).
    pub instance: String,
}

impl Redis {
    /// How often claims are renewed (and the cluster looked at).
    pub fn renew_interval(&self) -> Duration {
        self.lease / 4
    }

    /// The time from an instance's death to its members' next restart by another: its claims
    /// run out, a survivor notices on its next look and loads the jobs; a second for loading
    /// and the restart itself. Every job keeps this much of its delay in hand.
    pub fn failover_headroom(&self) -> Duration {
        self.lease + self.renew_interval() + Duration::from_secs(1)
    }
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// This machine's name, for instance names: `HOSTNAME`, else `/etc/hostname`, else `bridge`.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "bridge".to_owned())
}

impl Section for Storage {
    fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let redis = match src.get("LIVEKIT_REDIS_URL") {
            None => None,
            Some(url) => {
                let parsed = Url::parse(url).map_err(|e| bad("LIVEKIT_REDIS_URL", e.to_string()))?;
                if !matches!(parsed.scheme(), "redis" | "rediss") || parsed.host_str().is_none() {
                    return Err(bad("LIVEKIT_REDIS_URL", "expected redis://host[:port][/db] or rediss://…"));
                }
                let prefix = src.get_or_default("RTC_LEAVE_BRIDGE_REDIS_PREFIX").to_owned();
                let lease = src.duration("RTC_LEAVE_BRIDGE_LEASE", ms(1_000), ms(10_000))?;
                let instance = src.get("RTC_LEAVE_BRIDGE_INSTANCE").map(str::to_owned).unwrap_or_else(host_name);
                if instance.is_empty()
                    || instance.len() > 64
                    || instance.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(bad("RTC_LEAVE_BRIDGE_INSTANCE", "1 to 64 characters, no spaces"));
                }
                Some(Redis { url: url.to_owned(), prefix, lease, instance })
            }
        };
        Ok(Storage { data_dir: PathBuf::from(src.get_or_default("RTC_LEAVE_BRIDGE_DATA_DIR")), redis })
    }
}

/// Milliseconds, the lifecycle's unit of time.
pub type Millis = u64;

/// Timing knobs of the member lifecycle, all in milliseconds except the fractions.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Restart when this fraction of the delay has elapsed since the last confirmed restart.
    pub restart_fraction: f64,
    /// Up to this fraction of the delay is taken off each restart interval at random, so that
    /// restarts of members who joined together spread out.
    pub restart_jitter: f64,
    /// How long a delegated member may take to connect before LiveKit is asked whether it is there.
    pub join_timeout: Millis,
    /// How long a member that left for a migration / server shutdown may take to reappear.
    pub grace: Millis,
    /// How soon to ask LiveKit again after it could not be asked.
    pub probe_retry: Millis,
    /// First retry after a failed homeserver call; grows by half each time, jittered.
    pub backoff_initial: Millis,
    /// Ceiling of that backoff.
    pub backoff_max: Millis,
    /// Delay kept in hand at every restart for another instance to take the job over (0 with a
    /// single instance): restarts come at most `delay - failover_headroom` apart.
    pub failover_headroom: Millis,
    /// A homeserver call (from when the shell started it) or a RoomService listing (from when it
    /// was asked for) whose answer has not come back by then counts as failed: a lost answer (a
    /// task that panicked or was cancelled) never stops the restarts.
    pub call_timeout: Millis,
    /// Consecutive RoomService listings without the bound member that prove it gone: with two,
    /// each may fall in the gap of another reconnection whose webhooks were lost.
    pub absences_to_leave: u8,
    /// Those listings must have started at least this far apart: two started moments apart can
    /// both fall in the gap of one reconnection (a migration, a new session replacing the old).
    pub absence_spacing: Millis,
    /// How long a member whose presence must be confirmed (never joined, or gone for a migration)
    /// is kept alive while LiveKit cannot be asked. After that the job stops restarting and the
    /// homeserver's own timer decides: the last safety net against ghosts.
    pub unconfirmed_limit: Millis,
}

impl Default for Timing {
    /// The defaults of [`SETTINGS`].
    fn default() -> Self {
        Timing::from_source(&Source::from_pairs([])).expect("the defaults are valid")
    }
}

impl Section for Timing {
    fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let restart_fraction: f64 = src
            .get_or_default("RTC_LEAVE_BRIDGE_RESTART_AT")
            .parse()
            .map_err(|_| bad("RTC_LEAVE_BRIDGE_RESTART_AT", "not a number"))?;
        if !(0.1..=0.95).contains(&restart_fraction) {
            return Err(bad("RTC_LEAVE_BRIDGE_RESTART_AT", "must be between 0.1 and 0.95"));
        }
        let millis = |d: Duration| d.as_millis() as Millis;
        // A call's task reads /versions and then calls, each bounded by the request timeout.
        let call_timeout = 2 * millis(request_timeout(src)?) + 1_000;
        Ok(Timing {
            restart_fraction,
            // Jitter never eats more than half of the headroom.
            restart_jitter: (0.1f64).min(restart_fraction / 2.0),
            join_timeout: millis(src.duration("RTC_LEAVE_BRIDGE_JOIN_TIMEOUT", ms(1_000), hours(1))?),
            grace: millis(src.duration("RTC_LEAVE_BRIDGE_GRACE", ms(0), ms(600_000))?),
            probe_retry: 5_000,
            backoff_initial: 1_000,
            backoff_max: 30_000,
            failover_headroom: 0,
            call_timeout,
            absences_to_leave: 3,
            absence_spacing: 1_500,
            unconfirmed_limit: millis(src.duration("RTC_LEAVE_BRIDGE_UNCONFIRMED_LIMIT", ms(10_000), hours(24))?),
        })
    }
}

/// The engine: lifecycle timing, reconciliation and shutdown.
#[derive(Debug, Clone)]
pub struct Engine {
    pub timing: Timing,
    pub reconcile_interval: Duration,
    pub shutdown_timeout: Duration,
}

impl Section for Engine {
    fn from_source(src: &Source) -> Result<Self, ConfigError> {
        Ok(Engine {
            timing: Timing::from_source(src)?,
            reconcile_interval: src.duration("RTC_LEAVE_BRIDGE_RECONCILE_INTERVAL", ms(100), hours(1))?,
            shutdown_timeout: src.duration("RTC_LEAVE_BRIDGE_SHUTDOWN_TIMEOUT", ms(0), ms(600_000))?,
        })
    }
}

/// Appservice (homeserver-proxied) mode: the tokens shared with the one homeserver it serves.
#[derive(Clone, PartialEq, Eq)]
pub struct Appservice {
    /// What we present to the homeserver.
    pub as_token: String,
    /// What the homeserver presents to us.
    pub hs_token: String,
    pub server_name: String,
}

impl fmt::Debug for Appservice {
    /// Never prints the tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Appservice").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

/// A bot account in the rooms whose membership it shows (`RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_*`).
#[derive(Clone, PartialEq, Eq)]
pub struct MembershipBot {
    pub server_name: String,
    pub access_token: String,
}

impl fmt::Debug for MembershipBot {
    /// Never prints the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MembershipBot").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

/// Everything `serve` and `check-config` need.
#[derive(Debug, Clone)]
pub struct Config {
    pub livekit: LiveKit,
    pub tokens: Tokens,
    pub listen: Listen,
    pub homeservers: Homeservers,
    pub logging: Logging,
    pub storage: Storage,
    pub engine: Engine,
    pub fairness: Fairness,
    /// Set when the appservice settings are.
    pub appservice: Option<Appservice>,
    /// Set when the membership bot's settings are.
    pub membership_bot: Option<MembershipBot>,
    /// How often rooms with seats are polled (membership following).
    pub membership_poll_interval: Duration,
    /// Close the LiveKit rooms of Matrix rooms the homeserver has left.
    pub close_abandoned_rooms: bool,
}

impl Section for Config {
    /// With Redis, every job keeps [`Redis::failover_headroom`] of its delay in hand, and a
    /// delay must leave at least a second between restarts beyond it.
    fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let mut config = Config {
            livekit: LiveKit::from_source(src)?,
            tokens: Tokens::from_source(src)?,
            listen: Listen::from_source(src)?,
            homeservers: Homeservers::from_source(src)?,
            logging: Logging::from_source(src)?,
            storage: Storage::from_source(src)?,
            engine: Engine::from_source(src)?,
            fairness: Fairness::from_source(src)?,
            appservice: parse_appservice(src)?,
            membership_bot: parse_membership_bot(src)?,
            membership_poll_interval: src.duration("RTC_LEAVE_BRIDGE_MEMBERSHIP_POLL_INTERVAL", ms(1_000), hours(1))?,
            close_abandoned_rooms: src.flag("RTC_LEAVE_BRIDGE_CLOSE_ABANDONED_ROOMS")?,
        };
        if let Some(redis) = &config.storage.redis {
            let headroom = redis.failover_headroom();
            let needed = headroom + Duration::from_secs(1);
            let hs = &mut config.homeservers;
            if src.get("RTC_LEAVE_BRIDGE_MIN_DELAY").is_none() {
                hs.min_delay = hs.min_delay.max(needed);
            } else if hs.min_delay < needed {
                return Err(bad(
                    "RTC_LEAVE_BRIDGE_MIN_DELAY",
                    format!(
                        "{:?} is shorter than what failover needs with RTC_LEAVE_BRIDGE_LEASE={:?}: at least {needed:?}",
                        hs.min_delay, redis.lease
                    ),
                ));
            }
            config.engine.timing.failover_headroom = headroom.as_millis() as Millis;
        }
        let hs = &config.homeservers;
        if hs.max_delay < hs.min_delay {
            return Err(bad("RTC_LEAVE_BRIDGE_MAX_DELAY", format!("below the smallest delay, {:?}", hs.min_delay)));
        }
        Ok(config)
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn hours(n: u64) -> Duration {
    Duration::from_secs(n * 3600)
}

/// A Matrix server name (`host[:port]`), as the spec's grammar allows.
fn validate_server_name(setting: &str, name: &str) -> Result<(), ConfigError> {
    ruma::ServerName::parse(name).map(|_| ()).map_err(|_| bad(setting, format!("{name:?} is not a server name")))
}

/// Where setting values come from: the environment over an optional TOML file.
pub struct Source {
    values: HashMap<String, String>,
}

impl Source {
    /// The process environment over `file` (if given).
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut values = HashMap::new();
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(path).map_err(|e| bad("--config", format!("{}: {e}", path.display())))?;
            let table: toml::Table = text.parse().map_err(|e| bad("--config", format!("{}: {e}", path.display())))?;
            for (key, value) in table {
                let key = key.to_ascii_uppercase();
                if !SETTINGS.iter().any(|(name, ..)| *name == key) {
                    return Err(bad("--config", format!("unknown setting {key}")));
                }
                let value = match value {
                    toml::Value::String(s) => s,
                    toml::Value::Array(items) => items
                        .iter()
                        .map(|v| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()))
                        .collect::<Vec<_>>()
                        .join(","),
                    other => other.to_string(),
                };
                values.insert(key, value);
            }
        }
        for (name, ..) in SETTINGS {
            if let Ok(v) = std::env::var(name) {
                values.insert((*name).to_owned(), v);
            }
        }
        Ok(Source { values })
    }

    /// From explicit pairs (tests).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Source { values: pairs.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect() }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    /// Setting `name`, or its default from [`SETTINGS`].
    pub fn get_or_default<'a>(&'a self, name: &str) -> &'a str {
        self.get(name)
            .unwrap_or_else(|| SETTINGS.iter().find(|(n, ..)| *n == name).map(|(_, d, _)| *d).unwrap_or_default())
    }

    /// Whole-number setting `name`, which must lie within `min..=max`.
    fn count(&self, name: &str, min: usize, max: usize) -> Result<usize, ConfigError> {
        let text = self.get_or_default(name);
        let n: usize = text.parse().map_err(|_| bad(name, format!("{text:?} is not a whole number")))?;
        if n < min || n > max {
            return Err(bad(name, format!("{n} is outside {min}..={max}")));
        }
        Ok(n)
    }

    fn rate(&self, name: &str) -> Result<Rate, ConfigError> {
        Rate::parse(self.get_or_default(name)).map_err(|e| bad(name, e))
    }

    /// Duration setting `name`, which must lie within `min..=max`.
    fn duration(&self, name: &str, min: Duration, max: Duration) -> Result<Duration, ConfigError> {
        let d = parse_duration(self.get_or_default(name)).map_err(|e| bad(name, e))?;
        if d < min || d > max {
            return Err(bad(name, format!("{d:?} is outside {min:?}..={max:?}")));
        }
        Ok(d)
    }

    fn flag(&self, name: &str) -> Result<bool, ConfigError> {
        match self.get_or_default(name).to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" | "" => Ok(false),
            other => Err(bad(name, format!("expected true or false, got {other:?}"))),
        }
    }
}

/// `500ms`, `30s`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 500ms, 30s, 2m, 1h"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        "h" => n * 3600e3,
        _ => return Err(format!("{text:?} needs a unit: ms, s, m or h")),
    };
    Ok(Duration::from_millis(ms as u64))
}

fn read_file(setting: &str, path: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map(|s| s.trim().to_owned()).map_err(|e| bad(setting, format!("{path}: {e}")))
}

fn parse_bind(setting: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    let text = text.trim();
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad(setting, format!("{text:?}: bad port")))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        let port: u16 = port.parse().map_err(|_| bad(setting, format!("{text:?}: bad port")))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    Err(bad(setting, format!("{text:?} is not :port, ip:port or [ipv6]:port")))
}

/// The appservice settings: all of them or none.
fn parse_appservice(src: &Source) -> Result<Option<Appservice>, ConfigError> {
    let file = src.get("LIVEKIT_AS_REGISTRATION_FILE");
    let (as_token, hs_token) = (src.get("LIVEKIT_AS_TOKEN"), src.get("LIVEKIT_HS_TOKEN"));
    let server = src.get("LIVEKIT_HS_SERVER_NAME");
    if file.is_none() && as_token.is_none() && hs_token.is_none() && server.is_none() {
        return Ok(None);
    }
    let (as_token, hs_token) = match (file, as_token, hs_token) {
        (Some(path), None, None) => {
            #[derive(serde::Deserialize)]
            struct Registration {
                as_token: String,
                hs_token: String,
            }
            let text = read_file("LIVEKIT_AS_REGISTRATION_FILE", path)?;
            let r: Registration = serde_yaml_ng::from_str(&text)
                .map_err(|e| bad("LIVEKIT_AS_REGISTRATION_FILE", format!("{path}: {e}")))?;
            (r.as_token, r.hs_token)
        }
        (Some(_), _, _) => {
            return Err(bad(
                "LIVEKIT_AS_REGISTRATION_FILE",
                "set either the registration file or LIVEKIT_AS_TOKEN + LIVEKIT_HS_TOKEN, not both",
            ));
        }
        (None, Some(a), Some(h)) => (a.to_owned(), h.to_owned()),
        (None, None, _) => {
            return Err(bad("LIVEKIT_AS_TOKEN", "required in appservice mode (or LIVEKIT_AS_REGISTRATION_FILE)"));
        }
        (None, _, None) => {
            return Err(bad("LIVEKIT_HS_TOKEN", "required in appservice mode (or LIVEKIT_AS_REGISTRATION_FILE)"));
        }
    };
    if as_token.is_empty() || hs_token.is_empty() {
        return Err(bad("LIVEKIT_AS_REGISTRATION_FILE", "as_token and hs_token must not be empty"));
    }
    if as_token == hs_token {
        return Err(bad("LIVEKIT_HS_TOKEN", "must differ from the as_token"));
    }
    let server = server.ok_or_else(|| bad("LIVEKIT_HS_SERVER_NAME", "required in appservice mode"))?;
    validate_server_name("LIVEKIT_HS_SERVER_NAME", server)?;
    Ok(Some(Appservice { as_token, hs_token, server_name: server.to_owned() }))
}

/// The membership bot's settings: its server and one source of its token, or none of them.
fn parse_membership_bot(src: &Source) -> Result<Option<MembershipBot>, ConfigError> {
    const SERVER: &str = "RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_SERVER";
    const TOKEN: &str = "RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_TOKEN";
    const TOKEN_FILE: &str = "RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_TOKEN_FROM_FILE";
    let access_token = match (src.get(TOKEN), src.get(TOKEN_FILE)) {
        (Some(_), Some(_)) => return Err(bad(TOKEN_FILE, format!("set either {TOKEN} or {TOKEN_FILE}, not both"))),
        (Some(t), None) => Some(t.to_owned()),
        (None, Some(path)) => Some(read_file(TOKEN_FILE, path)?),
        (None, None) => None,
    };
    match (src.get(SERVER), access_token) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(bad(SERVER, format!("required with {TOKEN}"))),
        (Some(_), None) => Err(bad(TOKEN, format!("required with {SERVER} (or {TOKEN_FILE})"))),
        (Some(_), Some(t)) if t.is_empty() => Err(bad(TOKEN_FILE, "the file is empty")),
        (Some(server), Some(access_token)) => {
            validate_server_name(SERVER, server)?;
            Ok(Some(MembershipBot { server_name: server.to_owned(), access_token }))
        }
    }
}

fn parse_overrides(setting: &str, text: Option<&str>) -> Result<Overrides, ConfigError> {
    let mut out = Overrides::new();
    for pair in text.unwrap_or_default().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (server, url) = pair.split_once('=').ok_or_else(|| bad(setting, format!("{pair:?} is not server=url")))?;
        validate_server_name(setting, server.trim())?;
        let url = Url::parse(url.trim()).map_err(|e| bad(setting, format!("{url:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(bad(setting, format!("{url} is not an http(s) URL")));
        }
        out.insert(server.trim().to_owned(), url);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            ("LIVEKIT_URL", "wss://sfu.example.com"),
            ("LIVEKIT_KEY", "k"),
            ("LIVEKIT_SECRET", "s"),
            ("LIVEKIT_FULL_ACCESS_HOMESERVERS", "hs.example"),
        ]
    }

    fn with<'a>(extra: &[(&'a str, &'a str)]) -> Result<Config, ConfigError> {
        let mut pairs = base();
        pairs.extend_from_slice(extra);
        Config::from_source(&Source::from_pairs(pairs))
    }

    #[test]
    fn defaults() {
        let c = with(&[]).unwrap();
        assert_eq!(c.listen.bind, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.homeservers.allowed, AllowedHomeservers::Only(["hs.example".to_owned()].into()));
        assert_eq!(c.homeservers.min_delay, ms(5_000), "a few seconds on every store");
        let l = &c.listen;
        assert_eq!((l.operator_bind, l.header_timeout, l.request_timeout), (None, ms(10_000), ms(60_000)));
        assert_eq!(l.max_connections, 4096);
        let f = &c.fairness;
        assert_eq!(f.user_rate, Rate { requests: 30, per: ms(60_000) });
        assert_eq!(f.homeserver_rate, Rate { requests: 3000, per: ms(60_000) });
        assert_eq!((f.homeserver_checks, f.homeserver_calls, f.jobs_per_user), (32, 128, 50));
        assert_eq!(c.engine.timing, Timing::default());
        assert_eq!(c.engine.timing.join_timeout, 30_000);
        assert_eq!(c.engine.timing.call_timeout, 21_000, "twice the request timeout, and a second");
        assert_eq!(c.engine.reconcile_interval, Duration::from_secs(30));
        assert_eq!(c.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(c.storage.redis, None, "SQLite unless Redis is named");
        let r = with(&[("LIVEKIT_REDIS_URL", "redis://:hunter2@redis:6379/2")]).unwrap().storage.redis.unwrap();
        assert_eq!(r.prefix, "rtc-leave-bridge:");
        assert!(!format!("{r:?}").contains("hunter2"), "the password is never printed");
        assert_eq!(with(&[("LIVEKIT_REDIS_URL", "http://redis")]).unwrap_err().setting, "LIVEKIT_REDIS_URL");
        assert_eq!(c.livekit.api_base.as_str(), "https://sfu.example.com/");
        let t = &c.tokens;
        assert_eq!((t.ttl, t.room_empty_timeout, t.room_departure_timeout), (hours(1), ms(300_000), ms(20_000)));
        let internal = with(&[("RTC_LEAVE_BRIDGE_LIVEKIT_API_URL", "http://livekit:7880/lk/")]).unwrap();
        assert_eq!(internal.livekit.url, "wss://sfu.example.com", "clients are still told the public URL");
        assert_eq!(internal.livekit.api_base.as_str(), "http://livekit:7880/lk");
        assert!(!format!("{c:?}").contains("\"s\""), "secret never printed");
    }

    #[test]
    fn full_access_homeservers_must_be_named_and_any_only_when_written() {
        let none = Config::from_source(&Source::from_pairs([
            ("LIVEKIT_URL", "wss://sfu.example.com"),
            ("LIVEKIT_KEY", "k"),
            ("LIVEKIT_SECRET", "s"),
        ]));
        let e = none.unwrap_err();
        assert_eq!(e.setting, "LIVEKIT_FULL_ACCESS_HOMESERVERS");
        assert!(e.reason.contains("required"), "{e}");
        assert_eq!(
            with(&[("LIVEKIT_FULL_ACCESS_HOMESERVERS", "*")]).unwrap().homeservers.allowed,
            AllowedHomeservers::Any
        );
        assert_eq!(
            with(&[("LIVEKIT_FULL_ACCESS_HOMESERVERS", " , ")]).unwrap_err().setting,
            "LIVEKIT_FULL_ACCESS_HOMESERVERS"
        );
    }

    #[test]
    fn limits_are_validated() {
        assert_eq!(Rate::parse("5/s").unwrap(), Rate { requests: 5, per: ms(1_000) });
        assert_eq!(Rate::parse(" 100 / h ").unwrap(), Rate { requests: 100, per: hours(1) });
        for bad in ["0/m", "5", "5/d", "x/s", "-1/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
        for (name, value) in [
            ("RTC_LEAVE_BRIDGE_MIN_DELAY", "500ms"),
            ("RTC_LEAVE_BRIDGE_USER_RATE", "fast"),
            ("RTC_LEAVE_BRIDGE_HOMESERVER_RATE", "0/s"),
            ("RTC_LEAVE_BRIDGE_HOMESERVER_CHECKS", "0"),
            ("RTC_LEAVE_BRIDGE_HOMESERVER_CALLS", "5000"),
            ("RTC_LEAVE_BRIDGE_JOBS_PER_USER", "-3"),
            ("RTC_LEAVE_BRIDGE_MAX_CONNECTIONS", "2"),
            ("RTC_LEAVE_BRIDGE_HEADER_TIMEOUT", "10ms"),
            ("RTC_LEAVE_BRIDGE_HTTP_TIMEOUT", "1h"),
            ("RTC_LEAVE_BRIDGE_OPERATOR_BIND", "nope"),
            ("RTC_LEAVE_BRIDGE_OPERATOR_BIND", ":8080"),
        ] {
            assert_eq!(with(&[(name, value)]).unwrap_err().setting, name, "{name}={value}");
        }
        let c = with(&[("RTC_LEAVE_BRIDGE_MIN_DELAY", "1s"), ("RTC_LEAVE_BRIDGE_OPERATOR_BIND", "127.0.0.1:9090")])
            .unwrap();
        assert_eq!(c.homeservers.min_delay, ms(1_000));
        assert_eq!(c.listen.operator_bind, Some("127.0.0.1:9090".parse().unwrap()));
        // With Redis the default is raised to what failover needs, never lowered.
        let r = with(&[("LIVEKIT_REDIS_URL", "redis://r"), ("RTC_LEAVE_BRIDGE_LEASE", "8s")]).unwrap();
        assert_eq!(r.homeservers.min_delay, ms(8_000 + 2_000 + 1_000 + 1_000));
        let r = with(&[("LIVEKIT_REDIS_URL", "redis://r")]).unwrap();
        assert_eq!(r.homeservers.min_delay, ms(5_000));
    }

    #[test]
    fn bind_forms() {
        let bind = |pairs: &[(&str, &str)]| Listen::from_source(&Source::from_pairs(pairs.iter().copied()));
        assert_eq!(bind(&[("LIVEKIT_JWT_BIND", ":9000")]).unwrap().bind.port(), 9000);
        assert_eq!(bind(&[("LIVEKIT_JWT_BIND", "127.0.0.1:0")]).unwrap().bind, "127.0.0.1:0".parse().unwrap());
        assert_eq!(bind(&[("LIVEKIT_JWT_BIND", "[::1]:80")]).unwrap().bind, "[::1]:80".parse().unwrap());
        assert_eq!(bind(&[("LIVEKIT_JWT_PORT", "81")]).unwrap().bind.port(), 81);
        assert_eq!(bind(&[("LIVEKIT_JWT_BIND", "nope")]).unwrap_err().setting, "LIVEKIT_JWT_BIND");
        // The listen address alone is a valid Listen section: healthcheck needs nothing else.
        assert_eq!(bind(&[]).unwrap().bind.port(), 8080);
    }

    #[test]
    fn errors_name_the_setting() {
        let missing = Config::from_source(&Source::from_pairs([("LIVEKIT_KEY", "k")])).unwrap_err();
        for (name, value) in [
            ("RTC_LEAVE_BRIDGE_JOIN_TIMEOUT", "2h"),
            ("RTC_LEAVE_BRIDGE_GRACE", "11m"),
            ("RTC_LEAVE_BRIDGE_UNCONFIRMED_LIMIT", "25h"),
            ("RTC_LEAVE_BRIDGE_RECONCILE_INTERVAL", "50ms"),
            ("RTC_LEAVE_BRIDGE_RECONCILE_INTERVAL", "2h"),
            ("RTC_LEAVE_BRIDGE_REQUEST_TIMEOUT", "10m"),
            ("RTC_LEAVE_BRIDGE_SHUTDOWN_TIMEOUT", "1h"),
            ("RTC_LEAVE_BRIDGE_MAX_DELAY", "200h"),
            ("RTC_LEAVE_BRIDGE_TOKEN_TTL", "30s"),
            ("RTC_LEAVE_BRIDGE_ROOM_DEPARTURE_TIMEOUT", "2h"),
        ] {
            let e = with(&[(name, value)]).unwrap_err();
            assert_eq!(e.setting, name, "{name}={value}: {e}");
            assert!(e.reason.contains("outside"), "{e}");
        }
        assert_eq!(missing.setting, "LIVEKIT_URL");
        for (name, value) in [
            ("LIVEKIT_INSECURE_SKIP_VERIFY_TLS", "yes"),
            ("RTC_LEAVE_BRIDGE_JOIN_TIMEOUT", "30"),
            ("RTC_LEAVE_BRIDGE_RESTART_AT", "1.5"),
            ("LIVEKIT_CS_API_URL_OVERRIDES", "hs.example"),
            ("LIVEKIT_LOG_LEVEL", "loud"),
            ("LIVEKIT_URL", "ftp://x"),
        ] {
            assert_eq!(with(&[(name, value)]).unwrap_err().setting, name, "{name}={value}");
        }
    }

    #[test]
    fn key_file_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "lkkey: lksecret\n").unwrap();
        let path = file.to_str().unwrap();
        let c = Config::from_source(&Source::from_pairs([
            ("LIVEKIT_URL", "ws://127.0.0.1:7880"),
            ("LIVEKIT_KEY_FILE", path),
            ("LIVEKIT_CS_API_URL_OVERRIDES", "hs1.test=http://127.0.0.1:8008, hs2.test=https://matrix.hs2.test"),
            ("LIVEKIT_FULL_ACCESS_HOMESERVERS", "hs1.test,hs2.test"),
        ]))
        .unwrap();
        assert_eq!((c.livekit.key.as_str(), c.livekit.secret.as_str()), ("lkkey", "lksecret"));
        // Rotation: several keys, the first signs.
        std::fs::write(&file, "# rotating\nnewkey: newsecret\nlkkey: lksecret\n").unwrap();
        let lk = LiveKit::from_source(&Source::from_pairs([("LIVEKIT_URL", "ws://lk"), ("LIVEKIT_KEY_FILE", path)]))
            .unwrap();
        assert_eq!(lk.key, "newkey");
        assert_eq!(lk.keys.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["newkey", "lkkey"]);
        assert!(!format!("{lk:?}").contains("secret"), "secrets never printed");
        std::fs::write(&file, "a: 1\na: 2\n").unwrap();
        let twice = LiveKit::from_source(&Source::from_pairs([("LIVEKIT_URL", "ws://lk"), ("LIVEKIT_KEY_FILE", path)]));
        assert_eq!(twice.unwrap_err().setting, "LIVEKIT_KEY_FILE");
        assert_eq!(c.homeservers.cs_overrides["hs2.test"].as_str(), "https://matrix.hs2.test/");
        assert!(c.homeservers.allowed.allows("hs1.test") && !c.homeservers.allowed.allows("evil.test"));
    }

    #[test]
    fn every_setting_is_documented_in_the_readme() {
        let readme = include_str!("../README.md");
        for (name, ..) in SETTINGS {
            assert!(readme.contains(&format!("`{name}`")), "{name} missing from the README's table");
        }
    }

    #[test]
    fn the_membership_bot_needs_its_server_and_one_token() {
        const SERVER: &str = "RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_SERVER";
        const TOKEN: &str = "RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_TOKEN";
        const FILE: &str = "RTC_LEAVE_BRIDGE_MEMBERSHIP_BOT_TOKEN_FROM_FILE";
        assert_eq!(with(&[]).unwrap().membership_bot, None);
        let bot = with(&[(SERVER, "hs.test"), (TOKEN, "syt_secret")]).unwrap().membership_bot.unwrap();
        assert_eq!((bot.server_name.as_str(), bot.access_token.as_str()), ("hs.test", "syt_secret"));
        assert!(!format!("{bot:?}").contains("syt_secret"), "the token is never printed");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bot-token");
        std::fs::write(&file, "syt_from_file\n").unwrap();
        let path = file.to_str().unwrap();
        let bot = with(&[(SERVER, "hs.test"), (FILE, path)]).unwrap().membership_bot.unwrap();
        assert_eq!(bot.access_token, "syt_from_file");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        for (partial, setting) in [
            (&[(TOKEN, "t")][..], SERVER),
            (&[(SERVER, "hs.test")][..], TOKEN),
            (&[(SERVER, "not a name"), (TOKEN, "t")][..], SERVER),
            (&[(SERVER, "hs.test"), (TOKEN, "t"), (FILE, path)][..], FILE),
            (&[(SERVER, "hs.test"), (FILE, empty.to_str().unwrap())][..], FILE),
        ] {
            assert_eq!(with(partial).unwrap_err().setting, setting, "{partial:?}");
        }
    }

    #[test]
    fn appservice_settings_are_all_or_nothing() {
        assert_eq!(with(&[]).unwrap().appservice, None);
        let a = with(&[("LIVEKIT_AS_TOKEN", "as"), ("LIVEKIT_HS_TOKEN", "hs"), ("LIVEKIT_HS_SERVER_NAME", "hs.test")])
            .unwrap()
            .appservice
            .unwrap();
        assert_eq!((a.as_token.as_str(), a.hs_token.as_str(), a.server_name.as_str()), ("as", "hs", "hs.test"));
        assert!(!format!("{a:?}").contains("\"as\""), "tokens never printed");
        for (partial, setting) in [
            (&[("LIVEKIT_AS_TOKEN", "as")][..], "LIVEKIT_HS_TOKEN"),
            (&[("LIVEKIT_HS_SERVER_NAME", "hs.test")][..], "LIVEKIT_AS_TOKEN"),
            (&[("LIVEKIT_AS_TOKEN", "as"), ("LIVEKIT_HS_TOKEN", "hs")][..], "LIVEKIT_HS_SERVER_NAME"),
            (
                &[("LIVEKIT_AS_TOKEN", "t"), ("LIVEKIT_HS_TOKEN", "t"), ("LIVEKIT_HS_SERVER_NAME", "hs.test")][..],
                "LIVEKIT_HS_TOKEN",
            ),
        ] {
            assert_eq!(with(partial).unwrap_err().setting, setting, "{partial:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("registration.yaml");
        std::fs::write(
            &file,
            "id: rtc\nas_token: fromfile-as\nhs_token: fromfile-hs\nurl: null\nrate_limited: false\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let a = with(&[("LIVEKIT_AS_REGISTRATION_FILE", path), ("LIVEKIT_HS_SERVER_NAME", "hs.test")])
            .unwrap()
            .appservice
            .unwrap();
        assert_eq!((a.as_token.as_str(), a.hs_token.as_str()), ("fromfile-as", "fromfile-hs"));
        let both = with(&[
            ("LIVEKIT_AS_REGISTRATION_FILE", path),
            ("LIVEKIT_AS_TOKEN", "x"),
            ("LIVEKIT_HS_SERVER_NAME", "hs.test"),
        ]);
        assert_eq!(both.unwrap_err().setting, "LIVEKIT_AS_REGISTRATION_FILE");
    }

    #[test]
    fn keeps_path_prefixes_and_maps_websocket_schemes() {
        let base = |u: &str| livekit_http_base(u).map(|u| u.to_string());
        assert_eq!(base("wss://sfu.example.com/livekit/").unwrap(), "https://sfu.example.com/livekit");
        assert_eq!(base("ws://127.0.0.1:7880").unwrap(), "http://127.0.0.1:7880/");
        assert!(base("ftp://x").is_err());
        assert!(base("not a url").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("10").is_err());
    }
}
