//! Wiring of a running service: store, outside parties, engine, cluster (with Redis) and HTTP
//! server, and the order in which they stop on SIGTERM (stop accepting requests, drain homeserver
//! calls, commit, hand the shards over, exit).

use std::sync::Arc;

use anyhow::Context as _;
use tracing::{info, warn};

use crate::api::{self, AppState};
use crate::cluster::driver::{self, Settings};
use crate::cluster::intake::Intake;
use crate::cluster::leases::Leases;
use crate::config::{AllowedHomeservers, Config};
use crate::engine::{self, EngineConfig, Ports};
use crate::homeserver::delayed_events::{AppserviceCaller, HomeserverCalls, PathStyles};
use crate::homeserver::membership::Views;
use crate::homeserver::{Clients, Discovery};
use crate::livekit::room_service::{Listings, RoomService};
use crate::livekit::webhook::WebhookVerifier;
use crate::metrics::Metrics;
use crate::ports::{CallGate, Sole};
use crate::store::Store;
use crate::store::redis::RedisStore;
use crate::store::sqlite::SqliteStore;

pub async fn serve(config: Config) -> anyhow::Result<()> {
    crate::homeserver::install_crypto_provider();
    let hs = &config.homeservers;
    if matches!(hs.allowed, AllowedHomeservers::Any) {
        warn!(
            "LIVEKIT_FULL_ACCESS_HOMESERVERS is '*': users of any homeserver on the internet may open LiveKit rooms and delegate"
        );
    }
    if let Some(a) = &config.appservice {
        info!(server = %a.server_name, "appservice mode on: delegations proxied by this homeserver are accepted");
    }
    if hs.insecure_skip_verify_tls {
        warn!("TLS certificate verification is disabled (LIVEKIT_INSECURE_SKIP_VERIFY_TLS)");
    }
    // One instance per SQLite data directory; with Redis, any number.
    let _claim = match &config.storage.redis {
        None => Some(SqliteStore::claim(&config.storage.data_dir).context("RTC_LEAVE_BRIDGE_DATA_DIR")?),
        Some(_) => None,
    };
    let OpenedStore { store, shared } = open_store(&config, REDIS_WAIT).await?;
    // With Redis, this instance is one of several: its name, and the leases it will hold.
    let cluster_settings = config.storage.redis.as_ref().map(|r| Settings {
        // 64 random bits: two processes never take each other's leases for their own.
        instance: format!("{}-{:016x}", r.instance, rand::random::<u64>()),
        lease: r.lease,
        renew_interval: r.renew_interval(),
    });
    let leases = cluster_settings.as_ref().map(|c| Arc::new(Leases::new(c.lease)));
    let gate: Arc<dyn CallGate> = match &leases {
        Some(leases) => leases.clone(),
        None => Arc::new(Sole),
    };
    let clients =
        Clients::new(hs.request_timeout, hs.insecure_skip_verify_tls, hs.allow_private).map_err(anyhow::Error::msg)?;
    let discovery = Arc::new(Discovery::new(
        clients.clone(),
        hs.cs_overrides.clone(),
        hs.federation_overrides.clone(),
        hs.allow_private,
    ));
    let room_service = RoomService::new(
        clients.trusted.clone(),
        &config.livekit.api_base,
        &config.livekit.key,
        &config.livekit.secret,
        hs.request_timeout,
    )
    .map_err(anyhow::Error::msg)
    .context("LIVEKIT_URL")?;
    let metrics = Arc::new(Metrics::new());
    // The homeservers the configuration names: their families show from the start too.
    let mut named: Vec<&str> =
        hs.cs_overrides.keys().chain(hs.federation_overrides.keys()).map(String::as_str).collect();
    if let AllowedHomeservers::Only(servers) = &hs.allowed {
        named.extend(servers.iter().map(String::as_str));
    }
    if let Some(a) = &config.appservice {
        named.push(&a.server_name);
    }
    named.sort_unstable();
    named.dedup();
    metrics.preset_homeservers(named);
    let path_styles = Arc::new(PathStyles::default());
    let (engine, engine_task) = engine::start(
        EngineConfig {
            timing: config.engine.timing.clone(),
            reconcile_interval: config.engine.reconcile_interval,
            limits: engine::Limits {
                per_homeserver: config.fairness.homeserver_calls,
                jobs_per_user: config.fairness.jobs_per_user,
                ..engine::Limits::default()
            },
            instance: cluster_settings.as_ref().map(|c| c.instance.clone()),
            appservice_server: config.appservice.as_ref().map(|a| a.server_name.clone()),
        },
        Ports {
            store: store.clone(),
            homeserver: Arc::new(HomeserverCalls {
                discovery: discovery.clone(),
                path_styles: path_styles.clone(),
                appservice: config.appservice.as_ref().map(|a| AppserviceCaller {
                    as_token: Arc::from(a.as_token.as_str()),
                    server_name: a.server_name.clone(),
                }),
                timeout: hs.request_timeout,
                metrics: metrics.clone(),
            }),
            presence: Arc::new(Listings { room_service: room_service.clone(), metrics: metrics.clone() }),
            metrics: metrics.clone(),
            gate: gate.clone(),
        },
    )
    .await
    .context("loading stored jobs")?;
    let (cluster, intake) = match (shared, cluster_settings, leases) {
        (Some(shared), Some(settings), Some(leases)) => {
            let cluster = driver::start(settings, shared.clone(), engine.clone(), leases, metrics.clone())
                .await
                .context("LIVEKIT_REDIS_URL")?;
            (Some(cluster), Intake::Inbox { store: shared, metrics: metrics.clone() })
        }
        _ => (None, Intake::Engine(engine.clone())),
    };

    let issuer = api::token::issuer(&config, room_service.clone());
    let views = Arc::new(Views::new(
        config.appservice.as_ref(),
        config.membership_bot.clone(),
        discovery.clone(),
        hs.request_timeout,
    ));
    info!(checked = %views.describe(), "room membership checked before every token and delegation");
    // Who leaves the room leaves the call: wherever rooms can be seen at all.
    let following = views.any().then(|| {
        info!(poll_interval = ?config.membership_poll_interval,
            "following room membership: users who leave, are kicked or banned are removed from the call");
        crate::membership::driver::start(
            config.membership_poll_interval,
            crate::membership::driver::Ports {
                store: store.clone(),
                views: views.clone(),
                room_service,
                gate,
                metrics: metrics.clone(),
                close_abandoned: config.close_abandoned_rooms,
            },
        )
    });
    let state = Arc::new(AppState {
        issuer,
        views: views.clone(),
        following: following.as_ref().map(|(f, _)| f.clone()),
        engine: engine.clone(),
        intake,
        verifier: WebhookVerifier::new(&config.livekit.keys),
        admin_verifier: api::operator::OperatorKeys::new(&config.livekit.keys),
        discovery,
        allowed: Arc::new(hs.allowed.clone()),
        metrics: metrics.clone(),
        store,
        limits: Arc::new(api::limits::Limits::new(&config.fairness)),
        delays: api::DelayRange { min_ms: hs.min_delay.as_millis() as u64, max_ms: hs.max_delay.as_millis() as u64 },
        appservice: config.appservice.clone().map(|a| {
            Arc::new(api::appservice::AppserviceState {
                config: a,
                livekit_url: config.livekit.url.clone(),
                path_styles: path_styles.clone(),
                request_timeout: hs.request_timeout,
            })
        }),
    });
    let listen = &config.listen;
    let listener = api::listener::bind(listen.bind, listen.max_connections)
        .with_context(|| format!("LIVEKIT_JWT_BIND: cannot listen on {}", listen.bind))?;
    info!(addr = %listener.local_addr()?, livekit = %config.livekit.url, "rtc-leave-bridge listening");
    // In-flight requests get the drain time; a request is answered within its own deadline.
    let settings = api::listener::Settings {
        header_timeout: listen.header_timeout,
        max_connections: listen.max_connections,
        request_timeout: listen.request_timeout,
        drain: config.engine.shutdown_timeout.min(listen.request_timeout),
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let operator = match listen.operator_bind {
        None => None,
        Some(bind) => {
            let l = api::listener::bind(bind, listen.max_connections)
                .with_context(|| format!("RTC_LEAVE_BRIDGE_OPERATOR_BIND: cannot listen on {bind}"))?;
            info!(addr = %l.local_addr()?, "operator endpoints (/metrics, /admin/jobs) listening apart");
            let app = api::operator_router(state.clone());
            Some(tokio::spawn(api::listener::serve(l, app, settings, None, stopped(stop.clone()))))
        }
    };
    let public = tokio::spawn(api::listener::serve(
        listener,
        api::router(state, operator.is_some()),
        settings,
        Some(metrics),
        stopped(stop),
    ));
    termination().await;
    info!("no longer accepting requests; draining");
    let _ = stop_tx.send(true);
    let _ = public.await;
    if let Some(cluster) = &cluster {
        cluster.drain();
    }
    if let Some((_, task)) = following {
        task.abort(); // nothing of it is durable: seats are the store's
    }
    engine.shutdown(config.engine.shutdown_timeout).await;
    let _ = engine_task.await;
    if let Some(cluster) = cluster {
        cluster.shutdown().await;
    }
    if let Some(operator) = operator {
        let _ = operator.await;
    }
    Ok(())
}

/// The configured store, and the same as a shared store if it is one.
pub struct OpenedStore {
    pub store: Arc<dyn Store>,
    /// Set with Redis: the store shared by several instances.
    pub shared: Option<Arc<RedisStore>>,
}

/// The configured store: Redis if `LIVEKIT_REDIS_URL` is set (waited for up to `patience`), else
/// SQLite in the data directory.
pub async fn open_store(config: &Config, patience: std::time::Duration) -> anyhow::Result<OpenedStore> {
    Ok(match &config.storage.redis {
        Some(r) => {
            info!(prefix = %r.prefix, "store: Redis, shared with every instance using the same prefix");
            let store = Arc::new(connect_redis(r, config.homeservers.request_timeout, patience).await?);
            OpenedStore { store: store.clone(), shared: Some(store) }
        }
        None => {
            let dir = &config.storage.data_dir;
            let store = SqliteStore::open(dir);
            let store = Arc::new(store.with_context(|| format!("RTC_LEAVE_BRIDGE_DATA_DIR={}", dir.display()))?);
            OpenedStore { store, shared: None }
        }
    })
}

/// Connects to Redis, waiting for it (unreachable, or loading its data after a restart) for up to
/// `patience`: instances and Redis restarted together come up without an operator.
async fn connect_redis(
    r: &crate::config::Redis,
    timeout: std::time::Duration,
    patience: std::time::Duration,
) -> anyhow::Result<RedisStore> {
    let started = std::time::Instant::now();
    let mut wait = std::time::Duration::from_millis(200);
    loop {
        match RedisStore::connect(&r.url, &r.prefix, timeout).await {
            Ok(store) => return Ok(store),
            Err(e) if started.elapsed() + wait < patience => {
                warn!(error = %e, retry_in = ?wait, "Redis not ready; waiting for it");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(anyhow::Error::new(e).context("LIVEKIT_REDIS_URL")),
        }
    }
}

/// How long a starting instance waits for Redis before giving up (and exiting, for its supervisor
/// to start it again).
const REDIS_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
