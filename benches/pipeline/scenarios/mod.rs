//! The scenarios, one module each (the table in `main.rs` names them and
//! gives their order); each holds its runs, its constants and its targets
//! (the constants several share are in `main.rs` and `harness.rs`).

pub(crate) mod ceiling;
pub(crate) mod cluster;
pub(crate) mod dedup;
pub(crate) mod lanes;
pub(crate) mod latency;
pub(crate) mod memory;
pub(crate) mod noisy;
pub(crate) mod polling;
pub(crate) mod quota;
pub(crate) mod quota_change;
pub(crate) mod ratelimit;
pub(crate) mod scaleout;
pub(crate) mod storage;
pub(crate) mod throughput;
