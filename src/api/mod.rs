//! The HTTP surface: LiveKit's webhook endpoint, the endpoints clients call (LiveKit tokens,
//! delegations), and the operator endpoints (health, readiness, metrics). Handlers validate and authenticate, then hand
//! over to the engine; errors are Matrix-style `{"errcode", "error"}` bodies.

pub mod appservice;
pub(crate) mod delegation;
pub mod limits;
pub mod listener;
mod member;
pub mod membership;
pub mod operator;
pub mod token;
mod webhook;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::cors::{Any, CorsLayer};

use crate::cluster::intake::{Intake, IntakeError};
use crate::delegation::DelayRef;
use crate::engine::{EngineError, EngineHandle, Refusal};
use crate::homeserver::Discovery;
use crate::livekit::webhook::WebhookVerifier;
use crate::metrics::Metrics;
use crate::store::Store;

/// Largest webhook body accepted (LiveKit's are a few KiB).
pub const WEBHOOK_BODY_LIMIT: usize = 1 << 20;
/// Largest delegation body accepted.
pub const DELEGATION_BODY_LIMIT: usize = 64 << 10;

pub use crate::config::AllowedHomeservers;

/// What the handlers share, behind one `Arc`: axum clones the state for every request, so it
/// must cost one reference count, not a copy of every field.
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
    /// Through whom a user's room membership is checked before a token or a delegation.
    pub views: Arc<crate::homeserver::membership::Views>,
    /// Membership following, when the bridge can see rooms: transactions feed it, tokens are
    /// recorded as seats for it.
    pub following: Option<crate::membership::driver::Following>,
    /// What one user or one homeserver may ask.
    pub limits: Arc<limits::Limits>,
}

/// The public endpoints; the operator endpoints too unless `operator_apart` (they then have
/// their own listener, [`operator_router`]; `/healthz` and `/readyz` stay here as well, for load
/// balancers).
pub fn router(state: Arc<AppState>, operator_apart: bool) -> Router {
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
        .layer(axum::middleware::from_fn_with_state(DELEGATION_BODY_LIMIT, enforce_body_limit))
        .layer(DefaultBodyLimit::max(DELEGATION_BODY_LIMIT));
    // Any size: read and dropped as it comes (never held, never refused for its size).
    let transactions = Router::new()
        .route("/_matrix/app/v1/transactions/{txn}", axum::routing::put(appservice::transaction))
        .layer(DefaultBodyLimit::disable());
    let webhook = Router::new()
        // Reads its body within WEBHOOK_BODY_LIMIT itself (read_limited): the hottest route, a
        // middleware layer costs it 3–4 % of its throughput.
        .route("/sfu_webhook", post(webhook::receive));
    let public = Router::new()
        .merge(delegation)
        .merge(proxied)
        .merge(transactions)
        .merge(webhook)
        .route("/healthz", get(operator::healthz))
        .route("/readyz", get(operator::readyz));
    let all = if operator_apart { public } else { public.merge(operator_routes()) };
    all.fallback(unrecognized).with_state(state)
}

/// The operator endpoints on their own listener (`RTC_LEAVE_BRIDGE_OPERATOR_BIND`).
pub fn operator_router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(operator_routes())
        .route("/healthz", get(operator::healthz))
        .route("/readyz", get(operator::readyz))
        .fallback(unrecognized)
        .with_state(state)
}

fn operator_routes() -> Router<Arc<AppState>> {
    Router::new().route("/metrics", get(operator::metrics)).route("/admin/jobs", get(operator::jobs))
}

async fn unrecognized() -> MatrixError {
    MatrixError::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "unrecognized request")
}

/// Refuses bodies over `limit` bytes with `413 M_TOO_LARGE`: at once when `Content-Length` says
/// so (nothing of the body is read), else when the handler's body extractor hits
/// [`DefaultBodyLimit`]. The answer carries `Connection: close`: the unread rest of the body makes
/// the connection unusable, and a pooled client (LiveKit's webhook sender included) must not send
/// its next request on it.
async fn enforce_body_limit(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = declared_length(req.headers());
    let path = req.uri().path().to_owned();
    let response = if declared.is_some_and(|n| n > limit as u64) {
        None
    } else {
        Some(next.run(req).await).filter(|r| r.status() != StatusCode::PAYLOAD_TOO_LARGE)
    };
    response.unwrap_or_else(|| too_large(&path, limit, declared))
}

/// As [`enforce_body_limit`], for a handler that reads its own body: the body of at most
/// `limit` bytes of the request whose parts are `parts`.
pub async fn read_limited(parts: &axum::http::request::Parts, body: Body, limit: usize) -> Result<Bytes, Response> {
    let declared = declared_length(&parts.headers);
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(parts.uri.path(), limit, declared));
    }
    match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit)).await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(parts.uri.path(), limit, declared)),
        Err(e) => {
            tracing::debug!(path = %parts.uri.path(), error = %e, "request body not read");
            Err(MatrixError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", "request body not read").into_response())
        }
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
}

fn too_large(path: &str, limit: usize, declared: Option<u64>) -> Response {
    tracing::warn!(path = %path, limit, declared, "request body too large; refused");
    let mut r =
        MatrixError::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", format!("request body over {limit} bytes"))
            .into_response();
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// A Matrix-style error answer.
#[derive(Debug)]
pub struct MatrixError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub error: String,
    /// For `429`: how long to wait (`retry_after_ms` in the body, `Retry-After` in seconds).
    pub retry_after_ms: Option<u64>,
}

impl MatrixError {
    pub fn new(status: StatusCode, errcode: &'static str, error: impl Into<String>) -> Self {
        MatrixError { status, errcode, error: error.into(), retry_after_ms: None }
    }
}

impl IntoResponse for MatrixError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "errcode": self.errcode, "error": self.error });
        let Some(ms) = self.retry_after_ms else { return (self.status, Json(body)).into_response() };
        body["retry_after_ms"] = ms.into();
        let mut r = (self.status, Json(body)).into_response();
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000).max(1)));
        r
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
        Err(IntakeError::Engine(EngineError::Refused(refusal))) => Err(match refusal {
            Refusal::TooManyJobs(_) => {
                let mut e = MatrixError::new(StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED", refusal.to_string());
                e.retry_after_ms = Some(60_000);
                e
            }
            _ => MatrixError::new(StatusCode::CONFLICT, "M_INVALID_PARAM", format!("delay_id: {refusal}")),
        }),
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
            // Counted where they were refused: over a rate by [`limit`], over the user's live
            // jobs or conflicting with another member's by the engine.
            StatusCode::TOO_MANY_REQUESTS | StatusCode::CONFLICT => None,
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND => Some("invalid"),
            StatusCode::UNAUTHORIZED => Some("unauthorized"),
            StatusCode::FORBIDDEN => Some("forbidden"),
            _ => Some("unavailable"),
        };
        if let Some(outcome) = outcome {
            state.metrics.delegations.get_or_create(&crate::metrics::OutcomeLabel { outcome }).inc();
        }
    }
    result.map(|()| empty_ok())
}

/// Counts a request refused by one of [`limits::Limits`] (and, for a delegation endpoint, in
/// `delegations_total{outcome="limited"}`), logs it, and gives its answer.
pub fn limited(
    state: &AppState,
    endpoint: &'static str,
    server: &str,
    user: Option<&str>,
    l: limits::Limited,
) -> MatrixError {
    tracing::warn!(
        endpoint,
        server,
        user = user.unwrap_or_default(),
        limit = l.limit,
        retry_after_ms = l.retry_after.as_millis() as u64,
        "request over a limit; refused with 429"
    );
    state.metrics.requests_limited.get_or_create(&crate::metrics::LimitLabels { endpoint, limit: l.limit }).inc();
    if endpoint.ends_with("delegate") {
        state.metrics.delegations.get_or_create(&crate::metrics::OutcomeLabel { outcome: "limited" }).inc();
    }
    l.into_error()
}

/// `200 {}`
pub fn empty_ok() -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], "{}").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn request(body: Body, declared: Option<usize>) -> Request {
        let mut b = axum::http::Request::builder().method("POST").uri("/sfu_webhook");
        if let Some(n) = declared {
            b = b.header(header::CONTENT_LENGTH, n);
        }
        b.body(body).unwrap()
    }

    /// What a handler reading its own body answers, whether the client declares the size or
    /// streams it: the body within the limit, else `413` with the connection closed.
    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_declared_or_streamed() {
        let read = |req: Request| async move {
            let (parts, body) = req.into_parts();
            read_limited(&parts, body, 4).await
        };
        let ok = read(request(Body::from("{}"), Some(2))).await.unwrap();
        assert_eq!(ok, "{}");
        let exact = read(request(Body::from("1234"), None)).await.unwrap();
        assert_eq!(exact, "1234");
        for req in [request(Body::from("12345"), Some(5)), request(Body::from("12345"), None)] {
            let refused = read(req).await.unwrap_err();
            assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
            assert_eq!(refused.headers()[header::CONNECTION], "close");
        }
        // A stream that breaks off is not "too large".
        let broken = futures::stream::iter([Ok(Bytes::from("12")), Err(std::io::Error::other("reset"))]);
        let refused = read(request(Body::from_stream(broken), None)).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    }
}
