//! The Gateway's listeners: one per shard, and no other process's (spec: Gateway.SoleListener).
//!
//! Every shard accepts on its own socket with SO_REUSEPORT, so that the kernel spreads the
//! connections over the shards. SO_REUSEPORT also lets any process of the same user bind
//! the same address: a second instance started on a taken port would not fail, it would
//! silently answer a share of the first one's clients from its own state. So the sockets
//! are bound here, before any shard runs, and checked against the network namespace's
//! listening TCP sockets twice: before they listen (a process already serving the address
//! gets no connection of ours, and we none of its), and after (of two processes that
//! started together, both stop). The decision, [`foreign_listener`], is pure.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use procfs::net::{TcpNetEntry, TcpState};
use procfs::process::{FDTarget, Process};
use procfs::ProcError;
use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;
use tracing::warn;

/// Connections the kernel queues per shard before the shard accepts them.
const LISTEN_BACKLOG: i32 = 1_024;

#[derive(Debug, Error)]
pub enum SoleListenerError {
    #[error(
        "{address} is also listened on by another process ({other}): with SO_REUSEPORT it would \
         take a share of this instance's connections; stop it or choose another address"
    )]
    Shared { address: SocketAddr, other: SocketAddr },
    #[error("binding the HTTP address {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
}

/// One listening TCP socket of the network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    pub address: SocketAddr,
    /// The socket's inode: what `/proc/self/fd` links to for the sockets we own.
    pub inode: u64,
}

/// Binds one listening socket per shard on `address` (port 0: the kernel picks one port for
/// all of them), refusing an address another process listens on.
pub fn bind(address: SocketAddr, shards: usize) -> Result<Vec<std::net::TcpListener>, SoleListenerError> {
    assert!(shards > 0, "every instance has a shard");
    let bind_error = |source| SoleListenerError::Bind { address, source };
    let mut sockets: Vec<Socket> = Vec::with_capacity(shards);
    let mut bound = address;
    for _ in 0..shards {
        let socket = reuse_port_socket(bound).map_err(bind_error)?;
        bound = socket.local_addr().map_err(bind_error)?.as_socket().expect("an IP socket");
        sockets.push(socket);
    }
    check(bound)?;
    for socket in &sockets {
        socket.listen(LISTEN_BACKLOG).map_err(bind_error)?;
    }
    check(bound)?;
    Ok(sockets.into_iter().map(std::net::TcpListener::from).collect())
}

fn reuse_port_socket(address: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&address.into())?;
    Ok(socket)
}

/// Fails if a socket this process does not own listens on `address`. Without /proc (a
/// sandbox) the check cannot be made: a warning, and the start-up goes on.
fn check(address: SocketAddr) -> Result<(), SoleListenerError> {
    // The table first: a socket we open after it cannot look foreign.
    let found = listening_sockets().and_then(|listening| Ok((listening, own_socket_inodes()?)));
    let (listening, ours) = match found {
        Ok(found) => found,
        Err(e) => {
            warn!(%address, "cannot check that no other process listens on the HTTP address: {e}");
            return Ok(());
        }
    };
    match foreign_listener(address, &ours, &listening) {
        Some(other) => Err(SoleListenerError::Shared { address, other: other.address }),
        None => Ok(()),
    }
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

/// Whether a connection to one address could reach a socket bound to the other: the same
/// address, an IPv4 wildcard and any IPv4 address, or an IPv6 wildcard (dual-stack unless
/// V6ONLY, which the table does not show) and anything.
fn overlaps(a: IpAddr, b: IpAddr) -> bool {
    match (a.to_canonical(), b.to_canonical()) {
        (a, b) if a == b => true,
        (IpAddr::V6(wildcard), _) | (_, IpAddr::V6(wildcard)) if wildcard.is_unspecified() => true,
        (IpAddr::V4(a), IpAddr::V4(b)) => a.is_unspecified() || b.is_unspecified(),
        _ => false,
    }
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
        assert!(foreign_listener(wildcard, &ours, &[at("[::ffff:0.0.0.0]:7000", 9)]).is_some());
        let v6: SocketAddr = "[::1]:7000".parse().unwrap();
        assert!(foreign_listener(v6, &ours, &[at("[::]:7000", 9)]).is_some(), "a dual-stack wildcard");
    }

    #[test]
    fn other_ports_other_addresses_and_port_zero_are_not_shared() {
        let ours: HashSet<u64> = [1].into();
        let address: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let listening = [at("127.0.0.1:7001", 9), at("127.0.0.2:7000", 9), at("[::1]:7000", 9)];
        assert_eq!(foreign_listener(address, &ours, &listening), None);
        // An IPv4 socket never gets an IPv6 connection, and the other way round.
        let wildcard: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        assert_eq!(foreign_listener(wildcard, &ours, &[at("[::1]:7000", 9)]), None);
        let v6: SocketAddr = "[::1]:7000".parse().unwrap();
        assert_eq!(foreign_listener(v6, &ours, &[at("0.0.0.0:7000", 9)]), None);
        let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(foreign_listener(any_port, &ours, &[at("127.0.0.1:0", 9)]), None);
    }

    #[test]
    fn every_shard_listens_on_one_port_and_a_taken_address_is_refused() {
        let ours = bind("127.0.0.1:0".parse().unwrap(), 3).expect("a free address");
        let addresses: Vec<SocketAddr> = ours.iter().map(|l| l.local_addr().unwrap()).collect();
        assert!(addresses.iter().all(|a| *a == addresses[0]), "{addresses:?}");
        let found: Vec<Listening> =
            listening_sockets().unwrap().into_iter().filter(|l| l.address == addresses[0]).collect();
        assert_eq!(found.len(), 3, "the table lists our listeners");
        let own = own_socket_inodes().unwrap();
        assert!(found.iter().all(|l| own.contains(&l.inode)), "and /proc/self/fd links to them");
        // Taken by a socket without SO_REUSEPORT: the bind itself fails.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let error = bind(plain.local_addr().unwrap(), 2).expect_err("refused");
        assert!(matches!(error, SoleListenerError::Bind { .. }), "{error}");
    }
}
