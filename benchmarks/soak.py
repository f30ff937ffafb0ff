"""Soak: concurrency 32 for minutes, good and bad requests over HTTP and gRPC, one server.

Every good answer is checked against the same model run in this process; every bad request
must get its 4xx (or gRPC status); any 5xx, INTERNAL or wrong answer is a failure. The
server's RSS is sampled throughout: its drift is what a long-running predictor leaks.

    python benchmarks/soak.py --duration 600            # MiniLM-L6 with a 3-label head

Traffic goes to loopback only; the run is bounded by --duration and --max-requests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import Server, corpus_texts, minilm_classifier  # noqa: E402

#: (kind, weight): what share of the requests each kind is.
MIX = [
    ("http v2", 40),
    ("grpc", 25),
    ("http v1", 10),
    ("bad: malformed JSON", 4),
    ("bad: datatype", 4),
    ("bad: too many texts", 3),
    ("bad: unknown model", 3),
    ("bad: body over the limit", 2),
    ("bad: gzip body", 2),
    ("bad: grpc datatype", 4),
    ("bad: grpc unknown model", 3),
]
#: What each bad kind must get.
EXPECTED = {
    "bad: malformed JSON": 400,
    "bad: datatype": 400,
    "bad: too many texts": 400,
    "bad: unknown model": 404,
    "bad: body over the limit": 413,
    "bad: gzip body": 415,
    "bad: grpc datatype": "INVALID_ARGUMENT",
    "bad: grpc unknown model": "NOT_FOUND",
}


def v2_body(texts: list[str], datatype: str = "BYTES") -> dict:
    tensor = {"name": "text", "datatype": datatype, "shape": [len(texts)], "data": texts}
    return {"inputs": [tensor]}


async def soak(args: argparse.Namespace, server: Server, texts: list[str], expected) -> dict:
    import aiohttp
    import grpc
    import psutil
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    process = psutil.Process(server.proc.pid)
    counts: collections.Counter = collections.Counter()
    failures: collections.Counter = collections.Counter()
    examples: dict[str, str] = {}
    latencies: list[float] = []
    rss: list[tuple[float, float]] = []
    kinds, weights = zip(*MIX, strict=True)
    infer = f"{server.url}/v2/models/{server.name}/infer"
    json_headers = {"content-type": "application/json"}
    big = b'{"inputs": [{"name": "text", "data": ["' + b"x" * (2 << 20) + b'"]}]}'
    started = time.perf_counter()
    deadline = started + args.duration
    sent = 0

    def fail(kind: str, what: str) -> None:
        failures[kind] += 1
        examples.setdefault(kind, what)

    def check(kind: str, picked: list[int], probs: list[list[float]]) -> None:
        got = np.asarray(probs, dtype=np.float32)
        want = expected[picked]
        if got.shape != want.shape or not np.allclose(got, want, atol=args.atol):
            fail(kind, f"probabilities differ by {np.abs(got - want).max():.2g}")

    async def one(session, stub, rng: random.Random) -> None:
        kind = rng.choices(kinds, weights)[0]
        picked = rng.sample(range(len(texts)), rng.randint(1, 4))
        batch = [texts[i] for i in picked]
        began = time.perf_counter()
        if kind.startswith("bad: grpc") or kind == "grpc":
            datatype = "FP32" if kind == "bad: grpc datatype" else "BYTES"
            model = "nope" if kind == "bad: grpc unknown model" else server.name
            contents = (
                pb.InferTensorContents(fp32_contents=[1.0] * len(batch))
                if datatype == "FP32"
                else pb.InferTensorContents(bytes_contents=[t.encode() for t in batch])
            )
            tensor = pb.ModelInferRequest.InferInputTensor(
                name="text", datatype=datatype, shape=[len(batch)], contents=contents
            )
            try:
                response = await stub.ModelInfer(
                    pb.ModelInferRequest(model_name=model, inputs=[tensor]), timeout=60
                )
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code, response = err.code().name, None
            if kind == "grpc":
                if code != "OK":
                    fail(kind, code)
                else:
                    out = {o.name: o for o in response.outputs}
                    probs = np.asarray(out["probabilities"].contents.fp32_contents)
                    check(kind, picked, probs.reshape(len(batch), -1).tolist())
            elif code != EXPECTED[kind]:
                fail(kind, f"gRPC {code}, expected {EXPECTED[kind]}")
        else:
            if kind == "http v1":
                url, data = f"{server.url}/v1/models/{server.name}:predict", None
                body = {"instances": batch}
            else:
                url, body, data = infer, v2_body(batch), None
            headers = json_headers
            if kind == "bad: malformed JSON":
                data = b'{"inputs": [{"name": "text",'
            elif kind == "bad: datatype":
                body = v2_body(batch, "FP16")
            elif kind == "bad: too many texts":
                body = v2_body([batch[0]] * 1000)
            elif kind == "bad: unknown model":
                url = f"{server.url}/v2/models/nope/infer"
            elif kind == "bad: body over the limit":
                data = big
            elif kind == "bad: gzip body":
                data = gzip.compress(json.dumps(body).encode())
                headers = {**json_headers, "content-encoding": "gzip"}
            payload = data if data is not None else json.dumps(body).encode()
            try:
                async with session.post(url, data=payload, headers=headers) as response:
                    status, answer = response.status, await response.read()
            except aiohttp.ClientError as err:
                status, answer = 0, repr(err).encode()
            if status >= 500 or status == 0:
                fail(kind, f"HTTP {status}: {answer[:200]!r}")
            elif kind == "http v2":
                if status != 200:
                    fail(kind, f"HTTP {status}")
                else:
                    out = {o["name"]: o for o in json.loads(answer)["outputs"]}
                    probs = np.asarray(out["probabilities"]["data"]).reshape(len(batch), -1)
                    check(kind, picked, probs.tolist())
            elif kind == "http v1":
                if status != 200:
                    fail(kind, f"HTTP {status}")
                else:
                    rows = json.loads(answer)["predictions"]
                    check(kind, picked, [list(r["probabilities"].values()) for r in rows])
            elif status != EXPECTED[kind]:
                fail(kind, f"HTTP {status}, expected {EXPECTED[kind]}")
        counts[kind] += 1
        if not kind.startswith("bad"):
            latencies.append(time.perf_counter() - began)

    async def worker(session, stub, seed: int) -> None:
        nonlocal sent
        rng = random.Random(seed)
        while time.perf_counter() < deadline and sent < args.max_requests:
            sent += 1
            await one(session, stub, rng)

    async def sample_rss() -> None:
        while time.perf_counter() < deadline:
            rss.append((time.perf_counter() - started, process.memory_info().rss / 2**20))
            await asyncio.sleep(args.rss_every)

    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with (
        aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        stub = GRPCInferenceServiceStub(channel)
        sampler = asyncio.ensure_future(sample_rss())
        await asyncio.gather(*(worker(session, stub, i) for i in range(args.concurrency)))
        await sampler
    seconds = time.perf_counter() - started
    await asyncio.sleep(3)  # idle: let the server hand memory back
    rss.append((time.perf_counter() - started, process.memory_info().rss / 2**20))
    return {
        "seconds": seconds,
        "requests": sum(counts.values()),
        "counts": dict(counts),
        "failures": dict(failures),
        "examples": examples,
        "good_p99_ms": float(np.percentile(latencies, 99) * 1000) if latencies else None,
        "rss_mb": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", help="HF dir (default: MiniLM-L6 with a 3-label head)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-requests", type=int, default=2_000_000)
    parser.add_argument("--rss-every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--atol", type=float, default=1e-4, help="probability tolerance")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from fineserve.serving.engine import TextClassifier

    work = Path(tempfile.mkdtemp(prefix="fineserve-soak-"))
    model_dir = Path(args.model_dir or minilm_classifier(work / "model"))
    texts = corpus_texts(400, seed=1)
    expected = TextClassifier(model_dir, device="cpu").predict_proba(texts)
    with Server(model_dir, "soak", [], work / "server.log") as server:
        result = asyncio.run(soak(args, server, texts, expected))
    rss = [mb for _, mb in result["rss_mb"]]
    warm = rss[min(1, len(rss) - 1)]  # after the first minute's worth of warm-up samples
    print(
        f"soak: {result['requests']} requests in {result['seconds']:.0f} s "
        f"({result['requests'] / result['seconds']:.1f} req/s) at concurrency {args.concurrency}"
    )
    for kind, _ in MIX:
        print(
            f"  {kind:<26} {result['counts'].get(kind, 0):>7}  failures "
            f"{result['failures'].get(kind, 0)}  {result['examples'].get(kind, '')}"
        )
    print(f"  good answers p99 {result['good_p99_ms']:.0f} ms")
    print(
        f"  RSS MB: start {rss[0]:.0f}, after warm-up {warm:.0f}, peak {max(rss):.0f}, "
        f"end of load {rss[-2]:.0f}, idle after {rss[-1]:.0f} "
        f"(drift from warm-up to idle {rss[-1] - warm:+.0f})"
    )
    print(f"  server log: {work / 'server.log'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if result["failures"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
