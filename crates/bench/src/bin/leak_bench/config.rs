//! The daemon's TOML config: built from the flags, patched by `--set` and
//! `--unset`, plus what it asks of the daemon's memory handling, read back
//! from it.

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
        // A limit not given is left out, so the daemon's own default applies.
        for (key, value) in [
            ("soft_limit", &args.soft_limit),
            ("hard_limit", &args.hard_limit),
        ] {
            if let Some(value) = value {
                config.insert(key.into(), Value::String(value.clone()));
            }
        }
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

/// A `--soft-limit`/`--hard-limit` value: a size (see [`parse_size`]),
/// `auto` or `off`. Checked here so a typo fails before the daemon starts,
/// but passed to the daemon as written: the daemon decides what it means.
pub(crate) fn parse_limit(text: &str) -> Result<String, String> {
    let trimmed = text.trim();
    if !["auto", "off"].contains(&trimmed) {
        parse_size(trimmed)?;
    }
    Ok(trimmed.to_owned())
}

/// Parses `N[.N][unit]` with unit B, KB/MB/GB (powers of 1000) or K/M/G,
/// KiB/MiB/GiB (powers of 1024); no unit means bytes.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a size such as 300MiB, or auto, or off"))?;
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
    Ok((number * multiplier).round() as u64)
}

/// What the final config asks of the daemon's memory handling, read back
/// from it so that `--set` and `--unset` are reflected. The limits the daemon
/// actually applies come from its status (see `scenario::DaemonLimits`):
/// "auto", or a key left out, only the daemon can resolve.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Requested {
    /// `soft_limit` as written in the config; `None`: left to the daemon.
    pub(crate) soft_limit: Option<String>,
    /// `hard_limit` likewise.
    pub(crate) hard_limit: Option<String>,
    /// `chaos.leak_bytes_per_request` as configured, if any.
    pub(crate) leak_bytes: Option<u64>,
    /// `max_requests` as configured, if any.
    pub(crate) max_requests: Option<u64>,
}

impl Requested {
    pub(crate) fn from_config(config: &Table) -> Requested {
        let text = |key: &str| match config.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        };
        let uint = |value: Option<&Value>| {
            value
                .and_then(Value::as_integer)
                .and_then(|n| u64::try_from(n).ok())
        };
        Requested {
            soft_limit: text("soft_limit"),
            hard_limit: text("hard_limit"),
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
    fn sizes_and_limits_parse() {
        assert_eq!(parse_size("260MiB"), Ok(260 * 1024 * 1024));
        assert_eq!(parse_size(" 400 MB "), Ok(400_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(3 * 512 * 1024 * 1024));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
        assert_eq!(parse_limit(" 1GiB "), Ok("1GiB".to_owned()));
        assert_eq!(parse_limit("auto"), Ok("auto".to_owned()));
        assert_eq!(parse_limit("off"), Ok("off".to_owned()));
        assert!(parse_limit("automatic").is_err());
    }

    #[test]
    fn default_config_leaves_limits_to_the_daemon_and_round_trips() {
        let table = config(&[]);
        let text = toml::to_string(&table).expect("serialises");
        let back: Table = text.parse().expect("valid TOML");
        assert_eq!(back, table);
        assert!(back.get("soft_limit").is_none(), "{text}");
        assert!(back.get("hard_limit").is_none(), "{text}");
        assert_eq!(
            back["chaos"]["leak_bytes_per_request"].as_integer(),
            Some(2_097_152)
        );
        assert_eq!(back["workers"].as_integer(), Some(2));
        assert!(back.get("max_requests").is_none());
        let requested = Requested::from_config(&back);
        assert_eq!(requested.soft_limit, None);
        assert_eq!(requested.hard_limit, None);
    }

    #[test]
    fn given_limits_pass_through_as_written() {
        let table = config(&["--soft-limit", "auto", "--hard-limit", "2GiB"]);
        assert_eq!(table["soft_limit"].as_str(), Some("auto"));
        assert_eq!(table["hard_limit"].as_str(), Some("2GiB"));
        let table = config(&["--hard-limit", "off"]);
        assert!(table.get("soft_limit").is_none());
        assert_eq!(table["hard_limit"].as_str(), Some("off"));
    }

    #[test]
    fn no_leak_keys_leaves_only_todays_keys() {
        let table = config(&["--no-leak-keys", "--soft-limit", "1GiB"]);
        let keys: Vec<&str> = table.keys().map(String::as_str).collect();
        assert_eq!(keys, ["model", "socket", "workers"]);
    }

    #[test]
    fn set_merges_raw_toml_and_unset_removes() {
        let table = config(&[
            "--hard-limit",
            "400MiB",
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
        let requested = Requested::from_config(&table);
        assert_eq!(requested.soft_limit.as_deref(), Some("300MiB"));
        assert_eq!(requested.hard_limit, None, "--unset wins over the flag");
        assert!(parse_set("no equals sign").is_err());
        let mut table = table;
        assert!(!unset(&mut table, "chaos.nope"));
    }
}
