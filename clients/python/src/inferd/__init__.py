"""Python client for inferd, the embedding daemon.

Standard library only (numpy and LangChain are optional extras)::

    from inferd import Client

    client = Client(socket="/run/inferd/inferd.sock")
    vectors = client.embed(["first text", "second text"])

See :class:`Client`, the exceptions in :mod:`inferd.errors`, and
:class:`inferd.langchain.InferdEmbeddings` for LangChain.
"""

from .client import DEFAULT_MAX_TEXTS, Client
from .errors import (
    APIError,
    AuthenticationError,
    BadRequest,
    ConnectionFailed,
    InferdError,
    InternalError,
    ModelNotFound,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    Timeout,
    Unavailable,
    WorkerLost,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "DEFAULT_MAX_TEXTS",
    "InferdError",
    "APIError",
    "AuthenticationError",
    "BadRequest",
    "ConnectionFailed",
    "InternalError",
    "ModelNotFound",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProtocolError",
    "Timeout",
    "Unavailable",
    "WorkerLost",
]
