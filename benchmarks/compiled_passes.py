"""Eager passes (padding skipped) against torch.compile'd ones (padded), as served.

    .venv/bin/python benchmarks/compiled_passes.py --model-dir DIR [--rounds 3] [--seconds 8]

The engine plans passes the way the server does under load: batches of 18 random tweets, cut
into passes of at most 512 padded tokens. One torch thread (one forward worker's share on 2
cores). In each precision two engines load the same model, `--compile off` (eager, padding
skipped: what float32 serves) and `--compile on` (what auto serves in bfloat16 on a CPU), and
run the same passes in turn over interleaved rounds. The compile's load time is reported too.
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
from fineserve.serving.precision import ProbeSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per engine and round")
    parser.add_argument("--precisions", default="float32,bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    texts, rng = corpus_texts(), random.Random(0)
    no_probe = ProbeSettings(texts=0)  # a named precision, unchecked: the speed is the point
    for precision in args.precisions.split(","):
        engines: dict[str, TextClassifier] = {}
        for mode in ("off", "on"):
            began = time.perf_counter()
            engines[mode] = TextClassifier(
                args.model_dir, device="cpu", dtype=precision, threads=1, compile=mode,
                probe=no_probe,
            )  # fmt: skip
            seconds = time.perf_counter() - began
            print(f"{precision:9} --compile {mode:3}: loaded in {seconds:.1f} s")
        jobs = [job for _ in range(60) for job in engines["off"].plan(rng.sample(texts, 18))]
        answers = {m: np.concatenate([e.run(j) for j in jobs[:20]]) for m, e in engines.items()}
        drift = float(np.abs(answers["on"] - answers["off"]).max())
        rates: dict[str, list[float]] = {mode: [] for mode in engines}
        for _ in range(args.rounds):
            for mode, engine in engines.items():
                done, i, began = 0, 0, time.perf_counter()
                while time.perf_counter() - began < args.seconds:
                    engine.run(jobs[i % len(jobs)])
                    done += len(jobs[i % len(jobs)].indices)
                    i += 1
                rates[mode].append(done / (time.perf_counter() - began))
                print(f"{precision:9} --compile {mode:3} {rates[mode][-1]:7.1f} texts/s")
        eager, compiled = (statistics.median(rates[m]) for m in ("off", "on"))
        print(
            f"{precision:9} median: eager {eager:.1f}, compiled {compiled:.1f} texts/s "
            f"({compiled / eager:.2f}x); largest probability difference {drift:.2g}"
        )


if __name__ == "__main__":
    main()
