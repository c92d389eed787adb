//! Test harness: a real Synapse (behind a recording proxy), the LiveKit emulator or a real LiveKit
//! server with real participant processes, and the built bridge binary.
#![allow(dead_code)]

pub mod bridge;
pub mod element_call;
pub mod hs_proxy;
pub mod livekit;
pub mod livekit_server;
pub mod participant;
pub mod redis;
pub mod synapse;
pub mod txn_proxy;
pub mod webhook_proxy;

use std::cell::RefCell;
use std::sync::Once;
use std::time::{Duration, Instant};

thread_local! {
    /// The panic this thread is unwinding from, as [`remember_failures`]' hook saw it.
    static FAILURE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Makes a failing test's reason visible at the end of its output. Harness children print their
/// logs while the test unwinds, after the panic's message; CI shows only the output's end, so
/// [`repeat_failure`] says the reason again after each such log.
pub fn remember_failures() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
            let mut short: String = message.chars().take(1_500).collect();
            if short.len() < message.len() {
                short.push_str(" …");
            }
            FAILURE.with(|f| *f.borrow_mut() = Some(format!("{location}: {short}")));
            default(info);
        }));
    });
}

/// After a log printed while unwinding: the failure that caused it, again (at most 1 500
/// characters of its message).
pub fn repeat_failure() {
    if let Some(f) = FAILURE.with(|f| f.borrow().clone()) {
        eprintln!("---- the test failed (the logs above are its children's) ----\n{f}");
    }
}

/// A command running `program`, as user id `uid` if given (its own group, no others), so that a
/// [`participant::NetworkCut`] can single out its packets.
pub fn command_as(program: impl AsRef<std::ffi::OsStr>, uid: Option<u32>) -> std::process::Command {
    match uid {
        None => std::process::Command::new(program),
        Some(uid) => {
            let mut c = std::process::Command::new("setpriv");
            c.arg(format!("--reuid={uid}")).arg(format!("--regid={uid}")).arg("--clear-groups").arg(program);
            c
        }
    }
}

/// The JSON objects a child process prints, one per line, as they come (other lines skipped).
pub fn json_lines(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<serde_json::Value> {
    use std::io::BufRead as _;
    let (tx, events) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    events
}

/// SIGKILL of a harness child process, if running, reaped at once: no chance to clean up.
pub fn kill9(child: &mut Option<std::process::Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A TCP port free on 127.0.0.1 now, for a child process to listen on. Picked below the kernel's
/// ephemeral range (32768–60999 by default), where no outgoing connection takes it between this
/// check and the child's bind: port 0 would hand out an ephemeral one, and with browsers,
/// LiveKit and several Synapses opening connections in parallel tests, one was seen taken in
/// that window.
pub fn free_port() -> u16 {
    // Never the same port twice in one test process: tests run in parallel, and a port probed
    // free is bound only once its server starts — or starts again after being killed (a bridge
    // restarts on its port), when a probe would find it free too. Seen in a clean run: two
    // servers handed one port, the second failing with "Address already in use".
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1_000 {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        if !handed_out.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free TCP port in 20000-31999");
}

/// Polls `check` every 20 ms until it holds or `within` has passed.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < within {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Waits until `url` answers 2xx. Panics, with `log()`, if `child` exits first or `within` passes.
pub async fn wait_serving(
    http: &reqwest::Client,
    url: &str,
    child: &mut std::process::Child,
    within: Duration,
    what: &str,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited with {status}:\n{}", log());
        }
        assert!(Instant::now() < deadline, "{what} not serving within {within:?}:\n{}", log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resident memory of process `pid`, in KiB.
#[allow(dead_code)] // not every test binary measures memory
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
