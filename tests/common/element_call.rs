//! Element Call as its users run it: its embedded build (npm `@element-hq/element-call-embedded`,
//! installed by `scripts/test.sh` under `tests/element-call/`) served standalone with an operator's
//! `config.json`, and Debian's Chromium driving it (`tests/element-call/browser.mjs`, one process
//! and one browser per user), so that closing a tab, killing a browser and cutting its network are
//! what they are for a real user.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use rtc_leave_bridge::delegation::DelayRef;
use serde_json::{Value, json};

use super::bridge::Bridge;
use super::hs_proxy::{Call, HsProxy};
use super::livekit_server::LiveKitServer;
use super::synapse::{MatrixUser, SERVER_NAME, Synapse, SynapseOptions};
use super::webhook_proxy::WebhookProxy;

fn npm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/element-call")
}

fn dist() -> PathBuf {
    let dist = npm_dir().join("node_modules/@element-hq/element-call-embedded/dist");
    assert!(
        dist.join("index.html").exists(),
        "no Element Call at {}: run the README's test command (scripts/test.sh) first",
        dist.display()
    );
    dist
}

/// Element Call's version, as its package says.
pub fn version() -> String {
    let package = std::fs::read_to_string(dist().join("../package.json")).unwrap();
    serde_json::from_str::<Value>(&package).unwrap()["version"].as_str().unwrap().to_owned()
}

/// The operator's `config.json` for a homeserver and a MatrixRTC backend: the one `deploy/`
/// ships, with these addresses, and `mode` (`compatibility` or `matrix_2_0`).
pub fn config(homeserver_url: &str, server_name: &str, backend_url: &str, mode: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/element-call/config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    config["default_server_config"]["m.homeserver"] = json!({"base_url": homeserver_url, "server_name": server_name});
    config["livekit"]["livekit_service_url"] = json!(backend_url);
    config["matrix_rtc_mode"] = json!(mode);
    config
}

/// Element Call served standalone: assets by their path, `config.json` ours, `index.html` for
/// every other route (it routes in the page).
pub struct App {
    pub url: String,
    server: tokio::task::JoinHandle<()>,
}

impl App {
    pub async fn serve(config: Value) -> App {
        let dist = dist();
        let config = serde_json::to_vec(&config).unwrap();
        let app = axum::Router::new().fallback(move |uri: Uri| {
            let (dist, config) = (dist.clone(), config.clone());
            async move { asset(&dist, &config, uri.path()) }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        App { url, server }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn asset(dist: &Path, config: &[u8], path: &str) -> Response {
    if path == "/config.json" {
        return ([(header::CONTENT_TYPE, "application/json")], config.to_vec()).into_response();
    }
    // An asset of the build, wherever the page's route put the relative path (`/room/assets/…`).
    let file = path
        .find("/assets/")
        .map(|at| &path[at + 1..])
        .filter(|rel| !rel.contains(".."))
        .map(|rel| dist.join(rel))
        .filter(|f| f.is_file())
        .unwrap_or_else(|| dist.join("index.html"));
    let kind = match file.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript",
        "css" => "text/css",
        "json" | "map" => "application/json",
        "wasm" => "application/wasm",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        _ => "application/octet-stream",
    };
    match std::fs::read(&file) {
        Ok(body) => ([(header::CONTENT_TYPE, kind)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// One browser with Element Call, in a process of its own (its browser in a process group of its
/// own), optionally as user id `uid` (see [`super::participant::NetworkCut`]).
pub struct Browser {
    driver: Option<Child>,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Value>,
    /// Every event so far, in order.
    pub seen: Vec<Value>,
    /// The browser's process id (and process group).
    pub pid: u32,
    /// Where its console goes.
    dir: tempfile::TempDir,
    /// Once in a call: the Matrix user Element Call registered, its device and the call's link.
    pub user_id: String,
    pub device_id: String,
    pub call_url: String,
}

/// How long one step of a user's (loading the app, registering, joining) may take.
const STEP: Duration = Duration::from_secs(90);

impl Browser {
    pub async fn launch(uid: Option<u32>) -> Browser {
        super::remember_failures();
        let dir = tempfile::tempdir().unwrap();
        let script = npm_dir().join("browser.mjs");
        if let Some(uid) = uid {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).unwrap();
        }
        let mut driver = super::command_as("node", uid)
            .arg(script)
            .arg(dir.path().join("console.log"))
            .env("HOME", dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("driver.log")).unwrap())
            .spawn()
            .expect("node runs (Debian nodejs)");
        let events = super::json_lines(driver.stdout.take().unwrap());
        let stdin = driver.stdin.take();
        let mut b = Browser {
            driver: Some(driver),
            stdin,
            events,
            seen: Vec::new(),
            pid: 0,
            dir,
            user_id: String::new(),
            device_id: String::new(),
            call_url: String::new(),
        };
        let ready = b.wait_for("ready", Duration::from_secs(60)).await;
        let ready = ready.unwrap_or_else(|| panic!("the browser did not start: {:?}\n{}", b.seen, b.logs()));
        b.pid = ready["pid"].as_u64().unwrap() as u32;
        b
    }

    fn send(&mut self, command: Value) {
        let stdin = self.stdin.as_mut().expect("driver running");
        writeln!(stdin, "{command}").unwrap();
    }

    /// Carries out `command` and waits for it to be done.
    async fn run(&mut self, command: Value) {
        let what = command["do"].as_str().unwrap().to_owned();
        self.send(command);
        let until = Instant::now() + STEP;
        loop {
            if let Some(v) = self.next(until).await {
                if v["event"] == "done" && v["do"] == what.as_str() {
                    return;
                }
                if v["event"] == "error" {
                    panic!("{what} failed: {}\n{}", v["error"], self.logs());
                }
            } else {
                panic!("{what} not done within {STEP:?}: {:?}\n{}", self.seen, self.logs());
            }
        }
    }

    fn take_call(&mut self) {
        let in_call = self.seen.iter().rev().find(|v| v["event"] == "in_call").cloned().expect("in a call");
        self.user_id = in_call["user_id"].as_str().unwrap_or_default().to_owned();
        self.device_id = in_call["device_id"].as_str().unwrap_or_default().to_owned();
        self.call_url = in_call["url"].as_str().unwrap_or_default().to_owned();
    }

    /// Creates the call `call` in `app` as a new user named `name`, and joins it.
    pub async fn create_call(&mut self, app: &App, call: &str, name: &str) {
        self.run(json!({"do": "create", "url": app.url, "call": call, "name": name})).await;
        self.take_call();
    }

    /// Opens another user's call link as a new user named `name`, and joins the call.
    pub async fn join_call(&mut self, call_url: &str, name: &str) {
        self.run(json!({"do": "join", "url": call_url, "name": name})).await;
        self.take_call();
    }

    /// Element Call's own hang-up button.
    pub async fn hang_up(&mut self) {
        self.run(json!({"do": "hangup"})).await;
    }

    /// Closes the tab, as a user does.
    pub async fn close_tab(&mut self) {
        self.run(json!({"do": "close"})).await;
    }

    /// What the call shows: its tiles, its video elements, and how many of them play (a picture,
    /// its time advancing).
    pub async fn media(&mut self) -> (u64, u64, u64) {
        self.run(json!({"do": "media"})).await;
        let m = self.seen.iter().rev().find(|v| v["event"] == "media").unwrap();
        (m["tiles"].as_u64().unwrap(), m["videos"].as_u64().unwrap(), m["playing"].as_u64().unwrap())
    }

    /// Looks at what the call shows ([`Browser::media`]) until `settled` says it is as expected,
    /// for up to `within`; returns the last look, and whether it was.
    pub async fn wait_media(
        &mut self,
        within: Duration,
        settled: impl Fn(u64, u64, u64) -> bool,
    ) -> ((u64, u64, u64), bool) {
        let until = Instant::now() + within;
        loop {
            let (tiles, videos, playing) = self.media().await;
            if settled(tiles, videos, playing) {
                return ((tiles, videos, playing), true);
            }
            if Instant::now() >= until {
                return ((tiles, videos, playing), false);
            }
        }
    }

    /// Saves a screenshot next to the console log (kept when the test fails).
    pub async fn screenshot(&mut self) -> PathBuf {
        let path = self.dir.path().join(format!("screen-{}.png", self.seen.len()));
        self.run(json!({"do": "screenshot", "path": path})).await;
        path
    }

    /// SIGKILL of the whole browser (its process group) and of its driver: gone without a word.
    pub fn kill9(&mut self) {
        // (Quiet: a browser killed by the test is killed again, gone already, when dropped.)
        let group = format!("-{}", self.pid);
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        super::kill9(&mut self.driver);
    }

    /// The page's console and the driver's errors.
    pub fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("---- console ----\n{}---- driver ----\n{}", read("console.log"), read("driver.log"))
    }

    async fn next(&mut self, until: Instant) -> Option<Value> {
        loop {
            if let Ok(v) = self.events.try_recv() {
                self.seen.push(v.clone());
                return Some(v);
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_for(&mut self, event: &str, within: Duration) -> Option<Value> {
        let until = Instant::now() + within;
        while let Some(v) = self.next(until).await {
            if v["event"] == event {
                return Some(v);
            }
        }
        None
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("---- browser {} ({}) ----", self.user_id, self.dir.path().display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
            // Kept for a look: screenshots and the whole console.
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            eprintln!("(kept in {})", kept.display());
            super::repeat_failure();
        }
        self.stdin.take();
        self.kill9();
    }
}

pub const MEMBER: &str = "org.matrix.msc3401.call.member";

/// The whole stack a user of Element Call meets: a real Synapse (behind the recording proxy the
/// bridge reaches it through), a real LiveKit (its webhooks through a recording proxy), the built
/// bridge, and Element Call served with the operator's configuration.
pub struct Stack {
    pub synapse: Synapse,
    pub hs: HsProxy,
    pub livekit: LiveKitServer,
    pub webhooks: WebhookProxy,
    pub bridge: Bridge,
    pub app: App,
    /// A user of the homeserver who joins the call's room to read its state.
    pub observer: MatrixUser,
}

/// A user of Element Call, in a call.
pub struct User {
    pub browser: Browser,
    /// Their LiveKit identity (`@user:server:DEVICE`, or its hash in `matrix_2_0` mode).
    pub identity: String,
}

impl Stack {
    /// Everything, with Element Call in `mode` (`compatibility` or `matrix_2_0`).
    pub async fn start(mode: &str) -> Stack {
        let options = SynapseOptions {
            default_room_version: Some("11"),
            sticky_events: mode == "matrix_2_0",
            ..SynapseOptions::default()
        };
        let synapse = Synapse::start(options).await;
        let hs = HsProxy::start(&synapse.url).await;
        let port = super::free_port();
        let bridge_url = format!("http://127.0.0.1:{port}");
        let webhooks = WebhookProxy::start(&bridge_url).await;
        let livekit = LiveKitServer::start(std::slice::from_ref(&webhooks.url)).await;
        let bridge = Bridge::start_on(port, Bridge::env_for_url(&hs.url, &livekit.url)).await;
        let app = App::serve(config(&synapse.url, SERVER_NAME, &bridge.url, mode)).await;
        let observer = synapse.register("observer").await;
        Stack { synapse, hs, livekit, webhooks, bridge, app, observer }
    }

    /// A new browser creating a call (`link`: `None`) or joining the call at `link`, as user id
    /// `uid` if given; returns once LiveKit reported it joined (`others`: users still in calls)
    /// and the bridge has its delayed leave.
    pub async fn join(&self, name: &str, link: Option<&str>, uid: Option<u32>, others: &[&User]) -> User {
        let mut browser = Browser::launch(uid).await;
        let since = Instant::now();
        match link {
            None => browser.create_call(&self.app, "standup", name).await,
            Some(link) => browser.join_call(link, name).await,
        }
        // Its LiveKit identity: `@user:server:DEVICE` (compatibility mode), or a hash of it and
        // the membership (`matrix_2_0`): the one LiveKit reports joining since it started
        // joining that is nobody else's (users join one at a time).
        let until = Instant::now() + Duration::from_secs(30);
        let identity = loop {
            let deliveries = self.webhooks.deliveries().into_iter();
            let joined = deliveries.filter(|d| d.event == "participant_joined" && d.received >= since);
            let theirs = joined.filter_map(|d| d.identity).find(|i| others.iter().all(|o| &o.identity != i));
            if let Some(identity) = theirs {
                break identity;
            }
            assert!(
                Instant::now() < until,
                "LiveKit never reported {} joined\n{}",
                browser.user_id,
                self.bridge.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // The delayed leave it handed over: the one the bridge restarts, and nobody else's.
        let user = User { browser, identity };
        let handed = super::eventually(Duration::from_secs(30), || async { !self.delay_ids(&user).is_empty() }).await;
        assert!(handed, "{} handed no delayed leave over\n{}", user.identity, self.bridge.logs());
        user
    }

    /// A new user creating a call (compatibility mode), as user id `uid` if given: returns once
    /// the observer, joined to the call's room, sees the user's membership in its state.
    pub async fn start_call(&self, name: &str, uid: Option<u32>) -> (User, String) {
        let user = self.join(name, None, uid, &[]).await;
        let room = room_of(&user.browser.call_url);
        self.synapse.join_room(&self.observer, &room).await;
        let set = self.wait_member(&room, &user.browser.user_id, true, Duration::from_secs(10)).await;
        assert!(set.is_some(), "{}'s call membership never appeared\n{}", user.identity, self.bridge.logs());
        (user, room)
    }

    /// The delayed leaves `user`'s Element Call handed over that the bridge called the
    /// homeserver about (told apart by the fingerprint its log gives each delegation's delay id).
    pub fn delay_ids(&self, user: &User) -> Vec<String> {
        let logs = self.bridge.logs();
        let who = format!("user={}", user.browser.user_id);
        let refs: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("delegation stored") && l.split_whitespace().any(|f| f == who))
            .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("delay_id=")))
            .collect();
        let mut ids: Vec<String> = self.hs.calls().into_iter().filter_map(|c| c.delay_id).collect();
        ids.sort();
        ids.dedup();
        ids.retain(|id| refs.contains(&DelayRef(id).to_string().as_str()));
        ids
    }

    /// The bridge's send of one of `user`'s delayed leaves that Synapse accepted, if any.
    pub fn accepted_send(&self, user: &User) -> Option<Call> {
        self.delay_ids(user).iter().find_map(|id| self.hs.accepted_send(id))
    }

    /// Waits up to `within` for [`Stack::accepted_send`].
    pub async fn wait_accepted_send(&self, user: &User, within: Duration) -> Option<Call> {
        super::eventually(within, || async { self.accepted_send(user).is_some() }).await;
        self.accepted_send(user)
    }

    /// Every call the bridge made about `user`'s delayed leaves.
    pub fn calls_of(&self, user: &User) -> Vec<Call> {
        let ids = self.delay_ids(user);
        self.hs.calls().into_iter().filter(|c| c.delay_id.as_ref().is_some_and(|id| ids.contains(id))).collect()
    }

    /// Whether `user` has a call membership (a legacy state event, not empty) in `room`'s state.
    pub async fn is_member(&self, room: &str, user: &str) -> bool {
        let state = self.synapse.room_state(&self.observer, room).await;
        state.iter().any(|e| {
            e["type"] == MEMBER && e["sender"] == user && e["content"].as_object().is_some_and(|c| !c.is_empty())
        })
    }

    /// Polls until `user`'s call membership is in `room`'s state (`true`) or gone (`false`);
    /// when that was seen, or `None` after `within`.
    pub async fn wait_member(&self, room: &str, user: &str, present: bool, within: Duration) -> Option<Instant> {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if self.is_member(room, user).await == present {
                return Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Asserts that every one of `users` keeps their membership for `how_long`.
    pub async fn all_stay(&self, room: &str, users: &[&User], how_long: Duration, why: &str) {
        let until = Instant::now() + how_long;
        while Instant::now() < until {
            for u in users {
                let kept = self.is_member(room, &u.browser.user_id).await;
                assert!(kept, "{} removed while connected ({why})\n{}", u.identity, self.bridge.logs());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The Matrix room of a call, from its link (`…/room/#/name?roomId=!…`).
pub fn room_of(call_url: &str) -> String {
    let url = url::Url::parse(&call_url.replacen("#/", "", 1)).unwrap();
    let room = url.query_pairs().find(|(k, _)| k == "roomId").map(|(_, v)| v.into_owned());
    room.unwrap_or_else(|| panic!("no roomId in {call_url}"))
}
