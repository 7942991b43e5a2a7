//! vidu-worker: turns image-to-video requests on a RabbitMQ queue into
//! Novita Vidu Q3 Pro tasks, tracks them durably in the broker, and publishes
//! CloudEvents with the video URL.
#![deny(unsafe_code)]
#![warn(unreachable_pub, clippy::unwrap_used, missing_docs)]

pub mod broker;
pub mod cli;
pub mod config;
pub mod demo;
pub mod events;
pub mod gate;
pub mod intake;
pub mod metrics;
pub mod ops;
pub mod quota;
pub mod request;
pub mod retry;
pub mod signing;
pub mod simulator;
pub mod submit;
pub mod telemetry;
pub mod tls;
pub mod tracking;
pub mod upstream;
pub mod worker;

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use crate::{
        broker::Topology,
        config::{QueueType, Settings, MANAGED_QUEUE_ARGUMENTS},
    };

    /// The queue arguments users may not set (`amqp.queue_arguments`) are
    /// the ones the topology sets on the queues those arguments reach, plus
    /// `x-expires`, which it leaves unset on purpose. (The quota ledger's
    /// declaration takes no user arguments.)
    #[test]
    fn managed_queue_arguments_are_the_ones_the_topology_sets() {
        let mut set = BTreeSet::new();
        for queue_type in [QueueType::Quorum, QueueType::Classic] {
            let mut settings = Settings::default();
            settings.amqp.queue_type = queue_type;
            for (_, args) in Topology::new(&settings).queue_declarations() {
                set.extend(args.inner().keys().map(|k| k.to_string()));
            }
        }
        let managed: BTreeSet<String> = MANAGED_QUEUE_ARGUMENTS
            .iter()
            .map(|(name, _)| (*name).to_owned())
            .collect();
        let unmanaged: Vec<&String> = set.difference(&managed).collect();
        assert!(
            unmanaged.is_empty(),
            "the topology sets arguments users could override: {unmanaged:?}"
        );
        let unset: Vec<&String> = managed.difference(&set).collect();
        assert_eq!(
            unset,
            ["x-expires"],
            "managed but never set by the topology"
        );
    }
}
