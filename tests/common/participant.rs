//! A real LiveKit participant: one OS process (`tests/participant.py`, LiveKit's own client
//! library) per participant, so that a hang-up, a kill -9 and a freeze (SIGSTOP) are what they
//! are for a real client. The token comes from the bridge, as a MatrixRTC client gets it.

use std::io::Write as _;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Participant {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Value>,
    /// Every event so far, in order.
    pub seen: Vec<Value>,
    pub identity: String,
    pub sid: String,
}

impl Participant {
    /// Starts a participant joining `url` with `jwt`; returns once it is connected and
    /// publishing (panics with its output if it is not within 30 s).
    pub async fn join(url: &str, jwt: &str) -> Participant {
        Participant::join_as(url, jwt, None).await
    }

    /// As [`Participant::join`], as user id `uid` if given (see [`NetworkCut`]).
    pub async fn join_as(url: &str, jwt: &str, uid: Option<u32>) -> Participant {
        let joined = Participant::try_join_as(url, jwt, uid).await;
        joined.unwrap_or_else(|seen| panic!("participant did not connect: {seen:?}"))
    }

    /// As [`Participant::join_as`]; a participant that could not connect within 30 s (its
    /// process killed) is an error holding what it said.
    pub async fn try_join_as(url: &str, jwt: &str, uid: Option<u32>) -> Result<Participant, Vec<Value>> {
        Participant::try_join_within(url, jwt, uid, Duration::from_secs(30)).await
    }

    /// As [`Participant::try_join_as`], giving up after `within`.
    pub async fn try_join_within(
        url: &str,
        jwt: &str,
        uid: Option<u32>,
        within: Duration,
    ) -> Result<Participant, Vec<Value>> {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/participant.py");
        let mut child = super::command_as(super::synapse::python(), uid)
            .arg(script)
            .arg(url)
            .arg(jwt)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let events = super::json_lines(child.stdout.take().unwrap());
        let stdin = child.stdin.take();
        let mut p = Participant {
            child: Some(child),
            stdin,
            events,
            seen: Vec::new(),
            identity: String::new(),
            sid: String::new(),
        };
        let Some(connected) = p.wait_for("connected", within).await else {
            return Err(std::mem::take(&mut p.seen));
        };
        p.identity = connected["identity"].as_str().unwrap().to_owned();
        p.sid = connected["sid"].as_str().unwrap().to_owned();
        Ok(p)
    }

    /// Waits up to `within` for an event named `event`.
    pub async fn wait_for(&mut self, event: &str, within: Duration) -> Option<Value> {
        let until = Instant::now() + within;
        loop {
            while let Ok(v) = self.events.try_recv() {
                self.seen.push(v.clone());
                if v["event"] == event {
                    return Some(v);
                }
                // An error, or a disconnection while waiting for something else, ends the wait.
                if v["event"] == "error" || (v["event"] == "disconnected" && event == "connected") {
                    return None;
                }
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Hangs up cleanly (the client's own disconnect); returns when the process has exited.
    pub async fn hang_up(&mut self) {
        assert!(self.leave().await, "the participant did not hang up: {:?}", self.seen);
    }

    /// Tells the client to hang up, and returns at once (the process winds down on its own).
    pub fn ask_to_leave(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"leave\n");
        }
    }

    /// Asks the client to hang up; whether it said it did within 10 s. Its process is gone when
    /// this returns: killed if it did not say so, or did not exit within 5 s of saying it.
    pub async fn leave(&mut self) -> bool {
        self.ask_to_leave();
        let left = self.wait_for("left", Duration::from_secs(10)).await.is_some();
        if !(left && self.exited_within(Duration::from_secs(5)).await) {
            self.kill9();
        }
        left
    }

    /// Whether the process exits within `within`; reaped if it does. Polled, not waited for:
    /// a blocking wait would hold one of the runtime's threads for as long as the process
    /// lingers, and a process that never exits would hold it for good.
    async fn exited_within(&mut self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while let Some(c) = self.child.as_mut() {
            if !matches!(c.try_wait(), Ok(None)) {
                self.child = None;
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// SIGKILL: the client vanishes without a word.
    pub fn kill9(&mut self) {
        super::kill9(&mut self.child);
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a frozen client, its sockets open.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("running").id();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let _ = Command::new("kill").args([signal, &pid.to_string()]).status();
    }
}

impl Drop for Participant {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
        }
        self.kill9();
    }
}

/// A network cut for every process of user id `uid` (a participant started with
/// [`Participant::join_as`]): every packet its sockets send is dropped (an nftables rule on
/// `meta skuid`), so the server hears nothing more from it, whatever port it tries. Lifted when
/// dropped.
pub struct NetworkCut {
    table: String,
}

impl NetworkCut {
    pub fn start(uid: u32) -> NetworkCut {
        let table = format!("rtc_leave_bridge_cut_{uid}");
        let script = format!(
            "add table inet {table}\n\
             add chain inet {table} out {{ type filter hook output priority 0 ; }}\n\
             add rule inet {table} out meta skuid {uid} drop\n"
        );
        let out = Command::new("nft").arg("-f").arg("-").stdin(Stdio::piped()).spawn().and_then(|mut c| {
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait_with_output()
        });
        let out = out.expect("nft (Debian nftables; scripts/test.sh installs it) runs");
        assert!(out.status.success(), "nft refused the rule (root needed): {out:?}");
        NetworkCut { table }
    }
}

impl Drop for NetworkCut {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.table]).status();
    }
}
