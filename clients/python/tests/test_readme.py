"""Runs every ``python`` code block of clients/python/README.md against the
real daemon, so the recipes stay true."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest
from helpers import MODEL_NAME, TOLERANCE, Daemon, Reference, cosine, max_abs_diff

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks() -> list[str]:
    """The README's python code blocks, in order."""
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def food(ref: Reference) -> list[float]:
    """The reference vector of "A man is eating food."."""
    return ref.vectors[ref.texts.index("A man is eating food.")]


def check_client(ns: dict[str, Any], ref: Reference) -> None:
    vectors = ns["vectors"]
    assert len(vectors) == 2 and len(ns["query"]) == 384
    assert max_abs_diff(vectors[0], food(ref)) <= TOLERANCE
    horse = ref.vectors[ref.texts.index("A man is riding a horse.")]
    assert max_abs_diff(vectors[1], horse) <= TOLERANCE


def check_embed_iter(ns: dict[str, Any], ref: Reference) -> None:
    assert ns["number"] == 299, "one vector per line of corpus.txt"
    assert len(ns["vector"]) == 384


def check_openai(ns: dict[str, Any], ref: Reference) -> None:
    assert max_abs_diff(ns["vector"], food(ref)) <= TOLERANCE
    assert ns["answer"].model == MODEL_NAME


def check_langchain_openai(ns: dict[str, Any], ref: Reference) -> None:
    vectors = ns["vectors"]
    assert len(vectors) == 2 and cosine(vectors[0], food(ref)) >= 0.999


def check_inferd_embeddings(ns: dict[str, Any], ref: Reference) -> None:
    (hit,) = ns["hits"]
    assert hit.page_content == "The cat sleeps on the warm windowsill."


CHECKS: list[Callable[[dict[str, Any], Reference], None]] = [
    check_client,
    check_embed_iter,
    check_openai,  # over the Unix socket
    check_openai,  # over TCP with a key and an alias
    check_langchain_openai,
    check_inferd_embeddings,
]


def test_the_readme_has_the_recipes_this_test_checks() -> None:
    assert len(blocks()) == len(CHECKS)


@pytest.mark.parametrize("number", range(len(CHECKS)))
def test_readme_recipe(
    number: int,
    daemon: Daemon,
    ref: Reference,
    cl100k: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert daemon.url is not None and daemon.api_key is not None
    code = (
        blocks()[number]
        .replace("/tmp/inferd.sock", daemon.socket)
        .replace("http://127.0.0.1:8080", daemon.url)
        .replace("YOUR-KEY", daemon.api_key)
    )
    (tmp_path / "corpus.txt").write_text(
        "".join(f"line {i} of the corpus\n" for i in range(300)), encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": f"readme_block_{number}"}
    exec(compile(code, f"README.md block {number}", "exec"), namespace)  # noqa: S102
    CHECKS[number](namespace, ref)
