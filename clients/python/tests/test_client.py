"""The inferd Python client against the real daemon."""

from __future__ import annotations

import math
from typing import Callable

import pytest
from helpers import (
    ALIAS,
    API_KEYS,
    MODEL_NAME,
    TOLERANCE,
    Daemon,
    Reference,
    assert_matches_reference,
    max_abs_diff,
)

import inferd


def test_embed_matches_the_reference_over_the_unix_socket(
    client: inferd.Client, ref: Reference
) -> None:
    assert_matches_reference(client.embed(ref.texts), ref)


def test_embed_matches_the_reference_over_tcp_with_a_key(
    tcp_client: inferd.Client, ref: Reference
) -> None:
    assert_matches_reference(tcp_client.embed(ref.texts), ref)


def test_embed_one_single_string_and_numpy(client: inferd.Client, ref: Reference) -> None:
    one = client.embed_one(ref.texts[0])
    assert max_abs_diff(one, ref.vectors[0]) <= TOLERANCE
    (same,) = client.embed(ref.texts[0])
    assert max_abs_diff(same, ref.vectors[0]) <= TOLERANCE
    array = client.embed(ref.texts, as_numpy=True)
    assert array.shape == (len(ref.texts), 384) and str(array.dtype) == "float32"
    assert_matches_reference(array.tolist(), ref)
    assert client.embed([]) == []


def test_embed_splits_lists_longer_than_max_texts(
    client: inferd.Client, daemon: Daemon, ref: Reference
) -> None:
    max_texts = client.max_texts()
    assert max_texts == client.info()["max_texts"]
    texts = [ref.texts[i % 5] for i in range(2 * max_texts + 3)]
    before = daemon.status()["counters"]["requests_ok"]
    vectors = client.embed(texts)
    after = daemon.status()["counters"]["requests_ok"]
    assert after - before == 3, "2 full batches and 1 of 3 texts"
    assert len(vectors) == len(texts)
    for i, vector in enumerate(vectors):
        assert max_abs_diff(vector, ref.vectors[i % 5]) <= TOLERANCE, i


def test_health_info_and_wait_ready(
    client: inferd.Client, tcp_client: inferd.Client, daemon: Daemon
) -> None:
    assert client.health() is True
    client.wait_ready(timeout=5)
    client.embed_one("so that dims are known")
    info = client.info()
    assert info["model_id"] == MODEL_NAME
    assert info["dims"] == 384
    assert info["normalize"] is True
    assert info["max_texts"] > 0 and info["max_text_bytes"] > 0
    assert tcp_client.info() == info
    assert daemon.url is not None
    # /health needs no key on TCP.
    assert inferd.Client(url=daemon.url).health() is True


def test_vectors_are_unit_length(client: inferd.Client) -> None:
    for vector in client.embed(["one", "two words", "ünïcödé 🙂"]):
        assert abs(math.sqrt(sum(x * x for x in vector)) - 1.0) < 1e-4


def test_a_text_over_the_byte_limit_is_bad_request(client: inferd.Client) -> None:
    limit = client.info()["max_text_bytes"]
    with pytest.raises(inferd.BadRequest) as caught:
        client.embed_one("x" * (limit + 1))
    assert caught.value.status == 400
    assert caught.value.code == "bad_request"


def test_too_many_texts_in_one_request_is_bad_request(client: inferd.Client) -> None:
    # Over max_texts the daemon runs the request in parts, in order.
    texts = [f"text {i}" for i in range(client.max_texts() + 3)]
    vectors = client.embed_batch(texts)
    assert len(vectors) == len(texts)
    assert max_abs_diff(vectors[-1], client.embed_one(texts[-1])) <= TOLERANCE
    # Over OpenAI's 2048 it refuses.
    with pytest.raises(inferd.BadRequest) as caught:
        client.embed_batch(["a"] * 2049)
    assert caught.value.status == 400
    assert "2048" in caught.value.message
    assert not isinstance(caught.value, inferd.PayloadTooLarge)


def test_a_body_over_max_frame_bytes_is_payload_too_large(client: inferd.Client) -> None:
    limit = client.info()["max_frame_bytes"]
    with pytest.raises(inferd.PayloadTooLarge) as caught:
        client.embed_batch(["y" * (limit + 1)])
    assert caught.value.status == 413


def test_an_unknown_model_is_model_not_found(daemon: Daemon) -> None:
    with inferd.Client(socket=daemon.socket, model="no-such-model") as client:
        with pytest.raises(inferd.ModelNotFound) as caught:
            client.embed_one("x")
    assert caught.value.status == 404 and caught.value.code == "model_not_found"
    assert MODEL_NAME in caught.value.message


def test_the_served_name_and_an_alias_are_accepted(daemon: Daemon, ref: Reference) -> None:
    for model in (MODEL_NAME, ALIAS):
        with inferd.Client(socket=daemon.socket, model=model) as client:
            assert_matches_reference(client.embed(ref.texts), ref)


def test_tcp_needs_a_valid_key(daemon: Daemon) -> None:
    assert daemon.url is not None
    for key in (None, "wrong-key"):
        with inferd.Client(url=daemon.url, api_key=key) as client:
            with pytest.raises(inferd.AuthenticationError) as caught:
                client.embed_one("x")
            assert caught.value.status == 401
            with pytest.raises(inferd.AuthenticationError):
                client.info()
    # Every key of the file works; comments and blank lines are not keys.
    for key in API_KEYS:
        with inferd.Client(url=daemon.url, api_key=key) as client:
            assert len(client.embed_one("x")) == 384
    for not_a_key in ("# keys of the Python client tests", ""):
        with inferd.Client(url=daemon.url, api_key=not_a_key) as client:
            with pytest.raises(inferd.AuthenticationError):
                client.embed_one("x")


def test_the_unix_socket_needs_no_key_and_ignores_one(daemon: Daemon) -> None:
    with inferd.Client(socket=daemon.socket, api_key="anything") as client:
        assert len(client.embed_one("x")) == 384


def test_a_stopped_daemon_is_connection_failed(spawn_daemon: Callable[..., Daemon]) -> None:
    private = spawn_daemon(workers=1)
    client = inferd.Client(socket=private.socket, retries=1, backoff=0.01)
    assert client.health() is True
    assert private.stop() == 0
    with pytest.raises(inferd.ConnectionFailed):
        client.embed_one("x")
