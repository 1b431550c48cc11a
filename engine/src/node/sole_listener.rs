//! No other process shares our listening addresses (spec: Gateway.SoleListener,
//! PeerWire.SoleListener).
//!
//! Every listener sets SO_REUSEPORT (one per shard, so that the kernel spreads the
//! connections), and SO_REUSEPORT lets any process of the same user bind the same address
//! too: a second instance started on a taken port would not fail, it would silently
//! answer a share of the first one's clients from its own state. So once every shard has
//! bound, start-up reads the network namespace's listening TCP sockets and stops if one on
//! our port and an overlapping address belongs to someone else. Both of two processes that
//! start together see each other and stop; the decision, [`foreign_listener`], is pure.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use procfs::net::{TcpNetEntry, TcpState};
use procfs::process::{FDTarget, Process};
use procfs::ProcError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SoleListenerError {
    #[error(
        "{address} is also listened on by another process ({other}): with SO_REUSEPORT it would \
         take a share of this instance's connections; stop it or choose another address"
    )]
    Shared { address: SocketAddr, other: SocketAddr },
    #[error("reading the listening sockets from /proc: {0}")]
    Proc(#[from] ProcError),
}

/// One listening TCP socket of the network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    pub address: SocketAddr,
    /// The socket's inode: what `/proc/self/fd` links to for the sockets we own.
    pub inode: u64,
}

/// Fails if a socket this process does not own listens on one of `addresses` (port 0, an
/// address the kernel picks per socket, is never shared and not checked).
pub fn check(addresses: &[SocketAddr]) -> Result<(), SoleListenerError> {
    if addresses.iter().all(|a| a.port() == 0) {
        return Ok(());
    }
    let ours = own_socket_inodes()?;
    let listening = listening_sockets()?;
    for &address in addresses {
        if let Some(other) = foreign_listener(address, &ours, &listening) {
            return Err(SoleListenerError::Shared { address, other: other.address });
        }
    }
    Ok(())
}

/// A listener on `address`'s port, on an overlapping address, whose inode is not ours.
pub fn foreign_listener(address: SocketAddr, ours: &HashSet<u64>, listening: &[Listening]) -> Option<Listening> {
    if address.port() == 0 {
        return None;
    }
    listening.iter().copied().find(|l| {
        l.address.port() == address.port() && overlaps(l.address.ip(), address.ip()) && !ours.contains(&l.inode)
    })
}

/// Whether a connection to one address could reach a socket bound to the other.
fn overlaps(a: IpAddr, b: IpAddr) -> bool {
    a.is_unspecified() || b.is_unspecified() || a.to_canonical() == b.to_canonical()
}

fn own_socket_inodes() -> Result<HashSet<u64>, ProcError> {
    let mut inodes = HashSet::new();
    // An fd closed while the directory is read (an error item) is not one of our listeners.
    for fd in Process::myself()?.fd()?.flatten() {
        if let FDTarget::Socket(inode) = fd.target {
            inodes.insert(inode);
        }
    }
    Ok(inodes)
}

fn listening_sockets() -> Result<Vec<Listening>, ProcError> {
    let mut entries = procfs::net::tcp()?;
    match procfs::net::tcp6() {
        Ok(v6) => entries.extend(v6),
        // A kernel without IPv6 has no table for it.
        Err(ProcError::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    Ok(entries.iter().filter(|e| e.state == TcpState::Listen).map(listening).collect())
}

fn listening(entry: &TcpNetEntry) -> Listening {
    Listening { address: entry.local_address, inode: entry.inode }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(address: &str, inode: u64) -> Listening {
        Listening { address: address.parse().unwrap(), inode }
    }

    // spec: Gateway.SoleListener, PeerWire.SoleListener
    #[test]
    fn another_processs_socket_on_an_overlapping_address_is_foreign() {
        let ours: HashSet<u64> = [1, 2].into();
        let address: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let own = [at("127.0.0.1:7000", 1), at("127.0.0.1:7000", 2)];
        assert_eq!(foreign_listener(address, &ours, &own), None, "our own shards share the port");
        for other in ["127.0.0.1:7000", "0.0.0.0:7000", "[::]:7000", "[::ffff:127.0.0.1]:7000"] {
            let listening = [own[0], at(other, 9), own[1]];
            assert_eq!(foreign_listener(address, &ours, &listening), Some(at(other, 9)), "{other}");
        }
        let wildcard: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        assert!(foreign_listener(wildcard, &ours, &[at("10.0.0.1:7000", 9)]).is_some());
    }

    #[test]
    fn other_ports_other_addresses_and_port_zero_are_not_shared() {
        let ours: HashSet<u64> = [1].into();
        let address: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let listening = [at("127.0.0.1:7001", 9), at("127.0.0.2:7000", 9), at("[::1]:7000", 9)];
        assert_eq!(foreign_listener(address, &ours, &listening), None);
        let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(foreign_listener(any_port, &ours, &[at("127.0.0.1:0", 9)]), None);
    }

    #[test]
    fn this_processs_own_listener_is_not_foreign() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        check(&[address]).expect("a listener of our own");
        let ours = own_socket_inodes().unwrap();
        let found: Vec<Listening> = listening_sockets().unwrap().into_iter().filter(|l| l.address == address).collect();
        assert_eq!(found.len(), 1, "the table lists our listener");
        assert!(ours.contains(&found[0].inode), "and /proc/self/fd links to it");
    }
}
