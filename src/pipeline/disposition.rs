//! What becomes of a delivery once its handler is done, and the one place
//! that carries it out.
//!
//! Handlers never acknowledge anything themselves: they return a
//! [`Disposition`] (acknowledge, hand back, or leave it to the broker), and
//! [`apply`] settles the delivery. [`guarded`] runs a handler so that a
//! panic becomes a hand-back instead of a lost worker.

use std::{future::Future, panic::AssertUnwindSafe};

use futures_util::FutureExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
};

/// What happens to a delivery once its handler is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Its outputs are confirmed: acknowledge it.
    Ack,
    /// Give it back to the queue for another try.
    Requeue,
    /// Leave it unacknowledged: its channel is closing (shutdown) or gone,
    /// and the broker returns it to the queue, counting one delivery.
    Abandon,
}

/// Applies a disposition. A failure means the channel is gone and the
/// broker will redeliver: someone else will do it.
pub(crate) async fn apply(delivery: &Delivery, disposition: Disposition) {
    let result = match disposition {
        Disposition::Abandon => return,
        Disposition::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
        Disposition::Requeue => {
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "could not settle a delivery; the broker will redeliver it");
    }
}

/// Runs a handler under `catch_unwind`: a panic hands the message back.
pub(crate) async fn guarded<F>(handler: F) -> Disposition
where
    F: Future<Output = Disposition> + Send,
{
    // Boxed: the handlers' state machines are large, and moving them into
    // the spawned task by value showed up in profiles.
    let handler: std::pin::Pin<Box<dyn Future<Output = Disposition> + Send + '_>> =
        Box::pin(handler);
    AssertUnwindSafe(handler)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %what, "a handler panicked; handing its message back");
            Disposition::Requeue
        })
}
