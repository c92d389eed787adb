//! `POST /sfu_webhook`: LiveKit's webhooks. 401 unless signed with our key; 400 for a signed body
//! we cannot read; 413 over the size cap; 503 when the store cannot take the change (LiveKit
//! retries 5xx); 200 once applied durably, or ignored as not ours.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use tracing::{debug, warn};

use super::{AppState, MatrixError, WEBHOOK_BODY_LIMIT, empty_ok};
use crate::livekit::webhook::RejectedWebhook;
use crate::livekit::{SfuEvent, SfuEventKind};
use crate::metrics::WebhookLabels;

/// A function returning its future rather than an `async fn`, which would keep the whole request
/// beside its parts: the future is allocated for every webhook, and kept small enough for the
/// allocator's per-thread cache (a larger block takes glibc's arena lock, contended by every
/// thread: 1.4 KiB before, 0.5 KiB now).
pub fn receive(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> impl Future<Output = Result<Response, MatrixError>> {
    let (parts, body) = req.into_parts();
    async move {
        let event = {
            let body = match super::read_limited(&parts, body, WEBHOOK_BODY_LIMIT).await {
                Ok(body) => body,
                Err(refused) => return Ok(refused),
            };
            // Verified and decoded before anything else is awaited: the body is not kept while
            // the engine applies the event.
            verified(&state, &parts.headers, &body)?
        };
        // The headers (and the body, above) share hyper's read buffer: once they are gone it
        // reads the connection's next request into the same buffer rather than a new one.
        drop(parts);
        let name = event_label(event.kind.name());
        let id = event.id.clone();
        if let (Some(following), SfuEventKind::ParticipantJoined(p)) = (&state.following, &event.kind) {
            // Someone removed for leaving the room may come back with its old token.
            following.connected(&event.room, &p.identity);
        }
        // Boxed: applying it is most of this future, and needs none of the reading's.
        match Box::pin(state.intake.webhook(event)).await {
            Ok(outcome) => {
                count(&state, name, outcome.as_str());
                debug!(webhook = %id, event = name, outcome = outcome.as_str(), "webhook handled");
                Ok(empty_ok())
            }
            Err(e) => {
                count(&state, name, "unavailable");
                warn!(webhook = %id, event = name, error = %e, "webhook not applied; LiveKit will retry");
                Err(MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "state store unavailable"))
            }
        }
    }
}

/// The webhook in `body`, if signed with our key (401 if not) and readable (400 if not).
fn verified(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<SfuEvent, MatrixError> {
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.verifier.verify(body, auth) {
        Ok(event) => Ok(event),
        Err(RejectedWebhook::Unauthenticated(reason)) => {
            count(state, "unknown", "forged");
            warn!(reason = %reason, bytes = body.len(), "webhook refused: signature invalid");
            Err(MatrixError::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", "invalid webhook signature"))
        }
        Err(RejectedWebhook::Malformed(reason)) => {
            count(state, "unknown", "malformed");
            warn!(reason = %reason, "signed webhook could not be read");
            Err(MatrixError::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", reason))
        }
    }
}

fn count(state: &AppState, event: &'static str, outcome: &'static str) {
    state.metrics.webhooks.get_or_create(&WebhookLabels { event, outcome }).inc();
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

#[cfg(test)]
mod tests {
    /// The size of what `f` returns, from its type alone.
    fn returned<A, B, F: Fn(A, B) -> Fut, Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Allocated for every webhook: axum boxes the handler's future (with ~0.25 KiB of its
    /// own), and the handler boxes the intake's. glibc serves blocks up to 1 032 bytes from a
    /// per-thread cache; larger ones take an arena lock that every thread contends for.
    #[test]
    fn the_futures_allocated_per_webhook_fit_the_allocators_thread_cache() {
        let handler = returned(super::receive);
        let intake = returned(|i: &'static crate::cluster::intake::Intake, e: crate::livekit::SfuEvent| i.webhook(e));
        assert!(handler <= 640, "the webhook handler's future takes {handler} bytes");
        assert!(intake <= 1024, "the intake's future takes {intake} bytes");
    }
}
