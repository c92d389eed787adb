//! rtc-leave-bridge: keeps MatrixRTC delegated delayed leave events alive while their member is
//! connected to LiveKit, and sends them the moment LiveKit says the member is gone.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod delegation;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod homeserver;
pub mod identity;
pub mod lifecycle;
pub mod livekit;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod ports;
pub mod scheduler;
pub mod service;
pub mod store;
