//! A shard's state on its executor, shared by its tasks (the receivers, the Ushers, the
//! Ledger task): the [`ShardCore`], the queues to the sender tasks, and the Ledger task's
//! doorbell.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use glommio::channels::local_channel::LocalSender;
use tribunal_shards::router::ShardId;
use tribunal_shards::shard_core::{ShardCore, Unsynced};

use super::shared::Shared;
use super::{Message, Wire, D};

/// A shard's state on its executor: the core, and how its effects leave.
pub(super) struct ShardState {
    pub core: ShardCore<D>,
    /// Local queues to the sender tasks, one per other shard.
    outbound: Vec<Option<LocalSender<Wire>>>,
    /// Wakes the Ledger task; rung once per commit.
    doorbell: LocalSender<()>,
    doorbell_rung: bool,
    shared: Arc<Shared>,
}

impl ShardState {
    pub fn new(
        core: ShardCore<D>,
        outbound: Vec<Option<LocalSender<Wire>>>,
        doorbell: LocalSender<()>,
        shared: Arc<Shared>,
    ) -> Self {
        ShardState { core, outbound, doorbell, doorbell_rung: false, shared }
    }

    /// What the Ledger task commits next; the next dispatch that makes a commit due rings
    /// the doorbell again.
    pub fn take_commit(&mut self) -> Unsynced<D> {
        self.doorbell_rung = false;
        self.core.take_commit()
    }

    pub fn shard(&self) -> ShardId {
        self.core.shard()
    }

    /// A message for shard `to`: handled here when it is this shard, staged otherwise.
    /// Never awaits, so any task of the shard may call it.
    pub fn dispatch(&mut self, to: ShardId, message: Message) {
        self.core.dispatch(to, message);
        if self.core.commit_due() && !self.doorbell_rung {
            self.doorbell_rung = true;
            let _ = self.doorbell.try_send(());
        }
    }

    /// Hands every staged message to the sender tasks, one wire per destination.
    pub fn flush(&mut self) {
        let staged = self.core.staged_count() as u64;
        if staged == 0 {
            return;
        }
        self.shared.in_flight.fetch_add(staged, Ordering::Relaxed);
        for (to, wire) in self.core.drain_staged() {
            let queue = self.outbound[to as usize].as_ref().expect("a queue to every other shard");
            if queue.try_send(wire).is_err() {
                unreachable!("local queues are unbounded and live as long as the shard");
            }
        }
    }
}
