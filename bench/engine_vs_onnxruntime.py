#!/usr/bin/env python3
"""inferd's engine against onnxruntime on the same model file, one thread
each, one text at a time, in one run (issue 9's first yardstick).

For each model and each length (8, 128 and 242 tokens with [CLS] and [SEP])
it makes a text of exactly that many tokens with the model's own tokenizer,
then times, on that text:

  * onnxruntime: tokenize (tokenizers, truncation at 256), run the graph
    with 1 intra-op and 1 inter-op thread, mean-pool and L2-normalise, as
    scripts/reference_embeddings.py does;
  * inferd: ``Engine::embed`` of the same text (tokenize, run, pool,
    normalise; one thread), through the ``engine_latency`` example.

The sides run in turn, model by model, in rounds (onnxruntime, inferd,
inferd without its load-time fusions, onnxruntime, ...), so drift on a
shared machine hits all of them. Prints p50 and p99 per side and the p50
ratios (inferd / onnxruntime: below 1.00x means inferd is faster). The
"without fusions" side (``engine_latency --no-fusions``) is the engine as
tract alone optimizes the graph, i.e. before issue 9's work; --no-before
skips it.

Usage (the Python packages of bench/requirements.txt, e.g. the venv that
bench/run-http-bench makes):
  make model
  cargo build --release -p inferd-engine --example engine_latency
  ~/.cache/inferd/bench-venv/bin/python bench/engine_vs_onnxruntime.py [--iters 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parent.parent
MODELS = ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2"]
LENGTHS = [8, 128, 242]
MAX_SEQ_LEN = 256
PASSAGE = (
    "The supervisor keeps a small pool of worker processes, each of which loads the "
    "embedding model once and then answers requests one at a time over a socket. When a "
    "worker grows past its memory limit, the supervisor starts a replacement, waits until "
    "it is ready, stops sending work to the old one, and lets it finish the request it "
    "holds before asking it to exit. If the kernel kills a worker because the machine ran "
    "out of memory, the request it was holding is sent to another worker once, and a "
    "request that kills two workers is answered with an error instead of being retried "
    "forever, so that one input never takes the pool down. Operators read the pool's state "
    "with a small command, scrape its counters with Prometheus, and roll every worker with "
    "a signal when the model file changes on disk. Clients speak either a compact binary "
    "protocol or plain HTTP with the request shapes that popular embedding servers use, so "
    "that switching an application over is a matter of changing one base address in its "
    "configuration rather than rewriting the code that calls it. "
) * 3


def text_of(tokenizer: Tokenizer, tokens: int) -> str:
    """A prefix of PASSAGE that tokenizes to exactly ``tokens`` tokens."""
    enc = tokenizer.encode(PASSAGE, add_special_tokens=False)
    for body in range(tokens - 2, tokens + 8):
        text = PASSAGE[: enc.offsets[body - 1][1]]
        if len(tokenizer.encode(text).ids) == tokens:
            return text
    sys.exit(f"cannot make a {tokens}-token text")


class OrtEmbedder:
    """The usual onnxruntime embedding code, one thread."""

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(MAX_SEQ_LEN)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}

    def embed(self, text: str) -> tuple[np.ndarray, int]:
        enc = self.tokenizer.encode(text)
        feed = {
            "input_ids": np.array([enc.ids], dtype=np.int64),
            "attention_mask": np.array([enc.attention_mask], dtype=np.int64),
            "token_type_ids": np.array([enc.type_ids], dtype=np.int64),
        }
        outputs = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})
        hidden = next(o for o in outputs if o.ndim == 3)[0]
        mask = feed["attention_mask"][0][:, None].astype(np.float32)
        pooled = (hidden * mask).sum(0) / max(mask.sum(), 1e-9)
        return pooled / max(np.linalg.norm(pooled), 1e-12), len(enc.ids)


def time_ort(embedder: OrtEmbedder, text: str, iters: int, warmup: int) -> tuple[list[float], int]:
    tokens = 0
    for _ in range(warmup):
        _, tokens = embedder.embed(text)
    samples = []
    for _ in range(iters):
        started = time.perf_counter()
        _, tokens = embedder.embed(text)
        samples.append((time.perf_counter() - started) * 1e3)
    return samples, tokens


def time_inferd(
    binary: Path, model_dir: Path, texts: list[dict[str, str]], iters: int, warmup: int,
    fusions: bool = True,
) -> dict[str, dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    try:
        out = subprocess.run(
            [str(binary), "--model-dir", str(model_dir), "--texts", f.name,
             "--iters", str(iters), "--warmup", str(warmup)]
            + ([] if fusions else ["--no-fusions"]),
            check=True, capture_output=True, text=True, timeout=3600,
        ).stdout
    finally:
        os.unlink(f.name)
    return {row["name"]: row for row in map(json.loads, out.splitlines())}


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=100, help="timed calls per text, side and round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two sides")
    parser.add_argument("--model-dir", type=Path, default=Path(
        os.environ.get("INFERD_MODEL_DIR") or Path.home() / ".cache/inferd/models"))
    parser.add_argument("--binary", type=Path,
                        default=REPO / "target/release/examples/engine_latency")
    parser.add_argument("--no-before", action="store_true",
                        help="skip the engine without its load-time fusions (the 'before' column)")
    args = parser.parse_args()
    if not args.binary.exists():
        sys.exit(f"{args.binary} is missing: cargo build --release -p inferd-engine "
                 "--example engine_latency")
    before = not args.no_before
    print("| model | tokens | onnxruntime p50 / p99 ms | inferd p50 / p99 ms | inferd p50 / onnxruntime |"
          + (" inferd without fusions p50 / p99 ms | without fusions / onnxruntime |" if before else ""))
    print("|---|---|---|---|---|" + ("---|---|" if before else ""))
    for model in MODELS:
        model_dir = args.model_dir / model
        ort_side = OrtEmbedder(model_dir)
        texts = [{"name": str(n), "text": text_of(ort_side.tokenizer, n)} for n in LENGTHS]
        ort_samples: dict[str, list[float]] = {t["name"]: [] for t in texts}
        inferd_samples: dict[str, list[float]] = {t["name"]: [] for t in texts}
        unfused_samples: dict[str, list[float]] = {t["name"]: [] for t in texts}
        for _ in range(args.rounds):
            for t in texts:
                samples, tokens = time_ort(ort_side, t["text"], args.iters, args.warmup)
                assert tokens == int(t["name"]), (model, tokens, t["name"])
                ort_samples[t["name"]] += samples
            sides = [(True, inferd_samples)] + ([(False, unfused_samples)] if before else [])
            for fusions, into in sides:
                rows = time_inferd(args.binary, model_dir, texts, args.iters, args.warmup, fusions)
                for name, row in rows.items():
                    assert row["tokens"] == int(name), (model, row["tokens"], name)
                    into[name] += row["samples_ms"]
        for t in texts:
            o, i = ort_samples[t["name"]], inferd_samples[t["name"]]
            ratio = statistics.median(i) / statistics.median(o)
            row = (f"| {model} | {t['name']} | {statistics.median(o):.2f} / {pct(o, 0.99):.2f} | "
                   f"{statistics.median(i):.2f} / {pct(i, 0.99):.2f} | {ratio:.2f}x |")
            if before:
                u = unfused_samples[t["name"]]
                row += (f" {statistics.median(u):.2f} / {pct(u, 0.99):.2f} | "
                        f"{statistics.median(u) / statistics.median(o):.2f}x |")
            print(row, flush=True)


if __name__ == "__main__":
    main()
