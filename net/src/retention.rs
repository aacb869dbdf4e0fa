//! Retention policies of a stream, as carried in control messages and stream records, with
//! the text form the CLI takes and prints: `none`, `time:MIN[,MAX]` (durations such as
//! `90s`, `30m`, `12h`, `7d`), `size:MIN[,MAX]` (sizes such as `512K`, `64M`, `10G`).
//! Retention keeps at least MIN of a stream; once more than MAX (default: MIN) is held, the
//! stream is truncated back to about MIN, at an event boundary.

use rkyv::{Archive, Deserialize, Serialize};

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retention {
    #[default]
    None,
    /// Keep data for at least `min_ms`; truncate once the oldest is older than `max_ms`.
    Time { min_ms: u64, max_ms: u64 },
    /// Keep at least `min_bytes`; truncate once more than `max_bytes` are held.
    Size { min_bytes: u64, max_bytes: u64 },
}

fn parse_with_units(s: &str, units: &[(&str, u64)], what: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a {what}"))?;
    let mult = units.iter().find(|(u, _)| u.eq_ignore_ascii_case(unit)).map(|(_, m)| *m).ok_or_else(|| {
        let names: Vec<&str> = units.iter().map(|(u, _)| *u).filter(|u| !u.is_empty()).collect();
        format!("'{s}': unknown unit '{unit}' for a {what} (use {})", names.join(", "))
    })?;
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

const TIME_UNITS: &[(&str, u64)] = &[("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000)];
const SIZE_UNITS: &[(&str, u64)] = &[("", 1), ("b", 1), ("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30), ("t", 1 << 40)];
/// The units `Display` writes (largest first; each value in the largest that divides it).
const TIME_SHOWN: &[(&str, u64)] = &[("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)];
const SIZE_SHOWN: &[(&str, u64)] = &[("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("", 1)];

/// `n` in the largest of `units` that divides it exactly, as `parse` reads it back.
fn with_unit(n: u64, units: &[(&str, u64)]) -> String {
    // 0 (never a valid limit) in the smallest unit.
    let unit = units.iter().find(|(_, m)| n > 0 && n.is_multiple_of(*m)).or(units.last());
    let (name, mult) = unit.copied().unwrap_or(("", 1));
    format!("{}{name}", n / mult)
}

impl Retention {
    /// Parses `none`, `time:MIN[,MAX]` or `size:MIN[,MAX]`.
    pub fn parse(s: &str) -> Result<Retention, String> {
        if s == "none" {
            return Ok(Retention::None);
        }
        let (kind, limits) =
            s.split_once(':').ok_or_else(|| format!("'{s}': expected none, time:MIN[,MAX] or size:MIN[,MAX]"))?;
        let (min, max) = match limits.split_once(',') {
            Some((a, b)) => (a, Some(b)),
            None => (limits, None),
        };
        let units = match kind {
            "time" => (TIME_UNITS, "duration (e.g. 90s, 30m, 12h, 7d)"),
            "size" => (SIZE_UNITS, "size (e.g. 512K, 64M, 10G)"),
            _ => return Err(format!("'{s}': retention is none, time:MIN[,MAX] or size:MIN[,MAX]")),
        };
        let min = parse_with_units(min, units.0, units.1)?;
        let max = match max {
            Some(m) => parse_with_units(m, units.0, units.1)?,
            None => min,
        };
        if min == 0 || max < min {
            return Err(format!("'{s}': need 0 < MIN <= MAX"));
        }
        Ok(if kind == "time" {
            Retention::Time { min_ms: min, max_ms: max }
        } else {
            Retention::Size { min_bytes: min, max_bytes: max }
        })
    }
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Retention::None => write!(f, "none"),
            Retention::Time { min_ms, max_ms } => {
                write!(f, "time:{},{}", with_unit(*min_ms, TIME_SHOWN), with_unit(*max_ms, TIME_SHOWN))
            }
            Retention::Size { min_bytes, max_bytes } => {
                write!(f, "size:{},{}", with_unit(*min_bytes, SIZE_SHOWN), with_unit(*max_bytes, SIZE_SHOWN))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Retention;

    #[test]
    fn parse() {
        assert_eq!(Retention::parse("none"), Ok(Retention::None));
        assert_eq!(Retention::parse("time:90s"), Ok(Retention::Time { min_ms: 90_000, max_ms: 90_000 }));
        assert_eq!(Retention::parse("size:64M,1G"), Ok(Retention::Size { min_bytes: 64 << 20, max_bytes: 1 << 30 }));
        assert_eq!(Retention::parse("size:100"), Ok(Retention::Size { min_bytes: 100, max_bytes: 100 }));
        for bad in ["time", "time:", "time:5x", "size:2M,1M", "size:0", "speed:3", "time:1h,"] {
            assert!(Retention::parse(bad).is_err(), "{bad}");
        }
        let r = Retention::parse("time:1m,2h").unwrap();
        assert_eq!(Retention::parse(&r.to_string()), Ok(r));
        let r = Retention::parse("size:1k,2k").unwrap();
        assert_eq!(Retention::parse(&r.to_string()), Ok(r));
    }

    #[test]
    fn shown_in_the_largest_exact_unit_and_read_back() {
        let shown = |s: &str| Retention::parse(s).unwrap().to_string();
        assert_eq!(shown("size:8G,10G"), "size:8G,10G");
        assert_eq!(shown("size:1536M"), "size:1536M,1536M");
        assert_eq!(shown("size:1025"), "size:1025,1025");
        assert_eq!(shown("size:1024K,3T"), "size:1M,3T");
        assert_eq!(shown("time:12h,7d"), "time:12h,7d");
        assert_eq!(shown("time:1500ms,90s"), "time:1500ms,90s");
        assert_eq!(shown("time:120m"), "time:2h,2h");
        for s in ["size:1025,4097", "time:61s,25h", "size:3T", "time:1ms"] {
            let r = Retention::parse(s).unwrap();
            assert_eq!(Retention::parse(&r.to_string()), Ok(r), "{s}");
        }
    }
}
