"""Resident memory of one engine serving compiled bfloat16 passes: after load, after varied batches.

    .venv/bin/python benchmarks/compiled_memory.py --model-dir DIR [--unfrozen] [--batches 300]

Each batch is 1-32 random tweets, so passes come in many shapes (oneDNN caches a primitive per
shape; ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` bounds that cache). ``--unfrozen`` compiles as before
session 9 (weights as graph inputs), for comparison.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import corpus_texts  # noqa: E402

from fineserve.serving import compiled  # noqa: E402
from fineserve.serving.engine import TextClassifier  # noqa: E402


def resident_mb() -> int:
    """This process's resident set, MB."""
    return psutil.Process().memory_info().rss // 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--unfrozen", action="store_true", help="weights as graph inputs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.unfrozen:
        compiled.compiling_allowed = lambda: torch.compiler.set_stance("default")
    classifier = TextClassifier(args.model_dir, dtype="bfloat16", compile="on", unpad="off")
    label = "unfrozen" if args.unfrozen else "frozen"
    print(f"{label}: after load {resident_mb()} MB")
    texts, rng = corpus_texts(), random.Random(0)
    for _ in range(args.batches):
        classifier.predict_proba(rng.sample(texts, rng.randint(1, 32)))
    print(f"{label}: after {args.batches} batches {resident_mb()} MB")


if __name__ == "__main__":
    main()
