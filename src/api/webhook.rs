//! `POST /sfu_webhook`: LiveKit's webhooks. 401 unless signed with our key; 400 for a signed body
//! we cannot read; 413 over the size cap; 503 when the store cannot take the change (LiveKit
//! retries 5xx); 200 once applied durably, or ignored as not ours.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use tracing::{debug, warn};

use super::{AppState, MatrixError, WEBHOOK_BODY_LIMIT, empty_ok};
use crate::livekit::SfuEventKind;
use crate::livekit::webhook::RejectedWebhook;
use crate::metrics::WebhookLabels;

pub async fn receive(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, MatrixError> {
    let (parts, body) = match super::read_limited(req, WEBHOOK_BODY_LIMIT).await {
        Ok(read) => read,
        Err(refused) => return Ok(refused),
    };
    let headers = parts.headers;
    let count = |event: &'static str, outcome: &'static str| {
        state.metrics.webhooks.get_or_create(&WebhookLabels { event, outcome }).inc();
    };
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let event = match state.verifier.verify(&body, auth) {
        Ok(event) => event,
        Err(RejectedWebhook::Unauthenticated(reason)) => {
            count("unknown", "forged");
            warn!(reason = %reason, bytes = body.len(), "webhook refused: signature invalid");
            return Err(MatrixError::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", "invalid webhook signature"));
        }
        Err(RejectedWebhook::Malformed(reason)) => {
            count("unknown", "malformed");
            warn!(reason = %reason, "signed webhook could not be read");
            return Err(MatrixError::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", reason));
        }
    };
    let name = event_label(event.kind.name());
    let id = event.id.clone();
    if let (Some(following), SfuEventKind::ParticipantJoined(p)) = (&state.following, &event.kind) {
        // Someone removed for leaving the room may come back with its old token.
        following.connected(&event.room, &p.identity);
    }
    match state.intake.webhook(event).await {
        Ok(outcome) => {
            count(name, outcome.as_str());
            debug!(webhook = %id, event = name, outcome = outcome.as_str(), "webhook handled");
            Ok(empty_ok())
        }
        Err(e) => {
            count(name, "unavailable");
            warn!(webhook = %id, event = name, error = %e, "webhook not applied; LiveKit will retry");
            Err(MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "state store unavailable"))
        }
    }
}

fn event_label(name: &str) -> &'static str {
    match name {
        "participant_joined" => "participant_joined",
        "participant_left" => "participant_left",
        "participant_connection_aborted" => "participant_connection_aborted",
        "room_finished" => "room_finished",
        _ => "other",
    }
}
