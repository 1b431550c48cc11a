//! Tribunal federation: the Clerk, the wire protocol and peer links.
//!
//! Not built yet: certification across instances arrives with issue 5. The crate
//! exists so that the workspace has its final shape and its dependency graph
//! (`engine` -> `federation` -> `shards`) is fixed from the start.
