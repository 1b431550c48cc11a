//! Router: union-find over a batch's entity sets (spec: `specs/usher.allium`,
//! rules Usher.ComponentsFromUnionFind, Usher.SingleShardComponent, Usher.CrossShardComponent).
//!
//! Events that share an entity, directly or through a chain, form one component and
//! keep their log order inside it. Distinct components of a batch touch disjoint
//! entities, so they commute and may run on different shards at once. Scratch space is
//! reused across batches, so routing allocates only the result.

use std::hash::Hash;

use hashbrown::HashMap;

/// Index of a shard (one per core) inside an instance.
pub type ShardId = u16;
/// Most shards per instance: a [`ShardSet`] is one `u64`.
pub const MAX_SHARDS: usize = 64;

/// A set of shards, as a bit mask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardSet(u64);

impl ShardSet {
    pub fn insert(&mut self, shard: ShardId) {
        assert!((shard as usize) < MAX_SHARDS);
        self.0 |= 1 << shard;
    }

    pub fn contains(&self, shard: ShardId) -> bool {
        (shard as usize) < MAX_SHARDS && self.0 & (1 << shard) != 0
    }

    pub fn len(&self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// Shards in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = ShardId> + '_ {
        (0..MAX_SHARDS as ShardId).filter(move |s| self.contains(*s))
    }

    pub fn lowest(&self) -> Option<ShardId> {
        (self.0 != 0).then(|| self.0.trailing_zeros() as ShardId)
    }
}

/// Where a component runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Every entity is owned by `shard`.
    Single(ShardId),
    /// Entities span `shards`; `coordinator` (the lowest of them) evaluates, the others
    /// lend their entities and get them written back (spec: Arbiter.CrossShardCoordinator).
    Cross { coordinator: ShardId, shards: ShardSet },
}

impl Placement {
    /// The shard that evaluates the component.
    pub fn evaluator(&self) -> ShardId {
        match self {
            Placement::Single(shard) => *shard,
            Placement::Cross { coordinator, .. } => *coordinator,
        }
    }
}

/// One component of a batch, by index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedComponent {
    /// Indices of the batch's events, ascending (log order).
    pub events: Vec<u32>,
    /// Router node of each distinct entity, in first-seen order (see [`Router::key`]).
    pub nodes: Vec<u32>,
    pub placement: Placement,
}

const NO_COMPONENT: u32 = u32::MAX;

/// Reusable union-find router.
pub struct Router<K> {
    node_of_key: HashMap<K, u32>,
    keys: Vec<K>,
    shard: Vec<ShardId>,
    parent: Vec<u32>,
    rank: Vec<u8>,
    component_of_root: Vec<u32>,
    first_node_of_event: Vec<u32>,
}

impl<K: Clone + Eq + Hash> Default for Router<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone + Eq + Hash> Router<K> {
    pub fn new() -> Self {
        Self {
            node_of_key: HashMap::new(),
            keys: Vec::new(),
            shard: Vec::new(),
            parent: Vec::new(),
            rank: Vec::new(),
            component_of_root: Vec::new(),
            first_node_of_event: Vec::new(),
        }
    }

    /// The entity behind a node of the last routed batch.
    pub fn key(&self, node: u32) -> &K {
        &self.keys[node as usize]
    }

    /// The shard owning a node of the last routed batch.
    pub fn shard_of(&self, node: u32) -> ShardId {
        self.shard[node as usize]
    }

    fn intern(&mut self, key: &K, shard_of: &impl Fn(&K) -> ShardId) -> u32 {
        if let Some(node) = self.node_of_key.get(key) {
            return *node;
        }
        let node = u32::try_from(self.keys.len()).expect("a batch has far fewer than 2^32 entities");
        self.node_of_key.insert(key.clone(), node);
        self.keys.push(key.clone());
        self.shard.push(shard_of(key));
        self.parent.push(node);
        self.rank.push(0);
        node
    }

    /// Root of `node`, compressing the path behind it.
    fn find(&mut self, node: u32) -> u32 {
        let mut root = node;
        while self.parent[root as usize] != root {
            root = self.parent[root as usize];
        }
        let mut current = node;
        while self.parent[current as usize] != root {
            let next = self.parent[current as usize];
            self.parent[current as usize] = root;
            current = next;
        }
        root
    }

    /// Union by rank.
    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return;
        }
        let (rank_a, rank_b) = (self.rank[ra as usize], self.rank[rb as usize]);
        if rank_a < rank_b {
            self.parent[ra as usize] = rb;
        } else if rank_a > rank_b {
            self.parent[rb as usize] = ra;
        } else {
            self.parent[rb as usize] = ra;
            self.rank[ra as usize] += 1;
        }
    }

    /// Splits a batch into components. `events` yields each event's entity keys, in log
    /// order; every event touches at least one entity.
    pub fn route<'k>(
        &mut self,
        events: impl IntoIterator<Item = &'k [K]>,
        shard_of: impl Fn(&K) -> ShardId,
    ) -> Vec<RoutedComponent>
    where
        K: 'k,
    {
        self.node_of_key.clear();
        self.keys.clear();
        self.shard.clear();
        self.parent.clear();
        self.rank.clear();
        self.first_node_of_event.clear();

        for keys in events {
            let first = keys.first().expect("every event touches at least one entity");
            let first_node = self.intern(first, &shard_of);
            for key in &keys[1..] {
                let node = self.intern(key, &shard_of);
                self.union(first_node, node);
            }
            self.first_node_of_event.push(first_node);
        }

        self.component_of_root.clear();
        self.component_of_root.resize(self.keys.len(), NO_COMPONENT);
        let mut components: Vec<RoutedComponent> = Vec::new();
        for event in 0..self.first_node_of_event.len() {
            let root = self.find(self.first_node_of_event[event]);
            let mut component = self.component_of_root[root as usize];
            if component == NO_COMPONENT {
                component = components.len() as u32;
                self.component_of_root[root as usize] = component;
                components.push(RoutedComponent { events: Vec::new(), nodes: Vec::new(), placement: Placement::Single(0) });
            }
            components[component as usize].events.push(event as u32);
        }

        let mut shards = vec![ShardSet::default(); components.len()];
        for node in 0..self.keys.len() as u32 {
            let root = self.find(node);
            let component = self.component_of_root[root as usize] as usize;
            components[component].nodes.push(node);
            shards[component].insert(self.shard[node as usize]);
        }
        for (component, set) in components.iter_mut().zip(shards) {
            let lowest = set.lowest().expect("a component owns at least one entity");
            component.placement =
                if set.len() == 1 { Placement::Single(lowest) } else { Placement::Cross { coordinator: lowest, shards: set } };
        }
        components
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(events: &[&[u32]], shards: u16) -> Vec<RoutedComponent> {
        let mut router = Router::<u32>::new();
        router.route(events.iter().copied(), |k| (*k % u32::from(shards)) as ShardId)
    }

    #[test]
    fn events_sharing_entities_join_one_component_in_log_order() {
        // spec: Usher.ComponentsFromUnionFind
        let components = route(&[&[1, 2], &[3], &[2, 4], &[5], &[4, 6]], 1);
        let events: Vec<_> = components.iter().map(|c| c.events.clone()).collect();
        assert_eq!(events, vec![vec![0, 2, 4], vec![1], vec![3]]);
    }

    #[test]
    fn chains_through_later_events_merge_earlier_components() {
        // spec: Usher.ComponentsFromUnionFind
        let components = route(&[&[1], &[2], &[3], &[1, 3]], 1);
        let events: Vec<_> = components.iter().map(|c| c.events.clone()).collect();
        assert_eq!(events, vec![vec![0, 2, 3], vec![1]]);
    }

    #[test]
    fn placement_names_the_shard_or_the_coordinator() {
        // spec: Usher.SingleShardComponent
        // spec: Usher.CrossShardComponent
        let components = route(&[&[2, 4], &[3, 6], &[5]], 2);
        assert_eq!(components[0].placement, Placement::Single(0));
        let mut both = ShardSet::default();
        both.insert(0);
        both.insert(1);
        assert_eq!(components[1].placement, Placement::Cross { coordinator: 0, shards: both });
        assert_eq!(components[2].placement, Placement::Single(1));
    }

    #[test]
    fn scratch_is_reset_between_batches() {
        let mut router = Router::<u32>::new();
        let first = router.route([&[1u32, 2][..]], |_| 0);
        let second = router.route([&[2u32][..], &[3][..]], |_| 0);
        assert_eq!(first.len(), 1);
        assert_eq!(second.len(), 2);
        assert_eq!(router.key(second[1].nodes[0]), &3);
    }
}
