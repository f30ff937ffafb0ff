"""Serving benchmark: a v2 load generator, the in-process floor, and a one-run comparison.

    # load any v2 endpoint at fixed concurrency (keep-alive, warm-up, offline-corpus texts)
    python benchmarks/serve_bench.py load --url http://127.0.0.1:8080 --model NAME

    # the floor: tokenize + forward of batches of 16 (and 1) in this process
    python benchmarks/serve_bench.py floor --model-dir DIR

    # everything in one run: batching on vs off vs the floor (MiniLM-L6 + a 3-label head)
    python benchmarks/serve_bench.py compare

    # ... and the cost of the per-prediction metrics (label counts, top-probability histogram)
    python benchmarks/serve_bench.py compare --prediction-metrics-off

    # serving precisions: auto (the default) against float32, bfloat16 and int8 by name, and
    # the floor in each; use a trained model that carries its probe texts (a registered one)
    python benchmarks/serve_bench.py compare --precisions --model-dir DIR

Traffic goes to loopback only (unless --allow-remote) and every run is bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LABELS = ["negative", "neutral", "positive"]
NO_PREDICTION_METRICS = "prediction metrics off"
#: The precisions `compare --precisions` serves by name, beside the default (auto).
PRECISIONS = ("float32", "bfloat16", "int8")
#: How long a server may take to load: compiling (cold caches, and per forward process) is slow.
READY_TIMEOUT_S = 600


# --- inputs -----------------------------------------------------------------------------------


def corpus_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """``n`` tweet-length texts from the offline corpus (a Latin-1 CSV), in a fixed order."""
    import pandas as pd

    from fineserve.core.defaults import offline_corpus_path

    frame = pd.read_csv(offline_corpus_path(), encoding="latin-1")
    return frame["text"].sample(n=min(n, len(frame)), random_state=seed).tolist()


def minilm_classifier(out_dir: Path) -> Path:
    """Offline all-MiniLM-L6-v2 with a (random) 3-label head, saved to ``out_dir``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fineserve.core.defaults import offline_base_model

    if (out_dir / "config.json").is_file():
        return out_dir
    base = offline_base_model()
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)
    return out_dir


# --- load generator ---------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What one load run measured (latencies in seconds)."""

    requests: int
    errors: int
    seconds: float
    texts_per_request: int
    p50: float
    p95: float
    p99: float
    first_error: str = ""
    loop_cpu_ms: float = float("nan")  # the server's event-loop thread, CPU ms per request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def samples_per_s(self) -> float:
        return self.rps * self.texts_per_request


def _check_target(url: str, allow_remote: bool) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not (loopback or allow_remote):
        raise SystemExit(f"refusing to load {host!r}: only loopback unless --allow-remote")


async def run_load(
    url: str,
    model: str,
    texts: list[str],
    *,
    concurrency: int = 32,
    duration: float = 20.0,
    warmup: float = 3.0,
    texts_per_request: int = 1,
    max_requests: int = 100_000,
    loop_pid: int | None = None,
) -> LoadResult:
    """Closed-loop load: ``concurrency`` workers, each sending its next request on an answer.

    With ``loop_pid`` (a local server's process), also the CPU time its main thread, the event
    loop, spent per answered request while measured.
    """
    import aiohttp

    endpoint = f"{url.rstrip('/')}/v2/models/{model}/infer"
    bodies = []
    for i in range(0, len(texts) - texts_per_request + 1, texts_per_request):
        chunk = texts[i : i + texts_per_request]
        tensor = {"name": "text", "shape": [len(chunk)], "datatype": "BYTES", "data": chunk}
        bodies.append(json.dumps({"inputs": [tensor]}).encode())
    latencies: list[float] = []
    errors = 0
    first_error = ""
    sent = 0
    headers = {"content-type": "application/json"}

    async def worker(session: aiohttp.ClientSession, start: int, until: float, record: bool):
        nonlocal errors, first_error, sent
        i = start
        while time.perf_counter() < until and sent < max_requests:
            sent += 1
            body = bodies[i % len(bodies)]
            i += concurrency
            began = time.perf_counter()
            try:
                async with session.post(endpoint, data=body, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # noqa: UP041 (py3.10)
                ok, problem = False, repr(exc)
            if not record:
                continue
            if ok:
                latencies.append(time.perf_counter() - began)
            else:
                errors += 1
                first_error = first_error or problem

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        end_warmup = time.perf_counter() + warmup
        await asyncio.gather(*(worker(session, w, end_warmup, False) for w in range(concurrency)))
        sent = 0
        loop_began = _thread_ticks(loop_pid)
        began = time.perf_counter()
        until = began + duration
        await asyncio.gather(*(worker(session, w, until, True) for w in range(concurrency)))
        seconds = time.perf_counter() - began
        loop_ended = _thread_ticks(loop_pid)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if latencies else (np.nan,) * 3
    answered = len(latencies) + errors
    loop_cpu_ms = np.nan
    if loop_began is not None and loop_ended is not None and answered:
        loop_cpu_ms = (loop_ended - loop_began) / _TICK * 1000 / answered
    return LoadResult(
        len(latencies), errors, seconds, texts_per_request, p50, p95, p99, first_error, loop_cpu_ms
    )


# --- the floor: bare tokenize + forward in this process -------------------------------------


def run_floor(
    model_dir: Path,
    texts: list[str],
    batch_size: int,
    duration: float = 10.0,
    precision: str = "float32",
) -> float:
    """Samples/s of tokenize + forward in batches of ``batch_size`` (no server, no batcher).

    The weights are in ``precision``: float32, bfloat16, float16 or int8.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fineserve.serving import pooling  # noqa: F401  (mean-pooling models load)
    from fineserve.serving.precision import reduce

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    if precision != "float32":
        model = reduce(model, precision)

    def step(i: int) -> int:
        batch = [texts[(i + k) % len(texts)] for k in range(batch_size)]
        enc = tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
        model(**enc)
        return batch_size

    with torch.inference_mode():
        for i in range(3):  # warm-up
            step(i * batch_size)
        done, i, began = 0, 0, time.perf_counter()
        while time.perf_counter() - began < duration:
            done += step(i)
            i += batch_size
        return done / (time.perf_counter() - began)


# --- a shared machine ---------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far; (0, 0) without /proc."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _stat_ticks(path: str) -> int | None:
    """CPU ticks (user + system) of a /proc `stat` file; None when it cannot be read."""
    try:
        stat = Path(path).read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _process_ticks(pids: list[int]) -> int:
    """CPU ticks (user + system, all threads) used so far by ``pids`` and their children."""
    return sum(_stat_ticks(f"/proc/{pid}/stat") or 0 for pid in _with_descendants(pids))


def _with_descendants(pids: list[int]) -> list[int]:
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        for listing in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(child) for child in listing.read_text().split()]
    return found


def _thread_ticks(pid: int | None) -> int | None:
    """CPU ticks used so far by the main thread of ``pid``; None without one."""
    return _stat_ticks(f"/proc/{pid}/task/{pid}/stat") if pid else None


class OtherLoad:
    """Cores that processes other than ``pids`` kept busy while the block ran (Linux)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.cores = 0.0

    def __enter__(self) -> OtherLoad:
        self._start = (time.perf_counter(), _machine_ticks()[0], _process_ticks(self.pids))
        return self

    def __exit__(self, *exc: object) -> None:
        began, busy0, ours0 = self._start
        others = (_machine_ticks()[0] - busy0) - (_process_ticks(self.pids) - ours0)
        self.cores = max(0.0, others / _TICK / (time.perf_counter() - began))


def wait_until_quiet(limit_s: float, pids: list[int], threshold: float = 0.1) -> float:
    """Wait (at most ``limit_s``) until other processes leave the CPUs idle; their cores."""
    deadline = time.monotonic() + limit_s
    while True:
        with OtherLoad(pids) as other:
            time.sleep(2)
        if other.cores <= threshold or time.monotonic() >= deadline:
            return other.cores
        time.sleep(8)


# --- servers for the comparison ---------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def importable_checkout(source: Path, log: Path) -> Path:
    """A folder that, first on PYTHONPATH, imports `fineserve` from the checkout ``source``.

    The checkout's top-level folders install as subpackages of `fineserve` (its pyproject's
    package-dir), so the folder holds that layout as links: ``<log>.pkg/fineserve/serving``...
    """
    import tomllib

    project = tomllib.loads((source / "pyproject.toml").read_text())
    folders = project["tool"]["setuptools"]["package-dir"]
    stage = log.with_suffix(".pkg")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "fineserve").mkdir(parents=True)
    for item in (source / folders.pop("fineserve")).iterdir():
        (stage / "fineserve" / item.name).symlink_to(item)
    for package, folder in folders.items():
        (stage / package.replace(".", "/")).symlink_to(source / folder)
    return stage


class Server:
    """`python -m fineserve.serving` (from ``source``: a checkout) on free local ports."""

    def __init__(
        self,
        model_dir: Path,
        name: str,
        knobs: list[str],
        log: Path,
        launcher: list[str] | None = None,
        source: Path = REPO,
    ) -> None:
        self.port, self.grpc_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.argv = [
            *(launcher or [sys.executable, "-m", "fineserve.serving"]),
            "--model_name",
            name,
            "--model_dir",
            str(model_dir),
            "--http_port",
            str(self.port),
            "--grpc_port",
            str(self.grpc_port),
            *knobs,
        ]
        self.log = log
        self.source = source
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        import httpx

        path = REPO if self.source == REPO else importable_checkout(self.source, self.log)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(path))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.argv, cwd=path, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"{self.name} not ready; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def served_precision(server: Server) -> str:
    """The precision a running server chose (its v2 metadata platform)."""
    import httpx

    platform = httpx.get(f"{server.url}/v2/models/{server.name}", timeout=10).json()["platform"]
    return platform.removeprefix("pytorch_")


def _floor_label(precision: str, batch_size: int, by_precision: bool) -> str:
    return f"floor {precision} batch {batch_size}" if by_precision else f"floor batch {batch_size}"


# --- reporting --------------------------------------------------------------------------------


def _print_load(label: str, r: LoadResult, other_cores: float | None = None) -> None:
    print(
        f"{label:<22} {r.rps:8.1f} req/s {r.samples_per_s:8.1f} samples/s  "
        f"p50 {r.p50 * 1000:7.1f} ms  p95 {r.p95 * 1000:7.1f} ms  p99 {r.p99 * 1000:7.1f} ms  "
        f"errors {r.errors}"
        + (f" (first: {r.first_error})" if r.errors else "")
        + ("" if math.isnan(r.loop_cpu_ms) else f"  loop {r.loop_cpu_ms:.2f} ms CPU/req")
        + (f"  (others: {other_cores:.2f} cores)" if other_cores is not None else ""),
        flush=True,
    )


def _median(results: list[LoadResult]) -> dict[str, float]:
    return {
        key: statistics.median(getattr(r, key) for r in results)
        for key in ("rps", "samples_per_s", "p50", "p95", "p99", "loop_cpu_ms")
    } | {"errors": sum(r.errors for r in results), "requests": sum(r.requests for r in results)}


def compare(args: argparse.Namespace) -> dict:
    """Batching on vs off (and any --variant) vs the floor, interleaved over ``--rounds``."""
    texts = corpus_texts()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = (
        Path(args.model_dir).resolve() if args.model_dir else minilm_classifier(work / "minilm-3")
    )
    common = ["--device", "cpu", *args.server_arg]
    variants = {
        "batching on": common,
        # one request per forward pass, one pass at a time: KServe's HF runtime, off the loop
        "batching off": [*common, "--max_batch_size", "1", "--forward_workers", "1"],
    }
    if args.precisions:  # each precision by name; "batching on" is the default (auto)
        for name in PRECISIONS:
            variants[name] = [*common, "--dtype", name]
        variants["float32, batching off"] = [*variants["batching off"], "--dtype", "float32"]
    for spec in args.variant:
        label, _, options = spec.partition("=")
        variants[label.strip()] = [*common, *shlex.split(options)]
    sources: dict[str, Path] = {}
    for spec in args.checkout:  # e.g. an earlier commit's `git worktree`, in this interpreter
        label, _, source = spec.partition("=")
        if label.strip() not in variants or not (Path(source) / "serving").is_dir():
            raise SystemExit(f"--checkout {spec!r}: name a --variant and a fineserve checkout")
        sources[label.strip()] = Path(source).resolve()
    launchers = {}
    if args.prediction_metrics_off:  # the same server without the per-prediction metrics
        variants[NO_PREDICTION_METRICS] = common
        launchers[NO_PREDICTION_METRICS] = [
            sys.executable,
            str(REPO / "benchmarks" / "no_prediction_metrics.py"),
        ]
    load: dict[str, list[LoadResult]] = {name: [] for name in variants}
    floor_precisions = PRECISIONS if args.precisions else ("float32",)
    floor: dict[str, list[float]] = {
        _floor_label(name, batch_size, args.precisions): []
        for name in floor_precisions
        for batch_size in (16, 1)
    }
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(
                Server(
                    model_dir,
                    f"v{i}",
                    knobs,
                    work / f"v{i}.log",
                    launchers.get(name),
                    sources.get(name, REPO),
                )
            )
            for i, (name, knobs) in enumerate(variants.items())
        }
        for name, knobs in variants.items():
            served = served_precision(servers[name])
            where = f" in {sources[name]}" if name in sources else ""
            print(f"{name}: python -m fineserve.serving ... {' '.join(knobs)}  ({served}){where}",
                  flush=True)  # fmt: skip
        ours = [os.getpid(), *(server.proc.pid for server in servers.values())]
        others: dict[str, list[float]] = {name: [] for name in [*variants, *floor]}

        def measure(label: str, run: Callable[[], Any]) -> Any:
            """``run()`` in a quiet spell: measured again when other work shared the CPUs."""
            for attempt in range(args.retries + 1):
                wait_until_quiet(args.wait_quiet, ours)
                with OtherLoad(ours) as other:
                    result = run()
                if other.cores <= args.max_other_cores or attempt == args.retries:
                    break
                print(f"{label:<22} (others used {other.cores:.2f} cores: again)", flush=True)
            others[label].append(other.cores)
            return result

        for round_ in range(1, args.rounds + 1):
            print(f"--- round {round_}/{args.rounds}", flush=True)
            for name, server in servers.items():
                result = measure(
                    name,
                    lambda server=server: asyncio.run(
                        run_load(
                            server.url,
                            server.name,
                            texts,
                            concurrency=args.concurrency,
                            duration=args.duration,
                            warmup=args.warmup,
                            texts_per_request=args.texts_per_request,
                            loop_pid=server.proc.pid,
                        )
                    ),
                )
                load[name].append(result)
                _print_load(name, result, others[name][-1])
            for precision, batch_size in [(p, b) for p in floor_precisions for b in (16, 1)]:
                label = _floor_label(precision, batch_size, args.precisions)
                rate = measure(
                    label,
                    lambda b=batch_size, p=precision: run_floor(
                        model_dir, texts, b, args.floor_duration, p
                    ),
                )
                floor[label].append(rate)
                print(
                    f"{label:<22} {rate:8.1f} samples/s  (others: {others[label][-1]:.2f} cores)",
                    flush=True,
                )

    summary = {name: _median(results) for name, results in load.items()}
    summary |= {name: {"samples_per_s": statistics.median(v)} for name, v in floor.items()}
    on, off = summary["batching on"], summary["batching off"]
    floor16 = summary[_floor_label("float32", 16, args.precisions)]
    checks: dict[str, float | bool] = {
        "req/s on / off (target >= 2.5)": on["rps"] / off["rps"],
        "p99 on < off": bool(on["p99"] < off["p99"]),
        "samples/s on / floor batch 16 (target >= 0.75)": on["samples_per_s"]
        / floor16["samples_per_s"],
    }
    if args.precisions:
        fp32 = summary["float32"]
        checks["req/s auto / float32 (target >= 2 with AMX)"] = on["rps"] / fp32["rps"]
        checks["p99 auto < float32"] = bool(on["p99"] < fp32["p99"])
    for name in variants:
        if name not in ("batching on", "batching off"):
            checks[f"req/s on / {name}"] = on["rps"] / summary[name]["rps"]
    print(
        f"\n=== medians over {args.rounds} rounds, concurrency {args.concurrency}, "
        f"{args.texts_per_request} text(s) per request, {args.duration:.0f} s each"
    )
    print("| variant | req/s | samples/s | p50 ms | p95 ms | p99 ms | loop CPU ms/req | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in summary.items():
        if "rps" in row:
            print(
                f"| {name} | {row['rps']:.1f} | {row['samples_per_s']:.1f} | "
                f"{row['p50'] * 1000:.0f} | {row['p95'] * 1000:.0f} | {row['p99'] * 1000:.0f} | "
                f"{row['loop_cpu_ms']:.2f} | "
                f"{row['errors']} |"
            )
        else:
            print(f"| {name} (in-process) | | {row['samples_per_s']:.1f} | | | | | |")
    for check, value in checks.items():
        print(f"{check}: {value}" if isinstance(value, bool) else f"{check}: {value:.2f}")
    report = {
        "rounds": {k: [asdict(r) for r in v] for k, v in load.items()} | floor,
        "other_cores": others,
        "summary": summary,
        "checks": checks,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    return report


# --- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    load = sub.add_parser("load", help="load one v2 endpoint")
    load.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    load.add_argument("--model", required=True, help="model name on the v2 path")
    load.add_argument("--allow-remote", action="store_true")
    load.add_argument("--max-requests", type=int, default=100_000)
    load.add_argument(
        "--server-pid",
        type=int,
        help="the local server's process: also its event loop's (main thread's) CPU per "
        "request; meaningless with --workers > 1 or a launcher in between",
    )

    floor = sub.add_parser("floor", help="in-process tokenize + forward")
    floor.add_argument("--model-dir", help="HF dir (default: MiniLM-L6 with a 3-label head)")
    floor.add_argument("--floor-duration", type=float, default=10.0)

    both = sub.add_parser("compare", help="batching on vs off vs the floor, in one run")
    both.add_argument("--model-dir", help="HF dir (default: MiniLM-L6 with a 3-label head)")
    both.add_argument("--work-dir", help="where the model copy and server logs go")
    both.add_argument("--rounds", type=int, default=3)
    both.add_argument("--floor-duration", type=float, default=10.0)
    both.add_argument("--json", help="also write the full results here")
    both.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement, wait up to this long for other processes to go idle",
    )
    both.add_argument(
        "--max-other-cores",
        type=float,
        default=0.15,
        help="measure again when other processes used more cores than this meanwhile",
    )
    both.add_argument("--retries", type=int, default=0, help="how often to measure again")
    both.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=OPTIONS",
        help="another server to compare, e.g. 'unbatched, 2 workers=--max_batch_size 1'",
    )
    both.add_argument(
        "--checkout",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="serve the --variant LABEL from the fineserve source tree DIR (e.g. a `git "
        "worktree` of an earlier commit) with this interpreter: a baseline in the same run",
    )
    both.add_argument(
        "--prediction-metrics-off",
        action="store_true",
        help="also serve with the per-prediction metrics off (benchmarks/no_prediction_metrics.py)",
    )
    both.add_argument(
        "--precisions",
        action="store_true",
        help="also serve float32, bfloat16 and int8 by name (and float32 unbatched), with "
        "in-process floors in each: against the default, --dtype auto",
    )
    both.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `python -m fineserve.serving` option for both servers (repeatable)",
    )
    for p in (load, both):
        p.add_argument("--concurrency", type=int, default=32)
        p.add_argument("--duration", type=float, default=20.0, help="seconds measured")
        p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
        p.add_argument("--texts-per-request", type=int, default=1)
    args = parser.parse_args(argv)

    if args.command == "load":
        _check_target(args.url, args.allow_remote)
        result = asyncio.run(
            run_load(
                args.url,
                args.model,
                corpus_texts(),
                concurrency=args.concurrency,
                duration=args.duration,
                warmup=args.warmup,
                texts_per_request=args.texts_per_request,
                max_requests=args.max_requests,
                loop_pid=args.server_pid,
            )
        )
        _print_load(args.model, result)
    elif args.command == "floor":
        model_dir = Path(args.model_dir or minilm_classifier(Path(tempfile.mkdtemp()) / "m"))
        texts = corpus_texts()
        for batch_size in (16, 1):
            rate = run_floor(model_dir, texts, batch_size, duration=args.floor_duration)
            print(f"floor batch {batch_size:<3} {rate:8.1f} samples/s")
    else:
        compare(args)


if __name__ == "__main__":
    main()
