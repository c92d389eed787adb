//! The HTTP surface: LiveKit's webhook endpoint, the endpoints clients call (LiveKit tokens,
//! delegations), and the operator endpoints (health, readiness, metrics). Handlers validate and authenticate, then hand
//! over to the engine; errors are Matrix-style `{"errcode", "error"}` bodies.

pub mod appservice;
pub(crate) mod delegation;
mod member;
pub mod operator;
pub mod token;
mod webhook;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::cors::{Any, CorsLayer};

use crate::cluster::intake::Intake;
use crate::delegation::DelayRef;
use crate::engine::EngineHandle;
use crate::homeserver::Discovery;
use crate::livekit::webhook::WebhookVerifier;
use crate::metrics::Metrics;
use crate::store::Store;

/// Largest webhook body accepted (LiveKit's are a few KiB).
pub const WEBHOOK_BODY_LIMIT: usize = 1 << 20;
/// Largest delegation body accepted.
pub const DELEGATION_BODY_LIMIT: usize = 64 << 10;

pub use crate::config::AllowedHomeservers;

#[derive(Clone)]
pub struct AppState {
    /// This instance's engine (what `/admin/jobs` shows: the jobs driven here).
    pub engine: EngineHandle,
    /// Where webhooks and delegations go.
    pub intake: Intake,
    pub verifier: WebhookVerifier,
    /// Checks operator tokens (signed with the LiveKit API secret).
    pub admin_verifier: operator::OperatorKeys,
    pub discovery: Arc<Discovery>,
    pub allowed: Arc<AllowedHomeservers>,
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn Store>,
    /// The `delay_timeout`s accepted.
    pub delays: DelayRange,
    /// Set in appservice mode.
    pub appservice: Option<Arc<appservice::AppserviceState>>,
    /// Mints tokens and opens rooms.
    pub issuer: Arc<token::Issuer>,
}

pub fn router(state: AppState) -> Router {
    // Browsers call the delegation endpoint directly, as they do lk-jwt-service's.
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([axum::http::Method::POST, axum::http::Method::OPTIONS])
        .allow_headers(Any);
    let delegation = Router::new()
        .route("/delegate_delayed_leave", post(delegation::delegate))
        .route("/get_token", post(token::get_token))
        .route("/sfu/get", post(token::sfu_get))
        .layer(axum::middleware::from_fn_with_state(DELEGATION_BODY_LIMIT, enforce_body_limit))
        .layer(DefaultBodyLimit::max(DELEGATION_BODY_LIMIT))
        .layer(cors);
    // Reached through the member's homeserver (MSC4512), which authenticates the member.
    let proxied = Router::new()
        .route(
            "/_matrix/client/unstable/io.element.msc4195/rtc/livekit/delegate_delayed_leave",
            post(appservice::delegate),
        )
        .route("/_matrix/client/v1/rtc/livekit/delegate_delayed_leave", post(appservice::delegate))
        .route("/_matrix/client/unstable/io.element.msc4195/rtc/livekit/get_token", post(appservice::get_token))
        .route("/_matrix/client/v1/rtc/livekit/get_token", post(appservice::get_token))
        .route(
            "/_matrix/app/v1/ping",
            get(appservice::acknowledge).put(appservice::acknowledge).post(appservice::acknowledge),
        )
        .route("/_matrix/app/v1/transactions/{txn}", axum::routing::put(appservice::acknowledge))
        .layer(axum::middleware::from_fn_with_state(DELEGATION_BODY_LIMIT, enforce_body_limit))
        .layer(DefaultBodyLimit::max(DELEGATION_BODY_LIMIT));
    let webhook = Router::new()
        .route("/sfu_webhook", post(webhook::receive))
        .layer(axum::middleware::from_fn_with_state(WEBHOOK_BODY_LIMIT, enforce_body_limit))
        .layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT));
    Router::new()
        .merge(delegation)
        .merge(proxied)
        .merge(webhook)
        .route("/healthz", get(operator::healthz))
        .route("/readyz", get(operator::readyz))
        .route("/metrics", get(operator::metrics))
        .route("/admin/jobs", get(operator::jobs))
        .fallback(|| async { MatrixError::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "unrecognized request") })
        .with_state(state)
}

/// Refuses bodies over `limit` bytes with `413 M_TOO_LARGE`: at once when `Content-Length` says
/// so (nothing of the body is read), else when the handler's body extractor hits
/// [`DefaultBodyLimit`]. The answer carries `Connection: close`: the unread rest of the body makes
/// the connection unusable, and a pooled client (LiveKit's webhook sender included) must not send
/// its next request on it.
async fn enforce_body_limit(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let path = req.uri().path().to_owned();
    let response = if declared.is_some_and(|n| n > limit as u64) {
        None
    } else {
        Some(next.run(req).await).filter(|r| r.status() != StatusCode::PAYLOAD_TOO_LARGE)
    };
    response.unwrap_or_else(|| {
        tracing::warn!(path = %path, limit, declared, "request body too large; refused");
        let mut r =
            MatrixError::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", format!("request body over {limit} bytes"))
                .into_response();
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    })
}

/// A Matrix-style error answer.
#[derive(Debug)]
pub struct MatrixError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub error: String,
}

impl MatrixError {
    pub fn new(status: StatusCode, errcode: &'static str, error: impl Into<String>) -> Self {
        MatrixError { status, errcode, error: error.into() }
    }
}

impl IntoResponse for MatrixError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "errcode": self.errcode, "error": self.error }))).into_response()
    }
}

/// A client's JSON body as `T`, or `400 M_BAD_JSON` saying whether it was not JSON at all.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, MatrixError> {
    serde_json::from_slice(body).map_err(|e| {
        let kind =
            if serde_json::from_slice::<serde_json::Value>(body).is_ok() { "invalid request" } else { "not JSON" };
        MatrixError::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", format!("{kind}: {e}"))
    })
}

/// Identifier fields are capped well above anything real.
const MAX_ID_LEN: usize = 255;

/// `400 M_INVALID_PARAM`
pub fn invalid(msg: impl Into<String>) -> MatrixError {
    MatrixError::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", msg)
}

/// The delays accepted from clients, in milliseconds: at most the configured maximum, at least
/// what a takeover by another instance needs (see `RTC_LEAVE_BRIDGE_MIN_DELAY`).
#[derive(Debug, Clone, Copy)]
pub struct DelayRange {
    pub min_ms: u64,
    pub max_ms: u64,
}

impl DelayRange {
    /// `what`'s delay in milliseconds, or 400 M_INVALID_PARAM saying which delays are accepted.
    pub fn check(&self, what: &str, ms: i64) -> Result<u64, MatrixError> {
        match u64::try_from(ms) {
            Ok(ms) if (self.min_ms.max(1)..=self.max_ms).contains(&ms) => Ok(ms),
            _ => {
                Err(invalid(format!("{what} must be between {} and {} ms (got {ms})", self.min_ms.max(1), self.max_ms)))
            }
        }
    }
}

/// A free-form identifier from a client: non-empty, bounded, printable.
pub fn check_text(name: &str, value: &str) -> Result<(), MatrixError> {
    if value.is_empty() || value.len() > MAX_ID_LEN || value.chars().any(char::is_control) {
        return Err(invalid(format!("{name} must be 1 to {MAX_ID_LEN} printable characters")));
    }
    Ok(())
}

/// Hands a validated delegation to the engine: `Ok` once it is durably stored.
pub async fn store_delegation(state: &AppState, delegation: crate::delegation::Delegation) -> Result<(), MatrixError> {
    let (user, room, delay_id) = (delegation.user_id.clone(), delegation.room_id.clone(), delegation.delay_id.clone());
    let (mode, identity) = (delegation.mode, delegation.identities().swap_remove(0));
    match state.intake.delegate(delegation).await {
        Ok(receipt) => {
            tracing::info!(stored = %receipt, room = %room, identity = %identity, user = %user, delay_id = %DelayRef(&delay_id),
                mode = ?mode, "delegation stored");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(user = %user, room = %room, delay_id = %DelayRef(&delay_id), error = %e, "delegation not stored");
            Err(MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "cannot store the delegation now"))
        }
    }
}

/// Counts a refused delegation by why it was refused (accepted ones are counted by the engine),
/// and answers `200 {}` or the error.
pub fn delegation_answer(state: &AppState, result: Result<(), MatrixError>) -> Result<Response, MatrixError> {
    if let Err(e) = &result {
        let outcome = match e.status {
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND => "invalid",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            _ => "unavailable",
        };
        state.metrics.delegations.get_or_create(&crate::metrics::OutcomeLabel { outcome }).inc();
    }
    result.map(|()| empty_ok())
}

/// `200 {}`
pub fn empty_ok() -> Response {
    (StatusCode::OK, Json(serde_json::json!({}))).into_response()
}
