"""The inferd client: embeddings over the daemon's HTTP API.

Requests go to ``POST /v1/embeddings`` with ``encoding_format: "base64"``:
each vector comes back as base64 of its little-endian ``float32`` bytes,
which is about four times smaller than JSON numbers and decodes without a
float parser. The vectors are exactly the daemon's ``float32`` values.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import sys
import threading
import time
from array import array
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, Sequence, cast, overload

from ._transport import Endpoint, Response, Transport
from .errors import (
    InferdError,
    Overloaded,
    ProtocolError,
    Timeout,
    Unavailable,
    WorkerLost,
    error_from_response,
)

if TYPE_CHECKING:  # pragma: no cover
    import numpy

__all__ = ["Client", "DEFAULT_MAX_TEXTS"]

#: Batch limit used when the daemon's ``/info`` does not say ``max_texts``.
DEFAULT_MAX_TEXTS = 64

_USER_AGENT = "inferd-python/0.1.0"


def _decode_vector(encoded: str) -> bytes:
    """The little-endian ``float32`` bytes of one base64 vector."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ProtocolError(f"an embedding is not valid base64: {err}") from err
    if len(raw) % 4:
        raise ProtocolError(f"an embedding has {len(raw)} bytes, not a multiple of 4")
    return raw


def _floats(raw: bytes) -> list[float]:
    values = array("f")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def _numpy() -> Any:
    try:
        import numpy
    except ImportError as err:  # pragma: no cover - numpy is installed in the tests
        raise ImportError(
            "as_numpy=True needs numpy: pip install 'inferd[numpy]'"
        ) from err
    return numpy


class Client:
    """A client of one inferd daemon, over its Unix socket or TCP.

    Thread-safe: share one client between threads. Concurrent requests each
    use their own keep-alive connection; connections are reused between
    requests.

    Transient failures are retried with exponential backoff and jitter, at
    most ``retries`` times per request: 429 ``Overloaded`` (waiting at least
    its ``Retry-After``), 503 ``Unavailable``, a connection refused or reset
    (:class:`~inferd.errors.ConnectionFailed`, e.g. while the daemon
    restarts) and, once only, 500 ``WorkerLost`` (a request in flight at two
    worker deaths: retrying an input that really crashes the model more than
    once would crash more workers). Every other error is raised at once.

    Example::

        from inferd import Client

        with Client(socket="/run/inferd/inferd.sock") as client:
            vectors = client.embed(["first text", "second text"])
            for vector in client.embed_iter(open("corpus.txt"), concurrency=4):
                ...
    """

    def __init__(
        self,
        socket: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 5,
        model: str | None = None,
        deadline: float | None = None,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        """Args:
        socket: Path of the daemon's Unix socket (its ``socket`` setting).
        url: The daemon's TCP root instead, e.g. ``http://127.0.0.1:8080``
            (its ``http_listen`` setting). Exactly one of ``socket`` and
            ``url`` must be given.
        api_key: Sent as ``Authorization: Bearer <api_key>``; the TCP
            listener requires one of the daemon's ``api_keys_file`` keys.
        timeout: Seconds allowed for each socket operation (connect, send,
            each receive); past it a request raises
            :class:`~inferd.errors.Timeout`. Nothing waits longer.
        retries: Most retries of a request after a transient failure.
        model: Model name sent with each embedding request (the served name
            or one of its ``model_aliases``); ``None`` sends none.
        deadline: Seconds the daemon may take to answer an embedding request
            (sent as ``X-Request-Timeout-Ms``; past it the daemon answers
            504); ``None`` uses the daemon's ``default_deadline_ms``.
        backoff: First retry delay in seconds; doubled at each retry.
        max_backoff: Longest retry delay (a ``Retry-After`` may be longer).
        """
        if (socket is None) == (url is None):
            raise ValueError("give exactly one of socket= and url=")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if deadline is not None and deadline <= 0:
            raise ValueError("deadline must be positive")
        endpoint = Endpoint.unix(socket) if socket is not None else Endpoint.parse_url(str(url))
        self.endpoint = endpoint
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.model = model
        self.deadline = deadline
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._transport = Transport(endpoint, timeout)
        self._max_texts: int | None = None
        self._info_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Closes the idle connections. The client stays usable: a later
        request opens a new connection."""
        self._transport.close()
        self._transport = Transport(self.endpoint, self.timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.endpoint.describe()})"

    # ---------------------------------------------------------- plumbing

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"User-Agent": _USER_AGENT, "Accept": "application/json"}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if extra:
            headers.update(extra)
        return headers

    def _delay(self, attempt: int, error: InferdError) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        delay = min(self.max_backoff, self.backoff * (2**attempt))
        delay *= 0.5 + random.random() / 2  # jitter: spread out many clients
        if isinstance(error, Overloaded) and error.retry_after is not None:
            delay = max(delay, error.retry_after)
        return float(delay)

    def _send(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        extra_headers: dict[str, str] | None = None,
    ) -> Response:
        """One request, without retries; raises the typed error of an
        error status."""
        body = None
        headers = self._headers(extra_headers)
        if payload is not None:
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        answer = self._transport.request(method, path, body, headers)
        if answer.status >= 400:
            raise error_from_response(answer.status, answer.headers, answer.body)
        return answer

    def _call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        extra_headers: dict[str, str] | None = None,
    ) -> Response:
        """One request, retrying transient failures (see the class doc)."""
        attempt = 0
        lost = 0
        while True:
            try:
                return self._send(method, path, payload, extra_headers=extra_headers)
            except InferdError as error:
                if not error.transient or attempt >= self.retries:
                    raise
                if isinstance(error, WorkerLost):
                    if lost >= 1:
                        raise
                    lost += 1
                time.sleep(self._delay(attempt, error))
                attempt += 1

    @staticmethod
    def _json(answer: Response) -> Any:
        try:
            return json.loads(answer.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ProtocolError(
                f"the daemon's answer is not JSON: {answer.body[:200]!r}", status=answer.status
            ) from err

    # ------------------------------------------------------------ routes

    def health(self) -> bool:
        """Whether the daemon can serve now (``GET /health``): ``True`` while
        at least one worker is ready or busy, ``False`` while none is (503).

        Not retried. Raises :class:`~inferd.errors.ConnectionFailed` if the
        daemon cannot be reached.
        """
        try:
            self._send("GET", "/health")
        except Unavailable:
            return False
        return True

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.05) -> None:
        """Polls :meth:`health` until the daemon can serve.

        Connection failures (the daemon not listening yet) are polled
        through too.

        Raises:
            Timeout: The daemon was not ready within ``timeout`` seconds; the
                message says what the last poll saw.
        """
        end = time.monotonic() + timeout
        last = "no poll yet"
        while True:
            try:
                if self.health():
                    return
                last = "503: no worker ready"
            except InferdError as error:
                if not error.transient:
                    raise
                last = str(error)
            if time.monotonic() >= end:
                raise Timeout(
                    f"{self.endpoint.describe()} not ready within {timeout:g}s; last poll: {last}"
                )
            time.sleep(interval)

    def info(self) -> dict[str, Any]:
        """The daemon's ``GET /info``: ``model_id``, ``dims`` (once a worker
        answered), ``max_seq_len``, ``max_texts``, ``max_text_bytes``,
        ``max_frame_bytes``, ``normalize``, ``version``."""
        body = self._json(self._call("GET", "/info"))
        if not isinstance(body, dict):
            raise ProtocolError(f"GET /info answered {body!r}, not an object")
        max_texts = body.get("max_texts")
        if isinstance(max_texts, int) and max_texts > 0:
            self._max_texts = max_texts
        return body

    def max_texts(self) -> int:
        """Most texts the daemon takes in one request (``/info``'s
        ``max_texts``, read once and cached)."""
        if self._max_texts is None:
            with self._info_lock:
                if self._max_texts is None:
                    self.info()
                    if self._max_texts is None:
                        self._max_texts = DEFAULT_MAX_TEXTS
        return self._max_texts

    # -------------------------------------------------------- embeddings

    def _embed_raw(self, texts: list[str]) -> list[bytes]:
        """One ``POST /v1/embeddings`` of at most ``max_texts`` texts: each
        vector's little-endian ``float32`` bytes, in input order."""
        payload: dict[str, Any] = {"input": texts, "encoding_format": "base64"}
        if self.model is not None:
            payload["model"] = self.model
        extra = None
        if self.deadline is not None:
            extra = {"X-Request-Timeout-Ms": str(max(1, int(self.deadline * 1000)))}
        answer = self._call("POST", "/v1/embeddings", payload, extra_headers=extra)
        body = self._json(answer)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or len(data) != len(texts):
            count = len(data) if isinstance(data, list) else "no"
            raise ProtocolError(
                f"asked for {len(texts)} embeddings, the daemon answered {count}",
                status=answer.status,
            )
        vectors: list[bytes | None] = [None] * len(texts)
        for position, item in enumerate(data):
            index = item.get("index", position) if isinstance(item, dict) else None
            encoded = item.get("embedding") if isinstance(item, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(texts):
                raise ProtocolError(f"embedding {position} has a bad index: {index!r}")
            if vectors[index] is not None:
                raise ProtocolError(f"two embeddings have index {index}")
            if not isinstance(encoded, str):
                raise ProtocolError(f"embedding {position} is not a base64 string")
            vectors[index] = _decode_vector(encoded)
        return [v for v in vectors if v is not None]

    @staticmethod
    def _check_texts(texts: Sequence[str], start: int = 0) -> None:
        for offset, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"text {start + offset} is {type(text).__name__}, not str"
                )

    @staticmethod
    def _convert(raws: list[bytes], as_numpy: bool) -> list[list[float]] | "numpy.ndarray":
        if not as_numpy:
            return [_floats(raw) for raw in raws]
        np = _numpy()
        if not raws:
            return cast("numpy.ndarray", np.empty((0, 0), dtype=np.float32))
        flat = np.frombuffer(b"".join(raws), dtype="<f4").astype(np.float32)
        return cast("numpy.ndarray", flat.reshape(len(raws), -1))

    @overload
    def embed(
        self, texts: str | Sequence[str], *, as_numpy: Literal[False] = False
    ) -> list[list[float]]: ...

    @overload
    def embed(self, texts: str | Sequence[str], *, as_numpy: Literal[True]) -> "numpy.ndarray": ...

    def embed(
        self, texts: str | Sequence[str], *, as_numpy: bool = False
    ) -> list[list[float]] | "numpy.ndarray":
        """Embeds ``texts``, in order.

        Args:
            texts: The texts; a single string is one text (the answer is then
                a list of one vector). Lists longer than the daemon's
                ``max_texts`` are sent in several requests, one after another.
            as_numpy: Return a ``float32`` array of shape ``(len(texts),
                dims)`` instead of lists (needs numpy).

        Returns:
            One vector per text; an empty input gives an empty list (no
            request is sent).
        """
        items = [texts] if isinstance(texts, str) else list(texts)
        self._check_texts(items)
        raws: list[bytes] = []
        if items:
            size = 1 if len(items) == 1 else self.max_texts()
            for start in range(0, len(items), size):
                raws.extend(self._embed_raw(items[start : start + size]))
        return self._convert(raws, as_numpy)

    @overload
    def embed_batch(
        self, texts: Sequence[str], *, as_numpy: Literal[False] = False
    ) -> list[list[float]]: ...

    @overload
    def embed_batch(self, texts: Sequence[str], *, as_numpy: Literal[True]) -> "numpy.ndarray": ...

    def embed_batch(
        self, texts: Sequence[str], *, as_numpy: bool = False
    ) -> list[list[float]] | "numpy.ndarray":
        """Embeds ``texts`` in exactly one request, as they are. The daemon
        runs more than its ``max_texts`` as several pool requests side by
        side; more than 2048 (OpenAI's limit), or none, is answered
        :class:`~inferd.errors.BadRequest`. (:meth:`embed` splits into
        requests of ``max_texts`` instead.)
        """
        items = list(texts)
        self._check_texts(items)
        return self._convert(self._embed_raw(items), as_numpy)

    def embed_one(self, text: str) -> list[float]:
        """The embedding of one text."""
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}, not str")
        return _floats(self._embed_raw([text])[0])

    @overload
    def embed_iter(
        self,
        documents: Iterable[str],
        batch_size: int = 64,
        concurrency: int = 4,
        *,
        as_numpy: Literal[False] = False,
    ) -> Iterator[list[float]]: ...

    @overload
    def embed_iter(
        self,
        documents: Iterable[str],
        batch_size: int = 64,
        concurrency: int = 4,
        *,
        as_numpy: Literal[True],
    ) -> Iterator["numpy.ndarray"]: ...

    def embed_iter(
        self,
        documents: Iterable[str],
        batch_size: int = 64,
        concurrency: int = 4,
        *,
        as_numpy: bool = False,
    ) -> Iterator[list[float]] | Iterator["numpy.ndarray"]:
        """Streams the embeddings of a large, possibly lazy, corpus in input
        order.

        ``documents`` is read one batch at a time as results are consumed:
        at most ``concurrency`` batches are in flight (each on its own
        thread and connection) and held in memory, whatever the corpus size.
        Each batch is retried on transient failures as every request is (see
        the class doc); a batch that still fails raises its error from the
        iterator, after the vectors of every earlier document were yielded.
        Closing the iterator early cancels the batches not yet sent.

        Args:
            documents: The texts (any iterable of ``str``).
            batch_size: Texts per request; capped at the daemon's
                ``max_texts``.
            concurrency: Most requests in flight at once.
            as_numpy: Yield 1-D ``float32`` arrays instead of lists.

        Yields:
            One vector per document, in order.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        return self._embed_iter(documents, batch_size, concurrency, as_numpy)

    def _embed_iter(
        self, documents: Iterable[str], batch_size: int, concurrency: int, as_numpy: bool
    ) -> Iterator[Any]:
        source = iter(documents)
        size = min(batch_size, self.max_texts())
        convert: Any = _floats
        if as_numpy:
            np = _numpy()

            def convert(raw: bytes) -> Any:
                return np.frombuffer(raw, dtype="<f4").astype(np.float32)

        pending: deque[Future[list[bytes]]] = deque()
        read = 0
        exhausted = False
        executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="inferd-embed")

        def fill() -> None:
            nonlocal read, exhausted
            while not exhausted and len(pending) < concurrency:
                batch = list(islice(source, size))
                if not batch:
                    exhausted = True
                    return
                self._check_texts(batch, read)
                read += len(batch)
                pending.append(executor.submit(self._embed_raw, batch))

        try:
            fill()
            while pending:
                raws = pending.popleft().result()
                fill()
                for raw in raws:
                    yield convert(raw)
        finally:
            for future in pending:
                future.cancel()
            # Requests already sent end within their socket timeouts.
            executor.shutdown(wait=False, cancel_futures=True)
