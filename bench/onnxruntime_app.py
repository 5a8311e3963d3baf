"""The peer of inferd's HTTP API in docs/BENCHMARKS.md: the embedding service
a Python user would typically write, as a plain WSGI app for gunicorn.

    gunicorn -w 2 --threads 1 -b unix:/tmp/ort.sock --chdir bench onnxruntime_app:app

Each gunicorn worker (sync worker class: one request at a time, no
keep-alive) loads the model once at import, then for every request:

  * tokenizes the batch with the model's tokenizer.json (truncation at 256
    tokens, padding to the longest text of the batch);
  * runs one onnxruntime session (CPU, 1 intra-op and 1 inter-op thread, so
    two workers use two cores, as inferd's two workers do), feeding only the
    inputs the graph declares;
  * mean-pools the token embeddings with the attention mask, L2-normalises;
  * answers in OpenAI's `/v1/embeddings` shape (float, or base64 of
    little-endian f32), with `usage.prompt_tokens` the unpadded token count.

This is the pipeline of scripts/reference_embeddings.py (and of inferd's
engine), batched the usual way. The tokenizer's own thread pool is off
(TOKENIZERS_PARALLELISM=false unless set), for one thread per worker.

Environment: INFERD_BENCH_MODEL (the model directory, holding model.onnx and
tokenizer.json; default ${INFERD_MODEL_DIR:-~/.cache/inferd/models}/all-MiniLM-L6-v2).
Routes: POST /v1/embeddings, GET /health. Pinned packages: bench/requirements.txt.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

MAX_SEQ_LEN = 256
MAX_TEXTS = 2048


def _model_dir() -> Path:
    explicit = os.environ.get("INFERD_BENCH_MODEL")
    if explicit:
        return Path(explicit)
    models = os.environ.get("INFERD_MODEL_DIR") or Path.home() / ".cache/inferd/models"
    return Path(models) / "all-MiniLM-L6-v2"


class Embedder:
    """Tokenizer + onnxruntime session + mean pooling, loaded once per worker."""

    def __init__(self, model_dir: Path) -> None:
        self.name = model_dir.name
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # The shipped tokenizer.json pads and truncates at 128: override both.
        self.tokenizer.enable_truncation(MAX_SEQ_LEN)
        self.tokenizer.enable_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [i.name for i in self.session.get_inputs()]
        outputs = [
            o.name
            for o in self.session.get_outputs()
            if o.type == "tensor(float)" and len(o.shape) == 3
        ]
        if not outputs:
            raise RuntimeError("the model has no rank-3 float output (token embeddings)")
        self.output = outputs[0]

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Unit vectors, one row per text, and the number of real tokens."""
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        available = {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        feeds = {name: available[name] for name in self.inputs}
        (hidden,) = self.session.run([self.output], feeds)
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.clip(norms, 1e-12, None), int(mask.sum())


EMBEDDER = Embedder(_model_dir())


class BadRequest(Exception):
    """Answered with 400 and OpenAI's error shape."""


def _texts(payload: object) -> list[str]:
    if not isinstance(payload, dict) or "input" not in payload:
        raise BadRequest("the body must be a JSON object with `input`")
    value = payload["input"]
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRequest("`input` must be a string or an array of strings")
    if not texts or len(texts) > MAX_TEXTS:
        raise BadRequest(f"`input` must hold 1 to {MAX_TEXTS} texts")
    return texts


def _respond(start_response, status: str, body: object) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
    )
    return [data]


def _error(start_response, status: str, message: str) -> list[bytes]:
    error = {"message": message, "type": "invalid_request_error", "code": None}
    return _respond(start_response, status, {"error": error})


def app(environ, start_response):
    """The WSGI entry point."""
    path = environ.get("PATH_INFO", "")
    method = environ.get("REQUEST_METHOD", "")
    if path == "/health" and method == "GET":
        return _respond(start_response, "200 OK", {"status": "ok"})
    if path != "/v1/embeddings":
        return _error(start_response, "404 Not Found", f"no route {path}")
    if method != "POST":
        return _error(start_response, "405 Method Not Allowed", f"{method} is not allowed")
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        payload = json.loads(environ["wsgi.input"].read(length))
        texts = _texts(payload)
        encoding = payload.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise BadRequest(f"encoding_format `{encoding}` is not supported")
    except (ValueError, BadRequest) as e:
        return _error(start_response, "400 Bad Request", str(e))

    vectors, tokens = EMBEDDER.embed(texts)
    if encoding == "base64":
        encoded = [
            base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors
        ]
    else:
        encoded = vectors.tolist()
    data = [
        {"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)
    ]
    body = {
        "object": "list",
        "data": data,
        "model": EMBEDDER.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return _respond(start_response, "200 OK", body)
