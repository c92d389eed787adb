//! Wiring of a running service: store, outside parties, engine and HTTP server, and the order in
//! which they stop on SIGTERM (stop accepting requests, drain homeserver calls, commit, exit).

use std::sync::Arc;

use anyhow::Context as _;
use tracing::{info, warn};

use crate::api::{self, AppState};
use crate::config::Config;
use crate::engine::{self, EngineConfig, Ports};
use crate::homeserver::delayed_events::{HomeserverCalls, PathStyles};
use crate::homeserver::{Clients, Discovery};
use crate::livekit::room_service::{Listings, RoomService};
use crate::livekit::webhook::WebhookVerifier;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::sqlite::SqliteStore;

pub async fn serve(config: Config) -> anyhow::Result<()> {
    crate::homeserver::install_crypto_provider();
    if matches!(config.allowed, api::AllowedHomeservers::Any) {
        warn!("LIVEKIT_FULL_ACCESS_HOMESERVERS is '*': users of any homeserver may delegate");
    }
    if let Some(a) = &config.appservice {
        info!(server = %a.server_name, "appservice mode on: delegations proxied by this homeserver are accepted");
    }
    if config.insecure_skip_verify_tls {
        warn!("TLS certificate verification is disabled (LIVEKIT_INSECURE_SKIP_VERIFY_TLS)");
    }
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&config.data_dir)
            .with_context(|| format!("RTC_LEAVE_BRIDGE_DATA_DIR={}", config.data_dir.display()))?,
    );
    let clients =
        Clients::new(config.request_timeout, config.insecure_skip_verify_tls, config.allow_private_homeservers)
            .map_err(anyhow::Error::msg)?;
    let discovery = Arc::new(Discovery::new(
        clients.clone(),
        config.cs_overrides.clone(),
        config.federation_overrides.clone(),
        config.allow_private_homeservers,
    ));
    let room_service = RoomService::new(
        clients.trusted.clone(),
        &config.livekit_url,
        &config.livekit_key,
        &config.livekit_secret,
        config.request_timeout,
    )
    .map_err(anyhow::Error::msg)
    .context("LIVEKIT_URL")?;
    let metrics = Arc::new(Metrics::new());
    let path_styles = Arc::new(PathStyles::default());
    let (engine, engine_task) = engine::start(
        EngineConfig {
            timing: config.timing.clone(),
            reconcile_interval: config.reconcile_interval,
            limits: engine::Limits::default(),
        },
        Ports {
            store: store.clone(),
            homeserver: Arc::new(HomeserverCalls {
                discovery: discovery.clone(),
                path_styles: path_styles.clone(),
                as_token: config.appservice.as_ref().map(|a| Arc::from(a.as_token.as_str())),
                timeout: config.request_timeout,
                metrics: metrics.clone(),
            }),
            presence: Arc::new(Listings { room_service, metrics: metrics.clone() }),
            metrics: metrics.clone(),
        },
    )
    .await
    .context("loading stored jobs")?;

    let state = AppState {
        engine: engine.clone(),
        verifier: WebhookVerifier::new(&config.livekit_key, &config.livekit_secret),
        admin_verifier: livekit_api::access_token::TokenVerifier::with_api_key(
            &config.livekit_key,
            &config.livekit_secret,
        ),
        discovery,
        allowed: Arc::new(config.allowed.clone()),
        metrics,
        store,
        max_delay_ms: config.max_delay.as_millis() as u64,
        appservice: config.appservice.clone().map(|a| {
            Arc::new(api::appservice::AppserviceState {
                config: a,
                livekit_url: config.livekit_url.clone(),
                path_styles: path_styles.clone(),
                request_timeout: config.request_timeout,
            })
        }),
    };
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("LIVEKIT_JWT_BIND: cannot listen on {}", config.bind))?;
    info!(addr = %listener.local_addr()?, livekit = %config.livekit_url, "rtc-leave-bridge listening");
    axum::serve(listener, api::router(state)).with_graceful_shutdown(termination()).await?;
    info!("no longer accepting requests; draining");
    engine.shutdown(config.shutdown_timeout).await;
    let _ = engine_task.await;
    Ok(())
}

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
