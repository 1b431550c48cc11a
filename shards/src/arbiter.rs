//! Arbiter: evaluates components on one shard (spec: `specs/arbiter.allium`).
//!
//! A sans-IO state machine: messages in ([`Arbiter::handle`]), effects out
//! ([`Arbiter::drain_effects`]). The shard's IO shell moves messages over channels and
//! turns effects into Ledger writes and peer messages; the simulator does the same in
//! one thread with shuffled delivery.
//!
//! Ordered messages (pre-warm, decided, run, lend, batch-end) come from the Usher of
//! their partition and are processed in arrival order, one queue per partition. A
//! head that cannot run yet holds its own partition only. Control messages (lent
//! states, write-backs) come from other shards and apply at once.
//!
//! Only two things ever wait: a cross-shard component at its coordinator, for the
//! loans of the other shards; and a batch-end, for this shard's entities to come home
//! from coordinators. Nothing else can touch a lent entity: components of one batch
//! are disjoint, and a batch-end is not passed while a loan of its partition is out.
//!
//! No deadlock: within a partition, a wait points only at the same component's loans
//! (Lend messages of the same batch, reached once earlier work is done) or at a
//! write-back of a component the coordinator can finish; induction on log order. Two
//! partitions never wait for each other: their entities are disjoint namespaces, and
//! their queues are separate (one shared queue could deadlock two partitions whose
//! Ushers' messages interleave in opposite orders on two shards).

use std::collections::VecDeque;

use hashbrown::HashMap;
use smallvec::SmallVec;

use crate::domain::{Decision, Domain};
use crate::output::{encode_output, EncodedOutput, VerdictRef};
use crate::registrar::Registrar;
use crate::router::{Placement, ShardId, ShardSet};
use crate::usher::{Event, UsherDelta};

/// Most ordered messages one partition's queue holds while its head waits. The Usher's
/// backpressure keeps it near one batch; the bound turns a protocol bug into a loud
/// failure.
pub const MAX_QUEUED_MESSAGES: usize = 1 << 20;

/// Owner of an entity.
pub fn shard_of<D: Domain>(key: &D::EntityKey, shard_count: u16) -> ShardId {
    (D::affinity_hash(key) % u64::from(shard_count)) as ShardId
}

/// Names a component: its partition and the offset of its first event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComponentId {
    pub partition: u32,
    pub first_offset: u64,
}

/// Events of one batch that share entities, in log order.
#[derive(Debug, Clone)]
pub struct Component<D: Domain> {
    pub id: ComponentId,
    pub placement: Placement,
    pub events: Vec<Event<D>>,
}

pub type EntityStates<D> = Vec<(<D as Domain>::EntityKey, <D as Domain>::State)>;
/// Entity states an accepted event left behind; inline for up to two entities, so a
/// transfer or an adjustment allocates nothing for them.
pub type Changes<D> = SmallVec<[(<D as Domain>::EntityKey, <D as Domain>::State); 2]>;

#[derive(Debug, Clone)]
pub enum ShardMessage<D: Domain> {
    /// Ordered. Have these entities resident before the batch runs.
    Prewarm { partition: u32, keys: Vec<D::EntityKey> },
    /// Ordered. Evaluate the component here (its owner, or its coordinator).
    Run(Component<D>),
    /// Ordered. Lend these entities to `coordinator` for `component`.
    Lend { component: ComponentId, coordinator: ShardId, keys: Vec<D::EntityKey> },
    /// Control, lender to coordinator: the lent entities' states.
    Lent { component: ComponentId, lender: ShardId, states: EntityStates<D> },
    /// Control, coordinator to lender: the lent entities' states after evaluation.
    WriteBack { component: ComponentId, states: EntityStates<D> },
    /// Ordered, to the partition's home shard. Outputs the Usher decided itself
    /// (malformed, replay, conflict, full, version): recorded like any other output.
    Decided { outputs: Vec<EncodedOutput> },
    /// Ordered. Every message of the batch ending at `last_offset` came before this.
    /// The home shard's marker carries the Usher's journal for the batch; `snapshot`
    /// asks every shard for its entities of the partition as of this marker.
    BatchEnd { partition: u32, last_offset: u64, usher: Option<UsherDelta>, snapshot: bool },
}

#[derive(Debug)]
pub enum ShardEffect<D: Domain> {
    /// Deliver to another shard of this instance.
    Send { to: ShardId, message: ShardMessage<D> },
    /// One event's output, with the entity states it left behind (empty unless
    /// accepted): what the Ledger appends.
    Output { output: EncodedOutput, changes: Changes<D> },
    /// Every event of `partition` up to `last_offset` has been evaluated on this shard
    /// and no entity of this shard is out on loan: the Ledger appends the batch-end
    /// marker (with the Usher's journal on the home shard) and commits.
    BatchDone {
        partition: u32,
        last_offset: u64,
        usher: Option<UsherDelta>,
        /// This shard's non-default entities of the partition as of the marker, sorted,
        /// when a snapshot was asked for.
        snapshot: Option<EntityStates<D>>,
    },
}

/// Loans received by a coordinator for one component.
struct Loans<D: Domain> {
    lenders: ShardSet,
    states: EntityStates<D>,
}

pub struct Arbiter<D: Domain> {
    shard: ShardId,
    shard_count: u16,
    registrar: Registrar<D>,
    /// Ordered messages, one queue per partition.
    queues: HashMap<u32, VecDeque<ShardMessage<D>>>,
    /// This shard's entities out on loan, and how many per partition.
    lent_out: HashMap<(u32, D::EntityKey), ComponentId>,
    lent_per_partition: HashMap<u32, usize>,
    loans: HashMap<ComponentId, Loans<D>>,
    effects: Vec<ShardEffect<D>>,
    prewarmed_entities: u64,
    scratch: Scratch<D>,
}

fn partition_of<D: Domain>(message: &ShardMessage<D>) -> u32 {
    match message {
        ShardMessage::Prewarm { partition, .. } | ShardMessage::BatchEnd { partition, .. } => *partition,
        ShardMessage::Run(component) => component.id.partition,
        ShardMessage::Lend { component, .. } | ShardMessage::Lent { component, .. } => component.partition,
        ShardMessage::WriteBack { component, .. } => component.partition,
        ShardMessage::Decided { outputs } => outputs.first().map_or(0, |o| o.partition),
    }
}

impl<D: Domain> Arbiter<D> {
    pub fn new(shard: ShardId, shard_count: u16) -> Self {
        assert!(shard < shard_count);
        Self {
            shard,
            shard_count,
            registrar: Registrar::new(),
            queues: HashMap::new(),
            lent_out: HashMap::new(),
            lent_per_partition: HashMap::new(),
            loans: HashMap::new(),
            effects: Vec::new(),
            prewarmed_entities: 0,
            scratch: Scratch::new(),
        }
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn registrar(&self) -> &Registrar<D> {
        &self.registrar
    }

    /// Sets an entity's state during recovery, before any message is handled.
    pub fn restore_entity(&mut self, partition: u32, key: &D::EntityKey, state: D::State) {
        assert!(self.is_idle(), "recovery happens before the shard runs");
        assert!(self.owns(key), "an entity is restored on the shard that owns it");
        self.registrar.set(partition, key, state);
    }

    /// Entities the Usher asked to have resident (the in-memory Registrar always has).
    pub fn prewarmed_entities(&self) -> u64 {
        self.prewarmed_entities
    }

    /// True while some partition's head waits.
    pub fn is_blocked(&self) -> bool {
        self.queues.values().any(|q| !q.is_empty())
    }

    /// True when nothing is queued, lent out or awaited.
    pub fn is_idle(&self) -> bool {
        !self.is_blocked() && self.lent_out.is_empty() && self.loans.is_empty()
    }

    pub fn handle(&mut self, message: ShardMessage<D>) {
        let partition = partition_of(&message);
        match message {
            ShardMessage::Lent { component, lender, states } => {
                // spec: Arbiter.LentStatesReceived
                let loans = self
                    .loans
                    .entry(component)
                    .or_insert_with(|| Loans { lenders: ShardSet::default(), states: Vec::new() });
                assert!(!loans.lenders.contains(lender), "one loan per lender and component");
                loans.lenders.insert(lender);
                loans.states.extend(states);
                let head_waits_for_it = matches!(self.queues.get(&partition).and_then(|q| q.front()), Some(ShardMessage::Run(c)) if c.id == component);
                if head_waits_for_it {
                    self.pump(partition);
                }
            }
            ShardMessage::WriteBack { component, states } => {
                // spec: Arbiter.WriteBackApplied
                let count = states.len();
                for (key, state) in states {
                    let lent_to = self.lent_out.remove(&(component.partition, key.clone()));
                    assert_eq!(lent_to, Some(component), "write-back of an entity not lent to that component");
                    self.registrar.set(component.partition, &key, state);
                }
                let lent = self.lent_per_partition.get_mut(&partition).expect("loans of this partition are out");
                *lent = lent.checked_sub(count).expect("no more write-backs than loans");
                self.pump(partition);
            }
            ordered => {
                let queue = self.queues.entry(partition).or_default();
                assert!(queue.len() < MAX_QUEUED_MESSAGES, "shard {} ordered queue overflow", self.shard);
                queue.push_back(ordered);
                // A message behind a waiting head cannot run before it: no need to look.
                if queue.len() == 1 {
                    self.pump(partition);
                }
            }
        }
    }

    /// Takes the effects produced so far, in the order they happened.
    pub fn drain_effects(&mut self) -> std::vec::Drain<'_, ShardEffect<D>> {
        self.effects.drain(..)
    }

    fn owns(&self, key: &D::EntityKey) -> bool {
        shard_of::<D>(key, self.shard_count) == self.shard
    }

    fn lent_in(&self, partition: u32) -> usize {
        self.lent_per_partition.get(&partition).copied().unwrap_or(0)
    }

    fn can_run(&self, message: &ShardMessage<D>) -> bool {
        match message {
            ShardMessage::Prewarm { .. } | ShardMessage::Decided { .. } | ShardMessage::Lend { .. } => true,
            ShardMessage::Run(component) => match component.placement {
                Placement::Single(_) => true,
                Placement::Cross { shards, .. } => {
                    let mut expected = shards;
                    expected.remove(self.shard);
                    self.loans.get(&component.id).is_some_and(|l| l.lenders == expected)
                }
            },
            // spec: Arbiter.BatchEndCompletes — only once this partition's loans are home.
            ShardMessage::BatchEnd { partition, .. } => self.lent_in(*partition) == 0,
            ShardMessage::Lent { .. } | ShardMessage::WriteBack { .. } => {
                unreachable!("control messages are not queued")
            }
        }
    }

    fn pump(&mut self, partition: u32) {
        loop {
            let Some(head) = self.queues.get(&partition).and_then(VecDeque::front) else { return };
            if !self.can_run(head) {
                return;
            }
            let head = self.queues.get_mut(&partition).and_then(VecDeque::pop_front).expect("front exists");
            match head {
                ShardMessage::Prewarm { keys, .. } => self.prewarmed_entities += keys.len() as u64,
                ShardMessage::Decided { outputs } => {
                    for output in outputs {
                        assert_eq!(output.partition, partition, "decided outputs travel with their partition");
                        self.effects.push(ShardEffect::Output { output, changes: Changes::<D>::new() });
                    }
                }
                ShardMessage::Lend { component, coordinator, keys } => self.lend(component, coordinator, keys),
                ShardMessage::Run(component) => {
                    // spec: Arbiter.HoldsLentEntities — never touches a lent entity (see module docs).
                    debug_assert!(!self.touches_lent(&component));
                    match component.placement {
                        Placement::Single(shard) => {
                            assert_eq!(shard, self.shard, "a single-shard component runs on its owner");
                            self.run_single(component);
                        }
                        Placement::Cross { coordinator, .. } => {
                            assert_eq!(coordinator, self.shard, "a cross-shard component runs on its coordinator");
                            self.run_cross(component);
                        }
                    }
                }
                ShardMessage::BatchEnd { partition, last_offset, usher, snapshot } => {
                    let snapshot = snapshot.then(|| self.registrar.entities_sorted(partition));
                    self.effects.push(ShardEffect::BatchDone { partition, last_offset, usher, snapshot });
                }
                ShardMessage::Lent { .. } | ShardMessage::WriteBack { .. } => unreachable!(),
            }
        }
    }

    /// Whether any event of `component` touches an entity lent out; checked in debug
    /// builds only, since the protocol makes it impossible.
    fn touches_lent(&self, component: &Component<D>) -> bool {
        let mut keys = Vec::new();
        component.events.iter().any(|event| {
            keys.clear();
            D::entities(&event.command, &mut keys);
            keys.iter().any(|k| self.lent_out.contains_key(&(component.id.partition, k.clone())))
        })
    }

    fn lend(&mut self, component: ComponentId, coordinator: ShardId, keys: Vec<D::EntityKey>) {
        // spec: Arbiter.KeysLent
        let mut states = Vec::with_capacity(keys.len());
        for key in keys {
            assert!(self.owns(&key), "a shard lends only what it owns");
            states.push((key.clone(), self.registrar.get(component.partition, &key)));
            let previous = self.lent_out.insert((component.partition, key), component);
            assert!(previous.is_none(), "an entity is lent to one component at a time");
        }
        *self.lent_per_partition.entry(component.partition).or_default() += states.len();
        let message = ShardMessage::Lent { component, lender: self.shard, states };
        self.effects.push(ShardEffect::Send { to: coordinator, message });
    }

    fn run_single(&mut self, component: Component<D>) {
        // spec: Arbiter.EvaluatesInLogOrder
        for event in &component.events {
            let scratch = &mut self.scratch;
            scratch.keys.clear();
            D::entities(&event.command, &mut scratch.keys);
            scratch.states.clear();
            scratch.states.extend(scratch.keys.iter().map(|k| self.registrar.get(event.partition, k)));
            let (output, accepted) = evaluate::<D>(event, scratch);
            let mut changes = Changes::<D>::new();
            if accepted {
                for (key, state) in scratch.keys.iter().zip(scratch.states.iter()) {
                    self.registrar.set(event.partition, key, *state);
                    changes.push((key.clone(), *state));
                }
            }
            self.effects.push(ShardEffect::Output { output, changes });
        }
    }

    fn run_cross(&mut self, component: Component<D>) {
        // spec: Arbiter.CrossShardCoordinator
        let partition = component.id.partition;
        let loans = self.loans.remove(&component.id).expect("can_run checked the loans");
        let mut working: HashMap<D::EntityKey, D::State> = loans.states.into_iter().collect();
        for event in &component.events {
            let scratch = &mut self.scratch;
            scratch.keys.clear();
            D::entities(&event.command, &mut scratch.keys);
            scratch.states.clear();
            for key in &scratch.keys {
                let state = match working.get(key) {
                    Some(state) => *state,
                    None => {
                        assert_eq!(
                            shard_of::<D>(key, self.shard_count),
                            self.shard,
                            "other shards' entities arrive as loans"
                        );
                        let state = self.registrar.get(partition, key);
                        working.insert(key.clone(), state);
                        state
                    }
                };
                scratch.states.push(state);
            }
            let (output, accepted) = evaluate::<D>(event, scratch);
            let mut changes = Changes::<D>::new();
            if accepted {
                for (key, state) in scratch.keys.iter().zip(scratch.states.iter()) {
                    working.insert(key.clone(), *state);
                    changes.push((key.clone(), *state));
                }
            }
            self.effects.push(ShardEffect::Output { output, changes });
        }
        // Own entities go to the Registrar; loans go home, changed or not, so that every
        // lender can release them. Sorted, so the messages do not depend on map order.
        let mut returns: Vec<(ShardId, D::EntityKey, D::State)> =
            working.into_iter().map(|(k, s)| (shard_of::<D>(&k, self.shard_count), k, s)).collect();
        returns.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut batch: Option<(ShardId, EntityStates<D>)> = None;
        for (owner, key, state) in returns {
            if owner == self.shard {
                self.registrar.set(partition, &key, state);
                continue;
            }
            match &mut batch {
                Some((to, states)) if *to == owner => states.push((key, state)),
                _ => {
                    if let Some((to, states)) = batch.take() {
                        self.write_back(to, component.id, states);
                    }
                    batch = Some((owner, vec![(key, state)]));
                }
            }
        }
        if let Some((to, states)) = batch {
            self.write_back(to, component.id, states);
        }
    }

    fn write_back(&mut self, to: ShardId, component: ComponentId, states: EntityStates<D>) {
        self.effects.push(ShardEffect::Send { to, message: ShardMessage::WriteBack { component, states } });
    }
}

/// Buffers reused by every evaluation, so the hot path allocates only what it hands on.
struct Scratch<D: Domain> {
    keys: Vec<D::EntityKey>,
    states: Vec<D::State>,
    backup: Vec<D::State>,
    body: Vec<u8>,
    encoded: Vec<u8>,
}

impl<D: Domain> Scratch<D> {
    fn new() -> Self {
        Self { keys: Vec::new(), states: Vec::new(), backup: Vec::new(), body: Vec::new(), encoded: Vec::new() }
    }
}

/// Evaluates one event against `scratch.states` (in `event.keys` order). On rejection
/// the states are restored, whatever the domain did to them
/// (spec: Arbiter.RejectionChangesNothing).
fn evaluate<D: Domain>(event: &Event<D>, scratch: &mut Scratch<D>) -> (EncodedOutput, bool) {
    scratch.backup.clear();
    scratch.backup.extend_from_slice(&scratch.states);
    scratch.body.clear();
    let decision = D::evaluate(
        event.version,
        &scratch.keys,
        &mut scratch.states,
        &event.command,
        event.stream_time_ms,
        &mut scratch.body,
    );
    let (verdict, accepted) = match decision {
        Decision::Accepted => (VerdictRef::Accepted { version: event.version }, true),
        Decision::Rejected(code) => {
            scratch.states.copy_from_slice(&scratch.backup);
            (VerdictRef::Rejected { version: event.version, code }, false)
        }
    };
    let output = encode_output(event.partition, event.offset, verdict, &scratch.body, &mut scratch.encoded);
    (output, accepted)
}
