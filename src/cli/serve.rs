//! `rtc-leave-bridge serve`: runs the service (see [`crate::service`]) with logging set up as
//! configured.

use std::process::ExitCode;

use super::{load, runtime};
use crate::config::{Config, Source};

pub fn run(source: &Source) -> ExitCode {
    let config: Config = match load(source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::logging::init(&config.logging);
    match runtime().block_on(crate::service::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "rtc-leave-bridge failed");
            eprintln!("rtc-leave-bridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}
