//! The headers the worker reads and writes on its messages, typed readers
//! for headers of any integer width, and the fresh properties of a
//! dead-letter copy (only what the contract keeps, never what the broker
//! would act on).

use lapin::{
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};

/// Header carrying why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-vidu-error";
/// Header carrying the W3C trace context.
pub const TRACEPARENT_HEADER: &str = crate::trace::HEADER;
/// Header RabbitMQ quorum queues set on redeliveries.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// Header of a dead-letter copy naming the queue the message came from.
pub const ORIGINAL_QUEUE_HEADER: &str = "x-vidu-original-queue";
/// Longest `x-vidu-error` header.
pub const MAX_ERROR_HEADER: usize = 1000;

/// The properties of a dead-letter copy, built field by field: never the
/// producer's `user_id` (the broker closes the channel when it does not
/// match the publishing user), `expiration` (the copy would vanish),
/// `priority`, `reply_to` or headers the broker acts on. Kept: the ids the
/// contract promises (`message_id`, `correlation_id`), the content type and
/// encoding, the timestamp, a valid `traceparent`, and the two headers that
/// say why and from where.
pub fn dead_letter_properties(
    original: &BasicProperties,
    why: &str,
    original_queue: &str,
    traceparent: Option<&crate::trace::TraceParent>,
) -> BasicProperties {
    let mut why: String = why.chars().take(MAX_ERROR_HEADER).collect();
    why.retain(|c| !c.is_control());
    let mut headers = FieldTable::default();
    headers.insert(
        ERROR_HEADER.into(),
        AMQPValue::LongString(LongString::from(why)),
    );
    headers.insert(
        ORIGINAL_QUEUE_HEADER.into(),
        AMQPValue::LongString(LongString::from(original_queue)),
    );
    if let Some(tp) = traceparent {
        headers.insert(
            TRACEPARENT_HEADER.into(),
            AMQPValue::LongString(LongString::from(tp.as_str())),
        );
    }
    // A ticket's signatures stay with its copy, so that it can be sent
    // again once a worker holds the right key (64 hex digits or nothing:
    // whatever else a producer put there is not copied).
    for name in crate::signing::SIGNATURE_HEADERS {
        if let Some(sig) = header_str(original, name)
            .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            headers.insert(name.into(), AMQPValue::LongString(LongString::from(sig)));
        }
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(v) = original.content_type() {
        properties = properties.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        properties = properties.with_content_encoding(v.clone());
    }
    if let Some(v) = original.message_id() {
        properties = properties.with_message_id(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        properties = properties.with_correlation_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        properties = properties.with_timestamp(*v);
    }
    properties
}

/// Reads an integer header (the broker may use any integer width).
pub fn header_int(properties: &BasicProperties, name: &str) -> Option<i64> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

/// Reads a string header.
pub fn header_str<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a str> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}
