//! `rtc-leave-bridge jobs`: lists the delegations the local service tracks, asking its
//! `/admin/jobs` with a short-lived token signed with the LiveKit API key.

use std::process::ExitCode;
use std::time::Duration;

use livekit_api::access_token::{AccessToken, VideoGrants};

use super::{http_client, load, local_url, runtime};
use crate::config::{Listen, LiveKit, Source};
use crate::engine::JobSummary;

pub fn run(source: &Source, json: bool) -> ExitCode {
    let (listen, livekit): (Listen, LiveKit) = match load(source).and_then(|l| Ok((l, load(source)?))) {
        Ok(sections) => sections,
        Err(code) => return code,
    };
    runtime().block_on(list(listen, livekit, json))
}

/// Lists the delegations the local service tracks.
async fn list(listen: Listen, livekit: LiveKit, json: bool) -> ExitCode {
    let token = AccessToken::with_api_key(&livekit.key, &livekit.secret)
        .with_identity("rtc-leave-bridge-cli")
        .with_ttl(Duration::from_secs(60))
        .with_grants(VideoGrants { room_admin: true, room_list: true, ..Default::default() })
        .to_jwt();
    let token = match token {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot sign the request: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On the operator listener when the operator endpoints have their own.
    let url = local_url(listen.operator_bind.unwrap_or(listen.bind), "/admin/jobs");
    let resp = match http_client().get(&url).bearer_auth(token).send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{url}: {} (is the service running with this configuration?)", e.without_url());
            return ExitCode::FAILURE;
        }
    };
    if !resp.status().is_success() {
        eprintln!("{url} answered {}: {}", resp.status(), resp.text().await.unwrap_or_default());
        return ExitCode::FAILURE;
    }
    let jobs: Vec<JobSummary> = match resp.json().await {
        Ok(j) => j,
        Err(e) => {
            eprintln!("unreadable answer: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&jobs).expect("serialisable"));
        return ExitCode::SUCCESS;
    }
    print!("{}", table(&jobs, crate::delegation::now_unix_ms()));
    ExitCode::SUCCESS
}

/// The human listing of `rtc-leave-bridge jobs`.
fn table(jobs: &[JobSummary], now_ms: u64) -> String {
    let mut rows = vec![[
        "JOB".to_owned(),
        "ROOM".to_owned(),
        "MEMBER".to_owned(),
        "DELAY".to_owned(),
        "IDENTITY".to_owned(),
        "STATE".to_owned(),
        "NEXT CALL".to_owned(),
        "AGE".to_owned(),
    ]];
    for j in jobs {
        let member = if j.device_id.is_empty() {
            format!("{} ({})", j.user_id, j.member_id)
        } else {
            format!("{} {}", j.user_id, j.device_id)
        };
        let next =
            j.next_call_in_ms.map(|ms| format!("{:.1}s", ms as f64 / 1000.0)).unwrap_or_else(|| "in flight".into());
        let age = now_ms.saturating_sub(j.created_at_ms) / 1000;
        rows.push([
            j.id.clone(),
            j.room_id.clone(),
            member,
            j.delay_ref.clone(),
            j.identity.clone().unwrap_or_else(|| "-".into()),
            j.state.clone(),
            next,
            format!("{}m{:02}s", age / 60, age % 60),
        ]);
    }
    let widths: Vec<usize> = (0..8).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!("{} job(s)\n", jobs.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_jobs_as_a_table() {
        let job = JobSummary {
            id: "00000000000000ab".into(),
            room_id: "!r:hs".into(),
            livekit_room: "x".into(),
            user_id: "@a:hs".into(),
            device_id: "DEV".into(),
            member_id: "m".into(),
            delay_ref: "#00000000".into(),
            mode: crate::delegation::Mode::OpenId,
            state: "connected".into(),
            identity: Some("ID".into()),
            next_call_in_ms: Some(2_500),
            created_at_ms: 1_000,
        };
        let t = table(&[job], 126_000);
        assert!(t.starts_with("JOB"), "{t}");
        assert!(
            t.contains("00000000000000ab  !r:hs  @a:hs DEV  #00000000  ID        connected  2.5s       2m05s"),
            "{t}"
        );
        assert!(t.ends_with("1 job(s)\n"));
    }
}
