//! Registrar: the shard's entity table (spec: `specs/registrar.allium`).
//!
//! Entities are namespaced by partition (docs/design.md §4), so there is one table per
//! partition. Each table keeps a state digest that is a wrapping sum of per-entity
//! digests: a change costs O(1) (subtract the old contribution, add the new one), and
//! the sum is independent of how entities are spread over shards, so shard digests add
//! up to the same instance digest whatever the shard count.

use hashbrown::HashMap;

use crate::domain::Domain;

/// Most partitions (ordering domains) one instance serves.
pub const MAX_PARTITIONS: u32 = 1_024;

/// An entity's state and its current contribution to the digest, kept so that a
/// change hashes only the new state.
#[derive(Clone, Copy)]
struct Slot<S> {
    state: S,
    digest: u128,
}

struct PartitionTable<D: Domain> {
    entities: HashMap<D::EntityKey, Slot<D::State>>,
    digest: u128,
}

impl<D: Domain> Default for PartitionTable<D> {
    fn default() -> Self {
        Self { entities: HashMap::new(), digest: 0 }
    }
}

pub struct Registrar<D: Domain> {
    partitions: Vec<PartitionTable<D>>,
}

impl<D: Domain> Default for Registrar<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: Domain> Registrar<D> {
    pub fn new() -> Self {
        Self { partitions: Vec::new() }
    }

    fn table_mut(&mut self, partition: u32) -> &mut PartitionTable<D> {
        assert!(partition < MAX_PARTITIONS, "partition {partition} is beyond MAX_PARTITIONS");
        let index = partition as usize;
        if self.partitions.len() <= index {
            self.partitions.resize_with(index + 1, PartitionTable::default);
        }
        &mut self.partitions[index]
    }

    /// State of an entity; an entity never seen is in the default state
    /// (spec: Registrar.AbsentIsZero).
    pub fn get(&self, partition: u32, key: &D::EntityKey) -> D::State {
        self.partitions
            .get(partition as usize)
            .and_then(|t| t.entities.get(key))
            .map_or_else(D::State::default, |slot| slot.state)
    }

    /// Sets an entity's state and updates the digest in O(1)
    /// (spec: Registrar.StateDigestIncremental). Default states are not stored.
    pub fn set(&mut self, partition: u32, key: &D::EntityKey, state: D::State) {
        let table = self.table_mut(partition);
        let is_default = state == D::State::default();
        let (old_digest, new_digest) = match table.entities.get_mut(key) {
            Some(slot) => {
                if slot.state == state {
                    return;
                }
                let old = slot.digest;
                if is_default {
                    table.entities.remove(key);
                    (old, 0)
                } else {
                    // Common case: an existing entity changes; one lookup, one hash.
                    let new = D::entity_digest(key, &state);
                    *slot = Slot { state, digest: new };
                    (old, new)
                }
            }
            None => {
                if is_default {
                    return;
                }
                let new = D::entity_digest(key, &state);
                table.entities.insert(key.clone(), Slot { state, digest: new });
                (0, new)
            }
        };
        table.digest = table.digest.wrapping_sub(old_digest).wrapping_add(new_digest);
    }

    /// Digest of this shard's part of `partition`'s state.
    pub fn digest(&self, partition: u32) -> u128 {
        self.partitions.get(partition as usize).map_or(0, |t| t.digest)
    }

    /// Partitions that have a table (some may be empty).
    pub fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// Non-default entities of `partition`, sorted by key (for inspection and snapshots).
    pub fn entities_sorted(&self, partition: u32) -> Vec<(D::EntityKey, D::State)> {
        let mut all: Vec<_> = self
            .partitions
            .get(partition as usize)
            .map(|t| t.entities.iter().map(|(k, slot)| (k.clone(), slot.state)).collect())
            .unwrap_or_default();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Recomputes the digest from scratch; tests compare it with the incremental one.
    pub fn recompute_digest(&self, partition: u32) -> u128 {
        self.partitions.get(partition as usize).map_or(0, |t| {
            t.entities.iter().fold(0u128, |acc, (k, slot)| acc.wrapping_add(D::entity_digest(k, &slot.state)))
        })
    }
}

/// Combines per-partition digests (each already summed over shards) into one instance
/// digest: xxh3 over the sorted (partition, digest) pairs of non-empty partitions.
pub fn combine_partition_digests(per_partition: &[(u32, u128)]) -> u128 {
    let mut sorted: Vec<_> = per_partition.iter().filter(|(_, d)| *d != 0).copied().collect();
    sorted.sort_unstable();
    let mut h = crate::digest::CanonicalHasher::new();
    for (partition, digest) in sorted {
        h.u64(u64::from(partition)).u64(digest as u64).u64((digest >> 64) as u64);
    }
    h.finish128()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Inventory, StockKey};

    #[test]
    fn digest_is_incremental_and_order_independent() {
        // spec: Registrar.StateDigestIncremental
        let mut a = Registrar::<Inventory>::new();
        let mut b = Registrar::<Inventory>::new();
        let k1 = StockKey::new("A", "S1");
        let k2 = StockKey::new("B", "S2");
        a.set(0, &k1, 5);
        a.set(0, &k2, 7);
        a.set(0, &k1, 3);
        b.set(0, &k2, 7);
        b.set(0, &k1, 3);
        assert_eq!(a.digest(0), b.digest(0));
        assert_eq!(a.digest(0), a.recompute_digest(0));
        a.set(0, &k1, 0);
        assert_eq!(a.get(0, &k1), 0);
        assert_eq!(a.entities_sorted(0).len(), 1);
        assert_eq!(a.digest(0), a.recompute_digest(0));
    }

    #[test]
    fn partitions_are_separate_namespaces() {
        let mut r = Registrar::<Inventory>::new();
        let k = StockKey::new("A", "S");
        r.set(0, &k, 5);
        assert_eq!(r.get(1, &k), 0);
        assert_eq!(r.digest(1), 0);
    }

    #[test]
    fn shard_digests_sum_to_the_single_table_digest() {
        // spec: Registrar.StateDigestIncremental
        let mut whole = Registrar::<Inventory>::new();
        let mut parts = [Registrar::<Inventory>::new(), Registrar::<Inventory>::new()];
        for i in 0..50u64 {
            let key = StockKey::new("W", &format!("S{i}"));
            whole.set(0, &key, i + 1);
            parts[(i % 2) as usize].set(0, &key, i + 1);
        }
        assert_eq!(whole.digest(0), parts[0].digest(0).wrapping_add(parts[1].digest(0)));
    }
}
