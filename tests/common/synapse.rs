//! A real Synapse (PyPI `matrix-synapse`) in a throwaway directory, with delayed events on, and
//! the Matrix client calls the tests make as a MatrixRTC client would.
//!
//! The Python interpreter is `$RTC_LEAVE_BRIDGE_PYTHON`, else `.venv/bin/python` of the checkout
//! (the README's test command creates it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const SERVER_NAME: &str = "hs1.test";

pub struct Synapse {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub url: String,
    child: Option<Child>,
    http: reqwest::Client,
}

/// Settings that differ between tests.
#[derive(Clone)]
pub struct SynapseOptions {
    /// `rc_delayed_event_mgmt`: (per_second, burst_count); `None` keeps Synapse's default (1/s, 5).
    pub delayed_event_rate: Option<(f64, u32)>,
    /// An appservice registration (YAML) to load, with MSC4512 proxying enabled.
    pub appservice_registration: Option<String>,
    /// A `matrix_rtc` section (YAML, without its key) to serve at `rtc/transports` (MSC4143).
    pub matrix_rtc: Option<String>,
    /// `default_room_version`; `None` keeps Synapse's (12 in 1.163, whose power levels Element
    /// Call 0.26.1's new rooms break: it lists their creator in `users`).
    pub default_room_version: Option<&'static str>,
    /// Sticky events (MSC4354), where Element Call's `matrix_2_0` mode keeps its membership.
    pub sticky_events: bool,
}

impl Default for SynapseOptions {
    fn default() -> Self {
        SynapseOptions {
            delayed_event_rate: Some((1000.0, 1000)),
            appservice_registration: None,
            matrix_rtc: None,
            default_room_version: None,
            sticky_events: false,
        }
    }
}

pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("RTC_LEAVE_BRIDGE_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Synapse venv at {}: run the README's test command (scripts/test.sh) first",
        venv.display()
    );
    venv
}

impl Synapse {
    pub async fn start(options: SynapseOptions) -> Synapse {
        rtc_leave_bridge::homeserver::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let d = dir.path().display();
        let mut extra = String::new();
        if let Some((rate, burst)) = options.delayed_event_rate {
            extra += &format!("rc_delayed_event_mgmt:\n  per_second: {rate}\n  burst_count: {burst}\n");
        }
        // Benchmarks schedule hundreds of delayed events for one user (Synapse's default cap: 100).
        let mut experimental = vec!["msc4140_max_delayed_events_per_user: 10000"];
        if let Some(section) = &options.matrix_rtc {
            experimental.push("msc4143_enabled: true");
            let indented: String = section.lines().map(|l| format!("  {l}\n")).collect();
            extra += &format!("matrix_rtc:\n{indented}");
        }
        if let Some(registration) = &options.appservice_registration {
            std::fs::write(dir.path().join("registration.yaml"), registration).unwrap();
            experimental.push("msc4512_enabled: true");
            extra += &format!("app_service_config_files: [{d}/registration.yaml]\n");
        }
        if let Some(version) = options.default_room_version {
            extra += &format!("default_room_version: \"{version}\"\n");
        }
        if options.sticky_events {
            experimental.push("msc4354_enabled: true");
        }
        extra += "experimental_features:\n";
        for line in experimental {
            extra += &format!("  {line}\n");
        }
        let config = format!(
            r#"server_name: "{SERVER_NAME}"
pid_file: {d}/homeserver.pid
listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client, federation, openid]
        compress: false
database:
  name: sqlite3
  args:
    database: {d}/homeserver.db
log_config: {d}/log.config
media_store_path: {d}/media_store
signing_key_path: {d}/signing.key
registration_shared_secret: "test-shared-secret"
macaroon_secret_key: "test-macaroon-secret"
form_secret: "test-form-secret"
report_stats: false
trusted_key_servers: []
suppress_key_server_warning: true
enable_registration: true
enable_registration_without_verification: true
max_event_delay_duration: 24h
{extra}rc_message: {{per_second: 1000, burst_count: 1000}}
rc_registration: {{per_second: 1000, burst_count: 1000}}
rc_login:
  address: {{per_second: 1000, burst_count: 1000}}
  account: {{per_second: 1000, burst_count: 1000}}
rc_joins:
  local: {{per_second: 1000, burst_count: 1000}}
rc_joins_per_room: {{per_second: 1000, burst_count: 1000}}
rc_room_creation: {{per_second: 1000, burst_count: 1000}}
"#
        );
        std::fs::write(dir.path().join("homeserver.yaml"), config).unwrap();
        let log = format!(
            "version: 1\nformatters:\n  f:\n    format: '%(asctime)s %(levelname)s %(name)s %(message)s'\nhandlers:\n  file:\n    class: logging.FileHandler\n    filename: {d}/homeserver.log\n    formatter: f\nroot:\n  level: WARNING\n  handlers: [file]\ndisable_existing_loggers: false\n"
        );
        std::fs::write(dir.path().join("log.config"), log).unwrap();
        let status = Command::new(python())
            .args(["-m", "synapse.app.homeserver", "-c", "homeserver.yaml", "--generate-keys"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "synapse --generate-keys failed");
        let mut s = Synapse {
            url: format!("http://127.0.0.1:{port}"),
            port,
            dir,
            child: None,
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
        };
        s.resume().await;
        s
    }

    /// Starts (again) the homeserver on the same directory and port.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(python())
            .args(["-m", "synapse.app.homeserver", "-c", "homeserver.yaml"])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let url = format!("{}/_matrix/client/versions", self.url);
        let stderr = self.dir.path().join("stderr.log");
        let logs = move || std::fs::read_to_string(&stderr).unwrap_or_default();
        let child = self.child.as_mut().unwrap();
        super::wait_serving(&self.http, &url, child, Duration::from_secs(60), "synapse", logs).await;
    }

    /// Stops the homeserver abruptly (it is "down" until [`Synapse::resume`]).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Registers `name` and returns a logged-in client.
    pub async fn register(&self, name: &str) -> MatrixUser {
        let (status, v) = self
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/register",
                None,
                json!({"username": name, "password": "correct horse battery staple", "auth": {"type": "m.login.dummy"}, "device_id": format!("{}DEV", name.to_uppercase())}),
            )
            .await;
        assert_eq!(status, 200, "register {name}: {v}");
        MatrixUser {
            user_id: v["user_id"].as_str().unwrap().to_owned(),
            device_id: v["device_id"].as_str().unwrap().to_owned(),
            token: v["access_token"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn create_room(&self, user: &MatrixUser) -> String {
        let (status, v) = self
            .call(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(&user.token), json!({"preset": "public_chat", "power_level_content_override": {"events": {"org.matrix.msc3401.call.member": 0}}}))
            .await;
        assert_eq!(status, 200, "{v}");
        v["room_id"].as_str().unwrap().to_owned()
    }

    pub async fn join_room(&self, user: &MatrixUser, room: &str) {
        let (status, v) = self
            .call(
                reqwest::Method::POST,
                &format!("/_matrix/client/v3/join/{}", enc(room)),
                Some(&user.token),
                json!({}),
            )
            .await;
        assert_eq!(status, 200, "{v}");
    }

    /// `user` leaves `room`.
    pub async fn leave_room(&self, user: &MatrixUser, room: &str) {
        let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(room));
        let (status, v) = self.call(reqwest::Method::POST, &path, Some(&user.token), json!({})).await;
        assert_eq!(status, 200, "{v}");
    }

    /// `by` kicks (`action` "kick") or bans ("ban") `user` from `room`.
    pub async fn remove_from_room(&self, by: &MatrixUser, action: &str, user: &MatrixUser, room: &str) {
        let path = format!("/_matrix/client/v3/rooms/{}/{action}", enc(room));
        let body = json!({"user_id": user.user_id, "reason": "test"});
        let (status, v) = self.call(reqwest::Method::POST, &path, Some(&by.token), body).await;
        assert_eq!(status, 200, "{action}: {v}");
    }

    /// Publishes a legacy call membership and schedules its delayed leave; returns the delay id.
    pub async fn join_call(&self, user: &MatrixUser, room: &str, delay_ms: u64) -> String {
        self.join_call_as(user, room, &user.state_key(), delay_ms).await
    }

    /// As [`Synapse::join_call`], under state key `key`.
    pub async fn join_call_as(&self, user: &MatrixUser, room: &str, key: &str, delay_ms: u64) -> String {
        let path = format!("/_matrix/client/v3/rooms/{}/state/org.matrix.msc3401.call.member/{}", enc(room), enc(key));
        // As MatrixRTC clients do: schedule the leave first, then publish the membership.
        let (status, v) = self
            .call(
                reqwest::Method::PUT,
                &format!("{path}?org.matrix.msc4140.delay={delay_ms}"),
                Some(&user.token),
                json!({}),
            )
            .await;
        assert_eq!(status, 200, "schedule delayed leave: {v}");
        let delay_id = v["delay_id"].as_str().unwrap().to_owned();
        let membership = json!({
            "application": "m.call", "call_id": "", "scope": "m.room", "device_id": user.device_id,
            "expires": 14_400_000, "focus_active": {"type": "livekit", "focus_selection": "oldest_membership"},
            "foci_preferred": [{"type": "livekit", "livekit_service_url": "https://lk-jwt.example"}]
        });
        let (status, v) = self.call(reqwest::Method::PUT, &path, Some(&user.token), membership).await;
        assert_eq!(status, 200, "publish membership: {v}");
        delay_id
    }

    /// Whether `user`'s call membership in `room` is present (a leave leaves `{}`).
    pub async fn is_member(&self, user: &MatrixUser, room: &str) -> bool {
        self.membership(user, room, &user.state_key()).await == Some(true)
    }

    /// Whether `user`'s call membership in `room` stays present for all of `wait` (checked every
    /// 200 ms).
    pub async fn still_member_after(&self, user: &MatrixUser, room: &str, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if !self.is_member(user, room).await {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        true
    }

    /// Whether the call membership under `key` is present; `None` if Synapse did not say (an
    /// error, an overloaded server).
    pub async fn membership(&self, user: &MatrixUser, room: &str, key: &str) -> Option<bool> {
        let path = format!("/_matrix/client/v3/rooms/{}/state/org.matrix.msc3401.call.member/{}", enc(room), enc(key));
        let (status, v) = self.call(reqwest::Method::GET, &path, Some(&user.token), Value::Null).await;
        match status {
            200 => Some(v.as_object().is_some_and(|o| !o.is_empty())),
            404 => Some(false),
            _ => None,
        }
    }

    /// The room's whole current state as `user` (joined) sees it.
    pub async fn room_state(&self, user: &MatrixUser, room: &str) -> Vec<Value> {
        let path = format!("/_matrix/client/v3/rooms/{}/state", enc(room));
        let (status, v) = self.call(reqwest::Method::GET, &path, Some(&user.token), Value::Null).await;
        assert_eq!(status, 200, "room state: {v}");
        v.as_array().cloned().unwrap_or_default()
    }

    /// Polls until the membership is gone; returns how long that took, or `None` after `within`.
    pub async fn wait_left(&self, user: &MatrixUser, room: &str, within: Duration) -> Option<Duration> {
        self.wait_left_as(user, room, &user.state_key(), within).await
    }

    /// As [`Synapse::wait_left`], for the membership under `key`: an answer Synapse could not
    /// give is no departure.
    pub async fn wait_left_as(&self, user: &MatrixUser, room: &str, key: &str, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < within {
            if self.membership(user, room, key).await == Some(false) {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// An OpenID token for `user`, as a client requests it before delegating.
    pub async fn openid_token(&self, user: &MatrixUser) -> Value {
        let (status, v) = self
            .call(
                reqwest::Method::POST,
                &format!("/_matrix/client/v3/user/{}/openid/request_token", enc(&user.user_id)),
                Some(&user.token),
                json!({}),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        v
    }

    /// Calls the homeserver-proxied delegation endpoint (MSC4512) as `user`, with its own token.
    pub async fn proxied_delegate(&self, user: &MatrixUser, body: &Value, stable: bool) -> (u16, Value) {
        self.proxied(user, "delegate_delayed_leave", body, stable).await
    }

    /// Calls `…/rtc/livekit/<endpoint>` on the homeserver (which forwards it to the appservice,
    /// MSC4512) as `user`, with its own token.
    pub async fn proxied(&self, user: &MatrixUser, endpoint: &str, body: &Value, stable: bool) -> (u16, Value) {
        let prefix = if stable { "/_matrix/client/v1" } else { "/_matrix/client/unstable/io.element.msc4195" };
        let path = format!("{prefix}/rtc/livekit/{endpoint}");
        self.call(reqwest::Method::POST, &path, Some(&user.token), body.clone()).await
    }

    /// Cancels a delayed event as its owner would.
    pub async fn cancel_delayed(&self, user: &MatrixUser, delay_id: &str) {
        let (status, v) = self.try_cancel_delayed(user, delay_id).await;
        assert_eq!(status, 200, "{v}");
    }

    /// As [`Synapse::cancel_delayed`]; the answer, whatever it is (404: already sent or expired).
    pub async fn try_cancel_delayed(&self, user: &MatrixUser, delay_id: &str) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            &format!("/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{}/cancel", enc(delay_id)),
            Some(&user.token),
            json!({}),
        )
        .await
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Clone)]
pub struct MatrixUser {
    pub user_id: String,
    pub device_id: String,
    pub token: String,
}

impl MatrixUser {
    /// The legacy membership state key.
    pub fn state_key(&self) -> String {
        format!("_{}_{}_m.call", self.user_id, self.device_id)
    }
}

pub fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}
