//! Segment containers: the sans-IO state machine (`core`), its read cache and file
//! indexes, the glommio driver that gives it direct-IO log files (`io`), and its tier-2
//! mover and tier-2 reads (`mover`), freeing log files no segment needs (`freeing`), a segment's tier-2 chunk list (`chunks`),
//! per-segment append rates for auto-scaling (`rates`), and the log scrub (`scrub`).

pub mod cache;
pub mod chunks;
pub mod core;
mod freeing;
pub mod handoff;
mod image;
pub mod index;
pub mod io;
pub mod mover;
pub mod rates;
pub mod scrub;
