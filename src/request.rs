//! Request messages: parse and validate what producers publish.
//!
//! A delivery's body and AMQP properties go in; a [`GenerationRequest`] that
//! is valid by construction comes out, or an [`InvalidRequest`] that names
//! the offending field. Every limit of the six Vidu Q3 models' request bodies is
//! checked here, so nothing downstream re-checks and nothing invalid is ever
//! sent upstream. Bodies are hostile: this module never panics on input,
//! never reads a body over [`MAX_BODY_BYTES`], and never echoes more than a
//! short excerpt of bad values back in an error.

use std::{borrow::Cow, collections::HashMap, fmt};

use serde::Serialize;
use serde_json::{value::RawValue, Value};

use crate::model::{excerpt, parse_input, problem, Problem};
pub use crate::model::{Model, ViduInput, MAX_URL_CHARS};

/// Largest body read; larger ones are rejected unread.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest `metadata` object, serialized.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Longest `request_id`.
pub const MAX_REQUEST_ID_CHARS: usize = 128;
/// Deepest nesting of arrays and objects accepted anywhere in a body (the
/// request itself needs three levels; the rest is for `metadata`).
pub const MAX_DEPTH: usize = 32;
/// Longest AMQP short-string property (`correlation_id`, `reply_to`, ...).
pub const MAX_PROPERTY_BYTES: usize = 255;
/// The one `amq.` name a `reply_to` may use: RabbitMQ's direct reply-to.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

const TOP_LEVEL_FIELDS: [&str; 5] = ["request_id", "model", "input", "metadata", "deadline"];

/// A request id: 1–128 characters of `[A-Za-z0-9._:-]`. Deserializing one
/// (from a ticket) checks the same rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct RequestId(String);

impl<'de> serde::Deserialize<'de> for RequestId {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let raw = Cow::<'de, str>::deserialize(de)?;
        Self::parse(&raw).map_err(|why| serde::de::Error::custom(format!("request_id {why}")))
    }
}

impl RequestId {
    /// Checks the id rules.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.is_empty() || raw.chars().count() > MAX_REQUEST_ID_CHARS {
            return Err("must be 1 to 128 characters");
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err("may only contain A-Z a-z 0-9 . _ : -");
        }
        Ok(Self(raw.to_owned()))
    }

    /// A fresh random id, for requests that name none.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The AMQP properties of a delivery that matter for parsing.
#[derive(Debug, Default, Clone, Copy)]
pub struct MessageProps<'a> {
    /// `message_id`, the fallback request id.
    pub message_id: Option<&'a str>,
    /// `content_type`; only JSON or none is accepted.
    pub content_type: Option<&'a str>,
    /// `content_encoding`; only none or identity is accepted.
    pub content_encoding: Option<&'a str>,
    /// `correlation_id`, copied to every event.
    pub correlation_id: Option<&'a str>,
    /// `reply_to`, where the terminal event also goes.
    pub reply_to: Option<&'a str>,
    /// The deployment's request queue: `reply_to` may not name it or
    /// anything that starts with it (its internal queues).
    pub request_queue: &'a str,
    /// `amqp.reply_to_allowed`: the patterns `reply_to` must match.
    pub reply_to_allowed: &'a [String],
}

/// Checks `correlation_id`: at most 255 bytes, no control characters
/// (it is copied into every event's properties).
pub fn check_correlation_id(value: &str) -> Result<(), String> {
    check_property(value)
}

fn check_property(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_PROPERTY_BYTES {
        return Err(format!("must be 1 to {MAX_PROPERTY_BYTES} bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err("may not contain control characters".into());
    }
    Ok(())
}

/// Checks `reply_to`: a queue name the worker may publish the terminal
/// event to. Not the deployment's own queues (`request_queue` and every
/// name starting with it), not another deployment's internal queues
/// (`….tracking`, `….dead`, `….wait.<n>s`, `….quota.…`), and no `amq.`
/// name except direct reply-to.
pub fn check_reply_to(value: &str, request_queue: &str) -> Result<(), String> {
    check_property(value)?;
    if value.chars().any(char::is_whitespace) {
        return Err("may not contain spaces".into());
    }
    if !request_queue.is_empty() && value.starts_with(request_queue) {
        return Err(format!(
            "{:?} is this deployment's own queue; reply_to must name a queue of the producer's",
            excerpt(value)
        ));
    }
    if value.starts_with("amq.") && !value.starts_with(DIRECT_REPLY_TO) {
        return Err(format!(
            "{:?} is a broker-reserved name (amq.); only {DIRECT_REPLY_TO} may be used",
            excerpt(value)
        ));
    }
    if looks_internal(value) {
        return Err(format!(
            "{:?} is the name of a vidu-worker deployment's internal queue",
            excerpt(value)
        ));
    }
    Ok(())
}

/// Checks `reply_to` against `amqp.reply_to_allowed` (on top of
/// [`check_reply_to`]): the terminal event goes only to queues the
/// operator allowed, never to any queue of the vhost a producer names.
pub fn check_reply_to_allowed(value: &str, allowed: &[String]) -> Result<(), String> {
    if allowed.iter().any(|p| matches_pattern(p, value)) {
        return Ok(());
    }
    Err(format!(
        "{:?} is not allowed by amqp.reply_to_allowed ({})",
        excerpt(value),
        allowed.join(", ")
    ))
}

/// Whether `name` matches `pattern`, where `*` matches any run of
/// characters (none included) and everything else itself.
pub fn matches_pattern(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == name;
    };
    if parts.len() == 1 {
        return pattern == name;
    }
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Whether a name has the shape of a deployment's internal queue.
fn looks_internal(name: &str) -> bool {
    if name.ends_with(".tracking") || name.ends_with(".dead") || name.contains(".quota.") {
        return true;
    }
    match name.rsplit_once(".wait.") {
        Some((_, tier)) => tier
            .strip_suffix('s')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

/// Where a request's id came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    /// The body's `request_id`.
    Body,
    /// The AMQP `message_id`.
    MessageId,
    /// Generated: the request named none, so a redelivered copy gets
    /// another id and cannot be recognised.
    Generated,
}

/// A request that passed every check.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The id events carry as `subject`.
    pub request_id: RequestId,
    /// Where the id came from.
    pub id_source: IdSource,
    /// The model (the request's `model`, or [`Model::DEFAULT`]).
    pub model: Model,
    /// The upstream request body.
    pub input: ViduInput,
    /// The producer's metadata, byte for byte.
    pub metadata: Option<Box<RawValue>>,
    /// When the request stops being worth creating (`deadline`).
    pub deadline: Option<chrono::DateTime<chrono::Utc>>,
}

impl GenerationRequest {
    /// Whether its deadline has passed at `now`.
    pub fn expired(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }

    /// The id, when the producer chose it (so a redelivered copy of this
    /// message carries the same one).
    pub fn stable_id(&self) -> Option<&RequestId> {
        (self.id_source != IdSource::Generated).then_some(&self.request_id)
    }

    /// Whether the upstream may take up to 48 h.
    pub fn off_peak(&self) -> bool {
        self.input.common().off_peak.unwrap_or(false)
    }
}

/// Why a request was refused, naming the field.
#[derive(Debug, Clone)]
pub struct InvalidRequest {
    /// The best request id that could be found (body, then `message_id`,
    /// then a generated one), for the `failed` event's subject.
    pub request_id: RequestId,
    /// The field at fault (`input.duration`, `body`, `metadata`, ...).
    pub field: Cow<'static, str>,
    /// What is wrong with it.
    pub message: String,
    /// The producer's metadata when it was readable and valid.
    pub metadata: Option<Box<RawValue>>,
}

impl fmt::Display for InvalidRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Parses and validates one delivery.
pub fn parse(
    body: &[u8],
    props: MessageProps<'_>,
) -> Result<GenerationRequest, Box<InvalidRequest>> {
    let mut ctx = Ctx {
        props,
        request_id: None,
        metadata: None,
    };
    match ctx.parse(body) {
        Ok(req) => Ok(req),
        Err((field, message)) => Err(Box::new(InvalidRequest {
            request_id: ctx.best_request_id(),
            field,
            message,
            metadata: ctx.metadata.take(),
        })),
    }
}

/// Refuses a valid request for a model outside the deployment's
/// `upstream.models`.
pub fn allowed(
    req: GenerationRequest,
    models: &[Model],
) -> Result<GenerationRequest, Box<InvalidRequest>> {
    if models.contains(&req.model) {
        return Ok(req);
    }
    let names: Vec<&str> = models.iter().map(|m| m.as_str()).collect();
    Err(Box::new(InvalidRequest {
        message: format!(
            "{} is not served by this deployment (upstream.models: {})",
            req.model,
            names.join(", ")
        ),
        request_id: req.request_id,
        field: Cow::Borrowed("model"),
        metadata: req.metadata,
    }))
}

struct Ctx<'p> {
    props: MessageProps<'p>,
    request_id: Option<RequestId>,
    metadata: Option<Box<RawValue>>,
}

impl Ctx<'_> {
    fn best_request_id(&self) -> RequestId {
        self.request_id
            .clone()
            .or_else(|| self.props.message_id.and_then(|m| RequestId::parse(m).ok()))
            .unwrap_or_else(RequestId::generate)
    }

    fn parse(&mut self, body: &[u8]) -> Result<GenerationRequest, Problem> {
        if body.len() > MAX_BODY_BYTES {
            return Err(problem(
                "body",
                format!(
                    "{} bytes is larger than the limit of {MAX_BODY_BYTES} bytes",
                    body.len()
                ),
            ));
        }
        check_content_type(self.props)?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(problem("body", "is empty; expected a JSON object"));
        }
        let fields: HashMap<Cow<'_, str>, &RawValue> =
            serde_json::from_slice(body).map_err(|e| problem("body", json_problem(body, &e)))?;

        // Pick up the id and metadata first, so that any later failure can
        // still be reported under the producer's id with its metadata.
        let request_id = match fields.get("request_id") {
            Some(raw) if raw.get() != "null" => match serde_json::from_str::<&str>(raw.get())
                .ok()
                .map(Cow::Borrowed)
                .or_else(|| {
                    serde_json::from_str::<String>(raw.get())
                        .ok()
                        .map(Cow::Owned)
                }) {
                Some(s) => {
                    Some(RequestId::parse(&s).map_err(|m| problem("request_id", m.to_owned()))?)
                }
                None => return Err(problem("request_id", "must be a string")),
            },
            _ => None,
        };
        let (request_id, id_source) = match request_id {
            Some(id) => (id, IdSource::Body),
            None => match self.props.message_id {
                Some(mid) => (
                    RequestId::parse(mid)
                        .map_err(|m| problem("message_id", format!("(used as request_id) {m}")))?,
                    IdSource::MessageId,
                ),
                None => (RequestId::generate(), IdSource::Generated),
            },
        };
        self.request_id = Some(request_id.clone());
        if let Some(c) = self.props.correlation_id {
            check_correlation_id(c).map_err(|m| problem("correlation_id", m))?;
        }
        if let Some(r) = self.props.reply_to {
            check_reply_to(r, self.props.request_queue).map_err(|m| problem("reply_to", m))?;
            check_reply_to_allowed(r, self.props.reply_to_allowed)
                .map_err(|m| problem("reply_to", m))?;
        }

        if let Some(raw) = fields.get("metadata").filter(|r| r.get() != "null") {
            if !raw.get().starts_with('{') {
                return Err(problem("metadata", "must be a JSON object"));
            }
            if raw.get().len() > MAX_METADATA_BYTES {
                return Err(problem(
                    "metadata",
                    format!(
                        "is {} bytes serialized, more than the limit of {MAX_METADATA_BYTES}",
                        raw.get().len()
                    ),
                ));
            }
            self.metadata = Some((*raw).to_owned());
        }

        // The whole body's structure, once the id is known (so that the
        // failed event can carry it). What failed is not echoed: no metadata
        // then, and no id read from a key given twice.
        if let Err(p) = check_structure(body) {
            self.metadata = None;
            if p.0 == "request_id" {
                self.request_id = None;
            }
            return Err(p);
        }

        let mut unknown: Vec<&str> = fields
            .keys()
            .map(|k| k.as_ref())
            .filter(|k| !TOP_LEVEL_FIELDS.contains(k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            let name = excerpt(unknown[0]);
            return Err(problem(
                name.clone(),
                format!(
                    "unknown field {name:?}; allowed fields are request_id, model, input, metadata, deadline"
                ),
            ));
        }

        let model = match fields.get("model").filter(|r| r.get() != "null") {
            None => Model::DEFAULT,
            Some(raw) => match serde_json::from_str::<String>(raw.get()) {
                Ok(m) => Model::parse(&m).ok_or_else(|| {
                    problem(
                        "model",
                        format!(
                            "unknown model {:?}; the models are {}",
                            excerpt(&m),
                            Model::names()
                        ),
                    )
                })?,
                Err(_) => return Err(problem("model", "must be a string")),
            },
        };

        let deadline = match fields.get("deadline").filter(|r| r.get() != "null") {
            None => None,
            Some(raw) => match serde_json::from_str::<String>(raw.get()) {
                Ok(text) if text.len() <= 64 => Some(
                    chrono::DateTime::parse_from_rfc3339(&text)
                        .map_err(|_| {
                            problem(
                                "deadline",
                                format!(
                                    "{:?} is not an RFC 3339 time like 2026-12-08T10:00:00Z",
                                    excerpt(&text)
                                ),
                            )
                        })?
                        .with_timezone(&chrono::Utc),
                ),
                _ => {
                    return Err(problem(
                        "deadline",
                        "must be an RFC 3339 time string like 2026-12-08T10:00:00Z",
                    ))
                }
            },
        };

        let input = match fields.get("input").filter(|r| r.get() != "null") {
            None => return Err(problem("input", "is required")),
            Some(raw) => match serde_json::from_str::<Value>(raw.get()) {
                Ok(Value::Object(map)) => parse_input(model, map)?,
                Ok(_) => return Err(problem("input", "must be a JSON object")),
                Err(e) => return Err(problem("input", e.to_string())),
            },
        };

        Ok(GenerationRequest {
            request_id,
            id_source,
            model,
            input,
            metadata: self.metadata.take(),
            deadline,
        })
    }
}

fn check_content_type(props: MessageProps<'_>) -> Result<(), Problem> {
    if let Some(ct) = props.content_type {
        let media = ct.split(';').next().unwrap_or("").trim();
        if !media.eq_ignore_ascii_case("application/json") {
            return Err(problem(
                "content_type",
                format!(
                    "{:?} is not supported; publish JSON with content type application/json or none",
                    excerpt(ct)
                ),
            ));
        }
    }
    if let Some(enc) = props.content_encoding {
        if !(enc.is_empty()
            || enc.eq_ignore_ascii_case("identity")
            || enc.eq_ignore_ascii_case("utf-8"))
        {
            return Err(problem(
                "content_encoding",
                format!(
                    "{:?} is not supported; send the body unencoded",
                    excerpt(enc)
                ),
            ));
        }
    }
    Ok(())
}

/// Walks the whole body once: no key twice in one object (JSON parsers
/// disagree on which one wins, so the worker would send upstream what a
/// reviewer does not see), nesting at most [`MAX_DEPTH`], numbers that fit
/// a double, strings that are valid Unicode (serde_json refuses lone
/// surrogates and unrepresentable numbers itself).
fn check_structure(body: &[u8]) -> Result<(), Problem> {
    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use std::cell::RefCell;

    struct Walk<'a> {
        path: String,
        depth: usize,
        found: &'a RefCell<Option<Problem>>,
    }

    impl Walk<'_> {
        fn fail<E: serde::de::Error>(&self, p: Problem) -> E {
            let text = p.1.clone();
            *self.found.borrow_mut() = Some(p);
            E::custom(text)
        }

        fn field(&self) -> String {
            if self.path.is_empty() {
                "body".to_owned()
            } else {
                self.path.clone()
            }
        }

        fn child(&self, segment: String) -> Result<Walk<'_>, Problem> {
            if self.depth + 1 > MAX_DEPTH {
                return Err(problem(
                    self.field(),
                    format!("nests deeper than {MAX_DEPTH} levels"),
                ));
            }
            Ok(Walk {
                path: segment,
                depth: self.depth + 1,
                found: self.found,
            })
        }
    }

    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
            de.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
            if v.is_finite() {
                Ok(())
            } else {
                Err(self.fail(problem(self.field(), "is a number too large for a double")))
            }
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0usize;
            loop {
                let child = self
                    .child(format!("{}[{i}]", self.path))
                    .map_err(|p| self.fail::<A::Error>(p))?;
                if seq.next_element_seed(child)?.is_none() {
                    return Ok(());
                }
                i += 1;
            }
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                let name = excerpt(&key);
                let seg = if self.path.is_empty() {
                    name.clone()
                } else if self.path.len() > 200 {
                    // Long enough to find the place; the rest would only
                    // repeat untrusted names.
                    self.path.clone()
                } else {
                    format!("{}.{name}", self.path)
                };
                if !seen.insert(key) {
                    return Err(self.fail(problem(
                        seg,
                        format!("duplicate key {name:?}: each key may appear once"),
                    )));
                }
                let child = self.child(seg).map_err(|p| self.fail::<A::Error>(p))?;
                map.next_value_seed(child)?;
            }
            Ok(())
        }
    }

    let found = RefCell::new(None);
    let walk = Walk {
        path: String::new(),
        depth: 0,
        found: &found,
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let result = walk.deserialize(&mut de).and_then(|()| de.end());
    match (result, found.into_inner()) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(p)) => Err(p),
        (Err(e), None) => Err(problem("body", json_problem(body, &e))),
    }
}

fn json_problem(body: &[u8], err: &serde_json::Error) -> String {
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    match (err.classify(), first) {
        (serde_json::error::Category::Data, Some(b'[')) => {
            "must be a JSON object, found an array".into()
        }
        (serde_json::error::Category::Data, _) => "must be a JSON object".into(),
        (serde_json::error::Category::Syntax | serde_json::error::Category::Eof, _)
            if std::str::from_utf8(body).is_err() =>
        {
            format!("is not valid UTF-8 JSON ({err})")
        }
        _ => format!("is not valid JSON ({err})"),
    }
}

/// Most ids one cancel message names.
pub const MAX_CANCEL_IDS: usize = 1000;
/// Largest cancel message read (1,000 ids of 128 characters fit).
pub const MAX_CANCEL_BYTES: usize = 256 * 1024;

/// Reads a cancel message (`{"cancel": "id"}` or `{"cancel": ["id", …]}`,
/// at most [`MAX_CANCEL_IDS`] valid request ids, nothing else): the ids, or
/// why it is not one (for the dead-letter reason; nothing of the body is
/// quoted beyond a short excerpt).
pub fn parse_cancel(body: &[u8]) -> Result<Vec<RequestId>, String> {
    if body.len() > MAX_CANCEL_BYTES {
        return Err(format!(
            "{} bytes is larger than the limit of {MAX_CANCEL_BYTES} bytes",
            body.len()
        ));
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cancel {
        cancel: OneOrMany,
    }
    let cancel: Cancel = serde_json::from_slice(body).map_err(|_| {
        "not a cancel: expected {\"cancel\": \"<request id>\"} or {\"cancel\": [\"<request id>\", …]}"
            .to_owned()
    })?;
    let ids = match cancel.cancel {
        OneOrMany::One(id) => vec![id],
        OneOrMany::Many(ids) => ids,
    };
    if ids.is_empty() || ids.len() > MAX_CANCEL_IDS {
        return Err(format!(
            "cancel must name 1 to {MAX_CANCEL_IDS} request ids"
        ));
    }
    ids.iter()
        .map(|id| {
            RequestId::parse(id)
                .map_err(|why| format!("cancel: request id {:?} {why}", excerpt(id)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancels_name_request_ids_and_nothing_else() {
        let ids = |body: &str| parse_cancel(body.as_bytes()).map(|v| v.len());
        assert_eq!(ids(r#"{"cancel": "order-1"}"#), Ok(1));
        assert_eq!(ids(r#"{"cancel": ["a", "b", "c"]}"#), Ok(3));
        let many: Vec<String> = (0..1000).map(|i| format!("id-{i}")).collect();
        assert_eq!(
            ids(&serde_json::json!({ "cancel": many }).to_string()),
            Ok(1000)
        );
        let too_many: Vec<String> = (0..1001).map(|i| format!("id-{i}")).collect();
        for bad in [
            String::new(),
            "null".to_owned(),
            r#"{"cancel": []}"#.to_owned(),
            r#"{"cancel": 42}"#.to_owned(),
            r#"{"cancel": "has space"}"#.to_owned(),
            r#"{"cancel": "a", "also": 1}"#.to_owned(),
            r#"{"cancel": ["ok", ""]}"#.to_owned(),
            serde_json::json!({ "cancel": too_many }).to_string(),
            format!(r#"{{"cancel": "{}"}}"#, "x".repeat(200)),
            "x".repeat(MAX_CANCEL_BYTES + 1),
        ] {
            assert!(
                parse_cancel(bad.as_bytes()).is_err(),
                "{}",
                bad.chars().take(60).collect::<String>()
            );
        }
    }

    #[test]
    fn a_deadline_is_an_rfc_3339_time() {
        let req = |deadline: serde_json::Value| {
            let body = serde_json::json!({
                "request_id": "d-1",
                "input": {"images": ["https://example.com/cat.png"], "duration": 5},
                "deadline": deadline,
            });
            parse(body.to_string().as_bytes(), MessageProps::default())
        };
        let ok = req(serde_json::json!("2026-12-08T10:00:00Z")).expect("valid");
        assert!(ok.deadline.is_some());
        assert!(ok.expired(chrono::Utc::now() + chrono::Duration::days(3650)));
        assert!(!ok.expired(
            chrono::DateTime::parse_from_rfc3339("2026-12-08T09:59:59Z")
                .expect("time")
                .with_timezone(&chrono::Utc)
        ));
        assert!(req(serde_json::Value::Null)
            .expect("valid")
            .deadline
            .is_none());
        for bad in [
            serde_json::json!("tomorrow"),
            serde_json::json!(1765000000),
            serde_json::json!("2026-13-01T00:00:00Z"),
        ] {
            let err = req(bad).expect_err("refused");
            assert_eq!(err.field, "deadline");
        }
    }
    use serde_json::json;

    fn parse_json(v: serde_json::Value) -> Result<GenerationRequest, Box<InvalidRequest>> {
        parse(
            &serde_json::to_vec(&v).expect("json"),
            MessageProps::default(),
        )
    }

    fn field_of(v: serde_json::Value) -> String {
        parse_json(v).expect_err("invalid").field.into_owned()
    }

    #[test]
    fn a_full_request_parses_into_the_upstream_body() {
        let req = parse_json(json!({
            "request_id": "order-1234",
            "model": "vidu-q3-pro-i2v",
            "input": {
                "images": ["https://example.com/cat.PNG?sig=abc"],
                "prompt": "blink", "duration": 16, "seed": 2147483647, "resolution": "1080p",
                "aspect_ratio": "9:16", "style": "anime", "audio": "https://x/a.mp3",
                "is_rec": true, "off_peak": true, "watermark": false,
                "wm_url": "https://x/wm.png", "wm_position": "bottom-right"
            },
            "metadata": {"user": 42}
        }))
        .expect("valid");
        assert_eq!(req.request_id.as_str(), "order-1234");
        assert!(req.off_peak());
        assert_eq!(
            req.metadata.as_ref().map(|m| m.get()),
            Some(r#"{"user":42}"#)
        );
        let body = serde_json::to_value(&req.input).expect("ser");
        assert_eq!(body["duration"], 16);
        assert_eq!(body["wm_position"], "bottom-right");
        assert_eq!(body.as_object().map(|o| o.len()), Some(13));
    }

    #[test]
    fn optional_fields_may_be_absent_or_null() {
        let req = parse_json(json!({"input": {"images": ["http://e.com/a.webp"], "prompt": null}}))
            .expect("valid");
        assert_eq!(req.model, Model::DEFAULT);
        assert_eq!(req.input.prompt(), None);
        let body = serde_json::to_string(&req.input).expect("ser");
        assert_eq!(body, r#"{"images":["http://e.com/a.webp"]}"#);
    }

    #[test]
    fn request_id_falls_back_to_message_id_then_a_uuid() {
        let body = br#"{"input": {"images": ["https://e.com/a.jpg"]}}"#;
        let props = MessageProps {
            message_id: Some("msg-1"),
            ..MessageProps::default()
        };
        assert_eq!(
            parse(body, props).expect("valid").request_id.as_str(),
            "msg-1"
        );
        let generated = parse(body, MessageProps::default())
            .expect("valid")
            .request_id;
        assert!(uuid::Uuid::parse_str(generated.as_str()).is_ok());
    }

    #[test]
    fn each_rule_names_its_field() {
        let img = json!(["https://e.com/a.jpg"]);
        let cases = [
            (
                json!({"input": {"images": img, "duration": 0}}),
                "input.duration",
            ),
            (
                json!({"input": {"images": img, "duration": 1.0}}),
                "input.duration",
            ),
            (json!({"input": {"images": img, "seed": -5}}), "input.seed"),
            (
                json!({"input": {"images": img, "resolution": "720P"}}),
                "input.resolution",
            ),
            (
                json!({"input": {"images": img, "aspect_ratio": "21:9"}}),
                "input.aspect_ratio",
            ),
            (json!({"input": {"images": img, "style": 1}}), "input.style"),
            (
                json!({"input": {"images": img, "wm_position": "middle"}}),
                "input.wm_position",
            ),
            (
                json!({"input": {"images": img, "audio": "mailto:a@b"}}),
                "input.audio",
            ),
            (
                json!({"input": {"images": img, "wm_url": "https://"}}),
                "input.wm_url",
            ),
            (
                json!({"input": {"images": img, "watermark": "true"}}),
                "input.watermark",
            ),
            (
                json!({"input": {"images": img, "prompt": "é".repeat(1501)}}),
                "input.prompt",
            ),
            (json!({"input": {"images": []}}), "input.images"),
            (json!({"input": {"images": [5]}}), "input.images[0]"),
            (
                json!({"input": {"images": ["https://e.com/a.jpg.exe"]}}),
                "input.images[0]",
            ),
            (
                json!({"input": {"images": ["https://e.com/a b.jpg"]}}),
                "input.images[0]",
            ),
            (
                json!({"input": {"images": img, "negative_prompt": "x"}}),
                "input.negative_prompt",
            ),
            (json!({"input": {"images": img}, "extra": 1}), "extra"),
            (json!({"input": {"images": img}, "model": "other"}), "model"),
            (json!({"input": {"images": img}, "model": 7}), "model"),
            (json!({"input": "x"}), "input"),
            (json!({}), "input"),
            (
                json!({"input": {"images": img}, "metadata": "x"}),
                "metadata",
            ),
            (
                json!({"input": {"images": img}, "request_id": ""}),
                "request_id",
            ),
            (
                json!({"input": {"images": img}, "request_id": "a/b"}),
                "request_id",
            ),
        ];
        for (body, field) in cases {
            assert_eq!(field_of(body.clone()), field, "{body}");
        }
        // 1500 characters (not bytes) are fine.
        assert!(parse_json(json!({"input": {"images": img, "prompt": "é".repeat(1500)}})).is_ok());
    }

    #[test]
    fn bodies_are_checked_before_they_are_read() {
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        let err = parse(&big, MessageProps::default()).expect_err("too big");
        assert_eq!(err.field, "body");
        assert!(err.message.contains("larger than the limit"));
        for bad in [
            &b""[..],
            b"   ",
            b"nope",
            b"[]",
            b"\"s\"",
            b"{\"a\":",
            &[0xc3, 0x28][..],
        ] {
            let err = parse(bad, MessageProps::default()).expect_err("bad body");
            assert_eq!(err.field, "body", "{bad:?}");
        }
        let deep = format!("{}{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
        let err = parse(deep.as_bytes(), MessageProps::default()).expect_err("deep");
        // serde_json's own recursion limit (128) or ours (32), whichever
        // reads it first.
        assert!(
            err.field == "body" || err.field.starts_with("a.a.a"),
            "{}",
            err.field
        );
        assert!(err.field.len() <= 210, "{}", err.field.len());
    }

    #[test]
    fn content_type_and_encoding_are_checked() {
        let body = br#"{"input": {"images": ["https://e.com/a.jpg"]}}"#;
        let ok = MessageProps {
            content_type: Some("application/json; charset=utf-8"),
            ..MessageProps::default()
        };
        assert!(parse(body, ok).is_ok());
        let text = MessageProps {
            content_type: Some("text/plain"),
            ..MessageProps::default()
        };
        assert_eq!(parse(body, text).expect_err("ct").field, "content_type");
        let gzip = MessageProps {
            content_encoding: Some("gzip"),
            ..MessageProps::default()
        };
        assert_eq!(parse(body, gzip).expect_err("ce").field, "content_encoding");
    }

    #[test]
    fn failures_keep_the_producers_id_and_metadata() {
        let err = parse_json(json!({
            "request_id": "r-9", "metadata": {"k": 1}, "input": {"images": ["https://e.com/a.jpg"], "duration": 99}
        }))
        .expect_err("invalid");
        assert_eq!(err.request_id.as_str(), "r-9");
        assert_eq!(err.metadata.as_ref().map(|m| m.get()), Some(r#"{"k":1}"#));
        assert_eq!(
            err.to_string(),
            "input.duration: must be an integer from 1 to 16, found 99"
        );
    }

    #[test]
    fn metadata_limit_is_16_kib_serialized() {
        let fits = "x".repeat(MAX_METADATA_BYTES - 8);
        assert!(parse_json(
            json!({"input": {"images": ["https://e.com/a.jpg"]}, "metadata": {"k": fits}})
        )
        .is_ok());
        let over = "x".repeat(MAX_METADATA_BYTES);
        assert_eq!(
            field_of(
                json!({"input": {"images": ["https://e.com/a.jpg"]}, "metadata": {"k": over}})
            ),
            "metadata"
        );
    }

    #[test]
    fn duplicate_keys_anywhere_are_refused_by_name() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"input": {"images": ["https://e.com/a.jpg"]}, "input": {"images": ["https://e.com/b.jpg"]}}"#,
                "input",
            ),
            (
                r#"{"input": {"images": ["https://e.com/a.jpg"], "duration": 5, "duration": 6}}"#,
                "input.duration",
            ),
            (
                r#"{"input": {"images": ["https://e.com/a.jpg"]}, "metadata": {"a": {"b": 1, "b": 2}}}"#,
                "metadata.a.b",
            ),
            (
                r#"{"input": {"images": ["https://e.com/a.jpg"]}, "metadata": {"l": [{"x": 1, "x": 1}]}}"#,
                "metadata.l[0].x",
            ),
        ];
        for (body, field) in cases {
            let err = parse(body.as_bytes(), MessageProps::default()).expect_err(body);
            assert_eq!(err.field, *field, "{body}");
            assert!(err.message.starts_with("duplicate key"), "{}", err.message);
        }
    }

    #[test]
    fn metadata_is_parsed_with_limits() {
        let img = r#""input": {"images": ["https://e.com/a.jpg"]}"#;
        // 31 levels inside metadata (32 with the body) are fine, one more is not.
        let nest = |n: usize| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
        let ok = format!("{{{img}, \"metadata\": {}}}", nest(MAX_DEPTH - 1));
        assert!(parse(ok.as_bytes(), MessageProps::default()).is_ok());
        let over = format!("{{{img}, \"metadata\": {}}}", nest(MAX_DEPTH));
        assert!(parse(over.as_bytes(), MessageProps::default()).is_err());
        let deep = format!("{{{img}, \"metadata\": {}}}", nest(1500));
        let err = parse(deep.as_bytes(), MessageProps::default()).expect_err("deep");
        assert!(err.field.starts_with("metadata"), "{}", err.field);
        assert!(err.message.contains("deeper than 32"), "{}", err.message);
        for bad in [
            format!(r#"{{{img}, "metadata": {{"n": 1e999999}}}}"#),
            format!(r#"{{{img}, "metadata": {{"s": "\ud800"}}}}"#),
            format!(r#"{{{img}, "metadata": {{"s": "\udc00x"}}}}"#),
        ] {
            let err = parse(bad.as_bytes(), MessageProps::default()).expect_err(&bad);
            assert_eq!(err.field, "body", "{bad}: {err}");
        }
    }

    #[test]
    fn properties_are_checked() {
        let body = br#"{"input": {"images": ["https://e.com/a.jpg"]}}"#;
        let allowed: Vec<String> = crate::config::DEFAULT_REPLY_TO_ALLOWED
            .iter()
            .map(|p| (*p).to_owned())
            .collect();
        let with = |correlation_id: Option<&'static str>, reply_to: Option<&'static str>| {
            parse(
                body,
                MessageProps {
                    correlation_id,
                    reply_to,
                    request_queue: "vidu.requests",
                    reply_to_allowed: &allowed,
                    ..MessageProps::default()
                },
            )
        };
        assert!(with(Some("corr-1"), Some("my.replies")).is_ok());
        assert!(with(None, Some("amq.rabbitmq.reply-to.g1hkABCD")).is_ok());
        // Not on the allow-list: any other queue of the vhost.
        let err = with(None, Some("team.waiting.room")).expect_err("not allowed");
        assert_eq!(err.field, "reply_to");
        assert!(err.message.contains("amqp.reply_to_allowed"), "{err}");
        // On it, but the deployment's own: still refused.
        let err = with(None, Some("vidu.requests.replies")).expect_err("own queue");
        assert!(err.message.contains("own queue"), "{err}");
        for (c, r, field) in [
            (Some("a\nb"), None, "correlation_id"),
            (None, Some("vidu.requests"), "reply_to"),
            (None, Some("vidu.requests.tracking"), "reply_to"),
            (None, Some("vidu.requests.wait.2s"), "reply_to"),
            (None, Some("vidu.requests.dead"), "reply_to"),
            (None, Some("other-team.requests.tracking"), "reply_to"),
            (None, Some("other-team.requests.wait.64s"), "reply_to"),
            (
                None,
                Some("other-team.requests.quota.20-per-60s"),
                "reply_to",
            ),
            (None, Some("amq.gen-abc"), "reply_to"),
            (None, Some("two words"), "reply_to"),
        ] {
            let err = with(c, r).expect_err(field);
            assert_eq!(err.field, field, "{c:?} {r:?}: {err}");
        }
    }

    #[test]
    fn reply_to_patterns_match_whole_names_with_star_for_any_run() {
        // (pattern, name, matches)
        let cases = [
            ("*.replies", "billing.replies", true),
            ("*.replies", ".replies", true),
            ("*.replies", "billing.replies.x", false),
            ("*.replies", "replies", false),
            ("amq.rabbitmq.reply-to*", "amq.rabbitmq.reply-to.g1h", true),
            ("amq.rabbitmq.reply-to*", "amq.rabbitmq.reply", false),
            ("team-a.*.out", "team-a.x.y.out", true),
            ("team-a.*.out", "team-a.out", false),
            ("exact.name", "exact.name", true),
            ("exact.name", "exact.names", false),
            ("*", "anything", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
            ("ab*ba", "aba", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(matches_pattern(pattern, name), want, "{pattern} ~ {name}");
        }
    }

    #[test]
    fn control_characters_never_reach_messages() {
        let err = parse(
            br#"{"input": {"images": ["https://e.com/a.jpg"], "x\u001b[31m\nforged": 1}}"#,
            MessageProps::default(),
        )
        .expect_err("unknown field");
        let text = err.to_string();
        assert!(!text.chars().any(char::is_control), "{text:?}");
    }

    #[test]
    fn request_ids_are_checked_when_read_back() {
        assert!(serde_json::from_str::<RequestId>(r#""order-1""#).is_ok());
        assert!(serde_json::from_str::<RequestId>(r#""a\nb""#).is_err());
        let long = format!("\"{}\"", "x".repeat(129));
        assert!(serde_json::from_str::<RequestId>(&long).is_err());
    }

    #[test]
    fn untrusted_text_is_shortened_in_messages() {
        let long = "z".repeat(10_000);
        let err =
            parse_json(json!({"input": {"images": ["https://e.com/a.jpg"], "resolution": long}}))
                .expect_err("bad");
        assert!(err.message.len() < 300, "{}", err.message.len());
    }
}
