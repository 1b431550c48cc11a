//! The input logs: the embedded local log and Kafka, the doorbell that wakes an idle
//! reader, and the Gateway's appender.

pub mod appender;
pub mod doorbell;
pub mod kafka;
pub mod local;
