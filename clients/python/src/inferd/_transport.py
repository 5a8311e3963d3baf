"""HTTP/1.1 over a Unix socket or TCP, with keep-alive connection reuse.

Standard library only: :mod:`http.client` with a small
:class:`~http.client.HTTPConnection` subclass that connects an ``AF_UNIX``
socket. Every socket operation (connect, send, each receive) has a timeout.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConnectionFailed, InferdError, Timeout

__all__ = ["Endpoint", "Response", "Transport", "UnixHTTPConnection"]

# The daemon (hyper) closes a connection that stays idle for 5 s between
# requests; a pooled connection idle for longer than this is not reused.
IDLE_REUSE_SECONDS = 4.0


class UnixHTTPConnection(http.client.HTTPConnection):
    """An :class:`http.client.HTTPConnection` to a Unix domain socket."""

    def __init__(self, path: str, timeout: float) -> None:
        """Args:
        path: The daemon's socket path.
        timeout: Seconds allowed for the connect and for each send and receive.
        """
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        """Connects the Unix socket (with the connection's timeout)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon listens: a Unix socket path or an ``http(s)://`` URL."""

    socket_path: str | None
    scheme: str
    host: str
    port: int | None
    prefix: str

    @classmethod
    def unix(cls, path: str) -> "Endpoint":
        """The daemon's Unix socket at ``path``."""
        return cls(socket_path=path, scheme="http", host="localhost", port=None, prefix="")

    @classmethod
    def parse_url(cls, url: str) -> "Endpoint":
        """The daemon at ``url`` (its root, e.g. ``http://127.0.0.1:8080``)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"url has no host: {url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"url must not have a query or fragment: {url!r}")
        return cls(
            socket_path=None,
            scheme=parts.scheme,
            host=parts.hostname,
            port=parts.port,
            prefix=parts.path.rstrip("/"),
        )

    def describe(self) -> str:
        """The endpoint for error messages."""
        if self.socket_path is not None:
            return f"unix socket {self.socket_path}"
        port = f":{self.port}" if self.port else ""
        return f"{self.scheme}://{self.host}{port}{self.prefix}"

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        """A new, not yet connected, connection to the endpoint."""
        if self.socket_path is not None:
            return UnixHTTPConnection(self.socket_path, timeout)
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


@dataclass(frozen=True)
class Response:
    """One complete HTTP answer."""

    status: int
    #: Header names in lower case.
    headers: dict[str, str]
    body: bytes


class Transport:
    """Sends requests over a small pool of keep-alive connections.

    Each request holds one connection for itself from the moment it is sent
    until its answer is read in full, then puts it back for the next request
    (of any thread), so concurrent requests never share a connection and
    sequential ones reuse it. Thread-safe.
    """

    def __init__(self, endpoint: Endpoint, timeout: float, max_idle: int = 16) -> None:
        """Args:
        endpoint: Where the daemon listens.
        timeout: Seconds allowed for each socket operation.
        max_idle: Most idle connections kept for reuse.
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.endpoint = endpoint
        self.timeout = timeout
        self._max_idle = max_idle
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []
        self._lock = threading.Lock()
        self._closed = False
        #: Connections opened so far (for tests and diagnostics).
        self.connections_opened = 0

    def _checkout(self) -> http.client.HTTPConnection:
        """An idle connection young enough to reuse, else a new one."""
        stale: list[http.client.HTTPConnection] = []
        found: http.client.HTTPConnection | None = None
        now = time.monotonic()
        with self._lock:
            while self._idle:
                conn, since = self._idle.pop()
                if now - since < IDLE_REUSE_SECONDS:
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        return found if found is not None else self._fresh()

    def _fresh(self) -> http.client.HTTPConnection:
        with self._lock:
            self.connections_opened += 1
        return self.endpoint.connection(self.timeout)

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    def close(self) -> None:
        """Closes every idle connection; requests in progress finish on theirs."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
    ) -> Response:
        """Sends one request and reads its whole answer.

        A reused connection that the daemon had already closed (its idle
        keep-alive timeout) is detected by the send or the read failing
        before any answer arrived; the request is then sent once more on a
        fresh connection.

        Raises:
            Timeout: A socket operation took longer than ``timeout``.
            ConnectionFailed: The daemon could not be reached or closed the
                connection without an answer.
        """
        conn = self._checkout()
        try:
            return self._exchange(conn, method, path, body, headers)
        except _Stale:
            # A fresh connection is never stale: this cannot loop.
            return self._exchange(self._fresh(), method, path, body, headers)

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
    ) -> Response:
        # A connection from the pool is already connected; a new one is not.
        reused = conn.sock is not None
        where = self.endpoint.describe()
        try:
            try:
                conn.request(method, self.endpoint.prefix + path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                # The daemon may have answered before reading the whole body
                # (413 to a body over max_frame_bytes) and closed: read that
                # answer if it is there, else fail as below.
                if conn.sock is None:
                    raise
            answer = conn.getresponse()
            data = answer.read()
        except TimeoutError as err:
            conn.close()
            raise Timeout(
                f"no answer from {where} within {self.timeout:g}s (socket timeout)"
            ) from err
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as err:
            # http.client.RemoteDisconnected is a ConnectionResetError.
            conn.close()
            if reused:
                raise _Stale() from err
            raise ConnectionFailed(
                f"{where} closed the connection without an answer: {err}"
            ) from err
        except http.client.HTTPException as err:
            conn.close()
            raise ConnectionFailed(
                f"{where} did not answer in HTTP ({type(err).__name__}: {err}); the daemon "
                "refuses a connection over its connection caps or [access] rules with a "
                "native frame, and its log says why"
            ) from err
        except OSError as err:
            conn.close()
            raise ConnectionFailed(f"cannot reach {where}: {err}") from err
        if answer.will_close:
            conn.close()
        else:
            self._checkin(conn)
        return Response(
            status=answer.status,
            headers={name.lower(): value for name, value in answer.getheaders()},
            body=data,
        )


class _Stale(InferdError):
    """A reused keep-alive connection turned out to be closed."""

    def __init__(self) -> None:
        super().__init__("stale keep-alive connection")
