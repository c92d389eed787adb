//! The built `rtc-leave-bridge` binary, run as an operator would: configured by environment,
//! logs to a file, killed with SIGKILL or SIGTERM, restarted on the same data directory.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::livekit::{API_KEY, API_SECRET, LiveKit};
use super::synapse::{MatrixUser, SERVER_NAME, Synapse};

pub struct Bridge {
    pub url: String,
    pub data: tempfile::TempDir,
    pub env: HashMap<String, String>,
    child: Option<Child>,
    log: std::path::PathBuf,
    http: reqwest::Client,
}

impl Bridge {
    /// Settings pointing at the homeserver at `homeserver_url` (Synapse, or the recording proxy in
    /// front of it) and `livekit`, with short timings for tests.
    pub fn env_for(homeserver_url: &str, livekit: &LiveKit) -> HashMap<String, String> {
        Bridge::env_for_url(homeserver_url, &livekit.url)
    }

    /// As [`Bridge::env_for`], for the LiveKit server at `livekit_url` (a real one).
    pub fn env_for_url(homeserver_url: &str, livekit_url: &str) -> HashMap<String, String> {
        let hs = format!("{SERVER_NAME}={homeserver_url}");
        [
            ("LIVEKIT_URL", livekit_url),
            ("LIVEKIT_KEY", API_KEY),
            ("LIVEKIT_SECRET", API_SECRET),
            ("LIVEKIT_FULL_ACCESS_HOMESERVERS", SERVER_NAME),
            ("LIVEKIT_CS_API_URL_OVERRIDES", hs.as_str()),
            ("LIVEKIT_FEDERATION_URL_OVERRIDES", hs.as_str()),
            ("LIVEKIT_LOG_LEVEL", "debug"),
            ("RTC_LEAVE_BRIDGE_JOIN_TIMEOUT", "3s"),
            ("RTC_LEAVE_BRIDGE_GRACE", "2s"),
            ("RTC_LEAVE_BRIDGE_RECONCILE_INTERVAL", "2s"),
            ("RTC_LEAVE_BRIDGE_REQUEST_TIMEOUT", "2s"),
            // Short delays keep the tests quick; the hostile tests set the defaults back.
            ("RTC_LEAVE_BRIDGE_MIN_DELAY", "1s"),
            ("RTC_LEAVE_BRIDGE_USER_RATE", "1000/s"),
            ("RTC_LEAVE_BRIDGE_HOMESERVER_RATE", "1000/s"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// As [`Bridge::env_for`], for one of several instances sharing `redis_url`, named
    /// `instance`, with leases of `lease`.
    pub fn env_for_cluster(
        homeserver_url: &str,
        livekit: &LiveKit,
        redis_url: &str,
        lease: Duration,
        instance: &str,
    ) -> HashMap<String, String> {
        Bridge::env_for_cluster_url(homeserver_url, &livekit.url, redis_url, lease, instance)
    }

    /// As [`Bridge::env_for_cluster`], for the LiveKit server at `livekit_url`.
    pub fn env_for_cluster_url(
        homeserver_url: &str,
        livekit_url: &str,
        redis_url: &str,
        lease: Duration,
        instance: &str,
    ) -> HashMap<String, String> {
        let mut env = Bridge::env_for_url(homeserver_url, livekit_url);
        env.insert("LIVEKIT_REDIS_URL".into(), redis_url.into());
        env.insert("RTC_LEAVE_BRIDGE_LEASE".into(), format!("{}ms", lease.as_millis()));
        env.insert("RTC_LEAVE_BRIDGE_INSTANCE".into(), instance.into());
        let min_delay = Bridge::shortest_delay(lease);
        env.insert("RTC_LEAVE_BRIDGE_MIN_DELAY".into(), format!("{}ms", min_delay.as_millis()));
        env
    }

    /// The shortest delay failover allows with leases of `lease` (lease × 1.25 + 2 s, below the
    /// 5 s default): what a takeover may take before a moved job's first restart.
    pub fn shortest_delay(lease: Duration) -> Duration {
        lease + lease / 4 + Duration::from_secs(2)
    }

    pub async fn start(env: HashMap<String, String>) -> Bridge {
        Bridge::start_on(super::free_port(), env).await
    }

    /// As [`Bridge::start`], on a port chosen beforehand (one a homeserver was told about).
    pub async fn start_on(port: u16, env: HashMap<String, String>) -> Bridge {
        super::remember_failures();
        rtc_leave_bridge::homeserver::install_crypto_provider();
        let data = tempfile::tempdir().unwrap();
        let log = data.path().join("bridge.log");
        let mut b = Bridge {
            url: format!("http://127.0.0.1:{port}"),
            data,
            env,
            child: None,
            log,
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
        };
        b.env.insert("LIVEKIT_JWT_BIND".into(), format!("127.0.0.1:{port}"));
        b.env.insert("RTC_LEAVE_BRIDGE_DATA_DIR".into(), b.data.path().join("state").display().to_string());
        b.spawn().await;
        b
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(binary())
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&self.env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let url = format!("{}/readyz", self.url);
        let log = self.log.clone();
        let logs = move || std::fs::read_to_string(&log).unwrap_or_default();
        let child = self.child.as_mut().unwrap();
        super::wait_serving(&self.http, &url, child, Duration::from_secs(20), "bridge", logs).await;
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        super::kill9(&mut self.child);
    }

    /// Starts again on the same data directory and port.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        self.spawn().await;
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        sigterm(c.id());
        c.wait().unwrap()
    }

    /// Runs `rtc-leave-bridge <args>` with this bridge's settings, `overrides` on top.
    pub fn cli(&self, args: &[&str], overrides: &[(&str, &str)]) -> std::process::Output {
        let mut env = self.env.clone();
        for (k, v) in overrides {
            env.insert((*k).into(), (*v).into());
        }
        Command::new(binary())
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&env)
            .output()
            .unwrap()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.url)).send().await.unwrap().text().await.unwrap()
    }

    /// How many jobs the bridge tracks (the `jobs` gauges summed over states).
    pub async fn jobs_tracked(&self) -> f64 {
        let m = self.metrics().await;
        m.lines()
            .filter(|l| l.starts_with("rtc_leave_bridge_jobs{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }

    /// Waits (up to `within`) until the bridge tracks `n` jobs; returns the last count seen.
    pub async fn jobs_reach(&self, n: f64, within: Duration) -> f64 {
        let until = std::time::Instant::now() + within;
        loop {
            let count = self.jobs_tracked().await;
            if count == n || std::time::Instant::now() > until {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of one sample line of `/metrics` (0 if absent).
    pub async fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0.0)
    }

    /// Waits (up to 5 s) until the sample reaches `value`; returns the last value seen.
    pub async fn metric_reaches(&self, sample: &str, value: f64) -> f64 {
        let mut last = 0.0;
        for _ in 0..250 {
            last = self.metric(sample).await;
            if last >= value {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        last
    }

    /// POSTs a delegation body; returns status and JSON answer.
    pub async fn delegate_raw(&self, body: &Value) -> (u16, Value) {
        let resp = self.http.post(format!("{}/delegate_delayed_leave", self.url)).json(body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Delegates `delay_id` of `user`'s membership in `room`, authenticated by `user`'s own OpenID
    /// token, as Element Call does. Returns the body it sent.
    pub async fn delegate(
        &self,
        synapse: &Synapse,
        user: &MatrixUser,
        room: &str,
        member_id: &str,
        delay_id: &str,
        delay_ms: u64,
    ) -> Value {
        let body = delegation_body(&synapse.openid_token(user).await, user, room, member_id, delay_id, delay_ms);
        let (status, v) = self.delegate_raw(&body).await;
        assert_eq!(status, 200, "delegation refused: {v}\n{}", self.logs());
        assert_eq!(v, json!({}));
        body
    }
}

pub const SLOT: &str = "m.call#ROOM";

/// Element Call's `/get_token` body (`getLiveKitJWTWithDelayDelegation`) without a delayed leave:
/// the member id is `user:device`, the slot `m.call#ROOM`.
pub fn get_token_body(openid: &Value, user: &MatrixUser, room: &str) -> Value {
    json!({
        "room_id": room,
        "slot_id": SLOT,
        "openid_token": openid,
        "member": {
            "id": format!("{}:{}", user.user_id, user.device_id),
            "claimed_user_id": user.user_id,
            "claimed_device_id": user.device_id,
        },
    })
}

pub fn delegation_body(
    openid: &Value,
    user: &MatrixUser,
    room: &str,
    member_id: &str,
    delay_id: &str,
    delay_ms: u64,
) -> Value {
    json!({
        "room_id": room,
        "slot_id": SLOT,
        "openid_token": openid,
        "member": {"id": member_id, "claimed_user_id": user.user_id, "claimed_device_id": user.device_id},
        "delay_id": delay_id,
        "delay_timeout": delay_ms,
        "delay_cs_api_url": "http://169.254.169.254/latest/meta-data",
    })
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- bridge log ----\n{}", self.logs());
            super::repeat_failure();
        }
    }
}

fn sigterm(pid: u32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}

/// The bridge binary: this build's, unless `RTC_LEAVE_BRIDGE_BIN` names another (benchmarks of an
/// older build, for before/after figures).
fn binary() -> String {
    std::env::var("RTC_LEAVE_BRIDGE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_rtc-leave-bridge").to_owned())
}
