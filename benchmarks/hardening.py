"""Two hostile-client measurements against one predictor: a memory burst, clients that hang up.

    # 48 concurrent 1 MB requests, three rounds: the server's RSS before, at peak, idle after
    python benchmarks/hardening.py burst

    # 200 clients send 16 texts and hang up; how long does the next good request wait?
    python benchmarks/hardening.py abandon

Each starts `python -m fineserve.serving` (MiniLM-L6 with a 3-label head unless --model-dir)
on free loopback ports; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import Server, minilm_classifier  # noqa: E402


def _infer_url(server: Server) -> str:
    return f"{server.url}/v2/models/{server.name}/infer"


def _body(texts: list[str]) -> bytes:
    tensor = {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}
    return json.dumps({"inputs": [tensor]}).encode()


def burst(server: Server, rounds: int = 3, concurrency: int = 48) -> None:
    import httpx
    import psutil

    process = psutil.Process(server.proc.pid)

    def rss() -> float:
        return process.memory_info().rss / 2**20

    text = ("lorem ipsum dolor sit amet " * 40_000)[: (1 << 20) // 2 - 2000]
    body = _body([text, text])
    print(f"body {len(body) / 2**20:.2f} MB; idle RSS {rss():.0f} MB")

    async def run() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            headers = {"content-type": "application/json"}
            for number in range(rounds):
                calls = asyncio.gather(
                    *(
                        client.post(_infer_url(server), content=body, headers=headers)
                        for _ in range(concurrency)
                    )
                )
                peak = 0.0
                while not calls.done():
                    peak = max(peak, rss())
                    await asyncio.sleep(0.05)
                codes = {response.status_code for response in await calls}
                print(f"round {number}: codes {codes}, peak {peak:.0f} MB, after {rss():.0f} MB")

    asyncio.run(run())
    time.sleep(5)
    print(f"idle 5 s after: {rss():.0f} MB")


def abandon(server: Server, clients: int = 200, texts: int = 16) -> None:
    import httpx

    def classified() -> float:
        metrics = httpx.get(f"{server.url}/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("fineserve_texts_total")
        )

    text = " ".join(["this movie was surprisingly good and the acting was great"] * 6)
    body = _body([text] * texts)
    head = (
        f"POST /v2/models/{server.name}/infer HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    before = classified()
    sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(clients)]
    for sock in sockets:
        sock.sendall(head + body)
    for sock in sockets:
        sock.close()
    began = time.perf_counter()
    status = httpx.post(
        _infer_url(server), content=body, headers={"content-type": "application/json"}, timeout=300
    ).status_code
    waited = time.perf_counter() - began
    time.sleep(3)
    print(
        f"{clients} clients hung up after sending {texts} texts each; the next good request "
        f"got {status} after {waited:.2f} s; texts classified since: "
        f"{classified() - before:.0f} of {clients * texts + texts}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("burst", "abandon"))
    parser.add_argument("--model-dir", help="HF dir (default: MiniLM-L6 with a 3-label head)")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra predictor option (repeatable)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fineserve-hardening-"))
    model_dir = Path(args.model_dir or minilm_classifier(work / "model"))
    with Server(model_dir, "m", args.server_arg, work / "server.log") as server:
        (burst if args.what == "burst" else abandon)(server)


if __name__ == "__main__":
    main()
