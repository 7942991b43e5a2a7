//! Cancels: one delivery from `<request_queue>.cancel`.
//!
//! A producer publishes `{"cancel": "<id>"}` or `{"cancel": [ids]}` there;
//! whichever worker reads it writes the ids into the deployment's journal
//! as signed canceled records, which every worker reads. From then on no
//! worker creates those requests (intake asks before every create, after
//! reading the journal up to the present) and no worker tracks their tasks
//! any more (tracking asks before every poll); each ends in its one
//! terminal event, `failed`/`canceled`, when a worker reaches it. A cancel
//! for an id that ended or was never sent changes nothing. A message that
//! is not a cancel is dead-lettered with the reason. Nothing here calls the
//! upstream.

use chrono::Utc;
use lapin::message::Delivery;

use super::{context::Context, disposition::Disposition};
use crate::{
    journal::canceled::{Canceled, IDS_PER_RECORD},
    request,
};

/// Handles one delivery from the cancel queue.
pub(crate) async fn handle(ctx: &Context, delivery: &Delivery) -> Disposition {
    let ids = match request::parse_cancel(&delivery.data) {
        Ok(ids) => ids,
        Err(why) => {
            tracing::info!(reason = %why, "dead-lettering a message on the cancel queue that is not a cancel");
            return match ctx.dead_letter(delivery, &why, None).await {
                Ok(()) => Disposition::Ack,
                Err(_) => Disposition::Requeue,
            };
        }
    };
    let Some(publisher) = ctx.publisher() else {
        return Disposition::Requeue;
    };
    let at = Utc::now();
    for chunk in ids.chunks(IDS_PER_RECORD) {
        let record = Canceled {
            v: 1,
            request_ids: chunk.to_vec(),
            at,
        };
        if let Err(e) = ctx.journal.record(&publisher, &record).await {
            tracing::warn!(error = %e, "could not record a cancel in the journal; it goes back to its queue");
            return Disposition::Requeue;
        }
    }
    tracing::info!(
        ids = ids.len(),
        first = %ids.first().map(|id| id.as_str()).unwrap_or_default(),
        "recorded a cancel for the fleet"
    );
    ctx.metrics.cancels_recorded(ids.len());
    Disposition::Ack
}
