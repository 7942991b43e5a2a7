//! Telemetry: sets up logging once per process.
//!
//! JSON lines on stderr by default (`log.format = "pretty"` for people),
//! levels from `RUST_LOG` (default `info`). Span fields such as `request_id`
//! and `task_id` appear on every line logged inside a request's span. Values
//! can hold untrusted text (a producer's field names, an upstream's reason):
//! the JSON format escapes them, and the pretty format writes every control
//! character as `\u{..}`, so no value can forge a log line or drive a
//! terminal. This module never logs anything itself and holds no secrets.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::RecordFields,
    fmt::{format::Writer, FormatFields},
    prelude::*,
    EnvFilter,
};

use crate::config::LogFormat;

/// Lets a log line that can repeat (once per message of a flood, say)
/// through at most once per period; callers log the rest at debug.
#[derive(Debug)]
pub struct Every {
    period: std::time::Duration,
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Every {
    /// At most once per `period`.
    pub const fn new(period: std::time::Duration) -> Self {
        Self {
            period,
            last: std::sync::Mutex::new(None),
        }
    }

    /// Whether the line may go out now (and, if so, the period starts).
    pub fn due(&self) -> bool {
        let now = std::time::Instant::now();
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|at| now.duration_since(at) < self.period) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// Default filter when `RUST_LOG` is unset: our own info, libraries' warnings.
const DEFAULT_FILTER: &str = "info,lapin=warn,amq_protocol=warn,hyper=warn,reqwest=warn";

/// Default filter for commands whose own output matters more than logs.
pub const QUIET_FILTER: &str = "warn";

/// Installs the global subscriber with the default filter; later calls are
/// no-ops.
pub fn init(format: LogFormat) {
    init_with_default(format, DEFAULT_FILTER);
}

/// Installs the global subscriber, using `default_filter` when `RUST_LOG`
/// is unset.
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .fmt_fields(EscapedFields)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // A subscriber already installed (tests) is fine.
    let _ = result;
}

/// Writes `text` with every control character as `\u{..}`.
pub fn escape_into(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    for c in text.chars() {
        if c.is_control() {
            write!(out, "\\u{{{:x}}}", u32::from(c))?;
        } else {
            out.write_char(c)?;
        }
    }
    Ok(())
}

/// The pretty format's fields, `name=value` separated by spaces, with
/// control characters escaped.
#[derive(Debug, Default, Clone, Copy)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = Escaping {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Escaping<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Escaping<'_, '_> {
    fn write(&mut self, field: &Field, text: &str) {
        if self.result.is_err() {
            return;
        }
        let mut line = String::new();
        if !self.first {
            line.push(' ');
        }
        self.first = false;
        if field.name() != "message" {
            line.push_str(field.name());
            line.push('=');
        }
        self.result = escape_into(&mut line, text).and_then(|()| self.writer.write_str(&line));
    }
}

impl Visit for Escaping<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.write(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        let mut out = String::new();
        escape_into(&mut out, "a\nb\u{1b}[31mc\u{85}d").expect("write");
        assert_eq!(out, "a\\u{a}b\\u{1b}[31mc\\u{85}d");
        assert!(!out.chars().any(char::is_control));
    }

    #[test]
    fn pretty_lines_cannot_be_forged() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .fmt_fields(EscapedFields)
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let field = "input.x\n2026-12-01T00:00:00Z  INFO forged line\u{1b}[2J";
            tracing::info!(field = %field, "rejecting an invalid request");
        });
        let text = String::from_utf8(
            sink.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
        .expect("utf-8");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("field=input.x\\u{a}2026"), "{text}");
        assert!(!text.trim_end().chars().any(char::is_control), "{text:?}");
    }
}
