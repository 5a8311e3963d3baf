#!/usr/bin/env python3
"""Compute reference sentence embeddings with onnxruntime, for the engine tests.

The Rust engine (crates/engine, tract-onnx) is checked against these vectors:
crates/engine/tests/reference.rs compares its output with the committed fixture
tests/fixtures/reference_embeddings.json, for both models that
scripts/fetch-model installs.

Pipeline, the same as the engine's and sentence-transformers':
  * tokenize with the model's tokenizer.json, padding off, truncation at
    MAX_SEQ_LEN (256) tokens (the shipped file pads and truncates at 128);
  * run the ONNX graph on one text at a time (batch 1, so no padding at all),
    feeding only the inputs the graph declares (the L3 export has no
    token_type_ids);
  * take the rank-3 float output [batch, seq, dim] (the L3 export has several
    outputs, one already pooled but not normalised);
  * mean-pool over the tokens with the attention mask, then L2-normalise.

Pinned versions (scripts/requirements-reference.txt), Python >= 3.11:
  onnxruntime==1.32.0  tokenizers==0.23.3  numpy==2.4.6

Usage:
  scripts/fetch-model
  python3 -m pip install -r scripts/requirements-reference.txt
  python3 scripts/reference_embeddings.py [--out tests/fixtures/reference_embeddings.json]

Models are read from ${INFERD_MODEL_DIR:-~/.cache/inferd/models}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

try:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer
except ImportError as e:  # pragma: no cover - environment problem, not logic
    sys.exit(
        f"missing Python package ({e}); run: "
        "python3 -m pip install -r scripts/requirements-reference.txt"
    )

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "reference_embeddings.json"
MAX_SEQ_LEN = 256
MODELS = ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2"]

# ~128 tokens of plain English prose.
MEDIUM_TEXT = (
    "The supervisor keeps a small pool of worker processes, each of which loads "
    "the embedding model once and then answers requests one at a time over a "
    "socket. When a worker grows past its memory limit, the supervisor starts a "
    "replacement, waits until it is ready, stops sending work to the old one, "
    "and lets it finish the request it holds before asking it to exit. If the "
    "kernel kills a worker because the machine ran out of memory, the request it "
    "was holding is sent to another worker once, and a request that kills two "
    "workers is answered with an error instead of being retried forever."
)

# Well over 256 tokens, so the engine must truncate it (and say so).
LONG_TEXT = " ".join(
    [
        "Long-running inference services tend to leak memory in ways that are hard to see.",
        "A tokenizer may cache every string it has ever seen, a framework may build",
        "and keep a new execution plan for every input shape, and an allocator may",
        "never give freed pages back to the operating system. Each of these is",
        "harmless for a day and fatal after a month: the process grows until the",
        "out-of-memory killer takes it, usually in the middle of a busy hour.",
        "The usual answers in Python are poor. A multiprocessing pool can hang",
        "forever when one of its children is killed, a process pool executor",
        "declares the whole pool broken, and task queues can lose the job that was",
        "running. The approach taken here is to make the worker process the unit of",
        "failure and of memory, and to keep the supervising process small, simple",
        "and free of the model, so that it never fails for the same reasons.",
        "Workers are recycled on a schedule and on memory pressure, one at a time,",
        "with a replacement started and ready before the old worker is drained.",
        "Requests are queued in the supervisor, never in a worker, so that no",
        "request is lost when a worker dies, and every request gets exactly one",
        "answer within its deadline, whatever happens to the process that held it.",
        "Operators can roll all workers with a signal, read the state of the pool",
        "from a status command, and find every worker exit classified in the log:",
        "retired on purpose, killed by the supervisor and why, killed by the kernel",
        "for memory, or crashed with a signal or an exit code.",
    ]
)

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The girl is carrying a baby.",
    "embeddings",
    "Café crème brûlée, naïve façade — 日本語のテキスト 🙂🚀 Ünïcödé ✓",
    MEDIUM_TEXT,
    LONG_TEXT,
]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenizer(path: Path) -> tuple[Tokenizer, Tokenizer]:
    """The tokenizer as the engine configures it, and an untruncated twin.

    The untruncated twin gives the full length, hence the truncated flag.
    """
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(MAX_SEQ_LEN)
    full = Tokenizer.from_file(str(path))
    full.no_padding()
    full.no_truncation()
    return tok, full


def embedding_output(sess: ort.InferenceSession) -> str:
    """Name of the rank-3 float output (token embeddings)."""
    for out in sess.get_outputs():
        if out.type == "tensor(float)" and len(out.shape) == 3:
            return out.name
    raise SystemExit(f"no rank-3 float output among {[o.name for o in sess.get_outputs()]}")


def embed_one(sess, out_name, tok, full, text) -> dict:
    enc = tok.encode(text)
    full_len = len(full.encode(text).ids)
    ids = np.array([enc.ids], dtype=np.int64)
    mask = np.array([enc.attention_mask], dtype=np.int64)
    type_ids = np.array([enc.type_ids], dtype=np.int64)
    available = {"input_ids": ids, "attention_mask": mask, "token_type_ids": type_ids}
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name not in available:
            raise SystemExit(f"model declares an unknown input {inp.name!r}")
        feeds[inp.name] = available[inp.name]
    (hidden,) = sess.run([out_name], feeds)
    hidden = hidden.astype(np.float64)  # pool in f64: the reference should not add rounding
    m = mask.astype(np.float64)[:, :, None]
    pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    norm = np.linalg.norm(pooled, axis=1, keepdims=True)
    vec = (pooled / np.clip(norm, 1e-12, None))[0]
    return {
        "text": text,
        "token_count": len(enc.ids),
        "truncated": full_len > MAX_SEQ_LEN,
        "vector": [float(f"{x:.9g}") for x in vec.astype(np.float32)],
    }


def check_known_values(results: list[dict]) -> None:
    """Values published for all-MiniLM-L6-v2 (sentence-transformers), to catch a
    broken pipeline before it becomes the fixture."""
    by_text = {r["text"]: np.array(r["vector"], dtype=np.float64) for r in results}
    food = by_text["A man is eating food."]
    bread = by_text["A man is eating a piece of bread."]
    expected_head = [0.03095, 0.00667, -0.00437, 0.04751, -0.13992]
    assert np.allclose(food[:5], expected_head, atol=1e-4), f"head {food[:5]} != {expected_head}"
    cosine = float(food @ bread)
    assert abs(cosine - 0.7535) < 5e-4, f"cosine(food, bread) = {cosine}, expected 0.7535"
    print(f"all-MiniLM-L6-v2 check ok: head {np.round(food[:5], 5)}, cosine {cosine:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    model_dir = Path(os.environ.get("INFERD_MODEL_DIR") or Path.home() / ".cache/inferd/models")
    out = {
        "generator": "scripts/reference_embeddings.py",
        "onnxruntime": ort.__version__,
        "max_seq_len": MAX_SEQ_LEN,
        "pooling": "mean",
        "normalize": True,
        "texts": TEXTS,
        "models": [],
    }
    for name in MODELS:
        model_path = model_dir / name / "model.onnx"
        tok_path = model_dir / name / "tokenizer.json"
        for p in (model_path, tok_path):
            if not p.is_file():
                raise SystemExit(f"{p} is missing: run scripts/fetch-model first")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        out_name = embedding_output(sess)
        tok, full = load_tokenizer(tok_path)
        results = [embed_one(sess, out_name, tok, full, t) for t in TEXTS]
        if name == "all-MiniLM-L6-v2":
            check_known_values(results)
        out["models"].append(
            {
                "name": name,
                "model_sha256": sha256_of(model_path),
                "dims": len(results[0]["vector"]),
                "embeddings": results,
            }
        )
        for r in results:
            flag = " (truncated)" if r["truncated"] else ""
            print(f"{name}: {r['token_count']:4d} tokens{flag}: {r['text'][:50]!r}")

    counts = [r["token_count"] for r in out["models"][0]["embeddings"]]
    assert any(100 <= c <= 160 for c in counts), f"no ~128-token text: {counts}"
    assert any(r["truncated"] and r["token_count"] == MAX_SEQ_LEN for r in out["models"][0]["embeddings"])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
