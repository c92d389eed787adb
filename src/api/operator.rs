//! Operator endpoints: `/healthz` (the process serves), `/readyz` (the store is usable),
//! `/metrics` (Prometheus text), and `/admin/jobs` (tracked delegations, for
//! `rtc-leave-bridge jobs`; it names users, so it requires a token signed with the LiveKit API
//! secret carrying the `roomAdmin` and `roomList` grants and no room scope — webhook tokens carry
//! neither grant). With `RTC_LEAVE_BRIDGE_OPERATOR_BIND`, `/metrics` and `/admin/jobs` are served
//! on that listener only.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{AppState, MatrixError, empty_ok};

pub async fn healthz() -> Response {
    empty_ok()
}

/// `/readyz` may be public: it says whether the store is usable, never why not (the log does).
pub async fn readyz(State(state): State<Arc<AppState>>) -> Result<Response, MatrixError> {
    match state.store.ping().await {
        Ok(()) => Ok(empty_ok()),
        Err(e) => {
            tracing::warn!(error = %e, "not ready: the store is unavailable");
            Err(MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "store unavailable"))
        }
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
        .into_response()
}

pub async fn jobs(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, MatrixError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| MatrixError::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "missing token"))?;
    let claims = state
        .admin_verifier
        .verify(token)
        .ok_or_else(|| MatrixError::new(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "invalid token"))?;
    if !(claims.video.room_admin && claims.video.room_list) {
        return Err(MatrixError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "requires roomAdmin and roomList grants"));
    }
    // Every job of every room: a token scoped to one room (a room admin's) does not show them.
    if !claims.video.room.is_empty() {
        return Err(MatrixError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "requires a token with no room scope"));
    }
    let jobs = state
        .engine
        .jobs()
        .await
        .map_err(|e| MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", e.to_string()))?;
    Ok(Json(jobs).into_response())
}

/// Checks operator tokens (`rtc-leave-bridge jobs`) with whichever configured LiveKit key their
/// `iss` names.
#[derive(Clone)]
pub struct OperatorKeys {
    verifiers: Vec<(String, livekit_api::access_token::TokenVerifier)>,
}

impl OperatorKeys {
    pub fn new(keys: &[(String, String)]) -> Self {
        let verifiers = keys
            .iter()
            .map(|(k, s)| (k.clone(), livekit_api::access_token::TokenVerifier::with_api_key(k, s)))
            .collect();
        OperatorKeys { verifiers }
    }

    fn verify(&self, token: &str) -> Option<livekit_api::access_token::Claims> {
        let key = crate::livekit::webhook::issuer(token)?;
        let (_, verifier) = self.verifiers.iter().find(|(k, _)| *k == key)?;
        verifier.verify(token).ok()
    }
}
