"""Shared test helpers: the real daemon, the reference fixture, vector maths.

The daemon is the real ``target/debug/inferd`` (``$INFERD_BIN_DIR``
overrides the directory) serving ``all-MiniLM-L6-v2`` from the model cache
(``$INFERD_MODEL_DIR``, default ``~/.cache/inferd/models``; ``make model``
fills it). Every wait is a bounded poll.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

REPO = Path(__file__).resolve().parents[3]
MODEL_NAME = "all-MiniLM-L6-v2"
ALIAS = "text-embedding-3-small"
#: The shared daemon's API keys (the daemon wants at least 16 characters).
API_KEYS = ["python-client-test-key-1", "python-client-test-key-2"]
REFERENCE_FILE = REPO / "tests" / "fixtures" / "reference_embeddings.json"

#: Largest accepted |difference| between an answer and the reference vector
#: (the Rust suite's TOLERANCE).
TOLERANCE = 1e-4
POLL_INTERVAL = 0.05
#: The debug build's workers load the model in a few seconds on 2 cores.
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0

T = TypeVar("T")


def bin_dir() -> Path:
    """Directory of ``inferd``, ``inferd-worker`` and ``inferctl``."""
    return Path(os.environ.get("INFERD_BIN_DIR", REPO / "target" / "debug"))


def binary(name: str) -> Path:
    """A workspace binary; a clear failure when it was not built."""
    path = bin_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{name} not found at {path}: run `cargo build --workspace --bins` first "
            "(set INFERD_BIN_DIR to look elsewhere)"
        )
    return path


def model_files(name: str = MODEL_NAME) -> tuple[Path, Path]:
    """``(model.onnx, tokenizer.json)`` of a cached model."""
    root = Path(os.environ.get("INFERD_MODEL_DIR", Path.home() / ".cache" / "inferd" / "models"))
    model, tokenizer = root / name / "model.onnx", root / name / "tokenizer.json"
    for path in (model, tokenizer):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `make model` (scripts/fetch-model)")
    return model, tokenizer


@dataclass(frozen=True)
class Reference:
    """``tests/fixtures/reference_embeddings.json`` for one model: onnxruntime's
    vectors for each text."""

    texts: list[str]
    vectors: list[list[float]]


def reference(name: str = MODEL_NAME) -> Reference:
    """The onnxruntime reference vectors of model ``name``."""
    data = json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))
    (model,) = [m for m in data["models"] if m["name"] == name]
    assert [e["text"] for e in model["embeddings"]] == data["texts"]
    return Reference(texts=data["texts"], vectors=[e["vector"] for e in model["embeddings"]])


def max_abs_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest absolute difference; infinite if the lengths differ."""
    if len(a) != len(b):
        return math.inf
    return max(abs(float(x) - float(y)) for x, y in zip(a, b, strict=True))


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two vectors."""
    dot = sum(float(x) * float(y) for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(float(x) ** 2 for x in a))
    nb = math.sqrt(sum(float(y) ** 2 for y in b))
    return dot / (na * nb)


def norm(a: Sequence[float]) -> float:
    """Euclidean length."""
    return math.sqrt(sum(float(x) ** 2 for x in a))


def assert_matches_reference(vectors: Sequence[Sequence[float]], ref: Reference) -> None:
    """Every vector within TOLERANCE of the reference, and cosine >= 0.999."""
    assert len(vectors) == len(ref.vectors)
    for i, (got, want) in enumerate(zip(vectors, ref.vectors, strict=True)):
        diff = max_abs_diff(got, want)
        assert diff <= TOLERANCE, f"text {i}: max abs diff {diff}"
        assert cosine(got, want) >= 0.999, f"text {i}: cosine {cosine(got, want)}"


class PollTimeout(AssertionError):
    """A bounded poll ran out of time."""


def poll(what: str, probe: Callable[[], T | None], timeout: float) -> T:
    """Calls ``probe`` every POLL_INTERVAL until it returns a value other than
    ``None``; fails after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() >= end:
            raise PollTimeout(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(POLL_INTERVAL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_http(unix_path: str, method: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP/1.0-style request over a Unix socket, without the client
    under test: ``(status, body)``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(unix_path)
        s.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(config: dict[str, Any]) -> str:
    """A flat TOML document; dict values become tables after the keys."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for table, values in config.items():
        if isinstance(values, dict):
            lines.append(f"\n[{table}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


@dataclass
class Daemon:
    """A running ``inferd`` started by the tests."""

    process: subprocess.Popen[bytes]
    directory: Path
    socket: str
    log: Path
    url: str | None = None
    api_key: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        """The end of the daemon's log, for failure messages."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            return f"(no log: {err})"
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Fails with the log's tail if the daemon has exited."""
        code = self.process.poll()
        if code is not None:
            raise AssertionError(f"inferd exited with {code}; its log ends:\n{self.log_tail()}")

    def status(self) -> dict[str, Any]:
        """``inferctl status --json``."""
        out = subprocess.run(
            [str(binary("inferctl")), "--socket", self.socket, "status", "--json"],
            capture_output=True,
            timeout=15,
            check=False,
        )
        if out.returncode != 0:
            raise AssertionError(
                f"inferctl status failed ({out.returncode}): {out.stderr.decode(errors='replace')}"
            )
        return json.loads(out.stdout)

    def serving_pids(self) -> list[int]:
        """Pids of the workers that are ready or busy."""
        return [
            w["pid"] for w in self.status()["workers"] if w["state"] in ("ready", "busy")
        ]

    def wait_ready(self, workers: int = 1, timeout: float = READY_TIMEOUT) -> None:
        """Polls until ``/health`` answers 200 and at least ``workers``
        workers are ready or busy."""

        def probe() -> bool | None:
            self.check_alive()
            try:
                status, _ = raw_http(self.socket, "GET", "/health")
            except OSError:
                return None
            if status != 200:
                return None
            if workers > 1 and len(self.serving_pids()) < workers:
                return None
            return True

        try:
            poll(f"{workers} ready worker(s) of inferd", probe, timeout)
        except PollTimeout as err:
            raise PollTimeout(f"{err}; log:\n{self.log_tail()}") from None

    def stop(self) -> int:
        """SIGTERM, a bounded wait, then SIGKILL; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=STOP_TIMEOUT)


def start_daemon(directory: Path, workers: int = 2, **settings: Any) -> Daemon:
    """Starts ``inferd`` with a config file in ``directory``; ``settings``
    are extra config keys (e.g. ``http_listen``). Returns once ``/health``
    answers 200 and every worker is ready."""
    model, tokenizer = model_files()
    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / "inferd.sock"
    config: dict[str, Any] = {
        "socket": sock,
        "workers": workers,
        "model": model,
        "tokenizer": tokenizer,
        "worker_binary": binary("inferd-worker"),
        **settings,
    }
    if "api_keys_file" in settings:
        # The daemon refuses a key file other users can read.
        Path(settings["api_keys_file"]).chmod(0o600)
    path = directory / "inferd.toml"
    path.write_text(to_toml(config), encoding="utf-8")
    log = directory / "inferd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(binary("inferd")), "--config", str(path), "--log-format", "plain"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")},
        )
    daemon = Daemon(process=process, directory=directory, socket=str(sock), log=log, config=config)
    try:
        daemon.wait_ready(workers=workers)
    except BaseException:
        daemon.stop()
        raise
    return daemon
