//! Exit statuses of the command line, in one place: every subcommand
//! returns one of these, and scripts and the orchestrator read them (`2`
//! means fix the configuration, not retry).

/// Exit status for bad configuration or arguments.
pub const EXIT_CONFIG: u8 = 2;
/// Exit status of `submit --wait` when no terminal event came in time.
pub const EXIT_TIMEOUT: u8 = 3;
