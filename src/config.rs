//! Configuration: environment variables with the names lk-jwt-service operators already use, plus
//! our own `RTC_LEAVE_BRIDGE_*` knobs; optionally a TOML file with the same names as keys
//! (environment wins). Everything is validated at start, and an error names the setting.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use crate::api::AllowedHomeservers;
use crate::homeserver::Overrides;
use crate::lifecycle::Timing;

/// Every setting we read, with its default (if any) and meaning; the README's table mirrors it.
pub const SETTINGS: &[(&str, &str, &str)] = &[
    (
        "LIVEKIT_URL",
        "(required)",
        "LiveKit SFU URL (ws/wss/http/https); RoomService is called on its http(s) form, path kept",
    ),
    ("LIVEKIT_KEY", "", "LiveKit API key (webhook verification, RoomService)"),
    ("LIVEKIT_SECRET", "", "LiveKit API secret"),
    ("LIVEKIT_KEY_FILE", "", "file holding `key: secret` (instead of LIVEKIT_KEY/LIVEKIT_SECRET)"),
    ("LIVEKIT_KEY_FROM_FILE", "", "file holding the API key"),
    ("LIVEKIT_SECRET_FROM_FILE", "", "file holding the API secret"),
    ("LIVEKIT_JWT_BIND", ":8080", "listen address: `:port`, `host:port` or `[v6]:port`"),
    ("LIVEKIT_JWT_PORT", "", "deprecated: port to listen on all interfaces, if LIVEKIT_JWT_BIND is unset"),
    ("LIVEKIT_FULL_ACCESS_HOMESERVERS", "*", "comma-separated server names whose users may delegate; `*` = any"),
    ("LIVEKIT_CS_API_URL_OVERRIDES", "", "`server=url,…`: client-server API base per homeserver (else well-known)"),
    ("LIVEKIT_FEDERATION_URL_OVERRIDES", "", "`server=url,…`: federation API base per homeserver, for OpenID checks"),
    ("LIVEKIT_AS_REGISTRATION_FILE", "", "appservice mode: the registration YAML (source of as_token and hs_token)"),
    ("LIVEKIT_AS_TOKEN", "", "appservice mode: as_token (instead of the registration file)"),
    ("LIVEKIT_HS_TOKEN", "", "appservice mode: hs_token (instead of the registration file)"),
    ("LIVEKIT_HS_SERVER_NAME", "", "appservice mode: server name of the one homeserver this appservice belongs to"),
    ("LIVEKIT_INSECURE_SKIP_VERIFY_TLS", "", "`YES_I_KNOW_WHAT_I_AM_DOING` disables TLS certificate checks"),
    ("LIVEKIT_LOG_LEVEL", "info", "error, warn, info, debug or trace"),
    ("RTC_LEAVE_BRIDGE_LOG_FORMAT", "text", "`text` or `json`"),
    ("RTC_LEAVE_BRIDGE_DATA_DIR", "./data", "directory of the SQLite database"),
    (
        "RTC_LEAVE_BRIDGE_RESTART_AT",
        "0.8",
        "restart the delayed event when this fraction of its delay has elapsed (0.1–0.95)",
    ),
    ("RTC_LEAVE_BRIDGE_JOIN_TIMEOUT", "30s", "how long a delegated member may take to connect before LiveKit is asked"),
    ("RTC_LEAVE_BRIDGE_GRACE", "10s", "how long a migrating / shut-down session may take to reappear"),
    (
        "RTC_LEAVE_BRIDGE_UNCONFIRMED_LIMIT",
        "5m",
        "how long a member LiveKit must confirm is kept alive while LiveKit cannot be asked; then the homeserver's timer decides",
    ),
    ("RTC_LEAVE_BRIDGE_RECONCILE_INTERVAL", "30s", "how often rooms with jobs are listed through RoomService"),
    ("RTC_LEAVE_BRIDGE_REQUEST_TIMEOUT", "10s", "timeout of each homeserver and LiveKit request"),
    ("RTC_LEAVE_BRIDGE_SHUTDOWN_TIMEOUT", "10s", "how long SIGTERM waits for in-flight homeserver calls"),
    ("RTC_LEAVE_BRIDGE_MAX_DELAY", "24h", "largest delay_timeout accepted from a client"),
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

/// The validated configuration.
#[derive(Clone)]
pub struct Config {
    pub livekit_url: String,
    pub livekit_key: String,
    pub livekit_secret: String,
    pub bind: SocketAddr,
    pub allowed: AllowedHomeservers,
    pub cs_overrides: Overrides,
    pub federation_overrides: Overrides,
    pub insecure_skip_verify_tls: bool,
    pub log_level: String,
    pub log_format: LogFormat,
    pub data_dir: PathBuf,
    pub timing: Timing,
    pub reconcile_interval: Duration,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub max_delay: Duration,
    pub allow_private_homeservers: bool,
    /// Set when the appservice settings are.
    pub appservice: Option<Appservice>,
}

impl fmt::Debug for Config {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("livekit_url", &self.livekit_url)
            .field("livekit_key", &self.livekit_key)
            .field("bind", &self.bind)
            .field("allowed", &self.allowed)
            .field("data_dir", &self.data_dir)
            .field("appservice", &self.appservice)
            .finish_non_exhaustive()
    }
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

    fn get_or_default<'a>(&'a self, name: &str) -> &'a str {
        self.get(name)
            .unwrap_or_else(|| SETTINGS.iter().find(|(n, ..)| *n == name).map(|(_, d, _)| *d).unwrap_or_default())
    }

    fn duration(&self, name: &str) -> Result<Duration, ConfigError> {
        parse_duration(self.get_or_default(name)).map_err(|e| bad(name, e))
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
    crate::homeserver::discovery::validate_server_name(server)
        .map_err(|e| bad("LIVEKIT_HS_SERVER_NAME", e.to_string()))?;
    Ok(Some(Appservice { as_token, hs_token, server_name: server.to_owned() }))
}

fn parse_overrides(setting: &str, text: Option<&str>) -> Result<Overrides, ConfigError> {
    let mut out = Overrides::new();
    for pair in text.unwrap_or_default().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (server, url) = pair.split_once('=').ok_or_else(|| bad(setting, format!("{pair:?} is not server=url")))?;
        crate::homeserver::discovery::validate_server_name(server.trim()).map_err(|e| bad(setting, e.to_string()))?;
        let url = Url::parse(url.trim()).map_err(|e| bad(setting, format!("{url:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(bad(setting, format!("{url} is not an http(s) URL")));
        }
        out.insert(server.trim().to_owned(), url);
    }
    Ok(out)
}

impl Config {
    pub fn from_source(src: &Source) -> Result<Config, ConfigError> {
        let livekit_url = src.get("LIVEKIT_URL").ok_or_else(|| bad("LIVEKIT_URL", "required"))?.to_owned();
        crate::livekit::room_service::http_base(&livekit_url).map_err(|e| bad("LIVEKIT_URL", e))?;

        let (livekit_key, livekit_secret) = if let Some(path) = src.get("LIVEKIT_KEY_FILE") {
            let text = read_file("LIVEKIT_KEY_FILE", path)?;
            let (k, s) = text
                .lines()
                .find_map(|l| l.split_once(':'))
                .ok_or_else(|| bad("LIVEKIT_KEY_FILE", "expected a line `key: secret`"))?;
            (k.trim().to_owned(), s.trim().to_owned())
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
        if livekit_key.is_empty() {
            return Err(bad("LIVEKIT_KEY", "required (or LIVEKIT_KEY_FILE / LIVEKIT_KEY_FROM_FILE)"));
        }
        if livekit_secret.is_empty() {
            return Err(bad("LIVEKIT_SECRET", "required (or LIVEKIT_KEY_FILE / LIVEKIT_SECRET_FROM_FILE)"));
        }

        let bind = match (src.get("LIVEKIT_JWT_BIND"), src.get("LIVEKIT_JWT_PORT")) {
            (None, Some(port)) => parse_bind("LIVEKIT_JWT_PORT", &format!(":{port}"))?,
            _ => parse_bind("LIVEKIT_JWT_BIND", src.get_or_default("LIVEKIT_JWT_BIND"))?,
        };

        let allowed_text = src.get_or_default("LIVEKIT_FULL_ACCESS_HOMESERVERS");
        let names: Vec<&str> = allowed_text.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        let allowed = if names.contains(&"*") {
            AllowedHomeservers::Any
        } else {
            for n in &names {
                crate::homeserver::discovery::validate_server_name(n)
                    .map_err(|e| bad("LIVEKIT_FULL_ACCESS_HOMESERVERS", e.to_string()))?;
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

        let log_level = src.get_or_default("LIVEKIT_LOG_LEVEL").to_ascii_lowercase();
        if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
            return Err(bad("LIVEKIT_LOG_LEVEL", format!("{log_level:?}: use error, warn, info, debug or trace")));
        }
        let log_format = match src.get_or_default("RTC_LEAVE_BRIDGE_LOG_FORMAT") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(bad("RTC_LEAVE_BRIDGE_LOG_FORMAT", format!("{other:?}: use text or json"))),
        };

        let restart_fraction: f64 = src
            .get_or_default("RTC_LEAVE_BRIDGE_RESTART_AT")
            .parse()
            .map_err(|_| bad("RTC_LEAVE_BRIDGE_RESTART_AT", "not a number"))?;
        if !(0.1..=0.95).contains(&restart_fraction) {
            return Err(bad("RTC_LEAVE_BRIDGE_RESTART_AT", "must be between 0.1 and 0.95"));
        }
        let join_timeout = src.duration("RTC_LEAVE_BRIDGE_JOIN_TIMEOUT")?;
        let grace = src.duration("RTC_LEAVE_BRIDGE_GRACE")?;
        let unconfirmed_limit = src.duration("RTC_LEAVE_BRIDGE_UNCONFIRMED_LIMIT")?;
        let reconcile_interval = src.duration("RTC_LEAVE_BRIDGE_RECONCILE_INTERVAL")?;
        if reconcile_interval < Duration::from_millis(100) {
            return Err(bad("RTC_LEAVE_BRIDGE_RECONCILE_INTERVAL", "must be at least 100ms"));
        }
        let request_timeout = src.duration("RTC_LEAVE_BRIDGE_REQUEST_TIMEOUT")?;
        if request_timeout < Duration::from_millis(100) {
            return Err(bad("RTC_LEAVE_BRIDGE_REQUEST_TIMEOUT", "must be at least 100ms"));
        }
        let timing = Timing {
            restart_fraction,
            // Jitter never eats more than half of the headroom.
            restart_jitter: (0.1f64).min(restart_fraction / 2.0),
            join_timeout: join_timeout.as_millis() as u64,
            grace: grace.as_millis() as u64,
            unconfirmed_limit: unconfirmed_limit.as_millis() as u64,
            ..Timing::default()
        };

        Ok(Config {
            livekit_url,
            livekit_key,
            livekit_secret,
            bind,
            allowed,
            cs_overrides: parse_overrides("LIVEKIT_CS_API_URL_OVERRIDES", src.get("LIVEKIT_CS_API_URL_OVERRIDES"))?,
            federation_overrides: parse_overrides(
                "LIVEKIT_FEDERATION_URL_OVERRIDES",
                src.get("LIVEKIT_FEDERATION_URL_OVERRIDES"),
            )?,
            insecure_skip_verify_tls,
            log_level,
            log_format,
            data_dir: PathBuf::from(src.get_or_default("RTC_LEAVE_BRIDGE_DATA_DIR")),
            timing,
            reconcile_interval,
            request_timeout,
            shutdown_timeout: src.duration("RTC_LEAVE_BRIDGE_SHUTDOWN_TIMEOUT")?,
            max_delay: src.duration("RTC_LEAVE_BRIDGE_MAX_DELAY")?,
            allow_private_homeservers: src.flag("RTC_LEAVE_BRIDGE_ALLOW_PRIVATE_HOMESERVERS")?,
            appservice: parse_appservice(src)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![("LIVEKIT_URL", "wss://sfu.example.com"), ("LIVEKIT_KEY", "k"), ("LIVEKIT_SECRET", "s")]
    }

    fn with<'a>(extra: &[(&'a str, &'a str)]) -> Result<Config, ConfigError> {
        let mut pairs = base();
        pairs.extend_from_slice(extra);
        Config::from_source(&Source::from_pairs(pairs))
    }

    #[test]
    fn defaults() {
        let c = with(&[]).unwrap();
        assert_eq!(c.bind, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.allowed, AllowedHomeservers::Any);
        assert_eq!(c.timing.join_timeout, 30_000);
        assert_eq!(c.reconcile_interval, Duration::from_secs(30));
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert!(!format!("{c:?}").contains("\"s\""), "secret never printed");
    }

    #[test]
    fn bind_forms() {
        assert_eq!(with(&[("LIVEKIT_JWT_BIND", ":9000")]).unwrap().bind.port(), 9000);
        assert_eq!(with(&[("LIVEKIT_JWT_BIND", "127.0.0.1:0")]).unwrap().bind, "127.0.0.1:0".parse().unwrap());
        assert_eq!(with(&[("LIVEKIT_JWT_BIND", "[::1]:80")]).unwrap().bind, "[::1]:80".parse().unwrap());
        assert_eq!(with(&[("LIVEKIT_JWT_PORT", "81")]).unwrap().bind.port(), 81);
        assert_eq!(with(&[("LIVEKIT_JWT_BIND", "nope")]).unwrap_err().setting, "LIVEKIT_JWT_BIND");
    }

    #[test]
    fn errors_name_the_setting() {
        let missing = Config::from_source(&Source::from_pairs([("LIVEKIT_KEY", "k")])).unwrap_err();
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
        assert_eq!((c.livekit_key.as_str(), c.livekit_secret.as_str()), ("lkkey", "lksecret"));
        assert_eq!(c.cs_overrides["hs2.test"].as_str(), "https://matrix.hs2.test/");
        assert!(c.allowed.allows("hs1.test") && !c.allowed.allows("evil.test"));
    }

    #[test]
    fn every_setting_is_documented_in_the_readme() {
        let readme = include_str!("../README.md");
        for (name, ..) in SETTINGS {
            assert!(readme.contains(&format!("`{name}`")), "{name} missing from the README's table");
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
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("10").is_err());
    }
}
