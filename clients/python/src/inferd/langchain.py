"""LangChain integration: :class:`InferdEmbeddings`.

Needs ``langchain-core`` (``pip install 'inferd[langchain]'``); importing
:mod:`inferd` alone never imports LangChain.
"""

from __future__ import annotations

from typing import Any

try:
    from langchain_core.embeddings import Embeddings
except ImportError as err:  # pragma: no cover - installed in the tests
    raise ImportError(
        "inferd.langchain needs langchain-core: pip install 'inferd[langchain]'"
    ) from err

from .client import Client

__all__ = ["InferdEmbeddings"]


class InferdEmbeddings(Embeddings):
    """LangChain ``Embeddings`` served by an inferd daemon.

    Documents are sent as text (no tokenizer on the client side), in
    batches of ``batch_size`` with up to ``concurrency`` in flight, through
    :meth:`inferd.Client.embed_iter`.

    Example::

        from inferd.langchain import InferdEmbeddings
        from langchain_core.vectorstores import InMemoryVectorStore

        embeddings = InferdEmbeddings(socket="/run/inferd/inferd.sock")
        store = InMemoryVectorStore.from_texts(["a text", "another"], embeddings)
    """

    def __init__(
        self,
        socket: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        *,
        client: Client | None = None,
        batch_size: int = 64,
        concurrency: int = 4,
        **client_options: Any,
    ) -> None:
        """Args:
        socket: The daemon's Unix socket path (or give ``url`` or ``client``).
        url: The daemon's TCP root, e.g. ``http://127.0.0.1:8080``.
        api_key: Key for the TCP listener.
        client: An existing :class:`inferd.Client` to use instead.
        batch_size: Texts per request (capped at the daemon's ``max_texts``).
        concurrency: Most requests in flight for one ``embed_documents``.
        client_options: Other :class:`inferd.Client` arguments
            (``timeout``, ``retries``, ``model``, ...).
        """
        if client is not None:
            if socket is not None or url is not None or api_key is not None or client_options:
                raise ValueError("give either client= or the client's arguments, not both")
            self.client = client
        else:
            self.client = Client(socket=socket, url=url, api_key=api_key, **client_options)
        self.batch_size = batch_size
        self.concurrency = concurrency

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One embedding per text, in order."""
        return list(
            self.client.embed_iter(texts, batch_size=self.batch_size, concurrency=self.concurrency)
        )

    def embed_query(self, text: str) -> list[float]:
        """The embedding of one query text."""
        return self.client.embed_one(text)
