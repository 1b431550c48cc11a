//! What loadgen asks for: warehouses, SKUs and kits named under a per-run prefix, opening
//! stock, then a seeded mix of transfers, adjustments and kit assemblies with uniform or
//! Zipf SKU popularity.
//!
//! Deterministic for a seed and a stream number (one stream per connection), so a run can
//! be repeated; nothing here does IO.

use anyhow::{bail, Context};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::Serialize;
use tribunal_shards::inventory::{InventoryCommand, KitComponent};

/// Components per kit: enough to exercise multi-entity atomicity, few enough that kits
/// stay assemblable under load.
const KIT_COMPONENTS_MIN: usize = 2;
const KIT_COMPONENTS_MAX: usize = 3;
const QTY_PER_KIT_MAX: u64 = 3;
const TRANSFER_QTY_MAX: u64 = 5;
const KIT_QTY_MAX: u64 = 2;
/// Adjustments lean positive so stock is replenished roughly as fast as kits consume it.
const ADJUST_DELTA_MIN: i64 = -4;
const ADJUST_DELTA_MAX: i64 = 8;

/// SKU popularity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Popularity {
    Uniform,
    /// Zipf with this exponent: SKU rank r is picked with weight 1 / r^s.
    Zipf {
        s: f64,
    },
}

impl std::str::FromStr for Popularity {
    type Err = anyhow::Error;

    /// `uniform` or `zipf:S` (e.g. `zipf:1.1`).
    fn from_str(text: &str) -> anyhow::Result<Self> {
        match text.split_once(':') {
            None if text == "uniform" => Ok(Self::Uniform),
            Some(("zipf", s)) => {
                let s: f64 = s.parse().with_context(|| format!("zipf exponent {s:?}"))?;
                if !(s.is_finite() && s > 0.0) {
                    bail!("zipf exponent must be a positive number, not {s}");
                }
                Ok(Self::Zipf { s })
            }
            _ => bail!("popularity must be `uniform` or `zipf:S`, not {text:?}"),
        }
    }
}

/// Relative weights of the three movement kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mix {
    pub transfer: u32,
    pub adjust: u32,
    pub kit: u32,
}

impl std::str::FromStr for Mix {
    type Err = anyhow::Error;

    /// `transfer=70,adjust=20,kit=10`; a kind left out weighs 0.
    fn from_str(text: &str) -> anyhow::Result<Self> {
        let mut mix = Mix { transfer: 0, adjust: 0, kit: 0 };
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (name, weight) =
                part.split_once('=').with_context(|| format!("mix entry {part:?} is not NAME=WEIGHT"))?;
            let weight: u32 = weight.parse().with_context(|| format!("mix weight {weight:?}"))?;
            match name {
                "transfer" => mix.transfer = weight,
                "adjust" => mix.adjust = weight,
                "kit" => mix.kit = weight,
                other => bail!("unknown movement kind {other:?} in the mix (transfer, adjust, kit)"),
            }
        }
        if mix.transfer + mix.adjust + mix.kit == 0 {
            bail!("the mix {text:?} gives every kind weight 0");
        }
        Ok(mix)
    }
}

/// The workload's shape on the command line, shared by `loadgen run` and `loadgen bulk`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShapeArgs {
    #[arg(long, default_value_t = 8)]
    pub warehouses: u32,
    #[arg(long, default_value_t = 256)]
    pub skus: u32,
    /// Kit SKUs, each assembled from 2 or 3 of the SKUs.
    #[arg(long, default_value_t = 16)]
    pub kits: u32,
    /// Relative weights of the movement kinds.
    #[arg(long, default_value = "transfer=70,adjust=20,kit=10")]
    pub mix: Mix,
    /// SKU popularity: `uniform` or `zipf:S`.
    #[arg(long, default_value = "zipf:1.1")]
    pub popularity: Popularity,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl ShapeArgs {
    pub fn config(&self, run_prefix: String, duplicate_share: f64, initial_stock: u64) -> WorkloadConfig {
        WorkloadConfig {
            run_prefix,
            warehouses: self.warehouses,
            skus: self.skus,
            kits: self.kits,
            mix: self.mix,
            popularity: self.popularity,
            duplicate_share,
            initial_stock,
            seed: self.seed,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadConfig {
    /// Every name starts with it (`lg1a2b3c4d-W3`), so each run's stock starts empty.
    pub run_prefix: String,
    pub warehouses: u32,
    pub skus: u32,
    pub kits: u32,
    pub mix: Mix,
    pub popularity: Popularity,
    /// Share of requests that resend an already answered key with its body.
    pub duplicate_share: f64,
    /// Opening stock per (warehouse, SKU), set by acknowledged adjustments.
    pub initial_stock: u64,
    pub seed: u64,
}

impl WorkloadConfig {
    pub fn check(&self) -> anyhow::Result<()> {
        if self.warehouses < 2 {
            bail!("--warehouses must be at least 2 (transfers need two)");
        }
        if (self.skus as usize) < KIT_COMPONENTS_MAX + 1 {
            bail!("--skus must be at least {}", KIT_COMPONENTS_MAX + 1);
        }
        if self.mix.kit > 0 && self.kits == 0 {
            bail!("the mix has kits but --kits is 0");
        }
        // Opening stock is one adjustment per (warehouse, SKU): within a movement's bounds.
        if !(1..=tribunal_shards::inventory::MAX_MOVEMENT_QTY).contains(&self.initial_stock) {
            bail!("--initial-stock must be 1..={}", tribunal_shards::inventory::MAX_MOVEMENT_QTY);
        }
        if !(0.0..1.0).contains(&self.duplicate_share) {
            bail!("--duplicate-share must be in [0, 1)");
        }
        if self.run_prefix.len() + 12 > tribunal_shards::inventory::MAX_NAME_BYTES {
            bail!("--run-prefix is too long for names of at most 64 bytes");
        }
        Ok(())
    }

    pub fn warehouse(&self, i: u32) -> String {
        format!("{}-W{i}", self.run_prefix)
    }

    pub fn sku(&self, i: u32) -> String {
        format!("{}-S{i}", self.run_prefix)
    }

    pub fn kit_sku(&self, i: u32) -> String {
        format!("{}-K{i}", self.run_prefix)
    }

    /// Every SKU the run can touch (components and kits): what the verifier reads back.
    pub fn all_skus(&self) -> Vec<String> {
        (0..self.skus).map(|i| self.sku(i)).chain((0..self.kits).map(|i| self.kit_sku(i))).collect()
    }

    /// The opening stock: one adjustment per (warehouse, SKU).
    pub fn opening_stock(&self) -> Vec<InventoryCommand> {
        let mut commands = Vec::with_capacity((self.warehouses * self.skus) as usize);
        for w in 0..self.warehouses {
            for s in 0..self.skus {
                commands.push(InventoryCommand::Adjust {
                    sku: self.sku(s).into(),
                    warehouse: self.warehouse(w).into(),
                    delta: i64::try_from(self.initial_stock).expect("checked: at most MAX_MOVEMENT_QTY"),
                    reason: "loadgen opening stock".into(),
                });
            }
        }
        commands
    }
}

/// One stream of commands (one per connection).
pub struct Generator {
    config: WorkloadConfig,
    rng: SmallRng,
    zipf: Option<Zipf<f64>>,
    /// Kit i's components: (SKU index, qty per kit), distinct SKUs.
    kits: Vec<Vec<(u32, u64)>>,
}

impl Generator {
    pub fn new(config: &WorkloadConfig, stream: u64) -> Self {
        // Kits are the same in every stream: derived from the seed alone.
        let mut kit_rng = SmallRng::seed_from_u64(config.seed);
        let kits = (0..config.kits).map(|_| kit_components(&mut kit_rng, config.skus)).collect();
        let zipf = match config.popularity {
            Popularity::Uniform => None,
            Popularity::Zipf { s } => Some(Zipf::new(f64::from(config.skus), s).expect("checked: s > 0, skus >= 4")),
        };
        let stream_seed = config.seed ^ stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self { config: config.clone(), rng: SmallRng::seed_from_u64(stream_seed), zipf, kits }
    }

    /// Whether the next request should resend an answered key.
    pub fn wants_duplicate(&mut self) -> bool {
        self.config.duplicate_share > 0.0 && self.rng.random_bool(self.config.duplicate_share)
    }

    /// A number in 0..n, for picking among answered keys.
    pub fn pick(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n.max(1))
    }

    pub fn next_command(&mut self) -> InventoryCommand {
        let mix = self.config.mix;
        let roll = self.rng.random_range(0..mix.transfer + mix.adjust + mix.kit);
        if roll < mix.transfer {
            self.transfer()
        } else if roll < mix.transfer + mix.adjust {
            self.adjust()
        } else {
            self.kit()
        }
    }

    fn sku_index(&mut self) -> u32 {
        match &self.zipf {
            // Zipf yields ranks 1..=n as floats.
            Some(zipf) => (zipf.sample(&mut self.rng) as u32).clamp(1, self.config.skus) - 1,
            None => self.rng.random_range(0..self.config.skus),
        }
    }

    fn warehouse_index(&mut self) -> u32 {
        self.rng.random_range(0..self.config.warehouses)
    }

    fn transfer(&mut self) -> InventoryCommand {
        let sku = self.sku_index();
        let from = self.warehouse_index();
        // A different warehouse: same-warehouse transfers are refused by validation.
        let to = (from + self.rng.random_range(1..self.config.warehouses)) % self.config.warehouses;
        InventoryCommand::Transfer {
            sku: self.config.sku(sku).into(),
            from_warehouse: self.config.warehouse(from).into(),
            to_warehouse: self.config.warehouse(to).into(),
            qty: self.rng.random_range(1..=TRANSFER_QTY_MAX),
        }
    }

    fn adjust(&mut self) -> InventoryCommand {
        let mut delta = self.rng.random_range(ADJUST_DELTA_MIN..=ADJUST_DELTA_MAX);
        if delta == 0 {
            delta = 1;
        }
        let (sku, warehouse) = (self.sku_index(), self.warehouse_index());
        InventoryCommand::Adjust {
            sku: self.config.sku(sku).into(),
            warehouse: self.config.warehouse(warehouse).into(),
            delta,
            reason: if delta > 0 { "loadgen restock".into() } else { "loadgen shrinkage".into() },
        }
    }

    fn kit(&mut self) -> InventoryCommand {
        let kit = self.rng.random_range(0..self.config.kits);
        let warehouse = self.warehouse_index();
        let components = self.kits[kit as usize]
            .iter()
            .map(|&(sku, qty_per_kit)| KitComponent { sku: self.config.sku(sku).into(), qty_per_kit })
            .collect();
        InventoryCommand::AssembleKit {
            warehouse: self.config.warehouse(warehouse).into(),
            kit_sku: self.config.kit_sku(kit).into(),
            qty: self.rng.random_range(1..=KIT_QTY_MAX),
            components,
        }
    }
}

fn kit_components(rng: &mut SmallRng, skus: u32) -> Vec<(u32, u64)> {
    let count = rng.random_range(KIT_COMPONENTS_MIN..=KIT_COMPONENTS_MAX);
    let mut components: Vec<(u32, u64)> = Vec::with_capacity(count);
    while components.len() < count {
        let sku = rng.random_range(0..skus);
        if components.iter().all(|&(s, _)| s != sku) {
            components.push((sku, rng.random_range(1..=QTY_PER_KIT_MAX)));
        }
    }
    components
}

#[cfg(test)]
mod tests {
    use super::*;
    use tribunal_shards::domain::Domain;
    use tribunal_shards::inventory::Inventory;

    fn config(popularity: Popularity) -> WorkloadConfig {
        WorkloadConfig {
            run_prefix: "lgtest".into(),
            warehouses: 4,
            skus: 50,
            kits: 5,
            mix: Mix { transfer: 6, adjust: 3, kit: 1 },
            popularity,
            duplicate_share: 0.1,
            initial_stock: 100,
            seed: 7,
        }
    }

    #[test]
    fn every_generated_command_passes_the_engines_validation() {
        for popularity in [Popularity::Uniform, Popularity::Zipf { s: 1.2 }] {
            let config = config(popularity);
            config.check().unwrap();
            let mut generator = Generator::new(&config, 3);
            let commands: Vec<_> = (0..5_000).map(|_| generator.next_command()).chain(config.opening_stock()).collect();
            for command in &commands {
                Inventory::validate(command).unwrap_or_else(|e| panic!("{command:?}: {e:?}"));
            }
            let kinds = |f: fn(&InventoryCommand) -> bool| commands.iter().filter(|c| f(c)).count();
            assert!(kinds(|c| matches!(c, InventoryCommand::AssembleKit { .. })) > 0);
            assert!(kinds(|c| matches!(c, InventoryCommand::Transfer { .. })) > 0);
        }
    }

    #[test]
    fn zipf_favours_the_first_skus_and_streams_are_deterministic() {
        let config = config(Popularity::Zipf { s: 1.5 });
        let (mut a, mut b) = (Generator::new(&config, 1), Generator::new(&config, 1));
        let hot = config.sku(0);
        let mut hits = 0;
        for _ in 0..2_000 {
            let (x, y) = (a.next_command(), b.next_command());
            assert_eq!(x, y);
            if let InventoryCommand::Transfer { sku, .. } = x {
                hits += usize::from(sku == hot);
            }
        }
        // Uniform would give ~1/50 of ~1,200 transfers; rank 1 of Zipf(1.5) over 50 gets ~40%.
        assert!(hits > 200, "{hits}");
    }

    #[test]
    fn bad_flags_are_refused_with_a_reason() {
        assert!("zipf:0".parse::<Popularity>().is_err());
        assert!("zipf".parse::<Popularity>().is_err());
        assert!("transfer=1,teleport=2".parse::<Mix>().is_err());
        assert!("transfer=0".parse::<Mix>().is_err());
        let mut no_stock = config(Popularity::Uniform);
        no_stock.initial_stock = 0;
        assert!(no_stock.check().is_err());
        assert_eq!("kit=2,transfer=1".parse::<Mix>().unwrap(), Mix { transfer: 1, adjust: 0, kit: 2 });
    }
}
