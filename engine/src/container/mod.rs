//! Segment containers: the sans-IO state machine (`core`), its read cache and file
//! indexes, and the glommio driver that gives it direct-IO log files (`io`).

pub mod cache;
pub mod core;
pub mod index;
pub mod io;
