//! The integration test suite: one test binary, one module per area, all
//! sharing the project's test kit, `vidu_test_kit` in `tests/kit/` (a
//! per-test deployment on the real RabbitMQ at 127.0.0.1:5672, or on one
//! private node for the whole run when nothing answers there, the simulator
//! over real HTTP, worker child processes, private broker nodes), and
//! [`files`] for reading the repository's own files.
//!
//! `cargo test --locked` runs it together with the library's unit tests.
//! One module, or one test, by its path:
//!
//! ```text
//! cargo test --test suite faults::
//! cargo test --test suite end_to_end::happy_path_publishes_submitted_progress_and_succeeded_events
//! ```
//!
//! The tests share one process. None changes process-wide state (the
//! environment, the current directory, signal handlers, a global tracing
//! subscriber): what a worker needs goes to its child process explicitly,
//! and every deployment has its own queue and exchange names.

mod files;

mod broker_restart;
mod cli;
mod cluster;
mod cluster_manifests;
mod create_path;
mod dedup;
mod deploy_files;
mod end_to_end;
mod faults;
mod hostile;
mod infrastructure;
mod interface_docs;
mod lanes;
mod models;
mod monitoring;
mod quota;
mod request_parser;
mod rotation;
mod storage;
