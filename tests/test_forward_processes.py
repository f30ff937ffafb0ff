"""Forward passes in child processes: same answers, failures contained, no orphans."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from serving_helpers import (
    REPO,
    ServerProcess,
    free_port,
    serve_module_argv,
    server_env,
    v2_body,
)

from fineserve.serving.engine import ForwardJob, TextClassifier
from fineserve.serving.forward_processes import (
    ForwardProcessError,
    ForwardProcesses,
    NoForwardProcess,
    child_settings,
    uses_processes,
)
from fineserve.serving.predictor import ServeOptions


@pytest.fixture(scope="module")
def classifier(tiny_classifier) -> TextClassifier:
    return TextClassifier(tiny_classifier, device="cpu", max_batch_size=8, max_batch_tokens=256)


@pytest.fixture(scope="module")
def processes(classifier):
    pool = ForwardProcesses(child_settings(classifier, threads=1), count=2)
    pool.start()
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def jobs(classifier, corpus_frame) -> list[ForwardJob]:
    return classifier.plan(corpus_frame["text"].sample(40, random_state=5).tolist())


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def test_auto_runs_passes_in_processes_on_a_cpu_and_in_threads_on_a_gpu():
    assert uses_processes("auto", "cpu")
    assert not uses_processes("auto", "cuda")
    assert uses_processes("processes", "cuda")
    assert not uses_processes("threads", "cpu")
    with pytest.raises(ValueError, match="forward_in"):
        uses_processes("fibers", "cpu")
    with pytest.raises(ValueError, match="forward_in must be one of"):
        ServeOptions(forward_in="fibers")


def test_children_serve_the_precision_the_parent_decided(tiny_classifier, corpus_frame):
    parent = TextClassifier(
        tiny_classifier, device="cpu", dtype="bfloat16", compile="off", unpad="off"
    )
    settings = child_settings(parent, threads=1)
    assert (settings.dtype, settings.compile, settings.unpad) == ("bfloat16", "off", "off")
    pool = ForwardProcesses(settings, count=1)
    pool.start()
    try:
        job = parent.plan(corpus_frame["text"].head(6).tolist())[0]
        served = asyncio.run(pool.run(job))
    finally:
        pool.close()
    np.testing.assert_array_equal(served, parent.run(job))  # bfloat16, not float32
    assert np.abs(served - TextClassifier(tiny_classifier, device="cpu").run(job)).max() > 0


def test_passes_in_child_processes_answer_like_the_model_in_process(processes, classifier, jobs):
    async def run_all():
        return await asyncio.gather(*(processes.run(job) for job in jobs))

    answers = asyncio.run(run_all())
    assert len(jobs) > 2  # more passes than children: they queue for an idle one
    for job, probs in zip(jobs, answers, strict=True):
        np.testing.assert_allclose(probs, classifier.run(job), atol=1e-6)


def test_a_failing_pass_fails_alone_and_the_child_serves_on(processes, classifier, jobs):
    bad = ForwardJob([0], [[10**9]])  # a token id far past the vocabulary

    async def run_both():
        with pytest.raises(ForwardProcessError, match="forward pass failed in process"):
            await processes.run(bad)
        return await processes.run(jobs[0])

    pids = processes.pids
    np.testing.assert_allclose(asyncio.run(run_both()), classifier.run(jobs[0]), atol=1e-6)
    assert processes.pids == pids


async def _until_all_children_run(processes: ForwardProcesses, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(processes.pids) < processes.count:
        assert time.monotonic() < deadline, "no child replaced the dead one"
        await asyncio.sleep(0.05)


def test_a_child_killed_while_idle_costs_no_pass_and_is_replaced(processes, classifier, jobs):
    victim = processes.pids[0]
    os.kill(victim, signal.SIGKILL)
    _wait_for(lambda: _is_gone(victim))

    async def run_some():
        answers = await asyncio.gather(*(processes.run(job) for job in jobs[:4]))
        await _until_all_children_run(processes)
        return answers

    for job, probs in zip(jobs[:4], asyncio.run(run_some()), strict=True):
        np.testing.assert_allclose(probs, classifier.run(job), atol=1e-6)
    assert victim not in processes.pids


def test_a_child_dying_in_a_pass_fails_that_pass_only_and_is_replaced(processes, jobs):
    victim, other = processes.pids

    async def die_mid_pass():
        for pid in (victim, other):
            os.kill(pid, signal.SIGSTOP)  # each takes a pass but cannot answer yet
        passes = [asyncio.ensure_future(processes.run(job)) for job in jobs[:2]]
        await asyncio.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        await asyncio.sleep(0.5)
        os.kill(other, signal.SIGCONT)
        results = await asyncio.gather(*passes, return_exceptions=True)
        await _until_all_children_run(processes)
        return results

    results = asyncio.run(die_mid_pass())
    failed = [r for r in results if isinstance(r, ForwardProcessError)]
    assert len(failed) == 1 and "died during a pass" in str(failed[0])
    assert sum(isinstance(r, np.ndarray) for r in results) == 1
    assert victim not in processes.pids and other in processes.pids


def test_a_cancelled_pass_gives_its_child_back_once_it_answers(processes, classifier, jobs):
    async def cancel_one():
        pids = list(processes.pids)
        os.kill(pids[0], signal.SIGSTOP)
        os.kill(pids[1], signal.SIGSTOP)
        passes = [asyncio.ensure_future(processes.run(job)) for job in jobs[:2]]
        await asyncio.sleep(0.3)
        passes[0].cancel()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        await asyncio.gather(*passes, return_exceptions=True)
        for _ in range(100):  # the cancelled pass's child answers, and is idle again
            if processes._idle.qsize() == 2:
                break
            await asyncio.sleep(0.05)
        assert processes._idle.qsize() == 2
        return await asyncio.gather(*(processes.run(job) for job in jobs[:4]))

    pids = processes.pids
    for job, probs in zip(jobs[:4], asyncio.run(cancel_one()), strict=True):
        np.testing.assert_allclose(probs, classifier.run(job), atol=1e-6)
    assert processes.pids == pids


def test_closing_fails_the_passes_in_flight_and_later_ones_instead_of_hanging(classifier, jobs):
    pool = ForwardProcesses(child_settings(classifier, threads=1), count=1)
    pool.start()
    child = pool.pids[0]

    async def close_mid_pass():
        os.kill(child, signal.SIGSTOP)  # it takes the pass but cannot answer
        in_flight = asyncio.ensure_future(pool.run(jobs[0]))
        waiting = asyncio.ensure_future(pool.run(jobs[1]))  # no idle child: it waits
        await asyncio.sleep(0.3)
        os.kill(child, signal.SIGCONT)
        pool.close()
        results = await asyncio.wait_for(
            asyncio.gather(in_flight, waiting, return_exceptions=True), timeout=10
        )
        with pytest.raises(ForwardProcessError, match="stopping"):
            await pool.run(jobs[2])
        return results

    for result in asyncio.run(close_mid_pass()):
        assert isinstance(result, ForwardProcessError) and "stopping" in str(result)
    _wait_for(lambda: _is_gone(child), 10)


def test_a_hung_child_is_killed_after_the_pass_timeout_and_replaced(classifier, jobs):
    pool = ForwardProcesses(child_settings(classifier, threads=1), count=1, pass_timeout_s=1.0)
    pool.start()
    hung = pool.pids[0]

    async def hang_then_recover():
        os.kill(hung, signal.SIGSTOP)  # alive, but it never answers
        with pytest.raises(ForwardProcessError, match="over 1 s and was killed"):
            await asyncio.wait_for(pool.run(jobs[0]), timeout=30)
        assert not pool.ready  # its only child is gone: passes fail until the new one runs
        with pytest.raises(NoForwardProcess, match=r"no forward process is running \(1 starting\)"):
            await pool.run(jobs[1])
        await _until_all_children_run(pool)
        return await asyncio.wait_for(pool.run(jobs[1]), timeout=60)  # by its replacement

    try:
        probs = asyncio.run(hang_then_recover())
        np.testing.assert_allclose(probs, classifier.run(jobs[1]), atol=1e-6)
        assert pool.pids and hung not in pool.pids
    finally:
        pool.close()


def test_a_predictor_in_processes_keeps_no_weights_and_stops_its_children(
    tiny_classifier, classifier, corpus_frame, caplog
):
    from kserve.logging import logger as kserve_logger

    from fineserve.serving.predictor import TextClassifierModel

    texts = corpus_frame["text"].head(5).tolist()
    model = TextClassifierModel("m", tiny_classifier, ServeOptions(device="cpu"))
    kserve_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=kserve_logger.name):
            model.load()
    finally:
        kserve_logger.removeHandler(caplog.handler)
    children = model.processes.pids
    try:
        assert model.classifier.model is None  # the children hold the weights
        # the load log tells what the children run, not what this process kept
        assert classifier.unpadded is not None
        loaded = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded"))
        assert "2 forward process(es)" in loaded and "skipped in Linear layers" in loaded
        probs = asyncio.run(model.batcher.submit(texts))
        np.testing.assert_allclose(probs, classifier.predict_proba(texts), atol=1e-6)
    finally:
        model.stop()
    assert model.processes is None and not model.ready
    for pid in children:
        _wait_for(lambda pid=pid: _is_gone(pid), 10)


def test_a_child_that_cannot_load_the_model_fails_the_start_naming_why(classifier, tmp_path):
    settings = child_settings(classifier, threads=1)
    broken = tmp_path / "model"
    shutil.copytree(settings.model_dir, broken)
    (broken / "config.json").unlink()
    pool = ForwardProcesses(type(settings)(**{**settings.__dict__, "model_dir": str(broken)}), 1)
    with pytest.raises(ForwardProcessError, match="failed to load: ModelDirError.*config.json"):
        pool.start()


def _is_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie whose threads (and open files) are all gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":\t", 1) for line in status.read().splitlines())
    except FileNotFoundError:
        return True
    return fields["State"].startswith("Z") and fields["Threads"].strip() == "1"


def _children(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads started them."""
    children = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # (a thread ended)
            children += [int(child) for child in listing.read_text().split()]
    return children


def _forward_processes(server_pid: int) -> list[int]:
    """The server's forward processes now running (not the resource tracker, not zombies)."""
    return [
        pid for pid in _children(server_pid) if "spawn_main" in _cmdline(pid) and not _is_gone(pid)
    ]


@pytest.fixture
def served_model(tiny_classifier, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_classifier, path)
    (path / "fineserve.json").write_text(json.dumps({"max_length": 64, "model_version": "v1"}))
    return path


def test_a_server_keeps_answering_when_a_forward_process_dies_and_its_children_end_with_it(
    served_model, tmp_path
):
    argv = serve_module_argv(served_model, "m", "--device", "cpu", "--forward_workers", "2")
    with ServerProcess(argv, log_path=tmp_path / "server.log") as server:
        assert "2 forward process(es)" in server.log()
        children = _children(server.proc.pid)
        assert len(children) >= 2
        forward = [pid for pid in children if "spawn_main" in _cmdline(pid)]
        assert len(forward) == 2, [_cmdline(pid) for pid in children]
        os.kill(forward[0], signal.SIGKILL)
        _wait_for(lambda: _is_gone(forward[0]))  # (a pass sent as it dies fails: a 500)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for _ in range(10):
                response = http.post("/v2/models/m/infer", json=v2_body(["still there?"]))
                assert response.status_code == 200, response.text
        _wait_for(lambda: "forward process 0 (pid" in server.log().split("starting another")[-1])
        forward = [pid for pid in _children(server.proc.pid) if "spawn_main" in _cmdline(pid)]
        assert len(forward) == 2
    for pid in forward:  # the server stopped its children on SIGTERM
        _wait_for(lambda pid=pid: _is_gone(pid), 10)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


READY = {
    "v2 server": 200,
    "v2 model": 200,
    "v1 model": 200,
    "gRPC server": True,
    "gRPC model": True,
}
NOT_READY = {
    "v2 server": 503,
    "v2 model": 503,
    "v1 model": 503,
    "gRPC server": False,
    "gRPC model": False,
}


def _readiness(server: ServerProcess) -> dict[str, object]:
    """What each readiness endpoint says: HTTP v2 server and model, v1 model, gRPC both."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    with httpx.Client(base_url=server.url, timeout=10) as http:
        said = {
            "v2 server": http.get("/v2/health/ready").status_code,
            "v2 model": http.get("/v2/models/m/ready").status_code,
            "v1 model": http.get("/v1/models/m").status_code,
        }
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = GRPCInferenceServiceStub(channel)
        said["gRPC server"] = stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        said["gRPC model"] = stub.ModelReady(pb.ModelReadyRequest(name="m"), timeout=10).ready
    return said


def _grpc_infer(server: ServerProcess) -> grpc.StatusCode:
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    text = pb.ModelInferRequest.InferInputTensor(
        name="text",
        datatype="BYTES",
        shape=[1],
        contents=pb.InferTensorContents(bytes_contents=[b"hi"]),
    )
    with grpc.insecure_channel(server.grpc_target) as channel:
        try:
            GRPCInferenceServiceStub(channel).ModelInfer(
                pb.ModelInferRequest(model_name="m", inputs=[text]), timeout=30
            )
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def _post_all(url: str, count: int) -> list[httpx.Response]:
    """``count`` concurrent v2 inference requests to ``url`` (a server), as a client would."""

    async def fire():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            calls = [
                client.post("/v2/models/m/infer", json=v2_body([f"t{i}"])) for i in range(count)
            ]
            return await asyncio.gather(*calls)

    return asyncio.run(fire())


def test_with_no_forward_process_running_every_readiness_endpoint_says_so_and_requests_get_503(
    served_model, tmp_path
):
    """Both children killed (OOM killer, a crash): not ready at once, and 503s, not 98 s waits.

    The model folder is made unreadable first, so the replacements cannot start until it is
    back: the server is not ready meanwhile, and says why. Children that die idle, with no
    request to find them dead, are seen as quickly.
    """
    argv = serve_module_argv(
        served_model, "m", "--device", "cpu", "--forward_workers", "2", "--max_batch_size", "1"
    )  # (a pass per request: two run, and the others wait for a child)
    with ServerProcess(argv, log_path=tmp_path / "server.log") as server:
        assert _readiness(server) == READY
        forward = _forward_processes(server.proc.pid)
        assert len(forward) == 2
        (served_model / "config.json").rename(served_model / "config.json.away")
        for pid in forward:
            os.kill(pid, signal.SIGSTOP)  # each takes a pass and holds it
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(_post_all, server.url, 6)
            time.sleep(1.0)
            for pid in forward:
                os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            answered = in_flight.result(timeout=60)
        assert time.monotonic() - killed < 10, "requests in flight waited for a replacement"
        codes = sorted(response.status_code for response in answered)
        assert set(codes) <= {500, 503} and 503 in codes, codes  # 500: the passes it held

        _wait_for(lambda: _readiness(server) == NOT_READY, timeout=5)
        assert time.monotonic() - killed < 10
        with httpx.Client(base_url=server.url, timeout=30) as http:
            started = time.monotonic()
            refused = http.post("/v2/models/m/infer", json=v2_body(["now?"]))
            assert refused.status_code == 503 and time.monotonic() - started < 2
            assert (
                http.post("/v1/models/m:predict", json={"instances": ["now?"]}).status_code == 503
            )
            assert http.get("/v2/health/live").status_code == 200  # the pod is not restarted
        assert _grpc_infer(server) == grpc.StatusCode.UNAVAILABLE
        _wait_for(lambda: "could not be started" in server.log(), timeout=120)
        _wait_for(lambda: "config.json" in _inference_error(server), timeout=120)
        log = server.log()
        assert "ModelDirError" in log and "config.json" in log.split("could not be started")[1]
        assert _readiness(server) == NOT_READY

        (served_model / "config.json.away").rename(served_model / "config.json")
        _wait_for(lambda: _readiness(server) == READY, timeout=240)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.post("/v2/models/m/infer", json=v2_body(["back"])).status_code == 200
        assert _grpc_infer(server) == grpc.StatusCode.OK

        for pid in _forward_processes(server.proc.pid):  # idle: no request will find them dead
            os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: _readiness(server) == NOT_READY, timeout=5)
        _wait_for(lambda: _readiness(server) == READY, timeout=240)


def _inference_error(server: ServerProcess) -> str:
    """The error a v2 inference request gets now ("" if it is answered)."""
    response = httpx.post(f"{server.url}/v2/models/m/infer", json=v2_body(["x"]), timeout=30)
    return "" if response.status_code == 200 else response.json()["error"]


def test_a_server_killed_outright_takes_its_forward_processes_with_it(served_model, tmp_path):
    """SIGKILL (the OOM killer) runs no clean-up: the kernel ends the children, even stuck ones."""
    argv = serve_module_argv(served_model, "m", "--device", "cpu", "--forward_workers", "2")
    with ServerProcess(argv, log_path=tmp_path / "server.log") as server:
        forward = _forward_processes(server.proc.pid)
        assert len(forward) == 2
        os.kill(forward[0], signal.SIGSTOP)  # stuck: it would never read its pipe's end
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        for pid in forward:
            _wait_for(lambda pid=pid: _is_gone(pid), 10)


def test_a_port_taken_while_the_model_loads_ends_the_server_and_its_children(
    served_model, tmp_path
):
    """A failed bind comes after the load (uvicorn binds then): the exit must not hang on them."""
    http_port, grpc_port = free_port(), free_port()
    argv = serve_module_argv(served_model, "m", "--device", "cpu", "--forward_workers", "2")
    argv += ["--http_port", str(http_port), "--grpc_port", str(grpc_port)]
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=server_env(), stdout=log, stderr=log)
    try:
        _wait_for(lambda: len(_forward_processes(proc.pid)) == 2, timeout=120)  # loading
        forward = _forward_processes(proc.pid)
        with socket.socket() as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("0.0.0.0", http_port))
            holder.listen()
            _wait_for(lambda: "while attempting to bind" in log_path.read_text(), timeout=300)
            failed = time.monotonic()
            assert proc.wait(timeout=30) != 0
            took = time.monotonic() - failed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 10, f"exited {took:.1f} s after the failed bind"
    for pid in forward:
        _wait_for(lambda pid=pid: _is_gone(pid), 5)
