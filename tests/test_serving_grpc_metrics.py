"""gRPC calls their clients give up on are counted as the client's, not as server errors.

A real predictor process whose model stalls every request (`tests/faulty_predictor.py`), so
that each call is still in flight when its client cancels it or its deadline passes.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import time

import grpc
import httpx
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import REPO, ServerProcess, serve_module_argv

from fineserve.core.canary_analysis import CLIENT_ERRORS, SERVER_ERRORS

MODEL = "tiny"
STALL_SECONDS = 3.0
CALLS = 4


@pytest.fixture(scope="module")
def stalling_server(tiny_classifier, tmp_path_factory):
    """A predictor whose every request waits ``STALL_SECONDS`` before its forward pass."""
    model_dir = tmp_path_factory.mktemp("stalling") / "model"
    shutil.copytree(tiny_classifier, model_dir)
    (model_dir / "fineserve.json").write_text(json.dumps({"model_version": "1"}))
    serve = serve_module_argv(model_dir, MODEL, "--device", "cpu", "--forward_in", "threads")
    argv = [
        sys.executable, str(REPO / "tests" / "faulty_predictor.py"), "0", "1", str(STALL_SECONDS),
        *serve[3:],
    ]  # fmt: skip
    with ServerProcess(argv, log_path=model_dir.parent / "server.log") as server:
        yield server


def _grpc_counts(url: str) -> dict[str, float]:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
    requests = next(f for f in families if f.name == "fineserve_requests")
    return {
        s.labels["code"]: s.value
        for s in requests.samples
        if s.name == "fineserve_requests_total"
        and s.labels["protocol"] == "grpc"
        and s.labels["endpoint"] == "ModelInfer"
    }


def _request() -> pb.ModelInferRequest:
    text = pb.InferTensorContents(bytes_contents=[b"this film was great"])
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1], contents=text
    )
    return pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])


def test_calls_cancelled_or_timed_out_by_their_clients_are_not_server_errors(stalling_server):
    before = _grpc_counts(stalling_server.url)

    async def give_up() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(stalling_server.grpc_target) as channel:
            stub = GRPCInferenceServiceStub(channel)
            cancelled = [stub.ModelInfer(_request(), timeout=60) for _ in range(CALLS)]
            timed_out = [stub.ModelInfer(_request(), timeout=0.5) for _ in range(CALLS)]
            await asyncio.sleep(0.5)
            for call in cancelled:
                call.cancel()
            codes = []
            for call in (*cancelled, *timed_out):
                try:
                    await call
                except asyncio.CancelledError:
                    codes.append(grpc.StatusCode.CANCELLED)
                except grpc.aio.AioRpcError as err:
                    codes.append(err.code())
            return codes

    seen = asyncio.run(give_up())
    assert seen == [grpc.StatusCode.CANCELLED] * CALLS + [grpc.StatusCode.DEADLINE_EXCEEDED] * CALLS

    deadline = time.monotonic() + 10  # counted when the server's handler unwinds
    while True:
        after = _grpc_counts(stalling_server.url)
        added = {code: after[code] - before.get(code, 0) for code in after}
        added = {code: n for code, n in added.items() if n}
        if sum(added.values()) >= 2 * CALLS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert added == {"CANCELLED": CALLS, "DEADLINE_EXCEEDED": CALLS}, added
    # the analysis counts neither as the canary's server errors nor as its client errors
    for code in added:
        assert not re.fullmatch(SERVER_ERRORS, code) and not re.fullmatch(CLIENT_ERRORS, code)
