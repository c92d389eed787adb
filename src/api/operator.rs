//! Operator endpoints: `/healthz` (the process serves), `/readyz` (the store is usable), and
//! `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{AppState, MatrixError, empty_ok};

pub async fn healthz() -> Response {
    empty_ok()
}

pub async fn readyz(State(state): State<AppState>) -> Result<Response, MatrixError> {
    match state.store.ping().await {
        Ok(()) => Ok(empty_ok()),
        Err(e) => Err(MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", e.to_string())),
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
        .into_response()
}
