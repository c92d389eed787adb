//! `rtc-leave-bridge migrate-store --from A --to B`: copies every tracked job from one store to
//! the other (`sqlite:DIR`, `redis://…` or `rediss://…`), so that an operator can switch stores
//! without dropping live calls: stop the service, migrate, start it on the new store — it resumes
//! every job (restarts its event at once, asks LiveKit before trusting its phase). The source is
//! left as it was. A destination that already holds jobs is refused (they would be mixed), unless
//! `--merge`.

use std::process::ExitCode;
use std::time::Duration;

use super::runtime;
use crate::config::Source;
use crate::store::redis::RedisStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreOp};

/// Jobs per commit into the destination.
const CHUNK: usize = 500;

pub fn run(source: &Source, from: &str, to: &str, merge: bool) -> ExitCode {
    let prefix = source.get_or_default("RTC_LEAVE_BRIDGE_REDIS_PREFIX").to_owned();
    runtime().block_on(async {
        match migrate(from, to, &prefix, merge).await {
            Ok(n) => {
                println!("{n} job(s) copied from {} to {}", shown(from), shown(to));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("migrate-store: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// A store named on the command line, without any password it carries.
fn shown(spec: &str) -> String {
    match url::Url::parse(spec) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => spec.to_owned(),
    }
}

async fn open(spec: &str, prefix: &str) -> Result<Box<dyn Store>, String> {
    if let Some(dir) = spec.strip_prefix("sqlite:") {
        return SqliteStore::open(std::path::Path::new(dir))
            .map(|s| Box::new(s) as Box<dyn Store>)
            .map_err(|e| e.to_string());
    }
    if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        let store = RedisStore::connect(spec, prefix, Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
        return Ok(Box::new(store));
    }
    Err(format!("{}: expected sqlite:DIR, redis://… or rediss://…", shown(spec)))
}

async fn migrate(from: &str, to: &str, prefix: &str, merge: bool) -> Result<usize, String> {
    let (source, destination) = (open(from, prefix).await?, open(to, prefix).await?);
    let jobs = source.load().await.map_err(|e| format!("reading {}: {e}", shown(from)))?;
    let present = destination.load().await.map_err(|e| format!("reading {}: {e}", shown(to)))?;
    if !present.is_empty() && !merge {
        return Err(format!("{} already holds {} job(s); pass --merge to add to them", shown(to), present.len()));
    }
    for chunk in jobs.chunks(CHUNK) {
        let ops = chunk.iter().map(|j| StoreOp::Insert(Box::new(j.clone()))).collect();
        destination.commit(ops).await.map_err(|e| format!("writing {}: {e}", shown(to)))?;
    }
    let copied = destination.load().await.map_err(|e| format!("checking {}: {e}", shown(to)))?;
    let missing = jobs.iter().filter(|j| !copied.iter().any(|c| c == *j)).count();
    if missing > 0 {
        return Err(format!("{missing} job(s) did not arrive in {}", shown(to)));
    }
    Ok(jobs.len())
}
