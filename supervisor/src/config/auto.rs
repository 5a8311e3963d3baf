//! Settings that are "auto" unless the operator fixes them: the memory
//! limits (`soft_limit`, `hard_limit`) and the number of spare workers
//! (`spare_workers`). The pool derives the automatic values once the first
//! worker is Ready (see [`crate::limits`]); a fixed value always wins.
//!
//! In TOML (and on the command line) a limit is `"auto"`, `"off"` or a size
//! (`"1.5GiB"`, or a plain number of bytes); a spare count is `"auto"` or a
//! number.

use std::fmt;
use std::str::FromStr;

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One memory limit as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LimitSetting {
    /// Derived from the first worker's measured baseline and the memory
    /// available to the service.
    #[default]
    Auto,
    /// No limit.
    Off,
    /// This many bytes.
    Fixed(ByteSize),
}

impl LimitSetting {
    /// The fixed value, if the operator set one.
    pub fn fixed(self) -> Option<ByteSize> {
        match self {
            Self::Fixed(bytes) => Some(bytes),
            Self::Auto | Self::Off => None,
        }
    }
}

impl FromStr for LimitSetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "auto" => Ok(Self::Auto),
            "off" | "none" => Ok(Self::Off),
            size => size.parse::<ByteSize>().map(Self::Fixed).map_err(|_| {
                format!("{text:?} is not \"auto\", \"off\" or a size like \"1.5GiB\"")
            }),
        }
    }
}

impl fmt::Display for LimitSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Off => f.write_str("off"),
            Self::Fixed(bytes) => write!(f, "{bytes}"),
        }
    }
}

/// How many loaded workers to hold in reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpareSetting {
    /// One where the memory available holds it next to the workers and a
    /// recycle's replacement; none otherwise.
    #[default]
    Auto,
    /// This many.
    Count(u32),
}

impl FromStr for SpareSetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "auto" => Ok(Self::Auto),
            number => number
                .parse()
                .map(Self::Count)
                .map_err(|_| format!("{text:?} is not \"auto\" or a number of workers")),
        }
    }
}

impl fmt::Display for SpareSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Count(n) => write!(f, "{n}"),
        }
    }
}

/// What TOML may hold for either setting: a word or size, or a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum Written {
    Number(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for LimitSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Written::deserialize(deserializer)? {
            Written::Number(bytes) => Ok(Self::Fixed(ByteSize::b(bytes))),
            Written::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for LimitSetting {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            // Exact bytes: a rounded size would not read back the same.
            Self::Fixed(bytes) => serializer.serialize_u64(bytes.as_u64()),
            other => serializer.collect_str(other),
        }
    }
}

impl<'de> Deserialize<'de> for SpareSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Written::deserialize(deserializer)? {
            Written::Number(n) => u32::try_from(n)
                .map(Self::Count)
                .map_err(|_| serde::de::Error::custom(format!("{n} spare workers is too many"))),
            Written::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for SpareSetting {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Count(n) => serializer.serialize_u32(*n),
            Self::Auto => serializer.serialize_str("auto"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Deserialize, Serialize)]
    struct Both {
        limit: LimitSetting,
        spares: SpareSetting,
    }

    fn read(text: &str) -> Result<Both, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn words_sizes_and_numbers_read_and_write_back() {
        for (text, limit, spares) in [
            (
                "limit = \"auto\"\nspares = \"auto\"",
                LimitSetting::Auto,
                SpareSetting::Auto,
            ),
            (
                "limit = \"off\"\nspares = 0",
                LimitSetting::Off,
                SpareSetting::Count(0),
            ),
            (
                "limit = \"1.5GiB\"\nspares = 2",
                LimitSetting::Fixed(ByteSize::mib(1536)),
                SpareSetting::Count(2),
            ),
            (
                "limit = 1048576\nspares = \"1\"",
                LimitSetting::Fixed(ByteSize::mib(1)),
                SpareSetting::Count(1),
            ),
        ] {
            let both = read(text).unwrap_or_else(|err| panic!("{text}: {err}"));
            assert_eq!(both, Both { limit, spares }, "{text}");
            let written = toml::to_string(&both).expect("serialises");
            assert_eq!(read(&written).expect("reads back"), both, "{written}");
        }
    }

    #[test]
    fn nonsense_is_refused_with_the_accepted_forms() {
        let err = read("limit = \"lots\"\nspares = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"auto\", \"off\" or a size"), "{err}");
        let err = read("limit = \"auto\"\nspares = \"many\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"auto\" or a number"), "{err}");
        let err = read("limit = \"auto\"\nspares = -1")
            .unwrap_err()
            .to_string();
        assert!(!err.is_empty());
    }

    #[test]
    fn flags_parse_like_the_file() {
        assert_eq!("auto".parse::<LimitSetting>(), Ok(LimitSetting::Auto));
        assert_eq!(
            "600MiB".parse::<LimitSetting>(),
            Ok(LimitSetting::Fixed(ByteSize::mib(600)))
        );
        assert_eq!("3".parse::<SpareSetting>(), Ok(SpareSetting::Count(3)));
        assert!("x".parse::<SpareSetting>().is_err());
    }
}
