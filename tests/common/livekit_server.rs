//! A real LiveKit server (`livekit-server`, the Go module at the version `scripts/test.sh`
//! installs), run on loopback with **the shipped `deploy/livekit.yaml`**: only its addresses,
//! ports, key and webhook target are overridden, so the tests also prove the configuration
//! operators get (`room.auto_create: false` included). ICE runs on 127.0.0.1 with loopback
//! candidates.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::livekit::{API_KEY, API_SECRET};

/// The version `scripts/test.sh` installs and this harness expects.
pub const VERSION: &str = "1.13.5";

pub struct LiveKitServer {
    /// What clients connect to (`ws://127.0.0.1:PORT`).
    pub url: String,
    /// The same, as http (RoomService).
    pub http_url: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
}

/// The `livekit-server` binary: `LIVEKIT_SERVER_BIN`, else where `scripts/test.sh` caches it.
pub fn binary() -> PathBuf {
    if let Ok(bin) = std::env::var("LIVEKIT_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache"));
    cache.join(format!("rtc-leave-bridge/livekit-server-v{VERSION}/server"))
}

/// A UDP port range of `n` ports that is free now (probed).
fn free_udp_range(n: u16) -> u16 {
    for _ in 0..200 {
        // Above the kernel's ephemeral range (32768–60999 by default), where no socket of another
        // process lands by chance, and apart from [`super::free_port`]'s ports.
        let base = 61_000 + (rand::random::<u16>() % 4_400);
        let all_free = (base..base + n).all(|p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no free UDP range of {n} ports");
}

impl LiveKitServer {
    /// Starts LiveKit with its webhooks sent to `webhook_urls`.
    pub async fn start(webhook_urls: &[String]) -> LiveKitServer {
        super::remember_failures();
        let port = super::free_port();
        let mut server = LiveKitServer {
            url: format!("ws://127.0.0.1:{port}"),
            http_url: format!("http://127.0.0.1:{port}"),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            port,
        };
        server.write_config(webhook_urls);
        server.spawn().await;
        server
    }

    /// The shipped configuration with this run's addresses, ports, key and webhook targets.
    fn write_config(&self, webhook_urls: &[String]) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(root.join("deploy/livekit.yaml")).unwrap();
        let mut config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        let set = |v: &mut serde_yaml_ng::Value, path: &[&str], value: serde_yaml_ng::Value| {
            let mut at = v;
            for key in &path[..path.len() - 1] {
                let map = at.as_mapping_mut().unwrap();
                if !map.contains_key(*key) {
                    map.insert((*key).into(), serde_yaml_ng::Mapping::new().into());
                }
                at = map.get_mut(*key).unwrap();
            }
            at.as_mapping_mut().unwrap().insert(path[path.len() - 1].into(), value);
        };
        let udp = free_udp_range(20);
        let tcp = super::free_port();
        let yaml = |s: &str| serde_yaml_ng::from_str::<serde_yaml_ng::Value>(s).unwrap();
        set(&mut config, &["port"], self.port.into());
        set(&mut config, &["bind_addresses"], yaml("[127.0.0.1]"));
        set(&mut config, &["rtc", "tcp_port"], tcp.into());
        set(&mut config, &["rtc", "port_range_start"], udp.into());
        set(&mut config, &["rtc", "port_range_end"], (udp + 19).into());
        set(&mut config, &["rtc", "node_ip"], "127.0.0.1".into());
        set(&mut config, &["rtc", "enable_loopback_candidate"], true.into());
        set(&mut config, &["keys"], yaml(&format!("{{{API_KEY}: {API_SECRET}}}")));
        set(&mut config, &["webhook", "api_key"], API_KEY.into());
        let urls: Vec<serde_yaml_ng::Value> = webhook_urls.iter().map(|u| u.as_str().into()).collect();
        set(&mut config, &["webhook", "urls"], urls.into());
        // What operators get must already say these; the tests rely on them.
        assert_eq!(config["room"]["auto_create"].as_bool(), Some(false), "deploy/livekit.yaml opens rooms on join");
        assert_eq!(config["rtc"]["use_external_ip"].as_bool(), Some(false));
        std::fs::write(self.dir.path().join("livekit.yaml"), serde_yaml_ng::to_string(&config).unwrap()).unwrap();
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let bin = binary();
        assert!(bin.exists(), "{} missing: scripts/test.sh installs LiveKit server", bin.display());
        let child = Command::new(&bin)
            .arg("--config")
            .arg(self.dir.path().join("livekit.yaml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        let url = format!("{}/", self.http_url);
        let path = self.log_path();
        let logs = move || std::fs::read_to_string(&path).unwrap_or_default();
        super::wait_serving(&http, &url, self.child.as_mut().unwrap(), Duration::from_secs(30), "livekit-server", logs)
            .await;
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("livekit.log")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL: every participant's connection drops, and no webhook will ever say so.
    pub fn kill9(&mut self) {
        super::kill9(&mut self.child);
    }

    /// Starts again with the same configuration (an empty server: rooms live in memory).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        self.spawn().await;
    }
}

impl Drop for LiveKitServer {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(80).collect();
            eprintln!("---- livekit-server log (last lines) ----");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
            super::repeat_failure();
        }
    }
}
