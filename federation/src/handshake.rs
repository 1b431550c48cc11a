//! The PSK handshake of one connection, sans-IO (spec: Handshake.MutualProof,
//! Handshake.PeerIdentity).
//!
//! Connections are unidirectional: the dialer will send frames, the acceptor receive
//! them. Messages have fixed sizes, so the shell reads exact byte counts and never
//! parses a length from an unauthenticated peer:
//!
//! ```text
//! dialer   -> acceptor   dialer_hello                      HELLO_BYTES
//! acceptor -> dialer     acceptor_hello || acceptor_proof  REPLY_BYTES
//! dialer   -> acceptor   dialer_proof                      PROOF_BYTES
//!
//! hello          = b"TRBF" || version: u16 LE || instance_id: u32 LE || nonce: [u8; 32]
//! acceptor_proof = HMAC-SHA256(psk, b"acceptor" || dialer_hello || acceptor_hello)
//! dialer_proof   = HMAC-SHA256(psk, b"dialer"   || dialer_hello || acceptor_hello)
//! session_key    = HKDF-SHA256(ikm = psk, salt = dialer_nonce || acceptor_nonce,
//!                              info = b"tribunal frames" || dialer_id LE || acceptor_id LE)
//! ```
//!
//! Each proof covers both fresh nonces, so a recorded proof is useless in another
//! handshake; the role label keeps one side's proof from being reflected as the other's.
//! The session key depends on both nonces and on which instance dials, so each
//! connection (and each direction between two instances) has its own key.
//!
//! Every byte received is untrusted: nothing here panics on it. Key material (the PSK,
//! proofs' inputs, session keys) is never logged: the structs' `Debug` shows ids only.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::SessionKey;

pub const NONCE_BYTES: usize = 32;
/// magic b"TRBF" (4) + protocol version u16 LE (2) + instance_id u32 LE (4) + nonce (32).
pub const HELLO_BYTES: usize = MAGIC.len() + 2 + 4 + NONCE_BYTES;
pub const PROOF_BYTES: usize = 32;
/// The acceptor's reply: its hello, then its proof.
pub const REPLY_BYTES: usize = HELLO_BYTES + PROOF_BYTES;
pub const PROTOCOL_VERSION: u16 = 1;
/// The shortest PSK accepted. The caller validates the configured PSK with a clear
/// message; reaching the handshake with a shorter one is a bug.
pub const MIN_PSK_BYTES: usize = 16;

const MAGIC: [u8; 4] = *b"TRBF";
const ROLE_ACCEPTOR: &[u8] = b"acceptor";
const ROLE_DIALER: &[u8] = b"dialer";
const SESSION_KEY_INFO: &[u8] = b"tribunal frames";

const _: () = assert!(HELLO_BYTES == 42);

type HmacSha256 = Hmac<Sha256>;

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("handshake message of {got} bytes, expected {expected}")]
    WrongLength { expected: usize, got: usize },
    #[error("hello does not start with the federation magic")]
    BadMagic,
    #[error("unsupported protocol version {0} (this instance speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    #[error("instance {0} is not a configured peer")]
    UnknownPeer(u32),
    #[error("dialed instance {expected} but instance {got} answered")]
    UnexpectedPeer { expected: u32, got: u32 },
    #[error("peer's proof does not verify (different pre-shared key?)")]
    BadProof,
}

impl HandshakeError {
    /// A stable label for metrics (spec: Federation.HandshakeRejected).
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::WrongLength { .. } => "wrong_length",
            HandshakeError::BadMagic => "bad_magic",
            HandshakeError::UnsupportedVersion(_) => "unsupported_version",
            HandshakeError::UnknownPeer(_) => "unknown_peer",
            HandshakeError::UnexpectedPeer { .. } => "unexpected_peer",
            HandshakeError::BadProof => "bad_proof",
        }
    }
}

/// A hello, parsed and checked for magic and version.
struct Hello {
    instance_id: u32,
    nonce: [u8; NONCE_BYTES],
}

fn encode_hello(instance_id: u32, nonce: &[u8; NONCE_BYTES]) -> [u8; HELLO_BYTES] {
    let mut hello = [0; HELLO_BYTES];
    let (magic, rest) = hello.split_at_mut(MAGIC.len());
    let (version, rest) = rest.split_at_mut(2);
    let (id, nonce_out) = rest.split_at_mut(4);
    magic.copy_from_slice(&MAGIC);
    version.copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    id.copy_from_slice(&instance_id.to_le_bytes());
    nonce_out.copy_from_slice(nonce);
    hello
}

fn decode_hello(hello: &[u8; HELLO_BYTES]) -> Result<Hello, HandshakeError> {
    let (magic, rest) = hello.split_first_chunk::<4>().expect("HELLO_BYTES > 4");
    let (version, rest) = rest.split_first_chunk::<2>().expect("HELLO_BYTES > 6");
    let (id, rest) = rest.split_first_chunk::<4>().expect("HELLO_BYTES > 10");
    let nonce: [u8; NONCE_BYTES] = rest.try_into().expect("HELLO_BYTES = 10 + NONCE_BYTES");
    if *magic != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let version = u16::from_le_bytes(*version);
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::UnsupportedVersion(version));
    }
    Ok(Hello { instance_id: u32::from_le_bytes(*id), nonce })
}

/// Checks a received message's length before anything else reads it.
fn exact<const N: usize>(bytes: &[u8]) -> Result<&[u8; N], HandshakeError> {
    bytes.try_into().map_err(|_| HandshakeError::WrongLength { expected: N, got: bytes.len() })
}

fn transcript_mac(
    psk: &[u8],
    role: &[u8],
    dialer_hello: &[u8; HELLO_BYTES],
    acceptor_hello: &[u8; HELLO_BYTES],
) -> HmacSha256 {
    // HMAC takes keys of any length; only the type's generic signature is fallible.
    let mut mac = HmacSha256::new_from_slice(psk).expect("HMAC accepts any key length");
    mac.update(role);
    mac.update(dialer_hello);
    mac.update(acceptor_hello);
    mac
}

fn prove(
    psk: &[u8],
    role: &[u8],
    dialer_hello: &[u8; HELLO_BYTES],
    acceptor_hello: &[u8; HELLO_BYTES],
) -> [u8; PROOF_BYTES] {
    transcript_mac(psk, role, dialer_hello, acceptor_hello).finalize().into_bytes().into()
}

/// Constant-time: `verify_slice` does not stop at the first differing byte.
fn verify(
    psk: &[u8],
    role: &[u8],
    dialer_hello: &[u8; HELLO_BYTES],
    acceptor_hello: &[u8; HELLO_BYTES],
    proof: &[u8; PROOF_BYTES],
) -> Result<(), HandshakeError> {
    transcript_mac(psk, role, dialer_hello, acceptor_hello).verify_slice(proof).map_err(|_| HandshakeError::BadProof)
}

fn session_key(psk: &[u8], dialer: &Hello, acceptor: &Hello) -> SessionKey {
    let mut salt = [0; 2 * NONCE_BYTES];
    salt[..NONCE_BYTES].copy_from_slice(&dialer.nonce);
    salt[NONCE_BYTES..].copy_from_slice(&acceptor.nonce);
    let mut info = [0; SESSION_KEY_INFO.len() + 8];
    info[..SESSION_KEY_INFO.len()].copy_from_slice(SESSION_KEY_INFO);
    info[SESSION_KEY_INFO.len()..][..4].copy_from_slice(&dialer.instance_id.to_le_bytes());
    info[SESSION_KEY_INFO.len() + 4..].copy_from_slice(&acceptor.instance_id.to_le_bytes());

    let mut key = [0; 32];
    Hkdf::<Sha256>::new(Some(&salt), psk).expand(&info, &mut key).expect("HKDF-SHA256 expands up to 255 * 32 bytes");
    key
}

fn assert_psk(psk: &[u8]) {
    assert!(psk.len() >= MIN_PSK_BYTES, "the caller validates the PSK length");
}

/// The dialer (the sending side of a connection). Holds the PSK: `Debug` shows ids only.
pub struct Dialer {
    psk: Vec<u8>,
    own_id: u32,
    expected_peer_id: u32,
    hello: [u8; HELLO_BYTES],
}

impl core::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Dialer")
            .field("own_id", &self.own_id)
            .field("expected_peer_id", &self.expected_peer_id)
            .finish_non_exhaustive()
    }
}

impl Dialer {
    /// Returns the dialer and its hello (HELLO_BYTES) to write first. `nonce` must be
    /// fresh random bytes (it makes the proofs and the session key unique to this
    /// connection); `psk` at least MIN_PSK_BYTES, validated by the caller.
    pub fn new(
        psk: &[u8],
        own_id: u32,
        expected_peer_id: u32,
        nonce: [u8; NONCE_BYTES],
    ) -> (Dialer, [u8; HELLO_BYTES]) {
        assert_psk(psk);
        assert_ne!(own_id, expected_peer_id, "an instance never dials itself");
        let hello = encode_hello(own_id, &nonce);
        (Dialer { psk: psk.to_vec(), own_id, expected_peer_id, hello }, hello)
    }

    /// Input: the acceptor's reply, exactly HELLO_BYTES + PROOF_BYTES (its hello, then
    /// its proof). Verifies the acceptor's hello (magic, version, instance id ==
    /// expected_peer_id) and proof; returns the dialer's proof to write and the session
    /// key for sealing frames.
    pub fn on_reply(self, reply: &[u8]) -> Result<([u8; PROOF_BYTES], SessionKey), HandshakeError> {
        let reply = exact::<REPLY_BYTES>(reply)?;
        let (acceptor_hello, acceptor_proof) =
            reply.split_first_chunk::<HELLO_BYTES>().expect("REPLY_BYTES > HELLO_BYTES");
        let acceptor_proof: &[u8; PROOF_BYTES] =
            acceptor_proof.try_into().expect("REPLY_BYTES = HELLO_BYTES + PROOF_BYTES");

        let acceptor = decode_hello(acceptor_hello)?;
        if acceptor.instance_id != self.expected_peer_id {
            return Err(HandshakeError::UnexpectedPeer { expected: self.expected_peer_id, got: acceptor.instance_id });
        }
        // Also rejects our own hello reflected back: its id is ours, never the expected.
        assert_ne!(acceptor.instance_id, self.own_id);
        verify(&self.psk, ROLE_ACCEPTOR, &self.hello, acceptor_hello, acceptor_proof)?;

        let dialer = decode_hello(&self.hello).expect("our own hello is valid");
        let proof = prove(&self.psk, ROLE_DIALER, &self.hello, acceptor_hello);
        Ok((proof, session_key(&self.psk, &dialer, &acceptor)))
    }
}

/// The accepting side (receives frames). Holds the PSK: `Debug` shows ids only.
pub struct Acceptor {
    psk: Vec<u8>,
    own_id: u32,
    hello: [u8; HELLO_BYTES],
    /// The dialer's hello, once `on_hello` accepted it.
    dialer_hello: Option<[u8; HELLO_BYTES]>,
}

impl core::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let peer_id =
            self.dialer_hello.as_ref().map(|hello| u32::from_le_bytes([hello[6], hello[7], hello[8], hello[9]]));
        f.debug_struct("Acceptor").field("own_id", &self.own_id).field("peer_id", &peer_id).finish_non_exhaustive()
    }
}

impl Acceptor {
    /// `nonce` must be fresh random bytes; `psk` at least MIN_PSK_BYTES, validated by
    /// the caller.
    pub fn new(psk: &[u8], own_id: u32, nonce: [u8; NONCE_BYTES]) -> Acceptor {
        assert_psk(psk);
        Acceptor { psk: psk.to_vec(), own_id, hello: encode_hello(own_id, &nonce), dialer_hello: None }
    }

    /// Input: the dialer's hello (HELLO_BYTES). `is_known_peer(id)` says whether the id
    /// is in --peers (and not our own id; our own id is refused here too). Returns the
    /// reply to write: our hello + our proof (REPLY_BYTES). Called once; after an error
    /// the connection is closed.
    pub fn on_hello(
        &mut self,
        hello: &[u8],
        is_known_peer: impl Fn(u32) -> bool,
    ) -> Result<[u8; REPLY_BYTES], HandshakeError> {
        assert!(self.dialer_hello.is_none(), "on_hello is called once per connection");
        let hello = exact::<HELLO_BYTES>(hello)?;
        let dialer = decode_hello(hello)?;
        if dialer.instance_id == self.own_id || !is_known_peer(dialer.instance_id) {
            return Err(HandshakeError::UnknownPeer(dialer.instance_id));
        }
        self.dialer_hello = Some(*hello);

        let mut reply = [0; REPLY_BYTES];
        reply[..HELLO_BYTES].copy_from_slice(&self.hello);
        reply[HELLO_BYTES..].copy_from_slice(&prove(&self.psk, ROLE_ACCEPTOR, hello, &self.hello));
        Ok(reply)
    }

    /// Input: the dialer's proof (PROOF_BYTES). Returns (peer instance id, session key
    /// for opening frames). Only after a successful `on_hello`.
    pub fn on_proof(self, proof: &[u8]) -> Result<(u32, SessionKey), HandshakeError> {
        let dialer_hello = self.dialer_hello.expect("on_proof follows a successful on_hello");
        let proof = exact::<PROOF_BYTES>(proof)?;
        verify(&self.psk, ROLE_DIALER, &dialer_hello, &self.hello, proof)?;

        let dialer = decode_hello(&dialer_hello).expect("on_hello checked the dialer's hello");
        let acceptor = decode_hello(&self.hello).expect("our own hello is valid");
        assert_ne!(dialer.instance_id, self.own_id);
        Ok((dialer.instance_id, session_key(&self.psk, &dialer, &acceptor)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Frame, FrameOpener, FrameSealer, MAX_FRAME_BYTES};
    use proptest::prelude::*;

    const PSK: &[u8] = b"a pre-shared key of 32 bytes....";
    const DIALER_NONCE: [u8; NONCE_BYTES] = [0x11; NONCE_BYTES];
    const ACCEPTOR_NONCE: [u8; NONCE_BYTES] = [0x22; NONCE_BYTES];

    fn peers_1_2_3(id: u32) -> bool {
        (1..=3).contains(&id)
    }

    /// A full handshake: dialer `dialer_id` expecting `expected_id`, acceptor `acceptor_id`.
    fn handshake(
        dialer_psk: &[u8],
        acceptor_psk: &[u8],
        dialer_id: u32,
        expected_id: u32,
        acceptor_id: u32,
    ) -> Result<(SessionKey, u32, SessionKey), HandshakeError> {
        let (dialer, hello) = Dialer::new(dialer_psk, dialer_id, expected_id, DIALER_NONCE);
        let mut acceptor = Acceptor::new(acceptor_psk, acceptor_id, ACCEPTOR_NONCE);
        let reply = acceptor.on_hello(&hello, peers_1_2_3)?;
        let (proof, dialer_key) = dialer.on_reply(&reply)?;
        let (peer_id, acceptor_key) = acceptor.on_proof(&proof)?;
        Ok((dialer_key, peer_id, acceptor_key))
    }

    // spec: Handshake.MutualProof
    #[test]
    fn success_gives_equal_session_keys() {
        let (dialer_key, peer_id, acceptor_key) = handshake(PSK, PSK, 1, 2, 2).unwrap();
        assert_eq!(dialer_key, acceptor_key);
        assert_eq!(peer_id, 1);

        // The other direction between the same two instances has another key.
        let (reverse_key, peer_id, _) = handshake(PSK, PSK, 2, 1, 1).unwrap();
        assert_eq!(peer_id, 2);
        assert_ne!(reverse_key, dialer_key);
    }

    // spec: Handshake.MutualProof (session keys from HKDF over both nonces)
    #[test]
    fn session_key_depends_on_both_nonces() {
        let key = |dialer_nonce, acceptor_nonce| {
            let (dialer, hello) = Dialer::new(PSK, 1, 2, dialer_nonce);
            let mut acceptor = Acceptor::new(PSK, 2, acceptor_nonce);
            let reply = acceptor.on_hello(&hello, peers_1_2_3).unwrap();
            dialer.on_reply(&reply).unwrap().1
        };
        let base = key(DIALER_NONCE, ACCEPTOR_NONCE);
        assert_ne!(base, key([0x33; NONCE_BYTES], ACCEPTOR_NONCE));
        assert_ne!(base, key(DIALER_NONCE, [0x33; NONCE_BYTES]));
    }

    // spec: Handshake.MutualProof
    #[test]
    fn wrong_psk_is_a_bad_proof_on_both_sides() {
        let other_psk: &[u8] = b"another pre-shared key, 32 bytes";
        // The dialer checks first: the acceptor's proof fails.
        assert_eq!(handshake(PSK, other_psk, 1, 2, 2), Err(HandshakeError::BadProof));

        // The acceptor side: a dialer proof made with another PSK over the same
        // transcript (same hellos, same nonces).
        let (dialer, hello) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
        let mut honest = Acceptor::new(PSK, 2, ACCEPTOR_NONCE);
        let (proof, _) = dialer.on_reply(&honest.on_hello(&hello, peers_1_2_3).unwrap()).unwrap();
        let mut wrong = Acceptor::new(other_psk, 2, ACCEPTOR_NONCE);
        let reply = wrong.on_hello(&hello, peers_1_2_3).unwrap();
        assert_eq!(reply[..HELLO_BYTES], honest.hello);
        let error = wrong.on_proof(&proof).unwrap_err();
        assert_eq!(error, HandshakeError::BadProof);
        assert_eq!(error.reason(), "bad_proof");
    }

    // spec: Handshake.MutualProof (role labels, fresh nonces)
    #[test]
    fn proofs_do_not_transfer() {
        // The acceptor's own proof reflected back as the dialer's.
        let (_, hello) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
        let mut acceptor = Acceptor::new(PSK, 2, ACCEPTOR_NONCE);
        let reply = acceptor.on_hello(&hello, peers_1_2_3).unwrap();
        assert_eq!(acceptor.on_proof(&reply[HELLO_BYTES..]), Err(HandshakeError::BadProof));

        // A dialer proof recorded in one handshake, replayed in one with a fresh nonce.
        let (dialer, hello) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
        let mut acceptor = Acceptor::new(PSK, 2, ACCEPTOR_NONCE);
        let (recorded, _) = dialer.on_reply(&acceptor.on_hello(&hello, peers_1_2_3).unwrap()).unwrap();
        let mut fresh = Acceptor::new(PSK, 2, [0x44; NONCE_BYTES]);
        fresh.on_hello(&hello, peers_1_2_3).unwrap();
        assert_eq!(fresh.on_proof(&recorded), Err(HandshakeError::BadProof));

        // A recorded acceptor reply, replayed to a dialer with a fresh nonce.
        let (dialer, _) = Dialer::new(PSK, 1, 2, [0x55; NONCE_BYTES]);
        let (_, hello) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
        let reply = Acceptor::new(PSK, 2, ACCEPTOR_NONCE).on_hello(&hello, peers_1_2_3).unwrap();
        assert_eq!(dialer.on_reply(&reply), Err(HandshakeError::BadProof));
    }

    // spec: Handshake.PeerIdentity
    #[test]
    fn unknown_peer_is_refused() {
        let error = handshake(PSK, PSK, 9, 2, 2).unwrap_err();
        assert_eq!(error, HandshakeError::UnknownPeer(9));
        assert_eq!(error.reason(), "unknown_peer");
        // Our own id, even if the predicate wrongly accepts it.
        let (_, hello) = Dialer::new(PSK, 2, 3, DIALER_NONCE);
        let mut acceptor = Acceptor::new(PSK, 2, ACCEPTOR_NONCE);
        assert_eq!(acceptor.on_hello(&hello, |_| true), Err(HandshakeError::UnknownPeer(2)));
    }

    // spec: Handshake.PeerIdentity
    #[test]
    fn dialer_refuses_an_unexpected_peer() {
        let error = handshake(PSK, PSK, 1, 2, 3).unwrap_err();
        assert_eq!(error, HandshakeError::UnexpectedPeer { expected: 2, got: 3 });
        assert_eq!(error.reason(), "unexpected_peer");
    }

    // spec: Handshake.PeerIdentity: a hello reflected back to its dialer carries the
    // dialer's own id, never the expected one.
    #[test]
    fn dialer_refuses_its_own_hello_reflected() {
        let (dialer, hello) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
        let mut reply = hello.to_vec();
        reply.extend_from_slice(&[0; PROOF_BYTES]);
        assert_eq!(dialer.on_reply(&reply), Err(HandshakeError::UnexpectedPeer { expected: 2, got: 1 }));
    }

    // spec: Handshake.MutualProof (fixed-size messages)
    #[test]
    fn truncated_messages_are_wrong_length() {
        let (dialer, hello) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
        let mut acceptor = Acceptor::new(PSK, 2, ACCEPTOR_NONCE);
        let error = acceptor.on_hello(&hello[..HELLO_BYTES - 1], peers_1_2_3).unwrap_err();
        assert_eq!(error, HandshakeError::WrongLength { expected: HELLO_BYTES, got: HELLO_BYTES - 1 });
        assert_eq!(error.reason(), "wrong_length");

        let mut acceptor = Acceptor::new(PSK, 2, ACCEPTOR_NONCE);
        let reply = acceptor.on_hello(&hello, peers_1_2_3).unwrap();
        let (dialer_again, _) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
        assert_eq!(
            dialer_again.on_reply(&reply[..REPLY_BYTES - 1]),
            Err(HandshakeError::WrongLength { expected: REPLY_BYTES, got: REPLY_BYTES - 1 })
        );
        let mut longer = reply.to_vec();
        longer.push(0);
        let (dialer_again, _) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
        assert_eq!(
            dialer_again.on_reply(&longer),
            Err(HandshakeError::WrongLength { expected: REPLY_BYTES, got: REPLY_BYTES + 1 })
        );

        let (proof, _) = dialer.on_reply(&reply).unwrap();
        assert_eq!(
            acceptor.on_proof(&proof[..PROOF_BYTES - 1]),
            Err(HandshakeError::WrongLength { expected: PROOF_BYTES, got: PROOF_BYTES - 1 })
        );
    }

    // spec: Handshake.MutualProof (hello layout)
    #[test]
    fn bad_magic_and_version_are_refused() {
        let (_, hello) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
        assert_eq!(&hello[..4], b"TRBF");
        assert_eq!(hello[4..6], PROTOCOL_VERSION.to_le_bytes());
        assert_eq!(hello[6..10], 1u32.to_le_bytes());
        assert_eq!(hello[10..], DIALER_NONCE);

        let mut bad_magic = hello;
        bad_magic[0] = b'X';
        let mut acceptor = Acceptor::new(PSK, 2, ACCEPTOR_NONCE);
        assert_eq!(acceptor.on_hello(&bad_magic, peers_1_2_3), Err(HandshakeError::BadMagic));

        let mut bad_version = hello;
        bad_version[4..6].copy_from_slice(&7u16.to_le_bytes());
        let mut acceptor = Acceptor::new(PSK, 2, ACCEPTOR_NONCE);
        assert_eq!(acceptor.on_hello(&bad_version, peers_1_2_3), Err(HandshakeError::UnsupportedVersion(7)));

        // The same checks on the acceptor's hello, at the dialer.
        let mut acceptor = Acceptor::new(PSK, 2, ACCEPTOR_NONCE);
        let reply = acceptor.on_hello(&hello, peers_1_2_3).unwrap();
        let mut bad_reply = reply;
        bad_reply[5] = 1;
        let (dialer, _) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
        assert_eq!(dialer.on_reply(&bad_reply), Err(HandshakeError::UnsupportedVersion(0x0101)));
    }

    // spec: Handshake.MutualProof: any change to the transcript fails a proof.
    #[test]
    fn tampered_reply_fails() {
        let (_, hello) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
        let reply = Acceptor::new(PSK, 2, ACCEPTOR_NONCE).on_hello(&hello, peers_1_2_3).unwrap();
        for bit in 0..REPLY_BYTES * 8 {
            let mut tampered = reply;
            tampered[bit / 8] ^= 1 << (bit % 8);
            let (dialer, _) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
            assert!(dialer.on_reply(&tampered).is_err(), "bit {bit}");
        }
    }

    // spec: Handshake.MutualProof, then FrameCodec.WireLayout with the session key.
    #[test]
    fn session_key_seals_and_opens_frames() {
        let (dialer_key, peer_id, acceptor_key) = handshake(PSK, PSK, 3, 1, 1).unwrap();
        assert_eq!(peer_id, 3);
        let mut sealer = FrameSealer::new(dialer_key);
        let mut opener = FrameOpener::new(acceptor_key, MAX_FRAME_BYTES);
        let frames = [
            Frame::Readiness { ready: true, quarantined: false, publisher: false, incarnation: 1 },
            Frame::Watermark { partition: 0, durable_end: 10, certified_end: 8 },
            Frame::Copy { partition: 0, offset: 9, output: vec![1, 2, 3] },
        ];
        let mut buf = Vec::new();
        for frame in &frames {
            sealer.seal(frame, &mut buf).unwrap();
        }
        let mut rest = &buf[..];
        for frame in &frames {
            let (opened, consumed_bytes) = opener.open(rest).unwrap().unwrap();
            assert_eq!(&opened, frame);
            rest = &rest[consumed_bytes..];
        }
        assert!(rest.is_empty());

        // Another connection's key does not open these frames.
        let (other_key, _, _) = handshake(PSK, PSK, 2, 1, 1).unwrap();
        assert_eq!(FrameOpener::new(other_key, MAX_FRAME_BYTES).open(&buf), Err(crate::wire::WireError::BadMac));
    }

    #[test]
    fn debug_hides_key_material() {
        let psk = [0xC3; 32];
        let (dialer, hello) = Dialer::new(&psk, 1, 2, DIALER_NONCE);
        let mut acceptor = Acceptor::new(&psk, 2, ACCEPTOR_NONCE);
        acceptor.on_hello(&hello, peers_1_2_3).unwrap();
        let shown = format!("{dialer:?} {acceptor:?}");
        assert!(!shown.contains("195") && !shown.contains("17") && !shown.contains("34"), "{shown}");
        assert!(shown.contains("peer_id: Some(1)"), "{shown}");
    }

    proptest! {
        // spec: Handshake.MutualProof: arbitrary bytes at every step never panic.
        #[test]
        fn arbitrary_bytes_never_panic(
            hello in proptest::collection::vec(any::<u8>(), 0..64),
            reply in proptest::collection::vec(any::<u8>(), 0..96),
            proof in proptest::collection::vec(any::<u8>(), 0..48),
        ) {
            let mut acceptor = Acceptor::new(PSK, 2, ACCEPTOR_NONCE);
            if acceptor.on_hello(&hello, |_| true).is_ok() {
                prop_assert!(acceptor.on_proof(&proof).is_err());
            }
            let (dialer, _) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
            let _ = dialer.on_reply(&reply);
        }

        // The same with the right sizes and a valid magic and version, so the checks
        // past the length are reached.
        #[test]
        fn arbitrary_well_formed_messages_never_panic(
            id in any::<u32>(),
            nonce in any::<[u8; NONCE_BYTES]>(),
            proof in any::<[u8; PROOF_BYTES]>(),
        ) {
            let hello = encode_hello(id, &nonce);
            let mut acceptor = Acceptor::new(PSK, 2, ACCEPTOR_NONCE);
            match acceptor.on_hello(&hello, peers_1_2_3) {
                Ok(_) => prop_assert_eq!(acceptor.on_proof(&proof), Err(HandshakeError::BadProof)),
                Err(error) => prop_assert_eq!(error, HandshakeError::UnknownPeer(id)),
            }
            let mut reply = hello.to_vec();
            reply.extend_from_slice(&proof);
            let (dialer, _) = Dialer::new(PSK, 1, 2, DIALER_NONCE);
            let expected = if id == 2 {
                HandshakeError::BadProof
            } else {
                HandshakeError::UnexpectedPeer { expected: 2, got: id }
            };
            prop_assert_eq!(dialer.on_reply(&reply), Err(expected));
        }
    }
}
