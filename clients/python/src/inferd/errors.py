"""Typed exceptions for every way a request to inferd can fail.

Every exception derives from :class:`InferdError`. Errors the daemon answered
carry the HTTP ``status``, the machine-readable ``error_type`` and ``code``
and the daemon's ``message``; errors of the connection itself (refused,
reset, timed out) have ``status`` ``None``.

The daemon answers ``/v1/*`` routes in OpenAI's shape
(``{"error": {"message", "type", "code"}}``) and its other routes in
text-embeddings-inference's (``{"error", "error_type"}``);
:func:`error_from_response` reads both.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = [
    "InferdError",
    "ConnectionFailed",
    "ProtocolError",
    "APIError",
    "BadRequest",
    "PayloadTooLarge",
    "AuthenticationError",
    "PermissionDenied",
    "NotFound",
    "ModelNotFound",
    "Overloaded",
    "Unavailable",
    "Timeout",
    "WorkerLost",
    "InternalError",
    "error_from_response",
]


class InferdError(Exception):
    """Base class of every error this package raises.

    Attributes:
        message: What went wrong, as the daemon (or the socket) said it.
        status: The HTTP status of the daemon's answer; ``None`` when there
            was no answer (connection refused, reset, timed out).
        error_type: OpenAI's ``type`` or TEI's ``error_type``, if any.
        code: OpenAI's ``code``, if any.
        body: The parsed JSON error body, if there was one.
    """

    #: Whether retrying the same request later may succeed.
    transient: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        code: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.code = code
        self.body = body

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        kind = self.code or self.error_type
        return f"{self.status} {kind}: {self.message}" if kind else f"{self.status}: {self.message}"


class ConnectionFailed(InferdError):
    """The daemon could not be reached, or dropped the connection without an
    answer: socket missing, connection refused or reset (for example while
    the daemon restarts), or refused by the daemon's connection caps or
    ``[access]`` rules (which answer in the native protocol, not HTTP).
    """

    transient = True


class ProtocolError(InferdError):
    """The daemon answered something this client cannot read (not JSON, or
    JSON of the wrong shape)."""


class APIError(InferdError):
    """The daemon answered with an HTTP error status."""


class BadRequest(APIError):
    """400 or 422: the request is invalid (empty list, too many texts, a text
    over the byte limit, bad JSON, undecodable token ids, ...)."""


class PayloadTooLarge(BadRequest):
    """413: the request body is over ``max_frame_bytes``, or (TEI route with
    ``truncate: false``) an input was cut."""


class AuthenticationError(APIError):
    """401: a TCP request without a valid ``Authorization: Bearer`` key."""


class PermissionDenied(APIError):
    """403: the peer is not allowed this operation."""


class NotFound(APIError):
    """404: no such route."""


class ModelNotFound(NotFound):
    """404 ``model_not_found``: the request named a model the daemon does not
    serve (nor accept as an alias)."""


class Overloaded(APIError):
    """429: the daemon's queue is full; retry after :attr:`retry_after`.

    Attributes:
        retry_after: Seconds the daemon asked to wait (``Retry-After``), or
            ``None`` if it sent none.
    """

    transient = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Unavailable(APIError):
    """503: no worker can serve (workers starting or failing to load), the
    daemon is shutting down, or it has too many connections."""

    transient = True


class Timeout(InferdError):
    """504 from the daemon (the request passed its deadline), or a socket
    operation that timed out (``status`` is then ``None``)."""


class WorkerLost(APIError):
    """500 ``worker_lost``: the request was in flight at two worker deaths
    and the daemon quarantined it. A worker killed from outside (OOM killer,
    an operator) can cause it, so a retry may succeed; an input that really
    crashes the model fails again."""

    transient = True


class InternalError(APIError):
    """500: an internal error of the daemon (or any other 5xx status)."""


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = _header(headers, "retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        # An HTTP date: the daemon never sends one; treat it as "soon".
        return None
    return max(0.0, seconds)


def _fields(body: Any) -> tuple[str | None, str | None, str | None]:
    """``(message, type, code)`` of an OpenAI- or TEI-shaped error body."""
    if not isinstance(body, dict):
        return None, None, None
    error = body.get("error")
    if isinstance(error, dict):  # OpenAI
        message = error.get("message")
        kind = error.get("type")
        code = error.get("code")
    else:  # TEI
        message = error
        kind = body.get("error_type")
        code = None
    return (
        message if isinstance(message, str) else None,
        kind if isinstance(kind, str) else None,
        code if isinstance(code, str) else None,
    )


def error_from_response(status: int, headers: Mapping[str, str], raw: bytes) -> InferdError:
    """The typed exception for an HTTP error answer.

    Args:
        status: The HTTP status (>= 400).
        headers: The answer's headers.
        raw: The answer's body.
    """
    body: Any = None
    try:
        body = json.loads(raw.decode("utf-8")) if raw else None
    except (UnicodeDecodeError, ValueError):
        body = None
    message, kind, code = _fields(body)
    if message is None:
        text = raw.decode("utf-8", "replace").strip()
        message = text[:500] if text else f"HTTP {status}"
    fields: dict[str, Any] = {"status": status, "error_type": kind, "code": code, "body": body}
    kinds = {kind, code}
    if status in (400, 422):
        return BadRequest(message, **fields)
    if status == 413:
        return PayloadTooLarge(message, **fields)
    if status == 401:
        return AuthenticationError(message, **fields)
    if status == 403:
        return PermissionDenied(message, **fields)
    if status == 404:
        if "model_not_found" in kinds:
            return ModelNotFound(message, **fields)
        return NotFound(message, **fields)
    if status == 429:
        return Overloaded(message, retry_after=_retry_after(headers), **fields)
    if status == 503:
        return Unavailable(message, **fields)
    if status == 504:
        return Timeout(message, **fields)
    if "worker_lost" in kinds:
        return WorkerLost(message, **fields)
    if status >= 500:
        return InternalError(message, **fields)
    return APIError(message, **fields)
