//! Where certified outputs go: the outputs topic (Kafka) or the local outputs log, as
//! JSON, and the Gateway's certified view. The Clerk's shell feeds them; it knows them
//! only through what is defined here.

pub mod json;
pub mod kafka;
pub mod local;

use std::sync::Arc;

/// Certified outputs kept for a hand-over per partition beyond what the publisher has
/// published; past it the Ushers wait (spec: Publisher.BoundedBacklog).
pub const MAX_UNPUBLISHED: u64 = 262_144;

/// An own output whose Ledger record is durable, or a certified output on its way to
/// the publisher.
#[derive(Debug)]
pub struct DurableOutput {
    pub partition: u32,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// What the publisher sink gets: where to start (a hand-over), then certified outputs in
/// offset order per partition.
pub struct PublishBatch {
    pub skip_to: Vec<(u32, u64)>,
    pub outputs: Vec<DurableOutput>,
}

/// Takes every certified output, in offset order per partition, after any quarantine it
/// caused is persisted (spec: Gateway.CertifiedViewAdvances). The Gateway's view is one.
pub trait CertifiedSink: Send + Sync {
    fn certified(&self, outputs: &[(u32, u64, Arc<[u8]>)]);
}
