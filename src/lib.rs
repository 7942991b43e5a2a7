//! vidu-worker: turns video requests on a RabbitMQ queue into
//! Novita Vidu Q3 tasks (six models), tracks them durably in the broker, and publishes
//! CloudEvents with the video URL.
#![deny(unsafe_code)]
#![warn(unreachable_pub, clippy::unwrap_used, missing_docs)]

pub mod broker;
pub mod cli;
pub mod config;
pub mod events;
pub mod gate;
pub mod journal;
pub mod local_broker;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod quota;
pub mod request;
pub mod retry;
pub mod signing;
pub mod simulator;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod worker;
