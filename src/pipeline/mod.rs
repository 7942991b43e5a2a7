//! The pipeline: what happens to one delivery, below the session that takes
//! it.
//!
//! A request delivery goes through [`intake`] (refuse what is invalid or
//! poison, wait at the gate, create the task, record its [`ticket`]); a
//! ticket delivery goes through [`tracking`] (read and check the ticket,
//! poll once, finish or park again). A request with an id of its own is
//! created once in the fleet: the journal's created records and a
//! [`claim`] on the id stand before its create. A cancel delivery goes
//! through [`cancels`] (recorded for the fleet in the journal). Intake and tracking return a
//! [`disposition::Disposition`] that [`disposition::apply`] carries out, and
//! both take their next step from the plain functions of [`decisions`].
//! Everything a handler works with is in the [`context::Context`]; a
//! request's claim on its delivery is its [`lease::Lease`]. The session in
//! `worker` sits above this module and nothing here imports it.

pub(crate) mod cancels;
pub(crate) mod claim;
pub(crate) mod context;
pub mod decisions;
pub mod disposition;
pub(crate) mod intake;
pub mod lanes;
pub(crate) mod lease;
pub mod poison;
pub(crate) mod recent;
pub mod ticket;
pub(crate) mod tracking;

use lapin::message::Delivery;

use self::{context::Context, disposition::guarded, lease::Lease};

/// Handles a request delivery to the end: runs intake (a panic hands the
/// request back) and settles the delivery.
pub(crate) async fn handle_request(
    ctx: &Context,
    delivery: &Delivery,
    lease: &Lease,
    prepaid: crate::quota::Prepaid,
) {
    let disposition = guarded(intake::handle(ctx, delivery, lease, prepaid)).await;
    disposition::apply(delivery, disposition).await;
}

/// Handles a cancel delivery to the end: records it for the fleet (a
/// panic hands it back) and settles the delivery.
pub(crate) async fn handle_cancel(ctx: &Context, delivery: &Delivery) {
    let disposition = guarded(cancels::handle(ctx, delivery)).await;
    disposition::apply(delivery, disposition).await;
}

/// Handles a ticket delivery to the end: runs tracking (a panic hands the
/// ticket back) and settles the delivery.
pub(crate) async fn handle_ticket(ctx: &Context, delivery: &Delivery) {
    let disposition = guarded(tracking::handle(ctx, delivery)).await;
    disposition::apply(delivery, disposition).await;
}
