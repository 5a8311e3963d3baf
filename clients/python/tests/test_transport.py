"""The client's retries, timeouts, keep-alive and error mapping, against a
scripted server (no daemon needed)."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from fake_server import (
    Action,
    Answer,
    Close,
    FakeServer,
    Request,
    Script,
    Silence,
    embeddings_answer,
    openai_error,
    vector_of,
)

import inferd
from inferd.errors import error_from_response


def embed_or(actions: dict[int, Action]) -> Script:
    """A script: ``actions[n]`` for the n-th embeddings request (0-based),
    else the fake embeddings of its input; ``/info`` says max_texts 8."""
    seen = 0
    lock = threading.Lock()

    def script(number: int, request: Request) -> Action:
        nonlocal seen
        if request.path == "/info":
            return Answer(200, {"max_texts": 8})
        with lock:
            n, seen = seen, seen + 1
        if n in actions:
            return actions[n]
        return embeddings_answer(request.body["input"])

    return script


def fast_client(url: str, **options: object) -> inferd.Client:
    options.setdefault("backoff", 0.01)
    options.setdefault("timeout", 5.0)
    return inferd.Client(url=url, **options)  # type: ignore[arg-type]


def test_overloaded_is_retried_after_retry_after() -> None:
    script = embed_or(
        {0: openai_error(429, "overloaded", **{"Retry-After": "0.3"}),
         1: openai_error(429, "overloaded", **{"Retry-After": "0.3"})}
    )
    with FakeServer(script) as server, fast_client(server.url) as client:
        started = time.monotonic()
        assert client.embed_one("7") == vector_of("7")
        elapsed = time.monotonic() - started
    assert len(server.embed_requests()) == 3
    assert elapsed >= 0.6, f"Retry-After not honoured: {elapsed:.3f}s"


def test_unavailable_and_refused_connections_are_retried() -> None:
    script = embed_or({0: openai_error(503, "unavailable"), 1: Close()})
    with FakeServer(script) as server, fast_client(server.url) as client:
        assert client.embed(["1", "2"]) == [vector_of("1"), vector_of("2")]
        assert len(server.embed_requests()) == 3


def test_worker_lost_is_retried_once_only() -> None:
    lost = openai_error(500, "worker_lost")
    with FakeServer(embed_or({0: lost})) as server, fast_client(server.url) as client:
        assert client.embed_one("3") == vector_of("3")
    with FakeServer(embed_or({0: lost, 1: lost})) as server, fast_client(server.url) as client:
        with pytest.raises(inferd.WorkerLost) as caught:
            client.embed_one("3")
        assert caught.value.status == 500 and caught.value.code == "worker_lost"
        assert len(server.embed_requests()) == 2


def test_retries_are_bounded() -> None:
    with FakeServer(lambda n, r: openai_error(503, "unavailable")) as server:
        with fast_client(server.url, retries=3) as client:
            with pytest.raises(inferd.Unavailable) as caught:
                client.embed_one("x")
    assert caught.value.status == 503
    assert len(server.requests) == 4


def test_other_errors_are_not_retried() -> None:
    for status, kind, error in [
        (400, "invalid_request_error", inferd.BadRequest),
        (401, "invalid_api_key", inferd.AuthenticationError),
        (403, "permission_denied", inferd.PermissionDenied),
        (413, "payload_too_large", inferd.PayloadTooLarge),
        (500, "internal", inferd.InternalError),
        (504, "timeout", inferd.Timeout),
    ]:
        answer = openai_error(status, kind, "why")
        with FakeServer(lambda n, r, answer=answer: answer) as server:
            with fast_client(server.url) as client:
                with pytest.raises(error) as caught:
                    client.embed_one("x")
        assert len(server.requests) == 1, status
        assert caught.value.status == status and caught.value.message == "why"


def test_tei_and_openai_error_shapes_are_both_read() -> None:
    tei = error_from_response(
        500, {}, b'{"error":"request was lost twice","error_type":"worker_lost"}'
    )
    assert isinstance(tei, inferd.WorkerLost)
    assert tei.message == "request was lost twice"
    assert (tei.error_type, tei.code) == ("worker_lost", None)
    openai = error_from_response(
        404,
        {},
        b'{"error":{"message":"no model","type":"invalid_request_error","code":"model_not_found"}}',
    )
    assert isinstance(openai, inferd.ModelNotFound) and isinstance(openai, inferd.NotFound)
    assert openai.message == "no model" and openai.code == "model_not_found"
    overloaded = error_from_response(
        429, {"Retry-After": "2"}, b'{"error":"full","error_type":"overloaded"}'
    )
    assert isinstance(overloaded, inferd.Overloaded) and overloaded.retry_after == 2.0
    plain = error_from_response(502, {}, b"<html>bad gateway</html>")
    assert isinstance(plain, inferd.InternalError) and "bad gateway" in plain.message
    assert isinstance(error_from_response(422, {}, b"{}"), inferd.BadRequest)
    route = error_from_response(404, {}, b'{"error":"no route","error_type":"not_found"}')
    assert type(route) is inferd.NotFound


def test_a_silent_server_times_out() -> None:
    with FakeServer(lambda n, r: Silence(3.0)) as server:
        with fast_client(server.url, timeout=0.3) as client:
            started = time.monotonic()
            with pytest.raises(inferd.Timeout) as caught:
                client.embed_one("x")
            assert time.monotonic() - started < 2.5
    assert caught.value.status is None
    assert len(server.requests) == 1, "a socket timeout is not retried"


def test_a_missing_socket_is_connection_failed(tmp_path: Path) -> None:
    client = inferd.Client(socket=str(tmp_path / "absent.sock"), retries=2, backoff=0.01)
    with pytest.raises(inferd.ConnectionFailed) as caught:
        client.embed_one("x")
    assert caught.value.status is None and "absent.sock" in str(caught.value)
    with pytest.raises(inferd.ConnectionFailed):
        client.health()


def test_keep_alive_connections_are_reused_and_stale_ones_replaced() -> None:
    # Request 1's connection is closed by the server after its answer (as the
    # daemon does after 5 s idle): the next request finds it stale and is
    # sent again on a new connection, without counting as a retry.
    def script(number: int, request: Request):
        answer = embeddings_answer(request.body["input"])
        answer.close_after = number == 1
        return answer

    with FakeServer(script) as server, fast_client(server.url, retries=0) as client:
        for text in ["1", "2", "3", "4"]:
            assert client.embed_one(text) == vector_of(text)
        assert server.connections == 2, "one connection reused, replaced once when closed"
        assert len(server.embed_requests()) == 4


def test_api_key_and_model_are_sent() -> None:
    with FakeServer(embed_or({})) as server:
        with fast_client(server.url, api_key="k-123", model="m") as client:
            client.embed_one("1")
    (request,) = server.embed_requests()
    assert request.headers["authorization"] == "Bearer k-123"
    assert request.body["model"] == "m" and request.body["encoding_format"] == "base64"


def test_embed_splits_at_max_texts_and_embed_batch_does_not() -> None:
    with FakeServer(embed_or({})) as server, fast_client(server.url) as client:
        texts = [str(i) for i in range(20)]
        assert client.embed(texts) == [vector_of(t) for t in texts]
        sizes = [len(r.body["input"]) for r in server.embed_requests()]
        assert sizes == [8, 8, 4]
        client.embed_batch(texts)
        assert len(server.embed_requests()[-1].body["input"]) == 20
        assert client.embed([]) == []


def test_embed_iter_keeps_input_order_with_out_of_order_answers() -> None:
    rng = random.Random(7)
    lock = threading.Lock()

    def script(number: int, request: Request):
        if request.path == "/info":
            return Answer(200, {"max_texts": 64})
        with lock:
            delay = rng.random() * 0.05
        time.sleep(delay)
        return embeddings_answer(request.body["input"])

    pulled = 0

    def corpus(n: int):
        nonlocal pulled
        for i in range(n):
            pulled += 1
            yield str(i)

    with FakeServer(script) as server, fast_client(server.url) as client:
        stream = client.embed_iter(corpus(1000), batch_size=10, concurrency=4)
        first = next(stream)
        assert first == vector_of("0")
        # Lazy and bounded: at most `concurrency` batches read ahead.
        assert pulled <= 10 * 4 + 10, pulled
        rest = list(stream)
    assert [first, *rest] == [vector_of(str(i)) for i in range(1000)]
    assert max(len(r.body["input"]) for r in server.embed_requests()) == 10


def test_embed_iter_raises_a_failed_batch_in_order() -> None:
    def script(number: int, request: Request):
        if request.path == "/info":
            return Answer(200, {"max_texts": 5})
        if "12" in request.body["input"]:
            return openai_error(400, "invalid_request_error", "bad text")
        return embeddings_answer(request.body["input"])

    with FakeServer(script) as server, fast_client(server.url) as client:
        got = []
        with pytest.raises(inferd.BadRequest, match="bad text"):
            # batch_size 50 is capped at the server's max_texts (5).
            for vector in client.embed_iter((str(i) for i in range(100)), batch_size=50):
                got.append(vector)
    assert got == [vector_of(str(i)) for i in range(10)]


def test_embed_iter_rejects_non_strings() -> None:
    with FakeServer(embed_or({})) as server, fast_client(server.url) as client:
        with pytest.raises(TypeError, match="text 3 is int"):
            list(client.embed_iter(["0", "1", "2", 3], batch_size=2))


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        inferd.Client()
    with pytest.raises(ValueError):
        inferd.Client(socket="/x", url="http://127.0.0.1:1")
    with pytest.raises(ValueError):
        inferd.Client(url="ftp://host")
    with pytest.raises(ValueError):
        inferd.Client(socket="/x").embed_iter([], batch_size=0)


def test_wait_ready_polls_health_until_200_and_is_bounded() -> None:
    def script(number: int, request: Request) -> Action:
        if number < 3:
            return Answer(503, {"error": "no worker is ready", "error_type": "unhealthy"})
        return Answer(200, {"status": "ok"})

    with FakeServer(script) as server, fast_client(server.url) as client:
        assert client.health() is False
        client.wait_ready(timeout=5, interval=0.01)
        assert len(server.requests) == 4 and client.health() is True
    with FakeServer(lambda n, r: Answer(503, {"error": "x", "error_type": "unhealthy"})) as server:
        with fast_client(server.url) as client, pytest.raises(inferd.Timeout, match="503"):
            client.wait_ready(timeout=0.2, interval=0.01)
