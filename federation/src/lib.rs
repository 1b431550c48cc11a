//! Tribunal federation: the Clerk (certification by comparing output copies), the wire
//! protocol between instances (PSK handshake, MAC-sealed rkyv frames) and the publisher.
//! Everything here is sans-IO: the engine's glommio shell moves the bytes.

pub mod clerk;
pub mod handshake;
pub mod publisher;
pub mod wire;
