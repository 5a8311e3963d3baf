"""Fixtures: the real daemon (Unix socket and TCP with API keys), clients,
the reference vectors, and tiktoken's cl100k_base vocabulary offline."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from helpers import ALIAS, API_KEYS, Daemon, Reference, free_port, reference, start_daemon

import inferd

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
# The sha256 tiktoken checks cl100k_base.tiktoken against (tiktoken_ext/openai_public.py).
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def cl100k(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """tiktoken's cl100k_base encoding, loaded offline.

    tiktoken downloads the vocabulary at first use; the tests seed its cache
    (``TIKTOKEN_CACHE_DIR``, file named by the sha1 of the blob URL) with the
    copy the tiktoken-rs crate ships, which ``cargo build`` unpacked into the
    cargo registry, and forbid downloads for the session.
    """
    cargo_home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
    pattern = "registry/src/*/tiktoken-rs-*/assets/cl100k_base.tiktoken"
    candidates = sorted(cargo_home.glob(pattern))
    good = [p for p in candidates if _sha256(p) == CL100K_SHA256]
    if not good:
        seen = ", ".join(f"{p} (sha256 {_sha256(p)})" for p in candidates) or "none"
        pytest.fail(
            f"no cl100k_base.tiktoken with sha256 {CL100K_SHA256} under {cargo_home}/{pattern} "
            f"(found: {seen}); run `cargo build --workspace --bins` so cargo unpacks the "
            "tiktoken-rs crate (a dependency of the supervisor), or set CARGO_HOME",
            pytrace=False,
        )
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    key = hashlib.sha1(CL100K_URL.encode()).hexdigest()
    (cache / key).write_bytes(good[-1].read_bytes())

    import tiktoken
    import tiktoken.load

    def no_download(blobpath: str) -> bytes:
        raise AssertionError(
            f"tiktoken tried to download {blobpath}: the tests' offline cache {cache} "
            "does not hold it"
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        patch.setattr(tiktoken.load, "read_file", no_download)
        yield tiktoken.get_encoding("cl100k_base")


@pytest.fixture(scope="session")
def ref() -> Reference:
    """onnxruntime's reference vectors of the served model."""
    return reference()


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The daemon most tests share: 2 workers, the Unix socket, a TCP
    listener that needs one of API_KEYS, and the alias ALIAS."""
    directory = tmp_path_factory.mktemp("daemon")
    keys = directory / "api_keys"
    keys.write_text(
        "# keys of the Python client tests\n\n" + "\n".join(API_KEYS) + "\n", encoding="utf-8"
    )
    port = free_port()
    started = start_daemon(
        directory,
        workers=2,
        http_listen=f"127.0.0.1:{port}",
        api_keys_file=keys,
        model_aliases=[ALIAS],
    )
    started.url = f"http://127.0.0.1:{port}"
    started.api_key = API_KEYS[1]
    yield started
    alive = started.process.poll() is None
    code = started.stop()
    assert alive, f"inferd died during the tests ({code}); log:\n{started.log_tail()}"


@pytest.fixture
def spawn_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Starts a private daemon (``start_daemon``'s arguments); stopped at the
    end of the test."""
    started: list[Daemon] = []

    def spawn(**settings: Any) -> Daemon:
        d = start_daemon(tmp_path / f"daemon{len(started)}", **settings)
        started.append(d)
        return d

    yield spawn
    for d in started:
        d.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[inferd.Client]:
    """An inferd client over the shared daemon's Unix socket."""
    with inferd.Client(socket=daemon.socket) as c:
        yield c


@pytest.fixture
def tcp_client(daemon: Daemon) -> Iterator[inferd.Client]:
    """An inferd client over the shared daemon's TCP listener, with a key."""
    assert daemon.url is not None
    with inferd.Client(url=daemon.url, api_key=daemon.api_key) as c:
        yield c
