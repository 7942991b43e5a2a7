//! A request delivery's lease: the check that stands between a waiting
//! request and the paid create.
//!
//! A request taken with `basic.get` belongs to this worker only while its
//! channel is open and its broker session is the current one. When the
//! session is lost the broker hands the request to someone else, so the
//! create must not be sent here: [`Lease::alive`] is asked immediately
//! before the HTTP send, and [`Lease::lost`] ends every wait in front of it.

use lapin::Acker;
use tokio_util::sync::CancellationToken;

/// A request delivery's claim to be worked on: alive while its channel is
/// open and its session is the current one. Once it is lost the broker has
/// given (or will give) the request to someone else, so nothing may be
/// created for it here.
#[derive(Clone)]
pub(crate) struct Lease {
    acker: Acker,
    session: CancellationToken,
}

impl Lease {
    /// The lease of a delivery taken on the session that `session` ends with.
    pub(crate) fn new(acker: Acker, session: CancellationToken) -> Self {
        Self { acker, session }
    }

    /// Whether the delivery still belongs to this worker's current session.
    pub(crate) fn alive(&self) -> bool {
        !self.session.is_cancelled() && !self.acker.poisoned()
    }

    /// Resolves when the session the delivery came from ends.
    pub(crate) async fn lost(&self) {
        self.session.cancelled().await;
    }
}
