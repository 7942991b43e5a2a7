//! vidu-worker: turns video requests on a RabbitMQ queue into Novita Vidu
//! Q3 tasks (six models), tracks them durably in the broker, and publishes
//! CloudEvents with the video URL (and, with a bucket, the stored copy).
//!
//! # Layout
//!
//! Modules import only modules below them, never one above:
//!
//! - [`cli`] — the commands (`run`, `check`, `submit`, `cancel`, `simulate`, `demo`);
//!   the one place that starts anything.
//! - [`worker`] — wires one worker together: broker sessions, `basic.get`
//!   intake once a create could follow, the tracking consumer, background
//!   probes.
//! - [`pipeline`] — what happens to one delivery: a request (intake, the
//!   fleet-wide claim on its id, the lane it came from), a ticket (tracking,
//!   the copy into the bucket) or a cancel; every decision as a plain
//!   function in [`pipeline::decisions`].
//! - [`quota`] (the create budget: pauses, the deployment's window, the
//!   learned quota), [`journal`] (the deployment's stream: keys, created
//!   and canceled ids, the learned quota), [`events`] (CloudEvents), [`ops`] (health and
//!   metrics endpoint).
//! - [`broker`] (topology, connecting, confirmed publishing, headers),
//!   [`upstream`] (the Novita client), [`storage`] (videos copied into the
//!   user's bucket), [`gate`] (stops creates while the key, balance,
//!   upstream or storage is refused), [`telemetry`] (logs).
//! - [`request`] (parsing hostile requests), [`config`] (settings),
//!   [`metrics`] (counters and their label values).
//! - [`model`] (the six models' bodies), [`signing`], [`trace`] (W3C trace
//!   context), [`retry`] (the backoff policy), [`tls`], [`local_broker`]
//!   (private RabbitMQ nodes for the demo, tests and benchmark), and
//!   [`simulator`] (the offline Novita stand-in).
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
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod worker;
