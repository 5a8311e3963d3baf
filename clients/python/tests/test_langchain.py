"""LangChain: ``OpenAIEmbeddings`` with its default settings (it sends
cl100k_base token ids, which the daemon decodes), and ``InferdEmbeddings``;
vector store round trips with LangChain's InMemoryVectorStore and FAISS."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import faiss
import httpx2
import numpy as np
from helpers import (
    ALIAS,
    MODEL_NAME,
    TOLERANCE,
    Daemon,
    Reference,
    assert_matches_reference,
    cosine,
    max_abs_diff,
)
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_openai import OpenAIEmbeddings

import inferd
from inferd.langchain import InferdEmbeddings

DOCUMENTS = [
    "The cat sleeps on the warm windowsill all afternoon.",
    "Stock markets fell sharply after the interest rate announcement.",
    "Mix two eggs with flour and sugar, then bake the cake for forty minutes.",
    "The rocket lifted off and reached orbit ten minutes later.",
    "He repaired the flat tyre on his bicycle before riding to work.",
]
QUERIES = {
    "a kitten napping in the sun": 0,
    "how do I bake a sponge cake?": 2,
    "space launch": 3,
    "fixing a bike": 4,
}


def uds_openai_embeddings(daemon: Daemon, sent: list[Any]) -> OpenAIEmbeddings:
    """The README's recipe: LangChain's OpenAIEmbeddings over the Unix socket,
    default settings; request bodies are appended to ``sent``."""
    http_client = httpx2.Client(
        transport=httpx2.HTTPTransport(uds=daemon.socket),
        event_hooks={"request": [lambda request: sent.append(json.loads(request.content))]},
    )
    return OpenAIEmbeddings(
        model=MODEL_NAME,
        base_url="http://localhost/v1",
        api_key="unused",
        http_client=http_client,
    )


def assert_same_as_text(embeddings: Embeddings, daemon: Daemon, ref: Reference) -> None:
    """Documents and a query embed as the daemon embeds their text."""
    with inferd.Client(socket=daemon.socket) as direct:
        want = direct.embed(ref.texts)
    got = embeddings.embed_documents(ref.texts)
    assert len(got) == len(ref.texts)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert cosine(g, w) >= 0.999, f"text {i}: cosine {cosine(g, w)}"
    query = embeddings.embed_query(ref.texts[3])
    assert cosine(query, want[3]) >= 0.999


def assert_vector_stores_find_the_right_document(embeddings: Embeddings) -> None:
    """InMemoryVectorStore and a FAISS index both return the right document."""
    store = InMemoryVectorStore.from_texts(DOCUMENTS, embeddings)
    for query, expected in QUERIES.items():
        (hit,) = store.similarity_search(query, k=1)
        assert hit.page_content == DOCUMENTS[expected], query

    index = faiss.IndexFlatIP(384)  # inner product of unit vectors: cosine
    index.add(np.asarray(embeddings.embed_documents(DOCUMENTS), dtype=np.float32))
    queries = np.asarray([embeddings.embed_query(q) for q in QUERIES], dtype=np.float32)
    _, found = index.search(queries, 1)
    assert [int(row[0]) for row in found] == list(QUERIES.values())


def test_openai_embeddings_default_settings_over_the_unix_socket(
    daemon: Daemon, cl100k: Any, ref: Reference
) -> None:
    sent: list[Any] = []
    embeddings = uds_openai_embeddings(daemon, sent)
    assert embeddings.check_embedding_ctx_length, "LangChain's default: token ids"
    assert_same_as_text(embeddings, daemon, ref)
    # What went over the wire was cl100k_base token ids, not text.
    first = sent[0]["input"]
    assert isinstance(first, list) and all(isinstance(t, int) for t in first[0])
    assert first[0] == cl100k.encode_ordinary(ref.texts[0])
    assert_vector_stores_find_the_right_document(embeddings)


def test_openai_embeddings_default_settings_over_tcp(
    daemon: Daemon, cl100k: Any, ref: Reference
) -> None:
    assert daemon.url is not None
    embeddings = OpenAIEmbeddings(model=ALIAS, base_url=f"{daemon.url}/v1", api_key=daemon.api_key)
    assert_same_as_text(embeddings, daemon, ref)
    assert_vector_stores_find_the_right_document(embeddings)


def test_openai_embeddings_default_chunk_is_larger_than_max_texts(
    daemon: Daemon, cl100k: Any
) -> None:
    """LangChain sends up to 1000 inputs per request by default; the daemon
    runs them in parts of max_texts and answers them all, in order."""
    sent: list[Any] = []
    embeddings = uds_openai_embeddings(daemon, sent)
    with inferd.Client(socket=daemon.socket) as direct:
        max_texts = direct.max_texts()
        documents = [f"document number {i} about topic {i % 7}" for i in range(3 * max_texts + 5)]
        want = direct.embed(documents)
    got = embeddings.embed_documents(documents)
    assert len(sent) == 1 and len(sent[0]["input"]) == len(documents), "one request"
    assert len(got) == len(documents)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert cosine(g, w) >= 0.999, f"document {i}: cosine {cosine(g, w)}"


def test_inferd_embeddings(daemon: Daemon, ref: Reference) -> None:
    embeddings = InferdEmbeddings(socket=daemon.socket, batch_size=3, concurrency=2)
    assert_matches_reference(embeddings.embed_documents(ref.texts), ref)
    assert max_abs_diff(embeddings.embed_query(ref.texts[2]), ref.vectors[2]) <= TOLERANCE
    assert_vector_stores_find_the_right_document(embeddings)
    # LangChain's async methods run the sync ones in an executor.
    vectors = asyncio.run(embeddings.aembed_documents(ref.texts[:2]))
    assert_matches_reference(vectors, Reference(ref.texts[:2], ref.vectors[:2]))


def test_inferd_embeddings_over_tcp_and_with_a_client(daemon: Daemon, ref: Reference) -> None:
    assert daemon.url is not None
    over_tcp = InferdEmbeddings(url=daemon.url, api_key=daemon.api_key, model=ALIAS)
    assert_matches_reference(over_tcp.embed_documents(ref.texts), ref)
    shared = InferdEmbeddings(client=inferd.Client(socket=daemon.socket))
    assert max_abs_diff(shared.embed_query(ref.texts[0]), ref.vectors[0]) <= TOLERANCE
