//! The docker-compose stack, proven as far as it can be without a container engine: the file is
//! valid against the Compose specification's JSON schema, every mounted file exists, the
//! addresses, ports and keys the services use to reach each other agree, and the Grafana dashboard
//! and the Prometheus alerts only query metrics the bridge really exports.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `.env.example` as the operator would copy it.
fn env_example() -> HashMap<String, String> {
    std::fs::read_to_string(root().join(".env.example"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Compose interpolation of `${VAR}`, `${VAR:-default}` and `${VAR:?error}` against `.env.example`
/// (unset optional variables take their defaults: the `--profile stack` deployment).
fn interpolate(text: &str, env: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${") + start;
        let expr = &rest[start + 2..end];
        let value = if let Some((name, default)) = expr.split_once(":-") {
            env.get(name).cloned().unwrap_or_else(|| default.to_owned())
        } else if let Some((name, _)) = expr.split_once(":?") {
            env.get(name).cloned().unwrap_or_else(|| panic!("{name} is required but missing from .env.example"))
        } else {
            env.get(expr).cloned().unwrap_or_else(|| panic!("{expr} missing from .env.example"))
        };
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

struct Stack {
    compose: Value,
    env: HashMap<String, String>,
}

impl Stack {
    fn load() -> Stack {
        Stack { compose: yaml("docker-compose.yml"), env: env_example() }
    }
    fn service(&self, name: &str) -> &Value {
        &self.compose["services"][name]
    }
    fn service_env(&self, service: &str, var: &str) -> String {
        let raw = self.service(service)["environment"][var]
            .as_str()
            .unwrap_or_else(|| panic!("{service} has no {var}"))
            .to_owned();
        interpolate(&raw, &self.env)
    }
    /// A service's published ports, as written (`host:container[/proto]`).
    fn service_ports(&self, service: &str) -> Vec<String> {
        self.service(service)["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect()
    }
    /// `(host path, container path)` of a service's bind mounts.
    fn mounts(&self, service: &str) -> Vec<(String, String)> {
        self.service(service)["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .filter(|v| v.starts_with("./"))
            .map(|v| {
                let mut parts = v.split(':');
                (parts.next().unwrap().to_owned(), parts.next().unwrap().to_owned())
            })
            .collect()
    }
    /// The host file mounted at `container_path` in `service`.
    fn host_file(&self, service: &str, container_path: &str) -> String {
        self.mounts(service)
            .into_iter()
            .find(|(_, c)| c == container_path || container_path.starts_with(&format!("{c}/")))
            .map(|(h, c)| format!("{h}{}", &container_path[c.len()..]))
            .unwrap_or_else(|| panic!("{service} mounts nothing at {container_path}"))
    }
    fn bridge_port(&self) -> u16 {
        let bind = self.service_env("rtc-leave-bridge", "LIVEKIT_JWT_BIND");
        bind.rsplit(':').next().unwrap().parse().unwrap()
    }
    /// The proxy in front of every bridge instance: the port it listens on inside the stack, the
    /// port it publishes on the host, and the upstream (name, port) its Caddyfile names.
    fn proxy(&self) -> (u16, u16, (String, u16)) {
        let caddyfile =
            std::fs::read_to_string(root().join(self.host_file("bridge-proxy", "/etc/caddy/Caddyfile"))).unwrap();
        let listen: u16 = caddyfile
            .lines()
            .find_map(|l| l.trim().strip_prefix(':')?.strip_suffix('{')?.trim().parse().ok())
            .expect("the Caddyfile listens on :PORT");
        let upstream = caddyfile
            .lines()
            .find_map(|l| {
                let mut words = l.trim().strip_prefix("dynamic a ")?.split_whitespace();
                Some((words.next()?.to_owned(), words.next()?.parse().ok()?))
            })
            .expect("the Caddyfile names its upstreams by DNS");
        let published = self.service_ports("bridge-proxy");
        let host_port = published
            .iter()
            .find_map(|p| p.strip_suffix(&format!(":{listen}"))?.parse().ok())
            .unwrap_or_else(|| panic!("the proxy's port {listen} is not published: {published:?}"));
        (listen, host_port, upstream)
    }
}

fn url_parts(url: &str) -> (String, u16, String) {
    let u = url::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    (u.host_str().unwrap().to_owned(), u.port_or_known_default().unwrap(), u.path().to_owned())
}

#[test]
fn compose_file_is_valid_against_the_compose_specification() {
    let checker = common::synapse::python().with_file_name("check-jsonschema");
    let run = |file: &Path| {
        Command::new(&checker).args(["--builtin-schema", "vendor.compose-spec"]).arg(file).output().unwrap()
    };
    let out = run(&root().join("docker-compose.yml"));
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The check is real: a broken copy is refused.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("docker-compose.yml");
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    std::fs::write(&broken, text.replace("restart: unless-stopped", "restart: [not, a, policy]")).unwrap();
    assert!(!run(&broken).status.success());
}

#[test]
fn every_mounted_file_exists_and_every_required_variable_is_documented() {
    let stack = Stack::load();
    let services = stack.compose["services"].as_mapping().unwrap();
    for (name, _) in services {
        let name = name.as_str().unwrap();
        for (host, _) in stack.mounts(name) {
            assert!(root().join(&host).exists(), "{name} mounts {host}, which does not exist");
        }
    }
    assert!(root().join("Dockerfile").exists());
    // Every ${VAR} the file uses without a default is in .env.example (interpolate panics if not).
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    interpolate(&text, &stack.env);
}

#[test]
fn services_agree_on_addresses_ports_and_keys() {
    let stack = Stack::load();
    let bridge_port = stack.bridge_port();
    // Instances publish nothing (several can run); the proxy publishes one port and spreads
    // requests over every instance of the service.
    assert!(stack.service_ports("rtc-leave-bridge").is_empty(), "replicas cannot share a host port");
    let (proxy_port, proxy_public_port, upstream) = stack.proxy();
    assert_eq!(upstream, ("rtc-leave-bridge".to_owned(), bridge_port), "the proxy forwards to every instance");
    assert_eq!(stack.service("rtc-leave-bridge")["deploy"]["replicas"].as_str(), Some("${BRIDGE_REPLICAS:-1}"));

    // LiveKit → bridge (through the proxy): webhook URL and the key it signs with.
    let livekit = yaml(&stack.host_file("livekit", "/etc/livekit.yaml"));
    let webhook_url = livekit["webhook"]["urls"][0].as_str().unwrap();
    assert_eq!(url_parts(webhook_url), ("bridge-proxy".into(), proxy_port, "/sfu_webhook".into()));
    let key = stack.service_env("rtc-leave-bridge", "LIVEKIT_KEY");
    assert_eq!(livekit["webhook"]["api_key"].as_str(), Some(key.as_str()), "webhook api_key = bridge key");
    let keys = stack.service_env("livekit", "LIVEKIT_KEYS");
    let (lk_key, lk_secret) = keys.split_once(':').unwrap();
    assert_eq!(lk_key.trim(), key);
    assert_eq!(lk_secret.trim(), stack.service_env("rtc-leave-bridge", "LIVEKIT_SECRET"), "same secret");
    // Bridge → LiveKit: RoomService on LiveKit's port, inside the stack; clients are told the
    // port LiveKit publishes.
    let lk_port = livekit["port"].as_u64().unwrap() as u16;
    let (host, port, _) = url_parts(&stack.service_env("rtc-leave-bridge", "RTC_LEAVE_BRIDGE_LIVEKIT_API_URL"));
    assert_eq!((host.as_str(), port), ("livekit", lk_port));
    let (_, public_port, _) =
        url_parts(&stack.service_env("rtc-leave-bridge", "LIVEKIT_URL").replace("ws://", "http://"));
    let published = stack.service_ports("livekit");
    assert!(published.iter().any(|p| p.starts_with(&format!("{public_port}:"))), "{published:?}");
    // Only full-access users open rooms.
    assert_eq!(livekit["room"]["auto_create"].as_bool(), Some(false));
    // Clients asking Synapse for its MatrixRTC backend are told the bridge, on its published port.
    let synapse_cfg = yaml(&stack.host_file("synapse", "/config/homeserver.yaml"));
    assert_eq!(synapse_cfg["experimental_features"]["msc4143_enabled"].as_bool(), Some(true));
    let service_url = synapse_cfg["matrix_rtc"]["transports"][0]["livekit_service_url"].as_str().unwrap();
    assert_eq!(url_parts(service_url).1, proxy_public_port, "{service_url}");

    // Bridge ↔ Synapse: server name, client-server URL, appservice registration.
    let synapse = yaml(&stack.host_file("synapse", "/config/homeserver.yaml"));
    let server_name = synapse["server_name"].as_str().unwrap();
    assert_eq!(stack.service_env("rtc-leave-bridge", "LIVEKIT_HS_SERVER_NAME"), server_name);
    let synapse_port = synapse["listeners"][0]["port"].as_u64().unwrap() as u16;
    for var in ["LIVEKIT_CS_API_URL_OVERRIDES", "LIVEKIT_FEDERATION_URL_OVERRIDES"] {
        let value = stack.service_env("rtc-leave-bridge", var);
        let (server, url) = value.split_once('=').unwrap();
        assert_eq!(server, server_name, "{var}");
        assert_eq!(url_parts(url).0, "synapse", "{var}");
        assert_eq!(url_parts(url).1, synapse_port, "{var}");
    }
    let registration_in_synapse = synapse["app_service_config_files"][0].as_str().unwrap();
    let synapse_registration = stack.host_file("synapse", registration_in_synapse);
    let bridge_registration =
        stack.host_file("rtc-leave-bridge", &stack.service_env("rtc-leave-bridge", "LIVEKIT_AS_REGISTRATION_FILE"));
    assert_eq!(synapse_registration, bridge_registration, "Synapse and the bridge read the same registration");
    let registration = yaml(&synapse_registration);
    for field in ["url", "io.element.msc4512.proxy_url"] {
        let (host, port, _) = url_parts(registration[field].as_str().unwrap());
        assert_eq!((host.as_str(), port), ("bridge-proxy", proxy_port), "{field}");
    }
    assert_eq!(registration["io.element.msc4512.proxy_prefix"].as_str(), Some("rtc/livekit"));
    assert_eq!(registration["rate_limited"].as_bool(), Some(false));
    assert_eq!(synapse["experimental_features"]["msc4512_enabled"].as_bool(), Some(true));
    assert!(synapse["max_event_delay_duration"].as_str().is_some(), "delayed events on");

    // Prometheus → bridge, Grafana → Prometheus.
    let prometheus = yaml(&stack.host_file("prometheus", "/etc/prometheus/prometheus.yml"));
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    // Each instance scraped on its own, found through the service's DNS name.
    let sd = &job["dns_sd_configs"][0];
    assert_eq!(sd["names"][0].as_str(), Some("rtc-leave-bridge"));
    // On the operator listener, apart from the public one the proxy forwards to.
    let operator = stack.service_env("rtc-leave-bridge", "RTC_LEAVE_BRIDGE_OPERATOR_BIND");
    let operator_port: u16 = operator.trim_start_matches(':').parse().unwrap();
    assert_ne!(operator_port, bridge_port, "the operator endpoints stay off the public proxy");
    assert_eq!((sd["type"].as_str(), sd["port"].as_u64()), (Some("A"), Some(u64::from(operator_port))));
    for rules in prometheus["rule_files"].as_sequence().unwrap() {
        assert!(root().join(stack.host_file("prometheus", rules.as_str().unwrap())).exists());
    }
    // Several instances: Redis with every write on disk before it is acknowledged, at the
    // address .env.example gives.
    let redis = stack.service("redis");
    assert_eq!(redis["profiles"][0].as_str(), Some("ha"));
    let command: Vec<&str> = redis["command"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(command.windows(2).any(|w| w == ["--appendonly", "yes"]), "{command:?}");
    assert!(command.windows(2).any(|w| w == ["--appendfsync", "always"]), "{command:?}");
    let example = std::fs::read_to_string(root().join(".env.example")).unwrap();
    let redis_url = example
        .lines()
        .find_map(|l| l.trim_start_matches(['#', ' ']).strip_prefix("LIVEKIT_REDIS_URL="))
        .expect(".env.example shows LIVEKIT_REDIS_URL");
    assert_eq!((url_parts(redis_url).0.as_str(), url_parts(redis_url).1), ("redis", 6379));
    assert!(example.contains("BRIDGE_REPLICAS=2") && example.contains("COMPOSE_PROFILES=stack,ha"));
    assert_eq!(stack.service_env("rtc-leave-bridge", "LIVEKIT_REDIS_URL"), "", "SQLite unless .env says otherwise");

    let datasources = yaml(&stack.host_file("grafana", "/etc/grafana/provisioning/datasources/prometheus.yml"));
    assert_eq!(url_parts(datasources["datasources"][0]["url"].as_str().unwrap()).0, "prometheus");
    let providers = yaml(&stack.host_file("grafana", "/etc/grafana/provisioning/dashboards/dashboards.yml"));
    let dashboards_dir = providers["providers"][0]["options"]["path"].as_str().unwrap();
    assert_eq!(stack.host_file("grafana", dashboards_dir), "./deploy/grafana/dashboards");
}

/// `rtc_leave_bridge_*` names used in PromQL expressions.
fn queried_metrics(exprs: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for e in exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("rtc_leave_bridge_") {
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_query_only_metrics_the_bridge_exports() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/dashboards/rtc-leave-bridge.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_owned()))
        .collect();
    let dashboard_count = exprs.len();
    let alerts = yaml("deploy/prometheus/alerts.yml");
    for group in alerts["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            exprs.push(rule["expr"].as_str().unwrap().to_owned());
        }
    }
    let queried = queried_metrics(&exprs);
    assert!(dashboard_count >= 10 && queried.len() >= 10, "{queried:?}");

    // What a live bridge exports once it has done its work once: a delegation (and a refused
    // one), webhooks (and a forged one), restarts, a listing, a leave.
    let synapse = common::synapse::Synapse::start(common::synapse::SynapseOptions::default()).await;
    let livekit = common::livekit::LiveKit::start().await;
    let bridge = common::bridge::Bridge::start(common::bridge::Bridge::env_for(&synapse.url, &livekit)).await;
    // A fresh bridge already has a sample for every series queried: the dashboard shows zeros,
    // not "No data", and rate-based alerts can fire on the first event.
    let fresh = bridge.metrics().await;
    let sampled: BTreeSet<&str> =
        fresh.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let missing: Vec<&String> = queried.iter().filter(|q| !sampled.contains(q.as_str())).collect();
    assert!(missing.is_empty(), "no sample on a fresh bridge: {missing:?}\n{fresh}");
    let alice = synapse.register("alice").await;
    let room = synapse.create_room(&alice).await;
    let delay_id = synapse.join_call(&alice, &room, 60_000).await;
    bridge.delegate(&synapse, &alice, &room, "m1", &delay_id, 60_000).await;
    assert_eq!(bridge.delegate_raw(&serde_json::json!({})).await.0, 400);
    let lk_room = rtc_leave_bridge::identity::livekit_room(&room, common::bridge::SLOT);
    let ident = rtc_leave_bridge::identity::identity_three_part(&alice.user_id, &alice.device_id, "m1");
    let p = livekit.join(&bridge.url, &lk_room, &ident).await;
    assert_eq!(livekit.post_webhook(&bridge.url, "{}", Some("forged")).await, 401);
    livekit.leave(&bridge.url, &lk_room, &p, "CLIENT_INITIATED").await;
    assert!(synapse.wait_left(&alice, &room, std::time::Duration::from_secs(2)).await.is_some());
    bridge.metric_reaches("rtc_leave_bridge_jobs_finished_total{outcome=\"sent\"}", 1.0).await;
    let text = bridge.metrics().await;
    let mut exported = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let mut parts = rest.split_whitespace();
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for s in suffixes {
            exported.insert(format!("{name}{s}"));
        }
    }
    let unknown: Vec<&String> = queried.iter().filter(|q| !exported.contains(*q)).collect();
    assert!(unknown.is_empty(), "queried but not exported: {unknown:?}\nexported: {exported:?}");
}

#[test]
fn image_is_non_root_and_checks_itself() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("USER 65532:65532"));
    assert!(dockerfile.contains(r#"CMD ["/usr/local/bin/rtc-leave-bridge", "healthcheck"]"#));
    assert!(dockerfile.matches("FROM ").count() >= 2, "multi-stage");
}

/// The alert rules load, and each alert fires on the series that should fire it and not on a
/// healthy bridge's (`deploy/prometheus/alerts.test.yml`), as Prometheus' own promtool judges.
#[test]
fn alert_rules_pass_promtool() {
    let dir = root().join("deploy/prometheus");
    for args in [&["check", "rules", "alerts.yml"][..], &["test", "rules", "alerts.test.yml"][..]] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool is installed (Debian package prometheus; scripts/test.sh installs it)");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {}: {text}", args.join(" "));
        assert!(text.contains("SUCCESS"), "{text}");
    }
}
