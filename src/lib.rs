//! rtc-leave-bridge: keeps MatrixRTC delegated delayed leave events alive while their member is
//! connected to LiveKit, and sends them the moment LiveKit says the member is gone.

pub mod identity;
pub mod lifecycle;
pub mod delegation;
pub mod scheduler;
pub mod store;
pub mod livekit;
pub mod homeserver;
pub mod metrics;
pub mod api;
pub mod engine;
pub mod config;
pub mod service;
