//! The frame codec between instances, sans-IO: MAC-sealed, length-prefixed rkyv frames
//! (spec: FrameCodec.WireLayout, FrameCodec.OpenValidates).
//!
//! A connection is unidirectional: the dialer only seals, the acceptor only opens. Each
//! connection has its own session key from the handshake (`handshake.rs`), so one key
//! and one sequence counter per connection are enough; the direction is implied by the
//! key, which the handshake derives from both instance ids in dialer, acceptor order.
//!
//! Wire layout of one frame:
//!
//! ```text
//! [length: u32 LE][body: rkyv archive of Frame][mac: 32 bytes]
//! length = body + mac
//! mac    = BLAKE3-keyed(session_key, seq: u64 LE || length: u32 LE || body)
//! ```
//!
//! `seq` counts the frames of the connection from 0 and is not sent: both sides count,
//! so a replayed, reordered or dropped frame fails the MAC without any state on the wire.
//!
//! Every byte received is untrusted. The length is checked before the body is waited
//! for, the MAC (in constant time) before any decoding, and the body is decoded through
//! rkyv's validation (bytecheck). Nothing here panics on received bytes; an error means
//! the stream position can no longer be trusted and the connection must be closed
//! (spec: Federation.InvalidFrameDropped).

pub const MAC_BYTES: usize = 32;
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Default bound on one frame (body + MAC). A Copy frame carries one canonical output,
/// far below this; the bound keeps a peer from making us buffer unbounded bytes.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// A per-connection key, from the handshake.
pub type SessionKey = [u8; 32];

// The length prefix is a u32, so every bound must fit in it.
const _: () = assert!(MAX_FRAME_BYTES <= u32::MAX as usize);
const _: () = assert!(MAX_FRAME_BYTES > MAC_BYTES);
// The sealer serializes the body straight into the caller's buffer, at whatever position
// the buffer has reached, and the opener validates the body in place, at whatever address
// it sits. Both are only sound if the archive has no alignment: the workspace's rkyv
// `unaligned` feature guarantees it, and this fails to compile if that ever changes.
const _: () = assert!(core::mem::align_of::<ArchivedFrame>() == 1);

/// One message on a federation link.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A live copy of one of the sender's durable outputs: the canonical output bytes.
    /// The receiver computes the digest itself, so a copy cannot claim a digest its
    /// bytes do not have.
    Copy { partition: u32, offset: u64, output: Vec<u8> },
    /// Catch-up: the digest (xxh3_128) the sender certified for this offset. The output
    /// bytes are not resent: the receiver only compares digests.
    CertifiedCopy { partition: u32, offset: u64, digest: u128 },
    /// Watermarks as "ends": one past the last offset (0 = none).
    Watermark { partition: u32, durable_end: u64, certified_end: u64 },
    /// Liveness, and per partition one past the last offset the sender knows to be
    /// published (index = partition).
    Heartbeat { published_ends: Vec<u64> },
    Readiness {
        ready: bool,
        quarantined: bool,
        publisher: bool,
        /// The sender's data-dir incarnation (spec: Clerk.RebuiltPeerReadmitted).
        incarnation: u64,
    },
    /// Operator command relayed: lift a quarantine of `instance_id`.
    Readmit { instance_id: u32 },
}

impl Frame {
    /// The bytes of the frame's variable-length part: a lower bound on its body. Lets
    /// `seal` refuse a huge frame before serializing it.
    fn variable_bytes(&self) -> usize {
        match self {
            Frame::Copy { output, .. } => output.len(),
            Frame::Heartbeat { published_ends } => published_ends.len().saturating_mul(core::mem::size_of::<u64>()),
            Frame::CertifiedCopy { .. } | Frame::Watermark { .. } | Frame::Readiness { .. } | Frame::Readmit { .. } => {
                0
            }
        }
    }
}

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {length_bytes} bytes exceeds the bound of {max_bytes}")]
    Oversize { length_bytes: usize, max_bytes: usize },
    #[error("frame too short for its MAC ({length_bytes} bytes)")]
    Truncated { length_bytes: usize },
    #[error("frame MAC does not verify")]
    BadMac,
    #[error("frame body is not a valid frame: {0}")]
    Undecodable(String),
}

impl WireError {
    /// A stable label for metrics (spec: DropReason).
    pub fn reason(&self) -> &'static str {
        match self {
            WireError::Oversize { .. } => "oversize",
            WireError::Truncated { .. } => "truncated",
            WireError::BadMac => "bad_mac",
            WireError::Undecodable(_) => "undecodable",
        }
    }
}

/// The MAC of one frame: BLAKE3 in keyed mode, which is a MAC by design. `keyed` is a
/// hasher already keyed with the session key, cloned per frame.
fn frame_mac(keyed: &blake3::Hasher, seq: u64, length: u32, body: &[u8]) -> blake3::Hash {
    let mut mac = keyed.clone();
    mac.update(&seq.to_le_bytes());
    mac.update(&length.to_le_bytes());
    mac.update(body);
    mac.finalize()
}

fn keyed_mac(key: &SessionKey) -> blake3::Hasher {
    blake3::Hasher::new_keyed(key)
}

/// Seals frames for one connection, in order. Holds the session key, so its `Debug`
/// shows only the counter.
pub struct FrameSealer {
    keyed: blake3::Hasher,
    next_seq: u64,
}

impl core::fmt::Debug for FrameSealer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FrameSealer").field("next_seq", &self.next_seq).finish_non_exhaustive()
    }
}

impl FrameSealer {
    pub fn new(key: SessionKey) -> Self {
        Self { keyed: keyed_mac(&key), next_seq: 0 }
    }

    /// Appends one sealed frame to `out`. Err only if the frame exceeds
    /// `MAX_FRAME_BYTES` (caller bug or huge output); then `out` and the sequence are
    /// unchanged, so the connection stays usable.
    pub fn seal(&mut self, frame: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
        let max_body_bytes = MAX_FRAME_BYTES - MAC_BYTES;
        let variable_bytes = frame.variable_bytes();
        if variable_bytes > max_body_bytes {
            return Err(WireError::Oversize {
                length_bytes: variable_bytes.saturating_add(MAC_BYTES),
                max_bytes: MAX_FRAME_BYTES,
            });
        }

        let frame_start = out.len();
        out.extend_from_slice(&[0; LENGTH_PREFIX_BYTES]);
        let body_start = out.len();
        // The body goes straight into `out` (no scratch copy): the archive is position
        // independent because it has no alignment (asserted above). The arena is rkyv's
        // thread-local one, so a frame costs no allocation once `out` has grown.
        let serialized = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(frame, &mut *out);
        // Serializing into a Vec fails only past rkyv's 32-bit offsets, and the frame is
        // bounded far below them by the check above.
        assert!(serialized.is_ok(), "a frame within MAX_FRAME_BYTES always serializes");
        let body_bytes = out.len() - body_start;
        assert!(body_bytes >= variable_bytes);

        let length_bytes = body_bytes + MAC_BYTES;
        if length_bytes > MAX_FRAME_BYTES {
            out.truncate(frame_start);
            return Err(WireError::Oversize { length_bytes, max_bytes: MAX_FRAME_BYTES });
        }
        let length = u32::try_from(length_bytes).expect("MAX_FRAME_BYTES fits in u32");
        out[frame_start..body_start].copy_from_slice(&length.to_le_bytes());
        let mac = frame_mac(&self.keyed, self.next_seq, length, &out[body_start..]);
        out.extend_from_slice(mac.as_bytes());
        assert_eq!(out.len() - frame_start, LENGTH_PREFIX_BYTES + length_bytes);

        // 2^64 frames take millions of years at any real rate.
        self.next_seq = self.next_seq.checked_add(1).expect("frame sequence overflow");
        Ok(())
    }

    pub fn frames_sealed(&self) -> u64 {
        self.next_seq
    }
}

/// Opens the frames of one connection, in order. Holds the session key, so its `Debug`
/// shows only the counter and the bound.
pub struct FrameOpener {
    keyed: blake3::Hasher,
    next_seq: u64,
    max_frame_bytes: usize,
    /// The first error. After it the stream position is untrusted and the connection
    /// must close; every later `open` returns it again rather than resynchronize.
    failed: Option<WireError>,
}

impl core::fmt::Debug for FrameOpener {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FrameOpener")
            .field("next_seq", &self.next_seq)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl FrameOpener {
    /// `max_frame_bytes` bounds body + MAC; it must leave room for a MAC and fit the u32
    /// length prefix (`MAX_FRAME_BYTES` is the default).
    pub fn new(key: SessionKey, max_frame_bytes: usize) -> Self {
        assert!(max_frame_bytes > MAC_BYTES, "max_frame_bytes must leave room for a body");
        assert!(max_frame_bytes <= u32::MAX as usize, "max_frame_bytes must fit the u32 length prefix");
        Self { keyed: keyed_mac(&key), next_seq: 0, max_frame_bytes, failed: None }
    }

    /// Tries to open the frame at the start of `buf`. Ok(None): incomplete, read more
    /// bytes (but an oversize length prefix is an error as soon as the 4 prefix bytes are
    /// there, before any body is read). Ok(Some((frame, consumed_bytes))). Err: the
    /// connection must be closed.
    pub fn open(&mut self, buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let opened = self.open_unchecked(buf);
        if let Err(error) = &opened {
            self.failed = Some(error.clone());
        }
        opened
    }

    pub fn frames_opened(&self) -> u64 {
        self.next_seq
    }

    fn open_unchecked(&mut self, buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
        let Some((prefix, rest)) = buf.split_first_chunk::<LENGTH_PREFIX_BYTES>() else {
            return Ok(None);
        };
        let length = u32::from_le_bytes(*prefix);
        let length_bytes = length as usize;
        // Both checks need only the prefix: a peer cannot make us wait for (and buffer)
        // a body we will refuse anyway.
        if length_bytes > self.max_frame_bytes {
            return Err(WireError::Oversize { length_bytes, max_bytes: self.max_frame_bytes });
        }
        if length_bytes < MAC_BYTES {
            return Err(WireError::Truncated { length_bytes });
        }
        let Some(sealed) = rest.get(..length_bytes) else {
            return Ok(None);
        };
        let (body, mac) = sealed.split_at(length_bytes - MAC_BYTES);
        assert_eq!(mac.len(), MAC_BYTES);

        // Authenticate before decoding: unauthenticated bytes never reach rkyv.
        // `blake3::Hash` equality is constant-time.
        let mac: [u8; MAC_BYTES] = mac.try_into().expect("split at MAC_BYTES");
        if frame_mac(&self.keyed, self.next_seq, length, body) != blake3::Hash::from_bytes(mac) {
            return Err(WireError::BadMac);
        }
        let frame = rkyv::from_bytes::<Frame, rkyv::rancor::Error>(body)
            .map_err(|error| WireError::Undecodable(error.to_string()))?;

        self.next_seq = self.next_seq.checked_add(1).expect("frame sequence overflow");
        Ok(Some((frame, LENGTH_PREFIX_BYTES + length_bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: SessionKey = [7; 32];

    fn every_variant() -> Vec<Frame> {
        vec![
            Frame::Copy { partition: 3, offset: 1 << 40, output: b"canonical output bytes".to_vec() },
            Frame::Copy { partition: 0, offset: 0, output: Vec::new() },
            Frame::CertifiedCopy { partition: 1, offset: 42, digest: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210 },
            Frame::CertifiedCopy { partition: u32::MAX, offset: u64::MAX, digest: u128::MAX },
            Frame::Watermark { partition: 2, durable_end: 100, certified_end: 90 },
            Frame::Heartbeat { published_ends: vec![5, 0, u64::MAX] },
            Frame::Heartbeat { published_ends: Vec::new() },
            Frame::Readiness { ready: true, quarantined: false, publisher: true, incarnation: 7 },
            Frame::Readiness { ready: false, quarantined: true, publisher: false, incarnation: u64::MAX },
            Frame::Readmit { instance_id: 9 },
        ]
    }

    fn seal_all(frames: &[Frame]) -> Vec<u8> {
        let mut sealer = FrameSealer::new(KEY);
        let mut out = Vec::new();
        for frame in frames {
            sealer.seal(frame, &mut out).unwrap();
        }
        assert_eq!(sealer.frames_sealed(), frames.len() as u64);
        out
    }

    /// Opens every frame in `buf`, which must hold only whole frames.
    fn open_all(opener: &mut FrameOpener, mut buf: &[u8]) -> Result<Vec<Frame>, WireError> {
        let mut frames = Vec::new();
        while !buf.is_empty() {
            let (frame, consumed_bytes) = opener.open(buf)?.expect("only whole frames");
            frames.push(frame);
            buf = &buf[consumed_bytes..];
        }
        Ok(frames)
    }

    /// Seals arbitrary body bytes with a valid MAC, so tests can reach the decoder.
    fn seal_raw_body(key: &SessionKey, seq: u64, body: &[u8]) -> Vec<u8> {
        let length = u32::try_from(body.len() + MAC_BYTES).unwrap();
        let mut out = length.to_le_bytes().to_vec();
        out.extend_from_slice(body);
        out.extend_from_slice(frame_mac(&keyed_mac(key), seq, length, body).as_bytes());
        out
    }

    // spec: FrameCodec.WireLayout
    #[test]
    fn round_trip_every_variant() {
        for frame in every_variant() {
            let sealed = seal_all(std::slice::from_ref(&frame));
            let mut opener = FrameOpener::new(KEY, MAX_FRAME_BYTES);
            let (opened, consumed_bytes) = opener.open(&sealed).unwrap().unwrap();
            assert_eq!(opened, frame);
            assert_eq!(consumed_bytes, sealed.len());
            assert_eq!(opener.frames_opened(), 1);
        }
    }

    // spec: FrameCodec.WireLayout
    #[test]
    fn layout_is_length_body_mac() {
        let frame = Frame::Readmit { instance_id: 4 };
        let mut out = vec![0xAA; 3]; // An odd start: the body is position independent.
        FrameSealer::new(KEY).seal(&frame, &mut out).unwrap();
        assert_eq!(out[..3], [0xAA; 3]);
        let sealed = &out[3..];
        let body = rkyv::to_bytes::<rkyv::rancor::Error>(&frame).unwrap();
        let length = u32::from_le_bytes(sealed[..4].try_into().unwrap()) as usize;
        assert_eq!(length, body.len() + MAC_BYTES);
        assert_eq!(sealed.len(), LENGTH_PREFIX_BYTES + length);
        assert_eq!(&sealed[4..4 + body.len()], body.as_slice());
        assert_eq!(sealed, seal_raw_body(&KEY, 0, &body).as_slice());
    }

    // spec: FrameCodec.WireLayout
    #[test]
    fn frames_back_to_back_in_one_buffer() {
        let frames = every_variant();
        let buf = seal_all(&frames);
        let mut opener = FrameOpener::new(KEY, MAX_FRAME_BYTES);
        assert_eq!(open_all(&mut opener, &buf).unwrap(), frames);
        assert_eq!(opener.frames_opened(), frames.len() as u64);
    }

    // spec: FrameCodec.OpenValidates
    #[test]
    fn byte_at_a_time_is_incomplete_until_whole() {
        let frames = every_variant();
        let buf = seal_all(&frames);
        let mut opener = FrameOpener::new(KEY, MAX_FRAME_BYTES);
        let mut start = 0;
        let mut opened = Vec::new();
        for end in 0..=buf.len() {
            if let Some((frame, consumed_bytes)) = opener.open(&buf[start..end]).unwrap() {
                assert_eq!(start + consumed_bytes, end, "a frame opens exactly when its last byte arrives");
                opened.push(frame);
                start = end;
            }
        }
        assert_eq!(start, buf.len());
        assert_eq!(opened, frames);
    }

    // spec: Federation.InvalidFrameDropped, FrameCodec.OpenValidates
    #[test]
    fn any_flipped_bit_is_an_error() {
        let max_frame_bytes = 4096;
        for frame in every_variant() {
            let sealed = seal_all(std::slice::from_ref(&frame));
            for bit in 0..sealed.len() * 8 {
                let mut buf = sealed.clone();
                buf[bit / 8] ^= 1 << (bit % 8);
                // Pad so that a length flipped upwards (within the bound) is complete:
                // the flip must be an error, not a wait for more bytes.
                buf.resize(LENGTH_PREFIX_BYTES + max_frame_bytes, 0);
                let mut opener = FrameOpener::new(KEY, max_frame_bytes);
                let error = opener.open(&buf).expect_err("a flipped bit never opens");
                if bit < LENGTH_PREFIX_BYTES * 8 {
                    assert!(matches!(
                        error,
                        WireError::BadMac | WireError::Oversize { .. } | WireError::Truncated { .. }
                    ));
                } else {
                    assert_eq!(error, WireError::BadMac);
                }
            }
        }
    }

    // spec: FrameCodec.WireLayout (seq not on the wire), Federation.InvalidFrameDropped
    #[test]
    fn replayed_frame_fails_the_mac() {
        let sealed = seal_all(&[Frame::Readmit { instance_id: 1 }]);
        let mut opener = FrameOpener::new(KEY, MAX_FRAME_BYTES);
        assert!(opener.open(&sealed).unwrap().is_some());
        let error = opener.open(&sealed).unwrap_err();
        assert_eq!(error, WireError::BadMac);
        assert_eq!(error.reason(), "bad_mac");
        assert_eq!(opener.frames_opened(), 1);
    }

    // spec: FrameCodec.WireLayout (seq not on the wire), Federation.InvalidFrameDropped
    #[test]
    fn reordered_or_dropped_frame_fails_the_mac() {
        let mut sealer = FrameSealer::new(KEY);
        let mut first = Vec::new();
        let mut second = Vec::new();
        sealer.seal(&Frame::Readmit { instance_id: 1 }, &mut first).unwrap();
        sealer.seal(&Frame::Readmit { instance_id: 2 }, &mut second).unwrap();

        let mut opener = FrameOpener::new(KEY, MAX_FRAME_BYTES);
        assert_eq!(opener.open(&second), Err(WireError::BadMac));
        // The opener stays failed: the connection must close.
        assert_eq!(opener.open(&first), Err(WireError::BadMac));
    }

    // spec: FrameCodec.OpenValidates
    #[test]
    fn wrong_key_fails_the_mac() {
        let sealed = seal_all(&[Frame::Readmit { instance_id: 1 }]);
        let mut opener = FrameOpener::new([8; 32], MAX_FRAME_BYTES);
        assert_eq!(opener.open(&sealed), Err(WireError::BadMac));
    }

    // spec: Federation.InvalidFrameDropped (an oversize length prefix is rejected before
    // reading the body)
    #[test]
    fn oversize_prefix_rejected_with_only_the_prefix() {
        let mut opener = FrameOpener::new(KEY, MAX_FRAME_BYTES);
        let prefix = u32::try_from(MAX_FRAME_BYTES + 1).unwrap().to_le_bytes();
        assert_eq!(opener.open(&prefix[..3]), Ok(None));
        let error = opener.open(&prefix).unwrap_err();
        assert_eq!(error, WireError::Oversize { length_bytes: MAX_FRAME_BYTES + 1, max_bytes: MAX_FRAME_BYTES });
        assert_eq!(error.reason(), "oversize");

        let mut opener = FrameOpener::new(KEY, MAX_FRAME_BYTES);
        assert!(matches!(opener.open(&u32::MAX.to_le_bytes()), Err(WireError::Oversize { .. })));
    }

    // spec: FrameCodec.OpenValidates
    #[test]
    fn length_shorter_than_a_mac_is_truncated() {
        let mut opener = FrameOpener::new(KEY, MAX_FRAME_BYTES);
        let length = u32::try_from(MAC_BYTES - 1).unwrap();
        let error = opener.open(&length.to_le_bytes()).unwrap_err();
        assert_eq!(error, WireError::Truncated { length_bytes: MAC_BYTES - 1 });
        assert_eq!(error.reason(), "truncated");
    }

    // spec: FrameCodec.OpenValidates (the body is not a valid archive of a known frame)
    #[test]
    fn authenticated_garbage_is_undecodable() {
        for body in [&b""[..], &b"\xff"[..], &[0xff; 64][..]] {
            let sealed = seal_raw_body(&KEY, 0, body);
            let mut opener = FrameOpener::new(KEY, MAX_FRAME_BYTES);
            let error = opener.open(&sealed).unwrap_err();
            assert!(matches!(error, WireError::Undecodable(_)), "{error:?}");
            assert_eq!(error.reason(), "undecodable");
            assert_eq!(opener.frames_opened(), 0);
        }
    }

    #[test]
    fn oversize_frame_is_not_sealed() {
        let mut sealer = FrameSealer::new(KEY);
        let mut out = vec![1, 2, 3];
        let huge = Frame::Copy { partition: 0, offset: 0, output: vec![0; MAX_FRAME_BYTES] };
        assert!(matches!(sealer.seal(&huge, &mut out), Err(WireError::Oversize { .. })));
        // Just past the bound once the fixed part and the MAC are counted: caught after
        // serializing, and `out` is restored.
        let edge = Frame::Copy { partition: 0, offset: 0, output: vec![0; MAX_FRAME_BYTES - MAC_BYTES] };
        assert!(matches!(sealer.seal(&edge, &mut out), Err(WireError::Oversize { .. })));
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(sealer.frames_sealed(), 0);

        // The sealer stays usable, in step with the opener.
        let frame = Frame::Readmit { instance_id: 5 };
        let mut out = Vec::new();
        sealer.seal(&frame, &mut out).unwrap();
        let mut opener = FrameOpener::new(KEY, MAX_FRAME_BYTES);
        assert_eq!(opener.open(&out).unwrap(), Some((frame, out.len())));
    }

    #[test]
    fn largest_copy_within_the_bound_round_trips() {
        let fixed = seal_all(&[Frame::Copy { partition: 0, offset: 0, output: Vec::new() }]).len();
        let output_bytes = MAX_FRAME_BYTES + LENGTH_PREFIX_BYTES - fixed;
        let frame = Frame::Copy { partition: 0, offset: 0, output: vec![0x5A; output_bytes] };
        let sealed = seal_all(std::slice::from_ref(&frame));
        assert_eq!(sealed.len(), LENGTH_PREFIX_BYTES + MAX_FRAME_BYTES);
        let mut opener = FrameOpener::new(KEY, MAX_FRAME_BYTES);
        assert_eq!(opener.open(&sealed).unwrap(), Some((frame, sealed.len())));
    }

    #[test]
    fn debug_hides_the_key() {
        let key = [0xC3; 32];
        let shown = format!("{:?} {:?}", FrameSealer::new(key), FrameOpener::new(key, MAX_FRAME_BYTES));
        assert!(!shown.contains("195") && !shown.to_lowercase().contains("c3"), "{shown}");
    }

    fn any_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (any::<u32>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..512))
                .prop_map(|(partition, offset, output)| Frame::Copy { partition, offset, output }),
            (any::<u32>(), any::<u64>(), any::<u128>()).prop_map(|(partition, offset, digest)| Frame::CertifiedCopy {
                partition,
                offset,
                digest
            }),
            (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(partition, durable_end, certified_end)| {
                Frame::Watermark { partition, durable_end, certified_end }
            }),
            proptest::collection::vec(any::<u64>(), 0..64)
                .prop_map(|published_ends| Frame::Heartbeat { published_ends }),
            (any::<bool>(), any::<bool>(), any::<bool>(), any::<u64>()).prop_map(
                |(ready, quarantined, publisher, incarnation)| Frame::Readiness {
                    ready,
                    quarantined,
                    publisher,
                    incarnation
                }
            ),
            any::<u32>().prop_map(|instance_id| Frame::Readmit { instance_id }),
        ]
    }

    proptest! {
        // spec: FrameCodec.OpenValidates
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..2048), max in 33usize..4096) {
            let mut opener = FrameOpener::new(KEY, max);
            let _ = opener.open(&buf);
            let _ = opener.open(&buf);
        }

        // spec: FrameCodec.OpenValidates: bytes that pass the MAC still go through
        // validation, so a peer holding the key cannot crash us either.
        #[test]
        fn authenticated_arbitrary_body_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let sealed = seal_raw_body(&KEY, 0, &body);
            let mut opener = FrameOpener::new(KEY, MAX_FRAME_BYTES);
            match opener.open(&sealed) {
                Ok(Some((_, consumed_bytes))) => prop_assert_eq!(consumed_bytes, sealed.len()),
                Ok(None) => prop_assert!(false, "a whole frame is never incomplete"),
                Err(error) => prop_assert!(matches!(error, WireError::Undecodable(_))),
            }
        }

        // spec: FrameCodec.OpenValidates: a valid frame with some of its body bytes
        // changed, then authenticated, decodes or is refused, never panics.
        #[test]
        fn authenticated_mutated_frame_never_panics(
            frame in any_frame(),
            mutations in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let mut body = rkyv::to_bytes::<rkyv::rancor::Error>(&frame).unwrap().to_vec();
            for (index, byte) in mutations {
                let len = body.len();
                body[index % len] = byte;
            }
            let sealed = seal_raw_body(&KEY, 0, &body);
            let _ = FrameOpener::new(KEY, MAX_FRAME_BYTES).open(&sealed);
        }

        // spec: FrameCodec.WireLayout
        #[test]
        fn arbitrary_frames_round_trip_in_arbitrary_chunks(
            frames in proptest::collection::vec(any_frame(), 1..16),
            chunk_bytes in 1usize..256,
        ) {
            let buf = seal_all(&frames);
            let mut opener = FrameOpener::new(KEY, MAX_FRAME_BYTES);
            let mut received = Vec::new();
            let mut opened = Vec::new();
            for chunk in buf.chunks(chunk_bytes) {
                received.extend_from_slice(chunk);
                while let Some((frame, consumed_bytes)) = opener.open(&received).unwrap() {
                    opened.push(frame);
                    received.drain(..consumed_bytes);
                }
            }
            prop_assert!(received.is_empty());
            prop_assert_eq!(opened, frames);
        }
    }
}
