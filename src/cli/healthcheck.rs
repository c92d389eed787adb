//! `rtc-leave-bridge healthcheck`: exit 0 if the local service answers `/healthz` (the
//! container image's HEALTHCHECK). Needs the listen address alone, so a health check works
//! wherever the service's other settings live.

use std::process::ExitCode;

use super::{http_client, load, local_url, runtime};
use crate::config::{Listen, Source};

pub fn run(source: &Source) -> ExitCode {
    let listen: Listen = match load(source) {
        Ok(l) => l,
        Err(code) => return code,
    };
    runtime().block_on(check(listen))
}

/// Exit 0 if the local service answers `/healthz`, else 1.
async fn check(listen: Listen) -> ExitCode {
    let url = local_url(listen.bind, "/healthz");
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
