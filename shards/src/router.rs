//! Router: union-find over a batch's entity sets (spec: `specs/usher.allium`,
//! rules Usher.ComponentsFromUnionFind, Usher.SingleShardComponent, Usher.CrossShardComponent).
//!
//! Events that share an entity, directly or through a chain, form one component and
//! keep their log order inside it. Distinct components of a batch touch disjoint
//! entities, so they commute and may run on different shards at once. Scratch space is
//! reused across batches, so routing allocates only the result.

use std::hash::Hash;

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

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

    pub fn remove(&mut self, shard: ShardId) {
        assert!((shard as usize) < MAX_SHARDS);
        self.0 &= !(1 << shard);
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

/// One component of a batch, as spans of the [`Routing`] index arrays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedComponent {
    /// `routing.events[events]`: indices of the batch's events, ascending (log order).
    pub events: std::ops::Range<u32>,
    /// `routing.nodes[nodes]`: router node of each distinct entity, in first-seen order
    /// (see [`Router::key`]).
    pub nodes: std::ops::Range<u32>,
    pub placement: Placement,
}

/// The components of one batch. Flat index arrays, reused across batches, so that
/// routing allocates nothing per event.
#[derive(Debug, Default)]
pub struct Routing {
    pub components: Vec<RoutedComponent>,
    pub events: Vec<u32>,
    pub nodes: Vec<u32>,
}

impl Routing {
    pub fn events_of(&self, component: &RoutedComponent) -> &[u32] {
        &self.events[component.events.start as usize..component.events.end as usize]
    }

    pub fn nodes_of(&self, component: &RoutedComponent) -> &[u32] {
        &self.nodes[component.nodes.start as usize..component.nodes.end as usize]
    }
}

const NO_COMPONENT: u32 = u32::MAX;

/// Reusable union-find router.
pub struct Router<K> {
    /// Node index of each key of the batch; the key itself lives in `keys`, so the
    /// table holds 4 bytes per slot and a key is cloned once.
    node_of_key: HashTable<u32>,
    hasher: DefaultHashBuilder,
    keys: Vec<K>,
    shard: Vec<ShardId>,
    parent: Vec<u32>,
    rank: Vec<u8>,
    component_of_root: Vec<u32>,
    first_node_of_event: Vec<u32>,
    keys_scratch: Vec<K>,
    counts: Vec<u32>,
    cursor: Vec<u32>,
    component_of_event: Vec<u32>,
    routing: Routing,
}

impl<K: Clone + Eq + Hash> Default for Router<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone + Eq + Hash> Router<K> {
    pub fn new() -> Self {
        Self {
            node_of_key: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            keys: Vec::new(),
            shard: Vec::new(),
            parent: Vec::new(),
            rank: Vec::new(),
            component_of_root: Vec::new(),
            first_node_of_event: Vec::new(),
            keys_scratch: Vec::new(),
            counts: Vec::new(),
            cursor: Vec::new(),
            component_of_event: Vec::new(),
            routing: Routing::default(),
        }
    }

    /// The components of the last routed batch.
    pub fn routing(&self) -> &Routing {
        &self.routing
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
        let hash = self.hasher.hash_one(key);
        let keys = &self.keys;
        if let Some(node) = self.node_of_key.find(hash, |&node| keys[node as usize] == *key) {
            return *node;
        }
        let node = u32::try_from(self.keys.len()).expect("a batch has far fewer than 2^32 entities");
        let (keys, hasher) = (&self.keys, &self.hasher);
        self.node_of_key.insert_unique(hash, node, |&n| hasher.hash_one(&keys[n as usize]));
        self.keys.push(key.clone());
        self.shard.push(shard_of(key));
        self.parent.push(node);
        self.rank.push(0);
        node
    }

    /// Union by rank.
    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (find(&mut self.parent, a), find(&mut self.parent, b));
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

    /// Splits a batch of `event_count` events into components. `keys_of(i, out)`
    /// appends the entity keys of event `i` (at least one); events are in log order.
    pub fn route(
        &mut self,
        event_count: usize,
        keys_of: impl FnMut(usize, &mut Vec<K>),
        shard_of: impl Fn(&K) -> ShardId,
    ) -> &Routing {
        self.union_events(event_count, keys_of, shard_of);
        // Number components by their first event, then lay events and nodes out
        // component by component (a counting sort, so both stay in order inside).
        self.number_components(event_count);
        self.lay_out_components();
        self.lay_out_events(event_count);
        self.lay_out_nodes();
        &self.routing
    }

    /// Interns every event's keys and unions each event's entities into one set.
    fn union_events(
        &mut self,
        event_count: usize,
        mut keys_of: impl FnMut(usize, &mut Vec<K>),
        shard_of: impl Fn(&K) -> ShardId,
    ) {
        self.node_of_key.clear();
        self.keys.clear();
        self.shard.clear();
        self.parent.clear();
        self.rank.clear();
        self.first_node_of_event.clear();

        let mut keys = std::mem::take(&mut self.keys_scratch);
        for event in 0..event_count {
            keys.clear();
            keys_of(event, &mut keys);
            let first = keys.first().expect("every event touches at least one entity");
            let first_node = self.intern(first, &shard_of);
            for key in &keys[1..] {
                let node = self.intern(key, &shard_of);
                self.union(first_node, node);
            }
            self.first_node_of_event.push(first_node);
        }
        self.keys_scratch = keys;
    }

    /// Numbers the components in the order of their first event and counts each
    /// component's events.
    fn number_components(&mut self, event_count: usize) {
        self.routing.components.clear();
        self.component_of_root.clear();
        self.component_of_root.resize(self.keys.len(), NO_COMPONENT);
        self.component_of_event.clear();
        self.counts.clear();
        for event in 0..event_count {
            let root = find(&mut self.parent, self.first_node_of_event[event]);
            let mut component = self.component_of_root[root as usize];
            if component == NO_COMPONENT {
                component = self.counts.len() as u32;
                self.component_of_root[root as usize] = component;
                self.counts.push(0);
            }
            self.component_of_event.push(component);
            self.counts[component as usize] += 1;
        }
    }

    /// Gives each component its spans of events and nodes and its placement; leaves
    /// each component's first event slot in `cursor`.
    fn lay_out_components(&mut self) {
        let component_count = self.counts.len();
        let mut shards = vec![ShardSet::default(); component_count];
        let mut node_counts = vec![0u32; component_count];
        for node in 0..self.keys.len() {
            let root = find(&mut self.parent, node as u32);
            let component = self.component_of_root[root as usize] as usize;
            node_counts[component] += 1;
            shards[component].insert(self.shard[node]);
        }
        let (mut event_start, mut node_start) = (0u32, 0u32);
        self.cursor.clear();
        for component in 0..component_count {
            let set = shards[component];
            let lowest = set.lowest().expect("a component owns at least one entity");
            self.routing.components.push(RoutedComponent {
                events: event_start..event_start + self.counts[component],
                nodes: node_start..node_start + node_counts[component],
                placement: if set.len() == 1 {
                    Placement::Single(lowest)
                } else {
                    Placement::Cross { coordinator: lowest, shards: set }
                },
            });
            self.cursor.push(event_start);
            event_start += self.counts[component];
            node_start += node_counts[component];
        }
    }

    /// Fills `routing.events`, component by component, each in log order.
    fn lay_out_events(&mut self, event_count: usize) {
        let routing = &mut self.routing;
        routing.events.clear();
        routing.events.resize(event_count, 0);
        for event in 0..event_count {
            let component = self.component_of_event[event] as usize;
            routing.events[self.cursor[component] as usize] = event as u32;
            self.cursor[component] += 1;
        }
    }

    /// Fills `routing.nodes`, component by component, each in first-seen order.
    fn lay_out_nodes(&mut self) {
        let routing = &mut self.routing;
        for (component, cursor) in self.cursor.iter_mut().enumerate() {
            *cursor = routing.components[component].nodes.start;
        }
        routing.nodes.clear();
        routing.nodes.resize(self.keys.len(), 0);
        for node in 0..self.keys.len() {
            let root = find(&mut self.parent, node as u32);
            let component = self.component_of_root[root as usize] as usize;
            routing.nodes[self.cursor[component] as usize] = node as u32;
            self.cursor[component] += 1;
        }
    }
}

/// Root of `node`, compressing the path behind it.
fn find(parent: &mut [u32], node: u32) -> u32 {
    let mut root = node;
    while parent[root as usize] != root {
        root = parent[root as usize];
    }
    let mut current = node;
    while parent[current as usize] != root {
        let next = parent[current as usize];
        parent[current as usize] = root;
        current = next;
    }
    root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(events: &[&[u32]], shards: u16) -> Vec<(Vec<u32>, Vec<u32>, Placement)> {
        let mut router = Router::<u32>::new();
        let routing = router.route(
            events.len(),
            |i, out| out.extend_from_slice(events[i]),
            |k| (*k % u32::from(shards)) as ShardId,
        );
        routing
            .components
            .iter()
            .map(|c| {
                let nodes = routing.nodes_of(c).iter().map(|n| *router_key(events, *n)).collect();
                (routing.events_of(c).to_vec(), nodes, c.placement)
            })
            .collect()
    }

    /// Node numbers are first-seen order over the batch's keys.
    fn router_key<'a>(events: &'a [&[u32]], node: u32) -> &'a u32 {
        let mut seen: Vec<&u32> = Vec::new();
        for key in events.iter().flat_map(|e| e.iter()) {
            if !seen.contains(&key) {
                seen.push(key);
            }
        }
        seen[node as usize]
    }

    #[test]
    fn events_sharing_entities_join_one_component_in_log_order() {
        // spec: Usher.ComponentsFromUnionFind
        let components = route(&[&[1, 2], &[3], &[2, 4], &[5], &[4, 6]], 1);
        let events: Vec<_> = components.iter().map(|c| c.0.clone()).collect();
        assert_eq!(events, vec![vec![0, 2, 4], vec![1], vec![3]]);
        assert_eq!(components[0].1, vec![1, 2, 4, 6]);
    }

    #[test]
    fn chains_through_later_events_merge_earlier_components() {
        // spec: Usher.ComponentsFromUnionFind
        let components = route(&[&[1], &[2], &[3], &[1, 3]], 1);
        let events: Vec<_> = components.iter().map(|c| c.0.clone()).collect();
        assert_eq!(events, vec![vec![0, 2, 3], vec![1]]);
    }

    #[test]
    fn placement_names_the_shard_or_the_coordinator() {
        // spec: Usher.SingleShardComponent
        // spec: Usher.CrossShardComponent
        let components = route(&[&[2, 4], &[3, 6], &[5]], 2);
        assert_eq!(components[0].2, Placement::Single(0));
        let mut both = ShardSet::default();
        both.insert(0);
        both.insert(1);
        assert_eq!(components[1].2, Placement::Cross { coordinator: 0, shards: both });
        assert_eq!(components[2].2, Placement::Single(1));
    }

    #[test]
    fn scratch_is_reset_between_batches() {
        let mut router = Router::<u32>::new();
        assert_eq!(router.route(1, |_, out| out.extend([1u32, 2]), |_| 0).components.len(), 1);
        let second = router.route(2, |i, out| out.push([2u32, 3][i]), |_| 0);
        assert_eq!(second.components.len(), 2);
        let node = second.nodes_of(&second.components[1])[0];
        assert_eq!(router.key(node), &3);
    }
}
