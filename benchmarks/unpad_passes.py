"""Skipping padding: per Linear layer, or with the feed-forward kept packed. Passes as served.

    .venv/bin/python benchmarks/unpad_passes.py --model-dir DIR [--rounds 3] [--seconds 8]

The engine plans passes the way the server does under load: batches of 18 random tweets, cut
into passes of at most 512 padded tokens. One torch thread (one forward worker's share on 2
cores). Each round runs, in each precision, the same passes three ways, interleaved: padded
(`--unpad off`), each Linear skipping padding on its own, and the feed-forward pairs kept
packed between their two Linear layers (what `--unpad auto` does now).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import corpus_texts  # noqa: E402

from fineserve.serving.engine import TextClassifier  # noqa: E402
from fineserve.serving.unpad import feed_forward_pairs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per variant and round")
    parser.add_argument("--precisions", default="float32,bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    texts, rng = corpus_texts(), random.Random(0)
    for precision in args.precisions.split(","):
        classifier = TextClassifier(
            args.model_dir, device="cpu", dtype=precision, threads=1, compile="off"
        )  # eager: compiled passes do not skip padding
        jobs = [job for _ in range(60) for job in classifier.plan(rng.sample(texts, 18))]
        unpadded = classifier.unpadded
        pairs = feed_forward_pairs(classifier.model)
        packed = {m: m.forward for pair in pairs for m in pair}
        per_linear = {m: unpadded._forward_of(m) for m in packed}

        rates: dict[str, list[float]] = {"padded": [], "per Linear": [], "packed feed-forward": []}
        reference = None
        for _ in range(args.rounds):
            for name in rates:
                for module, forward in (
                    packed if name == "packed feed-forward" else per_linear
                ).items():
                    module.forward = forward
                classifier.unpadded = None if name == "padded" else unpadded
                probs = np.concatenate([classifier.run(job) for job in jobs[:20]])
                reference = probs if reference is None else reference
                done, i, began = 0, 0, time.perf_counter()
                while time.perf_counter() - began < args.seconds:
                    classifier.run(jobs[i % len(jobs)])
                    done += len(jobs[i % len(jobs)].indices)
                    i += 1
                rate = done / (time.perf_counter() - began)
                rates[name].append(rate)
                drift = float(np.abs(probs - reference).max())
                print(f"{precision:9} {name:20} {rate:7.1f} texts/s  (max drift {drift:.2g})")
        base = statistics.median(rates["per Linear"])
        for name, values in rates.items():
            median = statistics.median(values)
            print(f"{precision:9} {name:20} median {median:7.1f} texts/s  {median / base:.3f}x")
        size = np.mean([len(job.indices) for job in jobs])
        print(f"({len(pairs)} feed-forward pairs, passes of {size:.1f} texts on average)")


if __name__ == "__main__":
    main()
