"""A scripted HTTP server on 127.0.0.1 for testing the client's retries,
timeouts and error mapping without a daemon.

Each request is answered by a script function given the request; it returns
what to do: answer JSON, close the connection without answering, or stay
silent for a while.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Request:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Answer:
    """Answer with ``status`` and a JSON ``body``."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: Close the connection after answering (without a Connection: close header).
    close_after: bool = False


@dataclass
class Close:
    """Close the connection without answering."""


@dataclass
class Silence:
    """Answer nothing for ``seconds``, then close."""

    seconds: float


Action = Answer | Close | Silence
Script = Callable[[int, Request], Action]


def vector_of(text: str) -> list[float]:
    """The fake embedding of ``text``: ``[int(text), len(text)]`` for digit
    strings, ``[-1, len(text)]`` otherwise."""
    return [float(text) if text.isdigit() else -1.0, float(len(text))]


def embeddings_answer(texts: list[str]) -> Answer:
    """An OpenAI base64 answer with :func:`vector_of` of each text."""
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(struct.pack("<2f", *vector_of(t))).decode(),
        }
        for i, t in enumerate(texts)
    ]
    return Answer(200, {"object": "list", "data": data, "model": "fake", "usage": {}})


def openai_error(status: int, kind: str, message: str = "scripted", **headers: str) -> Answer:
    """An error in OpenAI's shape."""
    return Answer(status, {"error": {"message": message, "type": kind, "code": kind}}, headers)


class FakeServer:
    """A threaded HTTP/1.1 server answering by ``script``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[Request] = []
        self.connections = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server.connections += 1

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = Request(
                    method=self.command,
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=json.loads(raw) if raw else None,
                )
                with server._lock:
                    number = len(server.requests)
                    server.requests.append(request)
                action = server.script(number, request)
                if isinstance(action, Close):
                    self.close_connection = True
                    return
                if isinstance(action, Silence):
                    time.sleep(action.seconds)
                    self.close_connection = True
                    return
                payload = json.dumps(action.body).encode()
                self.send_response(action.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in action.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
                self.wfile.flush()
                if action.close_after:
                    self.close_connection = True

            do_GET = _handle
            do_POST = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> "FakeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)

    def embed_requests(self) -> list[Request]:
        """The ``POST /v1/embeddings`` requests received so far."""
        with self._lock:
            return [r for r in self.requests if r.path == "/v1/embeddings"]
