//! The `rtc-leave-bridge` command line: one file per command, each loading only the settings it
//! needs ([`serve`] and [`check_config`] everything, [`jobs`] the listen address and the LiveKit
//! key, [`migrate_store`] the Redis key prefix, [`healthcheck`] the listen address alone).

mod check_config;
mod healthcheck;
mod jobs;
mod migrate_store;
mod serve;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{ConfigError, SETTINGS, Section, Source};

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
    /// Copy every tracked job from one store to another (`sqlite:DIR`, `redis://…`), to switch
    /// stores with the service stopped. The source is left as it was.
    MigrateStore {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// Add to a destination that already holds jobs.
        #[arg(long)]
        merge: bool,
    },
    /// Exit 0 if the service configured here answers on its listen address (for HEALTHCHECK).
    /// Reads only LIVEKIT_JWT_BIND (or LIVEKIT_JWT_PORT).
    Healthcheck,
}

/// Parses the command line and runs the command.
pub fn run() -> ExitCode {
    let mut help = String::from("Configuration (environment variables; --config takes the same names):\n");
    for (name, default, meaning) in SETTINGS {
        let default = if default.is_empty() { String::new() } else { format!(" [default: {default}]") };
        help.push_str(&format!("  {name}{default}\n      {meaning}\n"));
    }
    let matches = Cli::command().after_long_help(help).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let source = match Source::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => return invalid(e),
    };
    match cli.command {
        Command::Serve => serve::run(&source),
        Command::CheckConfig => check_config::run(&source),
        Command::Jobs { json } => jobs::run(&source, json),
        Command::MigrateStore { from, to, merge } => migrate_store::run(&source, &from, &to, merge),
        Command::Healthcheck => healthcheck::run(&source),
    }
}

/// Section `S` of the configuration, or the exit code of an invalid one.
fn load<S: Section>(source: &Source) -> Result<S, ExitCode> {
    S::from_source(source).map_err(invalid)
}

fn invalid(e: ConfigError) -> ExitCode {
    eprintln!("rtc-leave-bridge: invalid configuration: {e}");
    ExitCode::from(2)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

/// Where a client on this machine reaches a server bound to `bind`: a wildcard address is
/// reached through the loopback address of its family (`:8080` and `0.0.0.0:8080` both mean
/// `127.0.0.1:8080`; `[::]:8080` means `[::1]:8080`).
pub fn local_address(bind: SocketAddr) -> SocketAddr {
    let ip = match bind.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bind.port())
}

/// The URL of `path` on the local service listening on `bind`.
fn local_url(bind: SocketAddr, path: &str) -> String {
    format!("http://{}{path}", local_address(bind))
}

fn http_client() -> reqwest::Client {
    crate::homeserver::install_crypto_provider();
    reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("HTTP client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bind_form_has_a_local_address() {
        let cases = [
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("[::]:8080", "[::1]:8080"),
            ("127.0.0.1:9000", "127.0.0.1:9000"),
            ("192.0.2.7:80", "192.0.2.7:80"),
        ];
        for (bind, local) in cases {
            assert_eq!(local_address(bind.parse().unwrap()), local.parse().unwrap(), "{bind}");
        }
    }
}
