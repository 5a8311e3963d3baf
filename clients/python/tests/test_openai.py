"""The official ``openai`` client against the daemon, over the Unix socket
and over TCP with an API key.

openai 3.x sends its requests through ``httpx2`` (its own fork of httpx): the
Unix socket transport is ``httpx2.HTTPTransport(uds=...)``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest
from helpers import ALIAS, MODEL_NAME, Daemon, Reference, assert_matches_reference, cosine

import inferd


def uds_client(daemon: Daemon, sent: list[dict[str, Any]] | None = None) -> openai.OpenAI:
    """The README's recipe: the openai client over the daemon's Unix socket.
    Request bodies are appended to ``sent`` if given."""
    hooks = {}
    if sent is not None:
        hooks["request"] = [lambda request: sent.append(json.loads(request.content))]
    http_client = httpx2.Client(
        transport=httpx2.HTTPTransport(uds=daemon.socket), event_hooks=hooks
    )
    return openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http_client)


def test_openai_over_the_unix_socket_base64_and_float(daemon: Daemon, ref: Reference) -> None:
    sent: list[dict[str, Any]] = []
    client = uds_client(daemon, sent)
    default = client.embeddings.create(model=MODEL_NAME, input=ref.texts)
    assert sent[-1]["encoding_format"] == "base64", "openai's default is base64"
    assert_matches_reference([d.embedding for d in default.data], ref)
    assert [d.index for d in default.data] == list(range(len(ref.texts)))
    assert default.model == MODEL_NAME
    assert default.usage.prompt_tokens > 0

    floats = client.embeddings.create(model=MODEL_NAME, input=ref.texts, encoding_format="float")
    assert sent[-1]["encoding_format"] == "float"
    assert_matches_reference([d.embedding for d in floats.data], ref)

    one = client.embeddings.create(model=MODEL_NAME, input=ref.texts[1])
    assert_matches_reference([one.data[0].embedding], Reference([ref.texts[1]], [ref.vectors[1]]))


def test_openai_over_tcp_with_an_api_key(daemon: Daemon, ref: Reference) -> None:
    assert daemon.url is not None
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key=daemon.api_key)
    answer = client.embeddings.create(model=ALIAS, input=ref.texts)
    assert_matches_reference([d.embedding for d in answer.data], ref)
    assert answer.model == MODEL_NAME

    wrong = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.embeddings.create(model=MODEL_NAME, input="x")
    assert caught.value.status_code == 401


def test_answers_carry_timing_headers(daemon: Daemon) -> None:
    raw = uds_client(daemon).embeddings.with_raw_response.create(
        model=MODEL_NAME, input=["timing", "headers"]
    )
    for name in ("x-total-time", "x-compute-tokens", "x-queue-time", "x-inference-time"):
        value = raw.headers.get(name)
        assert value is not None and int(value) >= 0, f"{name}: {value!r}"
    assert int(raw.headers["x-compute-tokens"]) > 0


def test_token_ids_embed_like_their_text(daemon: Daemon, cl100k: Any, ref: Reference) -> None:
    client = uds_client(daemon)
    texts = ref.texts
    ids = [cl100k.encode_ordinary(t) for t in texts]
    by_ids = client.embeddings.create(model=MODEL_NAME, input=ids)
    with inferd.Client(socket=daemon.socket) as direct:
        by_text = direct.embed(texts)
    for i, (got, want) in enumerate(zip([d.embedding for d in by_ids.data], by_text, strict=True)):
        assert cosine(got, want) >= 0.999, f"text {i}: cosine {cosine(got, want)}"
    single = client.embeddings.create(model=MODEL_NAME, input=ids[0])
    assert cosine(single.data[0].embedding, by_text[0]) >= 0.999


def test_undecodable_token_ids_are_a_400_naming_the_langchain_setting(daemon: Daemon) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        uds_client(daemon).embeddings.create(model=MODEL_NAME, input=[[999999999]])
    assert caught.value.status_code == 400
    assert "check_embedding_ctx_length=False" in str(caught.value)


def test_an_unknown_model_is_openai_not_found(daemon: Daemon) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        uds_client(daemon).embeddings.create(model="gpt-4", input="x")
    assert caught.value.code == "model_not_found"
