//! Tribunal federation: the Clerk, the wire protocol, peer links, and the Publisher.
//!
//! Today it holds the Publisher's sans-IO core, which orders durable outputs for the
//! outputs topic. Certification across instances (the Clerk) arrives with issue 5; the
//! Publisher will then be fed certified outputs instead of durable ones.

pub mod publisher;
