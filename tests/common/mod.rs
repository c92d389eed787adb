//! Test harness: a real Synapse (behind a recording proxy), the LiveKit emulator or a real LiveKit
//! server with real participant processes, and the built bridge binary.
#![allow(dead_code)]

pub mod bridge;
pub mod hs_proxy;
pub mod livekit;
pub mod livekit_server;
pub mod participant;
pub mod redis;
pub mod synapse;
pub mod txn_proxy;
pub mod webhook_proxy;

use std::time::{Duration, Instant};

/// SIGKILL of a harness child process, if running, reaped at once: no chance to clean up.
pub fn kill9(child: &mut Option<std::process::Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
