//! The daemon's TOML config: built from the flags, patched by `--set` and
//! `--unset`, plus the memory sizes and limits read back from it.

use std::path::Path;

use anyhow::{bail, Context, Result};
use toml::{Table, Value};

use crate::{Args, MIB};

/// The daemon's config as a TOML table: the scenario's keys, then every
/// `--set` line merged on top, then every `--unset` key removed.
pub(crate) fn daemon_config(args: &Args, socket: &Path, model: &Path) -> Result<Table> {
    let mut config = Table::new();
    config.insert("socket".into(), path_value(socket)?);
    config.insert("workers".into(), Value::Integer(args.workers.into()));
    config.insert("model".into(), path_value(model)?);
    if !args.no_leak_keys {
        config.insert(
            "soft_limit".into(),
            Value::String(args.soft_limit.text.clone()),
        );
        config.insert(
            "hard_limit".into(),
            Value::String(args.hard_limit.text.clone()),
        );
        if let Some(n) = args.max_requests {
            config.insert("max_requests".into(), integer(n, "--max-requests")?);
        }
        let mut chaos = Table::new();
        chaos.insert(
            "leak_bytes_per_request".into(),
            integer(args.leak_bytes, "--leak-bytes")?,
        );
        config.insert("chaos".into(), Value::Table(chaos));
    }
    for line in &args.set {
        merge(&mut config, parse_set(line)?);
    }
    for key in &args.unset {
        if !unset(&mut config, key) {
            bail!("--unset {key}: no such key in the daemon config");
        }
    }
    Ok(config)
}

fn path_value(path: &Path) -> Result<Value> {
    let text = path
        .to_str()
        .with_context(|| format!("path {} is not UTF-8", path.display()))?;
    Ok(Value::String(text.to_owned()))
}

fn integer(n: u64, flag: &str) -> Result<Value> {
    let n = i64::try_from(n).with_context(|| format!("{flag} {n} does not fit a TOML integer"))?;
    Ok(Value::Integer(n))
}

/// One `--set` line as a TOML table: `key = value` as written, or, when the
/// value is not valid TOML, with the value taken as a string.
fn parse_set(line: &str) -> Result<Table> {
    if let Ok(table) = line.parse::<Table>() {
        return Ok(table);
    }
    let (key, value) = line
        .split_once('=')
        .with_context(|| format!("--set {line:?}: expected KEY=VALUE"))?;
    let quoted = format!(
        "{} = {}",
        key.trim(),
        Value::String(value.trim().to_owned())
    );
    quoted
        .parse::<Table>()
        .with_context(|| format!("--set {line:?} is not a TOML key/value line"))
}

/// Merges `from` into `into`; tables merge key by key, anything else replaces.
fn merge(into: &mut Table, from: Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Table(existing)), Value::Table(incoming)) => merge(existing, incoming),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// Removes the dotted `key`; false if it was not there.
fn unset(table: &mut Table, key: &str) -> bool {
    match key.split_once('.') {
        None => table.remove(key).is_some(),
        Some((head, rest)) => match table.get_mut(head) {
            Some(Value::Table(inner)) => unset(inner, rest),
            _ => false,
        },
    }
}

/// A memory size as given (`"260MiB"`) and in bytes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Size {
    /// The text as given, passed to the daemon unchanged.
    pub(crate) text: String,
    /// Its value, for the plot and the summary.
    pub(crate) bytes: u64,
}

impl Size {
    /// Parses `N[.N][unit]` with unit B, KB/MB/GB (powers of 1000) or
    /// K/M/G, KiB/MiB/GiB (powers of 1024); no unit means bytes.
    pub(crate) fn parse(text: &str) -> Result<Size, String> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: expected a size such as 300MiB"))?;
        let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "k" | "kib" => 1024.0,
            "m" | "mib" => MIB,
            "g" | "gib" => MIB * 1024.0,
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
                ))
            }
        };
        Ok(Size {
            text: trimmed.to_owned(),
            bytes: (number * multiplier).round() as u64,
        })
    }

    pub(crate) fn mib(&self) -> f64 {
        self.bytes as f64 / MIB
    }
}

/// The limits the plot and summary show, read back from the final config so
/// that `--set` overrides are reflected.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) soft: Size,
    pub(crate) hard: Size,
    /// Whether the daemon was given the limits (false: drawn for reference).
    pub(crate) soft_configured: bool,
    pub(crate) hard_configured: bool,
    /// `chaos.leak_bytes_per_request` as configured, if any.
    pub(crate) leak_bytes: Option<u64>,
    /// `max_requests` as configured, if any.
    pub(crate) max_requests: Option<u64>,
}

impl Limits {
    pub(crate) fn from_config(config: &Table, args: &Args) -> Limits {
        let size_key = |key: &str| match config.get(key) {
            Some(Value::String(s)) => Size::parse(s).ok(),
            Some(Value::Integer(n)) => u64::try_from(*n).ok().map(|bytes| Size {
                text: n.to_string(),
                bytes,
            }),
            _ => None,
        };
        let uint = |value: Option<&Value>| {
            value
                .and_then(Value::as_integer)
                .and_then(|n| u64::try_from(n).ok())
        };
        let soft = size_key("soft_limit");
        let hard = size_key("hard_limit");
        Limits {
            soft_configured: soft.is_some(),
            hard_configured: hard.is_some(),
            soft: soft.unwrap_or_else(|| args.soft_limit.clone()),
            hard: hard.unwrap_or_else(|| args.hard_limit.clone()),
            leak_bytes: uint(
                config
                    .get("chaos")
                    .and_then(Value::as_table)
                    .and_then(|chaos| chaos.get("leak_bytes_per_request")),
            ),
            max_requests: uint(config.get("max_requests")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["inferd-leak-bench", "--model-dir", "/models"];
        argv.extend_from_slice(extra);
        Args::parse_from(argv)
    }

    fn config(extra: &[&str]) -> Table {
        daemon_config(
            &args(extra),
            Path::new("/tmp/s.sock"),
            Path::new("/m/model.onnx"),
        )
        .expect("config builds")
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(
            Size::parse("260MiB").map(|s| s.bytes),
            Ok(260 * 1024 * 1024)
        );
        assert_eq!(Size::parse(" 400 MB ").map(|s| s.bytes), Ok(400_000_000));
        assert_eq!(
            Size::parse("1.5GiB").map(|s| s.bytes),
            Ok(3 * 512 * 1024 * 1024)
        );
        assert_eq!(Size::parse("4096").map(|s| s.bytes), Ok(4096));
        assert!(Size::parse("lots").is_err());
        assert!(Size::parse("3 parsecs").is_err());
    }

    #[test]
    fn default_config_has_leak_keys_and_round_trips() {
        let table = config(&[]);
        let text = toml::to_string(&table).expect("serialises");
        let back: Table = text.parse().expect("valid TOML");
        assert_eq!(back, table);
        assert_eq!(back["soft_limit"].as_str(), Some("260MiB"));
        assert_eq!(back["hard_limit"].as_str(), Some("400MiB"));
        assert_eq!(
            back["chaos"]["leak_bytes_per_request"].as_integer(),
            Some(2_097_152)
        );
        assert_eq!(back["workers"].as_integer(), Some(2));
        assert!(back.get("max_requests").is_none());
    }

    #[test]
    fn no_leak_keys_leaves_only_todays_keys() {
        let table = config(&["--no-leak-keys"]);
        let keys: Vec<&str> = table.keys().map(String::as_str).collect();
        assert_eq!(keys, ["model", "socket", "workers"]);
    }

    #[test]
    fn set_merges_raw_toml_and_unset_removes() {
        let table = config(&[
            "--set",
            "soft_limit=300MiB",
            "--set",
            "chaos.crash_marker = \"boom\"",
            "--set",
            "memory = { hard_limit = \"1GiB\" }",
            "--unset",
            "hard_limit",
        ]);
        assert_eq!(table["soft_limit"].as_str(), Some("300MiB"));
        assert_eq!(table["chaos"]["crash_marker"].as_str(), Some("boom"));
        assert_eq!(
            table["chaos"]["leak_bytes_per_request"].as_integer(),
            Some(2_097_152)
        );
        assert_eq!(table["memory"]["hard_limit"].as_str(), Some("1GiB"));
        assert!(table.get("hard_limit").is_none());
        let limits = Limits::from_config(&table, &args(&[]));
        assert_eq!(limits.soft.text, "300MiB");
        assert!(limits.soft_configured);
        assert!(
            !limits.hard_configured,
            "hard limit drawn from the flag, marked unconfigured"
        );
        assert!(parse_set("no equals sign").is_err());
        let mut table = table;
        assert!(!unset(&mut table, "chaos.nope"));
    }
}
