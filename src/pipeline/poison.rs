//! The poison check, once for requests and tickets: a message the broker
//! has delivered `amqp.max_deliveries` times without it being settled has
//! crashed or stalled a worker each time, and is dead-lettered instead of
//! handled again.

use lapin::message::Delivery;

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
    over_limit(
        delivery.redelivered,
        broker::header_int(&delivery.properties, DELIVERY_COUNT_HEADER),
        max_deliveries,
    )
}

#[cfg(test)]
mod tests {
    use super::over_limit;

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
