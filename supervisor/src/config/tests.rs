//! Tests of the `config` module.

use super::*;

fn load_toml(text: &str, args: Args) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inferd.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&Args {
        config: Some(path),
        ..args
    })
}

#[test]
fn file_values_and_flag_overrides() {
    let config = load_toml(
        "model = \"/m/model.onnx\"\nworkers = 3\nsocket = \"/tmp/a.sock\"\n",
        Args {
            workers: Some(5),
            ..Args::default()
        },
    )
    .unwrap();
    assert_eq!(config.workers, 5, "flag wins over file");
    assert_eq!(config.socket, PathBuf::from("/tmp/a.sock"));
    assert_eq!(config.tokenizer, PathBuf::from("/m/tokenizer.json"));
    assert_eq!(config.worker_binary.file_name().unwrap(), "inferd-worker");
    assert_eq!(config.socket_mode_bits().unwrap(), 0o660);
}

#[test]
fn memory_limits_take_units() {
    let config = load_toml(
        "model = \"/m\"\nsoft_limit = \"1.5GiB\"\nhard_limit = \"2 GiB\"\n[chaos]\nleak_bytes_per_request = 1024\n",
        Args::default(),
    )
    .unwrap();
    assert_eq!(config.soft_limit, LimitSetting::Fixed(ByteSize::mib(1536)));
    assert_eq!(config.hard_limit, LimitSetting::Fixed(ByteSize::gib(2)));
    assert_eq!(config.chaos.leak_bytes_per_request, 1024);
    let err = load_toml(
        "model = \"/m\"\nsoft_limit = \"2GiB\"\nhard_limit = \"1GiB\"\n",
        Args::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("soft_limit"), "{err}");
    let err = load_toml("model = \"/m\"\nsoft_limit = \"lots\"\n", Args::default()).unwrap_err();
    let text = inferd_proto::error_chain(&err);
    assert!(text.contains("soft_limit"), "{text}");
}

/// The shipped example documents the defaults: it must parse, and every
/// value it sets (other than the paths) must be the built-in default.
#[test]
fn example_config_parses_and_shows_the_defaults() {
    let text = include_str!("../../../systemd/inferd.toml");
    let example: Config = toml::from_str(text).expect("systemd/inferd.toml parses");
    let defaults = Config {
        model: example.model.clone(),
        ..Config::default()
    };
    assert_eq!(example, defaults);
    // Every key of the schema is mentioned, commented out or not.
    let documented = |key: &str| {
        text.lines().any(|l| {
            let l = l.trim_start_matches('#').trim_start();
            l.starts_with(&format!("{key} =")) || l.starts_with(&format!("[{key}]"))
        })
    };
    // Every optional key set, so serialising names them all.
    let full = Config {
        soft_limit: LimitSetting::Fixed(ByteSize::mib(100)),
        hard_limit: LimitSetting::Fixed(ByteSize::mib(200)),
        spare_workers: SpareSetting::Count(1),
        max_requests: Some(1),
        max_lifetime_secs: Some(1),
        cgroup_parent: Some("/x".into()),
        socket_group: Some("inferd".into()),
        metrics_listen: Some("127.0.0.1:9464".parse().expect("address")),
        http_listen: Some("127.0.0.1:8080".parse().expect("address")),
        api_keys_file: Some("/etc/inferd/api-keys".into()),
        model_aliases: vec!["text-embedding-3-small".into()],
        ..Config::default()
    };
    let keys = toml::Table::try_from(&full).expect("config serialises");
    for key in keys.keys() {
        assert!(
            documented(key),
            "systemd/inferd.toml does not mention `{key}`"
        );
    }
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let err = load_toml("model = \"/m\"\nworkerz = 3\n", Args::default()).unwrap_err();
    let text = inferd_proto::error_chain(&err);
    assert!(text.contains("workerz"), "{text}");
}

#[test]
fn invalid_values_name_their_key() {
    for (text, key) in [
        ("model = \"/m\"\nworkers = 0\n", "workers"),
        ("model = \"/m\"\nsocket_mode = \"rw\"\n", "socket_mode"),
        ("model = \"/m\"\nqueue_capacity = 0\n", "queue_capacity"),
        (
            "model = \"/m\"\nrequest_timeout_ms = 0\n",
            "request_timeout_ms",
        ),
        ("workers = 1\n", "model"),
        (
            "model = \"/m\"\nhttp_listen = \"0.0.0.0:8080\"\n",
            "http_listen",
        ),
        (
            "model = \"/m\"\napi_keys_file = \"/nonexistent/keys\"\n",
            "api_keys_file",
        ),
        ("model = \"/m\"\nmodel_aliases = [\"\"]\n", "model_aliases"),
    ] {
        match load_toml(text, Args::default()) {
            Err(ConfigError::Invalid { key: got, .. }) => assert_eq!(got, key, "{text}"),
            other => panic!("{text}: expected invalid {key}, got {other:?}"),
        }
    }
}

#[test]
fn missing_file_is_a_read_error() {
    let err = Config::load(&Args {
        config: Some("/nonexistent/inferd.toml".into()),
        ..Args::default()
    })
    .unwrap_err();
    assert!(matches!(err, ConfigError::ReadFile { .. }));
}

#[test]
fn the_token_budget_gives_texts_per_run() {
    let config = |max_batch_tokens, max_seq_len| Config {
        max_batch_tokens,
        max_seq_len,
        ..Config::default()
    };
    assert_eq!(config(4096, 256).max_batch_texts(), 16);
    assert_eq!(config(4096, 512).max_batch_texts(), 8);
    assert_eq!(
        config(100, 256).max_batch_texts(),
        1,
        "at least one text a run"
    );
    assert_eq!(config(0, 256).max_batch_texts(), 0, "0 is off");
}
