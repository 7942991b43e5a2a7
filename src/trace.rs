//! W3C trace context: the `traceparent` a producer may send with a request,
//! checked once where it enters and continued with the worker's own span.
//!
//! [`TraceParent`] is the only form a trace context takes inside the worker:
//! parsed from the request's header (a malformed one is ignored, never an
//! error), carried in the ticket (checked again when read back), and written
//! into events, dead-letter copies and the upstream calls' headers.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The header (AMQP and HTTP) that carries the trace context.
pub const HEADER: &str = "traceparent";

/// A valid W3C `traceparent`: version, 32-hex trace id (not all zero),
/// 16-hex parent id, 2-hex flags, lowercase; 55 ASCII characters for
/// version 00.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TraceParent(String);

impl TraceParent {
    /// `value`, if it is a `traceparent` the worker can continue.
    pub fn parse(value: &str) -> Option<Self> {
        valid(value).then(|| Self(value.to_owned()))
    }

    /// Continues an incoming trace context (a producer's header, surrounding
    /// white space allowed): same trace id and flags, a new parent id for
    /// the worker's own span. `None` for a malformed one.
    pub fn continued(incoming: &str) -> Option<Self> {
        let incoming = incoming.trim();
        if !valid(incoming) {
            return None;
        }
        let mut parts = incoming.split('-');
        let (trace_id, flags) = (parts.nth(1)?, parts.nth(1)?);
        let span_id = loop {
            let v: u64 = rand::random();
            if v != 0 {
                break v;
            }
        };
        Some(Self(format!("00-{trace_id}-{span_id:016x}-{flags}")))
    }

    /// The header value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TraceParent {
    type Error = &'static str;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        if valid(&value) {
            Ok(Self(value))
        } else {
            Err("traceparent is malformed")
        }
    }
}

impl From<TraceParent> for String {
    fn from(value: TraceParent) -> Self {
        value.0
    }
}

fn valid(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let [version, trace_id, parent_id, flags] = parts.as_slice() else {
        return false;
    };
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    hex(version, 2)
        && *version != "ff"
        && hex(trace_id, 32)
        && !trace_id.bytes().all(|b| b == b'0')
        && hex(parent_id, 16)
        && hex(flags, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traces_continue_with_a_new_span() {
        for incoming in [INCOMING.to_owned(), format!("  {INCOMING}\t")] {
            let out = TraceParent::continued(&incoming).expect("valid");
            let out = out.as_str();
            assert!(
                out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{out}"
            );
            assert!(out.ends_with("-01"), "{out}");
            assert_ne!(out, INCOMING);
            assert_eq!(out.len(), INCOMING.len());
        }
    }

    #[test]
    fn malformed_traceparents_are_ignored_and_refused_when_read_back() {
        for bad in [
            "",
            "garbage",
            "00-x",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
        ] {
            assert_eq!(TraceParent::continued(bad), None, "{bad}");
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
            let json = serde_json::to_string(bad).expect("json");
            assert!(serde_json::from_str::<TraceParent>(&json).is_err(), "{bad}");
        }
        let good: TraceParent =
            serde_json::from_str(&format!("\"{INCOMING}\"")).expect("a valid one is read");
        assert_eq!(good.as_str(), INCOMING);
        assert_eq!(
            serde_json::to_string(&good).expect("json"),
            format!("\"{INCOMING}\"")
        );
    }
}
