//! `run`'s federation options: who the peers are, how they authenticate, how many copies
//! certify, and the fault injection used by tests and demonstrations.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tribunal_federation::handshake::MIN_PSK_BYTES;

pub use crate::clerk::{Fault, PeerAddress};

#[derive(clap::Args, Clone, Debug)]
pub struct FederationArgs {
    /// Where this instance accepts federation connections, e.g. `127.0.0.1:7101`.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The other instances: `ID@HOST:PORT[,ID@HOST:PORT..]`.
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// File holding the federation's pre-shared key (at least 16 bytes; surrounding
    /// whitespace is ignored). Required with --peers.
    #[arg(long)]
    pub psk_file: Option<PathBuf>,
    /// Byte-identical copies, this instance's own included, that certify an output.
    #[arg(long, default_value_t = 2)]
    pub expected_copies: u32,
    /// Fault injection, off by default: `bitflip:RATE` flips one bit in that share of this
    /// instance's outputs before they reach its Clerk and its peers; `delay:MS` holds each
    /// batch of outputs that long.
    #[arg(long)]
    pub inject_fault: Vec<String>,
}

pub fn parse_peer(text: &str) -> anyhow::Result<PeerAddress> {
    let (id, address) = text.split_once('@').with_context(|| format!("--peers {text:?}: expected ID@HOST:PORT"))?;
    let instance_id = id.parse().with_context(|| format!("--peers {text:?}: {id:?} is not an instance id"))?;
    let address = address.parse().with_context(|| format!("--peers {text:?}: {address:?} is not HOST:PORT"))?;
    Ok(PeerAddress { instance_id, address })
}

pub fn parse_fault(text: &str) -> anyhow::Result<Fault> {
    let (kind, value) =
        text.split_once(':').with_context(|| format!("--inject-fault {text:?}: expected bitflip:RATE or delay:MS"))?;
    match kind {
        "bitflip" => {
            let rate: f64 = value.parse().with_context(|| format!("--inject-fault {text:?}: bad rate"))?;
            anyhow::ensure!(rate > 0.0 && rate <= 1.0, "--inject-fault {text:?}: the rate must be in (0, 1]");
            Ok(Fault::BitFlip { rate })
        }
        "delay" => {
            let delay_ms = value.parse().with_context(|| format!("--inject-fault {text:?}: bad milliseconds"))?;
            Ok(Fault::Delay { delay_ms })
        }
        _ => anyhow::bail!("--inject-fault {text:?}: unknown fault {kind:?} (bitflip:RATE or delay:MS)"),
    }
}

pub fn read_psk(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading the pre-shared key {}", path.display()))?;
    let psk = bytes.trim_ascii().to_vec();
    anyhow::ensure!(
        psk.len() >= MIN_PSK_BYTES,
        "the pre-shared key in {} has {} bytes; at least {MIN_PSK_BYTES} are needed",
        path.display(),
        psk.len()
    );
    Ok(psk)
}
