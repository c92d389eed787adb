//! The `rtc-leave-bridge` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use rtc_leave_bridge::cli;
use rtc_leave_bridge::config::{Config, LogFormat, SETTINGS, Source};

#[derive(Parser)]
#[command(version, about = "Sends MatrixRTC delegated delayed leave events the moment LiveKit says a member is gone")]
struct Cli {
    /// TOML file with settings named like the environment variables (the environment wins).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve,
    /// Check the configuration: settings, data directory, LiveKit (reachable, accepts our key)
    /// and every configured homeserver. Exits non-zero if anything is wrong.
    CheckConfig,
    /// List the delegations the running service tracks (room, member, delay id fingerprint,
    /// identity, state, next restart, age).
    Jobs {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 if the service configured here answers on its listen address (for HEALTHCHECK).
    Healthcheck,
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let mut help = String::from("Configuration (environment variables; --config takes the same names):\n");
    for (name, default, meaning) in SETTINGS {
        let default = if default.is_empty() { String::new() } else { format!(" [default: {default}]") };
        help.push_str(&format!("  {name}{default}\n      {meaning}\n"));
    }
    let matches = Cli::command().after_long_help(help).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let config = match Source::load(cli.config.as_deref()).and_then(|s| Config::from_source(&s)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rtc-leave-bridge: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = match cli.command {
        Command::Serve => {
            init_tracing(&config);
            runtime.block_on(rtc_leave_bridge::service::serve(config))
        }
        Command::CheckConfig => return runtime.block_on(cli::check_config(&config)),
        Command::Jobs { json } => return runtime.block_on(cli::jobs(&config, json)),
        Command::Healthcheck => return runtime.block_on(cli::healthcheck(&config)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "rtc-leave-bridge failed");
            eprintln!("rtc-leave-bridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(format!("warn,rtc_leave_bridge={}", config.log_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// glibc gives each thread that allocates its own arena (up to 8 per core), and memory freed in
/// one arena is not reused by another: a burst handled on many threads (a wave of delegations,
/// the blocking pool) leaves resident memory behind in each. Two arenas are plenty for a service
/// whose state lives in one task. (musl, in the container image, has no arenas.)
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
