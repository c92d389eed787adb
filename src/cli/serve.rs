//! `rtc-leave-bridge serve`: runs the service (see [`crate::service`]) with logging set up as
//! configured.

use std::process::ExitCode;

use super::{load, runtime};
use crate::config::{Config, LogFormat, Logging, Source};

pub fn run(source: &Source) -> ExitCode {
    let config: Config = match load(source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_tracing(&config.logging);
    match runtime().block_on(crate::service::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "rtc-leave-bridge failed");
            eprintln!("rtc-leave-bridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(logging: &Logging) {
    let filter = tracing_subscriber::EnvFilter::new(format!("warn,rtc_leave_bridge={}", logging.level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match logging.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
