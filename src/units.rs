//! Serde helpers for the config's human units: humantime durations (`30s`,
//! `1m 30s`, `250ms`) and byte sizes (`1MiB`, `512KiB`, `1000`), and
//! [`UnitError`], why a value is refused (after the key's path).

use serde::{de, Deserialize, Deserializer, Serializer};
use std::time::Duration;

/// Why a duration or a size of the config is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnitError {
    #[error("invalid duration '{text}': {why} (write e.g. 30s, 1m 30s, 250ms)")]
    Duration {
        text: String,
        why: humantime::DurationError,
    },
    /// Longer than [`duration::MAX`].
    #[error("'{0}' is longer than 365d, the longest duration allowed")]
    TooLong(String),
    #[error("invalid size '{0}' (write e.g. 1MiB, 512KiB or a byte count)")]
    Size(String),
}

/// `#[serde(with = "units::duration")]`
pub mod duration {
    use super::*;

    /// The longest duration any key of the config may hold: 365 days.
    /// Longer is refused at parsing (naming the key), so that no deadline
    /// computed from a configured duration (`Instant + d`, tokio's timers,
    /// Redis expiries) can overflow; keys with a tighter bound have it
    /// checked in `Config::validate`.
    pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(&String::deserialize(d)?).map_err(de::Error::custom)
    }

    /// Parses a humantime duration of at most [`MAX`].
    pub fn parse(text: &str) -> Result<Duration, UnitError> {
        let d = humantime::parse_duration(text.trim()).map_err(|why| UnitError::Duration {
            text: text.into(),
            why,
        })?;
        if d > MAX {
            return Err(UnitError::TooLong(text.into()));
        }
        Ok(d)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Parses `text` as a YAML duration.
        fn parse(text: &str) -> Result<Duration, serde_yaml::Error> {
            deserialize(serde_yaml::Deserializer::from_str(text))
        }

        #[test]
        fn durations_past_a_year_are_refused() {
            assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
            assert_eq!(parse("365d").unwrap(), MAX);
            for absurd in ["365d 1s", "9999999999s", "500000000y"] {
                let e = parse(absurd).unwrap_err().to_string();
                assert!(e.contains("longer than 365d"), "{absurd}: {e}");
            }
            // The longest accepted duration still fits a deadline.
            assert!(std::time::Instant::now().checked_add(MAX).is_some());
            assert!(tokio::time::Instant::now().checked_add(MAX).is_some());
        }
    }
}

/// `#[serde(default, with = "units::optional_duration")]`: a duration that
/// may be left out (`None`), read as [`duration`] reads one.
pub mod optional_duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        duration::deserialize(d).map(Some)
    }
}

/// `#[serde(with = "units::size")]`
pub mod size {
    use super::*;

    pub fn serialize<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*n)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(n),
            Raw::Text(t) => parse(&t).ok_or_else(|| de::Error::custom(UnitError::Size(t))),
        }
    }

    /// Parses `1MiB`, `512 KiB`, `2MB`, `100B` or `1000` into bytes.
    pub fn parse(text: &str) -> Option<u64> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().ok()?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return None,
        };
        n.checked_mul(mult)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn sizes() {
            assert_eq!(super::parse("1MiB"), Some(1 << 20));
            assert_eq!(super::parse("512 KiB"), Some(512 << 10));
            assert_eq!(super::parse("1000"), Some(1000));
            assert_eq!(super::parse("1 parsec"), None);
            assert_eq!(super::parse("MiB"), None);
        }
    }
}
