//! Segment containers: the sans-IO state machine (`core`), its read cache and file
//! indexes, the glommio driver that gives it direct-IO log files (`io`), and its tier-2
//! mover and tier-2 reads (`mover`), and per-segment append rates for auto-scaling (`rates`).

pub mod cache;
pub mod core;
pub mod handoff;
mod image;
pub mod index;
pub mod io;
pub mod mover;
pub mod rates;
