//! Scaling policies of a stream, as carried in control messages and stream records, with
//! the text form the CLI takes and prints: `fixed:N`, `events:RATE,FACTOR,MIN` (events per
//! second per segment) and `bytes:KBPS,FACTOR,MIN` (KiB per second per segment). Under an
//! automatic policy a segment above the target rate splits into up to FACTOR parts, and
//! adjacent segments well below it merge, never below MIN segments.

use rkyv::{Archive, Deserialize, Serialize};
use std::fmt;

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalingPolicy {
    /// A fixed number of segments; only manual scaling changes it.
    Fixed { segments: u32 },
    /// Keep each segment near `events_per_s`.
    ByEventRate { events_per_s: u32, factor: u32, min_segments: u32 },
    /// Keep each segment near `kib_per_s` KiB per second.
    ByByteRate { kib_per_s: u32, factor: u32, min_segments: u32 },
}

impl Default for ScalingPolicy {
    fn default() -> Self {
        ScalingPolicy::Fixed { segments: 1 }
    }
}

impl ScalingPolicy {
    /// Parses `fixed:N`, `events:RATE,FACTOR,MIN` or `bytes:KBPS,FACTOR,MIN`.
    pub fn parse(s: &str) -> Result<ScalingPolicy, String> {
        let usage = "expected fixed:N, events:RATE,FACTOR,MIN or bytes:KBPS,FACTOR,MIN";
        let (kind, args) = s.split_once(':').ok_or_else(|| format!("'{s}': {usage}"))?;
        let nums: Vec<u32> = args
            .split(',')
            .map(|a| a.trim().parse::<u32>().map_err(|_| format!("'{s}': '{a}' is not a whole number")))
            .collect::<Result<_, _>>()?;
        let policy = match (kind, nums.as_slice()) {
            ("fixed", &[segments]) => ScalingPolicy::Fixed { segments },
            ("events", &[events_per_s, factor, min_segments]) => {
                ScalingPolicy::ByEventRate { events_per_s, factor, min_segments }
            }
            ("bytes", &[kib_per_s, factor, min_segments]) => {
                ScalingPolicy::ByByteRate { kib_per_s, factor, min_segments }
            }
            _ => return Err(format!("'{s}': {usage}")),
        };
        policy.validate().map_err(|e| format!("'{s}': {e}"))?;
        Ok(policy)
    }

    /// Checks the numbers: a positive target, a factor of 2 to 64, 1 to 1024 segments.
    pub fn validate(&self) -> Result<(), String> {
        let (target, factor, min) = match *self {
            ScalingPolicy::Fixed { segments } => (1, 2, segments),
            ScalingPolicy::ByEventRate { events_per_s, factor, min_segments } => (events_per_s, factor, min_segments),
            ScalingPolicy::ByByteRate { kib_per_s, factor, min_segments } => (kib_per_s, factor, min_segments),
        };
        if target == 0 {
            return Err("the target rate must be positive".into());
        }
        if !(2..=64).contains(&factor) {
            return Err(format!("the scale factor is 2 to 64, not {factor}"));
        }
        if !(1..=1024).contains(&min) {
            return Err(format!("a stream has 1 to 1024 segments, not {min}"));
        }
        Ok(())
    }

    /// The segments a new stream starts with.
    pub fn initial_segments(&self) -> u32 {
        match *self {
            ScalingPolicy::Fixed { segments } => segments,
            ScalingPolicy::ByEventRate { min_segments, .. } | ScalingPolicy::ByByteRate { min_segments, .. } => {
                min_segments
            }
        }
    }
}

impl fmt::Display for ScalingPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ScalingPolicy::Fixed { segments } => write!(f, "fixed:{segments}"),
            ScalingPolicy::ByEventRate { events_per_s, factor, min_segments } => {
                write!(f, "events:{events_per_s},{factor},{min_segments}")
            }
            ScalingPolicy::ByByteRate { kib_per_s, factor, min_segments } => {
                write!(f, "bytes:{kib_per_s},{factor},{min_segments}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_print_and_refuse() {
        for s in ["fixed:4", "events:1000,2,1", "bytes:10240,4,2"] {
            assert_eq!(ScalingPolicy::parse(s).unwrap().to_string(), s);
        }
        for bad in
            ["fixed", "fixed:0", "events:1000,2", "events:0,2,1", "events:10,1,1", "bytes:1,2,0", "x:1", "events:a,2,1"]
        {
            assert!(ScalingPolicy::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(ScalingPolicy::parse("events:5,2,3").unwrap().initial_segments(), 3);
    }
}
