//! The poison check, once for requests and tickets: a message the broker
//! has delivered `amqp.max_deliveries` times without it being settled has
//! crashed or stalled a worker each time, and is dead-lettered instead of
//! handled again.

use lapin::{message::Delivery, BasicProperties};

use crate::broker::{self, DELIVERY_COUNT_HEADER};

/// The delivery count, when a redelivered message has reached the limit.
/// Only a redelivery counts (`x-delivery-count` on a first delivery was set
/// by the producer), and a count the broker did not give is not a count.
pub fn over_limit(
    redelivered: bool,
    delivery_count: Option<i64>,
    max_deliveries: u32,
) -> Option<i64> {
    let count = delivery_count.filter(|_| redelivered)?;
    (count >= i64::from(max_deliveries)).then_some(count)
}

/// [`over_limit`] for a delivery.
pub(crate) fn check(delivery: &Delivery, max_deliveries: u32) -> Option<i64> {
    check_properties(delivery.redelivered, &delivery.properties, max_deliveries)
}

/// [`over_limit`] for a message's redelivery flag and properties (the
/// broker's `x-delivery-count` header, any integer width).
pub fn check_properties(
    redelivered: bool,
    properties: &BasicProperties,
    max_deliveries: u32,
) -> Option<i64> {
    over_limit(
        redelivered,
        broker::header_int(properties, DELIVERY_COUNT_HEADER),
        max_deliveries,
    )
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, FieldTable};

    use super::*;

    fn with_count(value: AMQPValue) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(DELIVERY_COUNT_HEADER.into(), value);
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn the_broker_count_is_read_from_the_header_in_any_width() {
        for value in [
            AMQPValue::LongLongInt(10),
            AMQPValue::LongInt(10),
            AMQPValue::ShortShortUInt(10),
        ] {
            assert_eq!(
                check_properties(true, &with_count(value.clone()), 10),
                Some(10)
            );
            assert_eq!(
                check_properties(false, &with_count(value.clone()), 10),
                None
            );
            assert_eq!(check_properties(true, &with_count(value), 11), None);
        }
        assert_eq!(check_properties(true, &BasicProperties::default(), 1), None);
        assert_eq!(
            check_properties(true, &with_count(AMQPValue::LongString("10".into())), 1),
            None
        );
    }

    #[test]
    fn only_a_redelivery_at_the_limit_is_poison() {
        // (redelivered, x-delivery-count, max, expected)
        let table = [
            (false, None, 10, None),
            (false, Some(50), 10, None),
            (true, None, 10, None),
            (true, Some(0), 10, None),
            (true, Some(9), 10, None),
            (true, Some(10), 10, Some(10)),
            (true, Some(11), 10, Some(11)),
            (true, Some(-1), 10, None),
            (true, Some(1), 1, Some(1)),
            (true, Some(i64::MAX), 10, Some(i64::MAX)),
        ];
        for (redelivered, count, max, expected) in table {
            assert_eq!(
                over_limit(redelivered, count, max),
                expected,
                "{redelivered} {count:?} {max}"
            );
        }
    }
}
