//! The certified view: what the Gateway answers from. Sans-IO: the Clerk's shell feeds it
//! certified outputs, in offset order per partition; the Gateway's handlers read it.
//!
//! Why a view of its own rather than the shards' entity tables: a shard's table runs ahead
//! of certification (it holds every durable output, certified or not), and the Gateway
//! answers only with certified state (spec: Gateway.StockRead). The view is built from the
//! stock levels each accepted output carries, so it is exactly the certified prefix of the
//! partition (spec: Gateway.CertifiedViewAdvances).
//!
//! Why the answers and the waiters live here too: one lock orders "the view includes
//! offset o", "the answer for o is stored" and "the request waiting for o is woken", so
//! a reader woken for o always sees o's effect (spec: Gateway.ReadYourWrites), and a
//! request that registers after o was certified finds o's answer instead of waiting for
//! ever.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use tribunal_shards::inventory::{InventoryBody, StockKey};
use tribunal_shards::output::{Output, Verdict};

/// Default of certified outputs kept for answers (all partitions together).
pub const DEFAULT_ANSWER_CAPACITY: usize = 262_144;
/// Default of requests that may wait for certification at once.
pub const DEFAULT_MAX_WAITING: usize = 65_536;

/// What a waiting request receives: its certified output's bytes.
pub type Answer = Arc<[u8]>;

/// How the view resolves a request for the answer at (partition, offset).
pub enum Lookup<W> {
    /// Certified, and still held.
    Ready(Answer),
    /// Certified, but no longer among the held answers.
    Evicted,
    /// Not certified yet: the waiter was registered and will be handed the answer.
    Registered,
    /// Not certified yet, and `max_waiting` requests already wait (spec: Gateway.WaitingBound).
    Full(W),
}

/// One partition's certified stock and recent answers.
#[derive(Default)]
struct PartitionView {
    stock: BTreeMap<StockKey, u64>,
    /// The view's stock was seeded with the recovered state at this end: outputs below it
    /// are already in it (spec: Gateway.ViewValidFromRecovery).
    seeded_end: u64,
    /// One past the last certified output fed in.
    end: u64,
    /// Answers for offsets `answers_start .. end`, dense; None for an offset that settled
    /// without this instance's output.
    answers: VecDeque<Option<Answer>>,
    answers_start: u64,
    /// The first offset that settled without this instance's output (it was overruled:
    /// self-quarantine). The stock from there on is unknown here until a restart rebuilds
    /// the view from the Ledger.
    gap_at: Option<u64>,
}

/// The view, the answer store and the waiters of one instance. `W` is whatever wakes a
/// waiting request (a oneshot sender in the engine; anything in tests).
pub struct CertifiedView<W> {
    partitions: Vec<PartitionView>,
    answer_capacity_per_partition: usize,
    waiters: HashMap<(u32, u64), W>,
    max_waiting: usize,
}

/// Outcome of feeding one certified output: the waiter to wake, if one waited.
pub struct Fed<W> {
    pub waiter: Option<(W, Answer)>,
}

impl<W> CertifiedView<W> {
    /// `seed[p]` is partition p's recovered stock and the end it reflects (the durable
    /// end); `certified[p]` is where certification resumes.
    pub fn new(
        seed: Vec<(Vec<(StockKey, u64)>, u64)>,
        certified: &[u64],
        answer_capacity: usize,
        max_waiting: usize,
    ) -> Self {
        assert_eq!(seed.len(), certified.len(), "one seed per partition");
        assert!(answer_capacity > 0 && max_waiting > 0);
        let per_partition = (answer_capacity / seed.len().max(1)).max(1);
        let partitions = seed
            .into_iter()
            .zip(certified)
            .map(|((entities, seeded_end), &certified_end)| {
                assert!(certified_end <= seeded_end, "certification never passes the durable end");
                PartitionView {
                    stock: entities.into_iter().filter(|(_, qty)| *qty > 0).collect(),
                    seeded_end,
                    end: certified_end,
                    answers: VecDeque::new(),
                    answers_start: certified_end,
                    gap_at: None,
                }
            })
            .collect();
        Self { partitions, answer_capacity_per_partition: per_partition, waiters: HashMap::new(), max_waiting }
    }

    /// The view of `partition` is the certified state: certification has reached the
    /// recovered state it was seeded with (spec: Gateway.ViewValidFromRecovery).
    pub fn is_valid(&self, partition: u32) -> bool {
        self.partitions.get(partition as usize).is_some_and(|p| p.end >= p.seeded_end && p.gap_at.is_none())
    }

    /// The view's stock is not the certified state from `offset` on (start-up found offsets
    /// treated as certified that never were).
    pub fn mark_gap(&mut self, partition: u32, offset: u64) {
        if let Some(view) = self.partitions.get_mut(partition as usize) {
            view.gap_at.get_or_insert(offset);
        }
    }

    /// Where the view lost track of certified state, if it did.
    pub fn gap_at(&self, partition: u32) -> Option<u64> {
        self.partitions.get(partition as usize).and_then(|p| p.gap_at)
    }

    /// One past the last certified offset of `partition` in the view.
    pub fn end(&self, partition: u32) -> u64 {
        self.partitions.get(partition as usize).map_or(0, |p| p.end)
    }

    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// spec: Gateway.CertifiedViewAdvances — apply, store, then hand to the waiter.
    /// `levels` are the output's accepted levels, decoded by the caller outside the lock
    /// ([`accepted_levels`]).
    pub fn feed(&mut self, partition: u32, offset: u64, output: Answer, levels: Option<Levels>) -> Fed<W> {
        let capacity = self.answer_capacity_per_partition;
        let Some(view) = self.partitions.get_mut(partition as usize) else {
            return Fed { waiter: None };
        };
        if offset < view.end {
            // Certified before (a restart resumes at the checkpoint): already in the view.
            return Fed { waiter: None };
        }
        if offset > view.end {
            // spec: Gateway.OverruledOffsetLeavesAGap — offsets settled without our output:
            // their effect is unknown here, and their waiters will get no answer.
            let skipped = view.end..offset;
            view.gap_at.get_or_insert(view.end);
            if skipped.end - skipped.start <= capacity as u64 {
                for missing in skipped.clone() {
                    view.answers.push_back(None);
                    self.waiters.remove(&(partition, missing));
                }
            } else {
                view.answers.clear();
                view.answers_start = offset;
                self.waiters.retain(|(p, o), _| *p != partition || !skipped.contains(o));
            }
        }
        // Once a gap is open the stock is unknown: applying more would pass off a state
        // that is no certified prefix as one.
        if offset >= view.seeded_end && view.gap_at.is_none() {
            for (key, qty) in levels.into_iter().flatten() {
                if qty == 0 {
                    view.stock.remove(&key);
                } else {
                    view.stock.insert(key, qty);
                }
            }
        }
        view.end = offset + 1;
        view.answers.push_back(Some(output.clone()));
        while view.answers.len() > capacity {
            view.answers.pop_front();
            view.answers_start += 1;
        }
        debug_assert_eq!(view.answers_start + view.answers.len() as u64, view.end);
        let waiter = self.waiters.remove(&(partition, offset)).map(|w| (w, output));
        Fed { waiter }
    }

    /// The answer at (`partition`, `offset`) if certified; else registers `waiter`.
    pub fn lookup_or_wait(&mut self, partition: u32, offset: u64, waiter: W) -> Lookup<W> {
        let Some(view) = self.partitions.get(partition as usize) else {
            return Lookup::Evicted;
        };
        if offset < view.end {
            if offset < view.answers_start {
                return Lookup::Evicted;
            }
            return match &view.answers[(offset - view.answers_start) as usize] {
                Some(answer) => Lookup::Ready(answer.clone()),
                None => Lookup::Evicted,
            };
        }
        if self.waiters.len() >= self.max_waiting {
            return Lookup::Full(waiter);
        }
        self.waiters.insert((partition, offset), waiter);
        Lookup::Registered
    }

    /// The certified answer at (`partition`, `offset`), if still held.
    pub fn answer(&self, partition: u32, offset: u64) -> Option<Answer> {
        let view = self.partitions.get(partition as usize)?;
        if offset >= view.end || offset < view.answers_start {
            return None;
        }
        view.answers[(offset - view.answers_start) as usize].clone()
    }

    /// A request gave up (deadline): forget its waiter.
    pub fn cancel(&mut self, partition: u32, offset: u64) {
        self.waiters.remove(&(partition, offset));
    }

    /// The certified level of one entity; an entity never touched holds 0.
    pub fn level(&self, partition: u32, key: &StockKey) -> u64 {
        self.partitions.get(partition as usize).and_then(|p| p.stock.get(key)).copied().unwrap_or(0)
    }

    /// Every warehouse holding `sku` (non-zero levels), in warehouse order.
    pub fn levels_of_sku(&self, partition: u32, sku: &str) -> Vec<(String, u64)> {
        let Some(view) = self.partitions.get(partition as usize) else { return Vec::new() };
        let from = StockKey { sku: sku.into(), warehouse: "".into() };
        view.stock
            .range(from..)
            .take_while(|(k, _)| k.sku == sku)
            .map(|(k, qty)| (k.warehouse.to_string(), *qty))
            .collect()
    }
}

/// The stock levels an output sets, as (entity, quantity).
pub type Levels = Vec<(StockKey, u64)>;

/// An accepted output's levels are the entities' states after it; other verdicts change
/// nothing (a rejected output repeats the unchanged levels, a replay carries none). Called
/// outside the view's lock: decoding is the costly part of feeding the view.
pub fn accepted_levels(bytes: &[u8]) -> Option<Levels> {
    // Certified outputs are this instance's own durable outputs: they decode. One that
    // does not is reported, never applied half.
    let output = match Output::decode(bytes) {
        Ok(output) => output,
        Err(error) => {
            tracing::error!(%error, "a certified output does not decode; the stock view skips it");
            return None;
        }
    };
    if !matches!(output.verdict, Verdict::Accepted { .. }) || output.body.is_empty() {
        return None;
    }
    match InventoryBody::decode(&output.body) {
        Ok(body) => Some(body.levels.into_iter().map(|l| (StockKey::new(&l.warehouse, &l.sku), l.qty)).collect()),
        Err(error) => {
            tracing::error!(%error, offset = output.offset, "a certified body does not decode");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tribunal_shards::inventory::StockLevel;
    use tribunal_shards::output::Output;

    fn accepted(partition: u32, offset: u64, levels: &[(&str, &str, u64)]) -> Answer {
        let body = body(levels);
        let output = Output { partition, offset, verdict: Verdict::Accepted { version: 1 }, body };
        Arc::from(output.encode().bytes)
    }

    /// A body in the domain's own canonical encoding, as the Arbiter writes it.
    fn body(levels: &[(&str, &str, u64)]) -> Vec<u8> {
        let levels: Vec<StockLevel> = levels
            .iter()
            .map(|(w, s, q)| StockLevel { warehouse: w.to_string(), sku: s.to_string(), qty: *q })
            .collect();
        tribunal_shards::inventory::levels_body(&levels)
    }

    /// Feeds an output the way the engine does: levels decoded first, outside the lock.
    fn feed(view: &mut CertifiedView<u32>, offset: u64, output: Answer) -> Fed<u32> {
        let levels = accepted_levels(&output);
        view.feed(0, offset, output, levels)
    }

    fn rejected(partition: u32, offset: u64) -> Answer {
        let output = Output {
            partition,
            offset,
            verdict: Verdict::Rejected { version: 1, code: "insufficient_stock".into() },
            body: body(&[("w1", "s", 999)]),
        };
        Arc::from(output.encode().bytes)
    }

    #[test]
    fn the_view_holds_the_certified_prefix_and_wakes_a_waiter_after_applying() {
        // spec: Gateway.CertifiedViewAdvances, Gateway.ReadYourWrites
        let mut view: CertifiedView<u32> = CertifiedView::new(vec![(vec![], 0)], &[0], 16, 4);
        assert!(matches!(view.lookup_or_wait(0, 1, 7), Lookup::Registered));
        assert!(feed(&mut view, 0, accepted(0, 0, &[("w1", "s", 5)])).waiter.is_none());
        assert_eq!(view.level(0, &StockKey::new("w1", "s")), 5);
        let fed = feed(&mut view, 1, accepted(0, 1, &[("w1", "s", 3), ("w2", "s", 2)]));
        let (waiter, answer) = fed.waiter.expect("the waiter of offset 1 is woken");
        assert_eq!(waiter, 7);
        assert_eq!(Output::decode(&answer).unwrap().offset, 1);
        // By the time the waiter is handed its answer, the view holds its effect.
        assert_eq!(view.level(0, &StockKey::new("w1", "s")), 3);
        assert_eq!(view.levels_of_sku(0, "s"), vec![("w1".into(), 3), ("w2".into(), 2)]);
        assert_eq!(view.waiting(), 0);
    }

    #[test]
    fn rejected_outputs_change_nothing_and_a_late_lookup_finds_the_answer() {
        // spec: Gateway.StockRead
        let mut view: CertifiedView<u32> = CertifiedView::new(vec![(vec![], 0)], &[0], 16, 4);
        feed(&mut view, 0, accepted(0, 0, &[("w1", "s", 5)]));
        feed(&mut view, 1, rejected(0, 1));
        assert_eq!(view.level(0, &StockKey::new("w1", "s")), 5, "a rejection's levels are not applied");
        match view.lookup_or_wait(0, 1, 9) {
            Lookup::Ready(answer) => assert_eq!(Output::decode(&answer).unwrap().offset, 1),
            _ => panic!("offset 1 is certified: its answer is ready"),
        }
        assert_eq!(view.level(0, &StockKey::new("nowhere", "s")), 0, "an untouched entity reads 0");
    }

    #[test]
    fn the_answer_store_is_bounded_and_waiters_are_bounded() {
        // spec: Gateway.WaitingBound
        let mut view: CertifiedView<u32> = CertifiedView::new(vec![(vec![], 0)], &[0], 2, 2);
        for offset in 0..5 {
            feed(&mut view, offset, accepted(0, offset, &[("w", "s", offset + 1)]));
        }
        assert!(matches!(view.lookup_or_wait(0, 2, 0), Lookup::Evicted));
        assert!(view.answer(0, 3).is_some() && view.answer(0, 4).is_some() && view.answer(0, 2).is_none());
        assert!(matches!(view.lookup_or_wait(0, 10, 1), Lookup::Registered));
        assert!(matches!(view.lookup_or_wait(0, 11, 2), Lookup::Registered));
        assert!(matches!(view.lookup_or_wait(0, 12, 3), Lookup::Full(3)));
        view.cancel(0, 10);
        assert!(matches!(view.lookup_or_wait(0, 12, 3), Lookup::Registered));
    }

    #[test]
    fn a_view_seeded_from_recovery_is_valid_only_once_certification_reaches_the_seed() {
        // spec: Gateway.ViewValidFromRecovery
        let seed = vec![(StockKey::new("w", "s"), 8)];
        let mut view: CertifiedView<u32> = CertifiedView::new(vec![(seed, 3)], &[1], 16, 4);
        assert!(!view.is_valid(0), "outputs 1 and 2 are durable but not certified yet");
        // Outputs below the seed are already in it: applying them would go back in time.
        feed(&mut view, 1, accepted(0, 1, &[("w", "s", 2)]));
        feed(&mut view, 2, accepted(0, 2, &[("w", "s", 4)]));
        assert!(view.is_valid(0));
        assert_eq!(view.level(0, &StockKey::new("w", "s")), 8);
        feed(&mut view, 3, accepted(0, 3, &[("w", "s", 6)]));
        assert_eq!(view.level(0, &StockKey::new("w", "s")), 6);
        assert!(view.answer(0, 1).is_some(), "answers below the seed are still held for replays");
    }

    #[test]
    fn an_offset_settled_without_our_output_makes_the_stock_unknown_but_answers_go_on() {
        // spec: Gateway.OverruledOffsetLeavesAGap
        let mut view: CertifiedView<u32> = CertifiedView::new(vec![(vec![], 0)], &[0], 16, 4);
        feed(&mut view, 0, accepted(0, 0, &[("w", "s", 1)]));
        assert!(matches!(view.lookup_or_wait(0, 1, 11), Lookup::Registered));
        let fed = feed(&mut view, 2, accepted(0, 2, &[("w", "t", 1)]));
        assert!(fed.waiter.is_none());
        assert_eq!(view.waiting(), 0, "the skipped offset's waiter is dropped, so it answers at once");
        assert!(!view.is_valid(0));
        assert_eq!(view.gap_at(0), Some(1));
        assert_eq!(view.level(0, &StockKey::new("w", "t")), 0, "nothing is applied past a gap");
        assert!(view.answer(0, 0).is_some(), "answers before the gap are kept for replays");
        assert!(view.answer(0, 2).is_some() && view.answer(0, 1).is_none());
        assert!(matches!(view.lookup_or_wait(0, 1, 12), Lookup::Evicted));
    }
}
