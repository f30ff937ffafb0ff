"""The predictor over real HTTP and gRPC: `python -m serving` on free local ports, tiny model."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import socket
import subprocess
import time

import grpc
import httpx
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import (
    REPO,
    ServerProcess,
    free_port,
    serve_module_argv,
    server_env,
    v2_body,
)

from fineserve.serving.engine import TextClassifier

MODEL = "tiny"
VERSION = "v7"
LABELS = ["negative", "neutral", "positive"]
MAX_TEXTS = 16
MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def model_dir(tiny_classifier, tmp_path_factory):
    """The tiny classifier plus the fineserve.json the register step writes."""
    path = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(tiny_classifier, path)
    (path / "fineserve.json").write_text(json.dumps({"max_length": 64, "model_version": VERSION}))
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    argv = serve_module_argv(
        model_dir,
        MODEL,
        "--max_batch_size",
        "16",
        "--max_batch_wait_ms",
        "20",
        "--max_texts_per_request",
        str(MAX_TEXTS),
        "--max_request_bytes",
        str(MAX_BYTES),
        "--device",
        "cpu",
    )
    with ServerProcess(argv, log_path=tmp_path_factory.mktemp("logs") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def reference(model_dir):
    """Probabilities computed in-process, one text at a time: what the server must answer."""
    classifier = TextClassifier(model_dir, device="cpu")
    return lambda texts: np.concatenate([classifier.predict_proba([t]) for t in texts])


@pytest.fixture(scope="module")
def texts(corpus_frame) -> list[str]:
    return corpus_frame["text"].sample(64, random_state=3).tolist()


def _infer(http: httpx.Client, texts: list[str]) -> dict:
    response = http.post(f"/v2/models/{MODEL}/infer", json=v2_body(texts))
    assert response.status_code == 200, response.text
    return {out["name"]: out for out in response.json()["outputs"]}


def _probs(outputs: dict) -> np.ndarray:
    out = outputs["probabilities"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


# --- health and metadata ----------------------------------------------------------------------


def test_health_and_readiness(http):
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}


def test_served_on_uvloop_without_kserve_latency_lines_per_request(http, server, texts):
    _infer(http, texts[:2])
    log = server.log()
    assert "event loop: uvloop" in log
    assert "kserve.trace" not in log  # KServe writes 3 a request; the access line stays
    assert f'"POST /v2/models/{MODEL}/infer HTTP/1.1" 200' in log


def test_metadata_lists_the_real_inputs_and_outputs(http):
    meta = http.get(f"/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL and meta["versions"] == [VERSION]
    assert meta["platform"] == "pytorch_float32"  # no probe texts stored: float32
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "label_id", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]


# --- inference --------------------------------------------------------------------------------


def test_v2_inference_with_kserve_rest_client(server, texts, reference):
    batch = texts[:5]

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
        request = InferRequest(
            model_name=MODEL,
            infer_inputs=[InferInput("text", [len(batch)], "BYTES", batch)],
            request_id="req-42",
        )
        try:
            return await client.infer(server.url, request, model_name=MODEL)
        finally:
            await client.close()

    response = asyncio.run(call())
    assert response.id == "req-42"
    assert response.model_name == MODEL
    probs = response.get_output_by_name("probabilities").as_numpy()
    label_ids = response.get_output_by_name("label_id").as_numpy()
    names = response.get_output_by_name("label").data
    expected = reference(batch)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert label_ids.tolist() == expected.argmax(1).tolist()
    assert names == [LABELS[i] for i in expected.argmax(1)]
    parameters = response.get_output_by_name("probabilities").parameters
    assert json.loads(parameters["labels"]) == LABELS


def test_v2_requested_outputs_only(http, texts):
    body = v2_body(texts[:2]) | {"outputs": [{"name": "label"}]}
    response = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    assert [out["name"] for out in response.json()["outputs"]] == ["label"]
    assert response.json()["model_version"] == VERSION


def test_v1_predict(http, texts, reference):
    batch = texts[:4]
    response = http.post(f"/v1/models/{MODEL}:predict", json={"instances": batch})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    expected = reference(batch)
    assert [p["label_id"] for p in predictions] == expected.argmax(1).tolist()
    assert [p["label"] for p in predictions] == [LABELS[i] for i in expected.argmax(1)]
    got = np.array([[p["probabilities"][name] for name in LABELS] for p in predictions])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_grpc_inference(server, texts, reference):
    batch = texts[5:8]

    async def call():
        client = InferenceGRPCClient(server.grpc_target, retries=0, timeout=30)
        try:
            as_list = await client.infer(
                InferRequest(
                    MODEL, [InferInput("text", [3], "BYTES", list(batch))], request_id="g-1"
                )
            )
            raw = InferInput("text", [3], "BYTES")
            raw.set_data_from_numpy(np.array(batch, dtype=object), binary_data=True)
            as_raw = await client.infer(InferRequest(MODEL, [raw], request_id="g-2"))
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await client.infer(InferRequest(MODEL, [InferInput("text", [1], "FP32", [1.0])]))
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await client.infer(InferRequest("nope", [InferInput("text", [1], "BYTES", ["a"])]))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            assert f"this predictor serves '{MODEL}'" in unknown.value.details()
            return as_list, as_raw, bad.value
        finally:
            await client.close()

    as_list, as_raw, bad = asyncio.run(call())
    expected = reference(batch)
    for response, request_id in ((as_list, "g-1"), (as_raw, "g-2")):
        assert response.id == request_id
        probs = response.get_output_by_name("probabilities").as_numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        assert response.get_output_by_name("label_id").as_numpy().tolist() == (
            expected.argmax(1).tolist()
        )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "datatype FP32" in bad.details()


def test_over_long_texts_are_truncated_not_rejected(http):
    head = " ".join(["great"] * 80)
    outputs = _infer(http, [head + " terrible" * 5000, head])
    probs = _probs(outputs)
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)  # beyond 64 tokens is cut


def test_concurrent_requests_are_batched_and_answer_like_sequential_ones(http, server, texts):
    requests = [texts[i : i + 1 + i % 3] for i in range(40)]
    sequential = [_probs(_infer(http, r)) for r in requests]
    before = _batch_stats(http)

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            url = f"/v2/models/{MODEL}/infer"
            return await asyncio.gather(*(client.post(url, json=v2_body(r)) for r in requests))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * len(requests)
    for request, response, alone in zip(requests, responses, sequential, strict=True):
        outputs = {out["name"]: out for out in response.json()["outputs"]}
        np.testing.assert_allclose(_probs(outputs), alone, atol=1e-5)
        assert len(outputs["label"]["data"]) == len(request)
    after = _batch_stats(http)
    passes = after["count"] - before["count"]
    assert after["sum"] - before["sum"] == sum(len(r) for r in requests)
    assert passes < len(requests), "concurrent requests were not coalesced into batches"


def _batch_stats(http: httpx.Client) -> dict[str, float]:
    stats = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        if family.name == "fineserve_batch_size":
            for sample in family.samples:
                if sample.labels.get("model_version") == VERSION and sample.name.endswith(
                    ("_count", "_sum")
                ):
                    stats[sample.name.rsplit("_", 1)[1]] = sample.value
    return stats


def test_metrics_carry_the_model_version(http, texts):
    _infer(http, texts[:2])
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    for name in ("fineserve_batch_size", "fineserve_queue_seconds"):
        counts = [s for s in families[name].samples if s.name == f"{name}_count"]
        assert counts and all(
            s.labels == {"model_name": MODEL, "model_version": VERSION} for s in counts
        )
        assert counts[0].value >= 1
    assert "request_predict_seconds" in families  # KServe's own latency histograms are kept


# --- bad input: a 4xx naming the problem, and the server keeps serving ------------------------

_GOOD = v2_body(["fine"])
_INFER = f"/v2/models/{MODEL}/infer"
_JSON = {"content-type": "application/json"}

BAD_REQUESTS = {
    "malformed JSON": (
        _INFER,
        {"content": b'{"inputs": [', "headers": _JSON},
        400,
        "malformed JSON",
    ),
    "missing inputs": (_INFER, {"json": {"id": "1"}}, 400, "inputs: Field required"),
    "wrong datatype": (_INFER, {"json": v2_body([1.5], datatype="FP32")}, 400, "datatype FP32"),
    "shape mismatch": (_INFER, {"json": v2_body(["a", "b"], shape=[3])}, 400, "shape [3]"),
    "non-string item": (_INFER, {"json": v2_body(["a", 7])}, 400, "item 1 is int"),
    "null item": (_INFER, {"json": v2_body(["a", None])}, 400, "item 1 is NoneType"),
    "empty list": (_INFER, {"json": v2_body([])}, 400, "is empty"),
    "too many texts": (
        _INFER,
        {"json": v2_body(["t"] * (MAX_TEXTS + 1))},
        400,
        f"at most {MAX_TEXTS}",
    ),
    "two inputs": (
        _INFER,
        {"json": {"inputs": v2_body(["a"])["inputs"] * 2}},
        400,
        "exactly one input",
    ),
    "body over limit": (
        _INFER,
        {"json": v2_body(["x" * (MAX_BYTES + 10)])},
        413,
        f"limit of {MAX_BYTES} bytes",
    ),
    "v1 body over limit": (
        f"/v1/models/{MODEL}:predict",
        {"json": {"instances": ["x" * (MAX_BYTES + 10)]}},
        413,
        f"limit of {MAX_BYTES} bytes",
    ),
    "chunked body over limit": (
        _INFER,
        {"content": iter([b'{"inputs": ["', b"x" * (MAX_BYTES + 10), b'"]}']), "headers": _JSON},
        413,
        f"limit of {MAX_BYTES} bytes",
    ),
    "invalid UTF-8": (
        _INFER,
        {"content": json.dumps(_GOOD).encode().replace(b"fine", b"fi\xffne"), "headers": _JSON},
        400,
        "not valid UTF-8",
    ),
    "lone surrogate": (
        _INFER,
        {"content": json.dumps(_GOOD).replace("fine", "\\ud800"), "headers": _JSON},
        400,
        "not valid UTF-8",
    ),
    "not JSON content type": (
        _INFER,
        {"content": b"fine", "headers": {"content-type": "text/plain"}},
        400,
        "Content-Type 'text/plain'",
    ),
    "binary header without inputs": (
        _INFER,
        {
            "content": b"{}",
            "headers": {
                "content-type": "application/octet-stream",
                "inference-header-content-length": "2",
            },
        },
        400,
        "malformed binary inference request",
    ),
    "unknown output": (
        _INFER,
        {"json": v2_body(["a"]) | {"outputs": [{"name": "logits"}]}},
        400,
        "logits",
    ),
    "unknown model (v2)": (
        "/v2/models/nope/infer",
        {"json": _GOOD},
        404,
        f"model 'nope' does not exist here; this predictor serves '{MODEL}'",
    ),
    "unknown model, versioned path (v2)": (
        "/v2/models/nope/versions/1/infer",
        {"json": _GOOD},
        404,
        f"model 'nope' does not exist here; this predictor serves '{MODEL}'",
    ),
    "unknown model (v1)": (
        "/v1/models/nope:predict",
        {"json": {"instances": ["a"]}},
        404,
        f"model 'nope' does not exist here; this predictor serves '{MODEL}'",
    ),
    "v1 missing instances": (
        f"/v1/models/{MODEL}:predict",
        {"json": {"inputs": ["a"]}},
        400,
        'missing "instances"',
    ),
    "v1 malformed JSON": (
        f"/v1/models/{MODEL}:predict",
        {"content": b'{"instances": [', "headers": _JSON},
        400,
        "Unrecognized request format",
    ),
    "v2 JSON nested too deeply": (
        _INFER,
        {"content": b"[" * 20_000 + b"]" * 20_000, "headers": _JSON},
        400,
        "nested too deeply",
    ),
    "v2 JSON string": (_INFER, {"content": b'"hello"', "headers": _JSON}, 400, "not a JSON string"),
    "v1 JSON string": (
        f"/v1/models/{MODEL}:predict",
        {"content": b'"hello"', "headers": _JSON},
        400,
        'must be a JSON object {"instances"',
    ),
    "gzip body": (
        _INFER,
        {
            "content": gzip.compress(json.dumps(_GOOD).encode()),
            "headers": {**_JSON, "content-encoding": "gzip"},
        },
        415,
        "Content-Encoding 'gzip' is not supported",
    ),
    "unknown input name": (
        _INFER,
        {"json": {"inputs": [{**_GOOD["inputs"][0], "name": "txt"}]}},
        400,
        "input 'txt' is unknown: this model takes one BYTES input named 'text'",
    ),
    "unknown requested output": (
        _INFER,
        {"json": {**_GOOD, "outputs": [{"name": "nope"}]}},
        400,
        "unknown requested output(s) ['nope']",
    ),
    "model version not served": (
        f"/v2/models/{MODEL}/versions/3/infer",
        {"json": _GOOD},
        404,
        f"has no version '3' here: this predictor serves version '{VERSION}'",
    ),
    "explain without an explainer": (
        f"/v1/models/{MODEL}:explain",
        {"json": {"instances": ["a"]}},
        404,
        "has no explainer",
    ),
    "v1 non-string instance": (
        f"/v1/models/{MODEL}:predict",
        {"json": {"instances": [{"text": "a"}]}},
        400,
        "item 0 is dict",
    ),
}


def test_bad_requests_are_logged_as_one_warning_line_without_traceback(http, server):
    marker = "no-such-model-1f3a"
    assert http.post(f"/v2/models/{marker}/infer", json=_GOOD).status_code == 404
    versioned = "no-such-model-2b7c"
    assert http.post(f"/v2/models/{versioned}/versions/1/infer", json=_GOOD).status_code == 404
    bad_datatype = {"inputs": [{**_GOOD["inputs"][0], "datatype": "FP16"}], "id": marker}
    assert http.post(_INFER, json=bad_datatype).status_code == 400
    lines = server.log().splitlines()
    logged = [i for i, line in enumerate(lines) if "client error, answered 4xx" in line]
    tail = server.log()[-2000:]
    assert any(marker in lines[i] and "WARNING" in lines[i] for i in logged), tail
    assert any(versioned in lines[i] and "WARNING" in lines[i] for i in logged), tail
    assert any("FP16" in lines[i] for i in logged), tail
    assert not any(lines[i + 1 : i + 2] == ["Traceback (most recent call last):"] for i in logged)


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_naming_the_problem(http, server, case):
    path, kwargs, status, message = BAD_REQUESTS[case]
    response = http.post(path, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    text = response.json().get("error") or response.json()["detail"]
    assert message.lower() in text.lower()
    # ...and the server keeps serving
    assert server.alive()
    assert http.post(_INFER, json=_GOOD).status_code == 200


@pytest.mark.parametrize("action", ["unload", "load"])
def test_no_client_can_unload_or_load_the_model_over_http(http, action):
    response = http.post(f"/v2/repository/models/{MODEL}/{action}")
    assert response.status_code == 403, response.text
    assert f"{action} of model '{MODEL}' is disabled" in response.json()["error"]
    assert "--enable_model_repository" in response.json()["error"]
    assert http.get("/v2/health/ready").status_code == 200
    assert http.post(_INFER, json=_GOOD).status_code == 200


def test_no_client_can_unload_the_model_over_grpc(server, http):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--enable_model_repository" in refused.value.details()
    assert http.post(_INFER, json=_GOOD).status_code == 200


def test_grpc_honours_the_request_size_limit(server, http):
    async def call(text: str):
        client = InferenceGRPCClient(server.grpc_target, retries=0, timeout=30)
        try:
            return await client.infer(
                InferRequest(MODEL, [InferInput("text", [1], "BYTES", [text])])
            )
        finally:
            await client.close()

    with pytest.raises(grpc.aio.AioRpcError) as too_large:
        asyncio.run(call("x" * (MAX_BYTES + 1024)))
    assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_BYTES) in too_large.value.details()
    assert asyncio.run(call("a fine day")).get_output_by_name("label") is not None


def test_the_served_version_answers_on_its_versioned_path(http):
    response = http.post(f"/v2/models/{MODEL}/versions/{VERSION}/infer", json=_GOOD)
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == VERSION


def test_a_client_sending_a_huge_body_reads_the_413(http, server):
    response = http.post(_INFER, content=b"x" * (64 << 20), headers=_JSON)
    assert response.status_code == 413
    assert f"limit of {MAX_BYTES} bytes" in response.json()["error"]
    assert server.alive() and http.post(_INFER, json=_GOOD).status_code == 200


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_client_that_sends_the_whole_body_before_reading_reads_the_413(http, server, framing):
    """Python's urllib sends all of a 64 MiB body before it reads: it gets the 413, no reset."""
    import urllib.error
    import urllib.request

    body = b"x" * (64 << 20)
    data = (
        body
        if framing == "content-length"
        else iter([body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)])
    )
    request = urllib.request.Request(f"{server.url}{_INFER}", data=data, headers=_JSON)
    started = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    took = time.monotonic() - started
    assert refused.value.code == 413, refused.value
    assert refused.value.headers["connection"] == "close"
    assert f"limit of {MAX_BYTES} bytes" in json.loads(refused.value.read())["error"]
    assert took < 20, f"{took:.1f} s"
    assert server.alive() and http.post(_INFER, json=_GOOD).status_code == 200


def test_grpc_and_http_accept_and_refuse_the_same_requests(server, http):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    def grpc_call(name="text", version="", outputs=()):
        tensor = pb.ModelInferRequest.InferInputTensor(
            name=name,
            datatype="BYTES",
            shape=[1],
            contents=pb.InferTensorContents(bytes_contents=[b"fine"]),
        )
        request = pb.ModelInferRequest(
            model_name=MODEL,
            model_version=version,
            inputs=[tensor],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs],
        )
        with grpc.insecure_channel(server.grpc_target) as channel:
            try:
                response = GRPCInferenceServiceStub(channel).ModelInfer(request)
            except grpc.RpcError as err:
                return err.code(), err.details()
        return grpc.StatusCode.OK, [output.name for output in response.outputs]

    assert grpc_call(outputs=["label"]) == (grpc.StatusCode.OK, ["label"])
    only_label = http.post(_INFER, json={**_GOOD, "outputs": [{"name": "label"}]}).json()
    assert [output["name"] for output in only_label["outputs"]] == ["label"]
    assert grpc_call(version=VERSION)[0] == grpc.StatusCode.OK
    code, details = grpc_call(version="3")
    assert code == grpc.StatusCode.NOT_FOUND and f"serves version '{VERSION}'" in details
    code, details = grpc_call(name="txt")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input 'txt' is unknown" in details
    code, details = grpc_call(outputs=["nope"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown requested output" in details


def _counts(http) -> dict[tuple[str, str, str], float]:
    families = text_string_to_metric_families(http.get("/metrics").text)
    requests = next(f for f in families if f.name == "fineserve_requests")
    counts: dict[tuple[str, str, str], float] = {}
    for s in requests.samples:
        if s.name == "fineserve_requests_total":
            key = (s.labels["protocol"], s.labels["endpoint"], s.labels["code"])
            counts[key] = counts.get(key, 0) + s.value
    return counts


def _settled_grpc_counts(http) -> dict[tuple[str, str, str], float]:
    """The counts once earlier tests' gRPC calls have all been counted.

    Each failed call is counted just after its status is sent; under load one can land late.
    """
    previous = _counts(http)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = _counts(http)
        if {k: v for k, v in now.items() if k[0] == "grpc"} == {
            k: v for k, v in previous.items() if k[0] == "grpc"
        }:
            return now
        previous = now
    return previous


def test_metrics_count_requests_by_protocol_endpoint_and_status(http, server):
    before = _settled_grpc_counts(http)
    assert http.post(_INFER, json=_GOOD).status_code == 200
    assert http.post(_INFER, json={"inputs": []}).status_code == 400
    assert http.post("/v2/models/nope/infer", json=_GOOD).status_code == 404
    assert http.get("/no/such/path/4242").status_code == 404

    async def grpc_calls():
        client = InferenceGRPCClient(server.grpc_target, retries=0, timeout=30)
        try:
            await client.infer(InferRequest(MODEL, [InferInput("text", [1], "BYTES", ["a"])]))
            with pytest.raises(grpc.aio.AioRpcError):
                await client.infer(InferRequest(MODEL, [InferInput("text", [1], "FP32", [1.0])]))
        finally:
            await client.close()

    asyncio.run(grpc_calls())
    # a failed gRPC call is counted just after its status is sent: give it a moment
    deadline = time.monotonic() + 5
    while True:
        after = _counts(http)
        failed = ("grpc", "ModelInfer", "INVALID_ARGUMENT")
        if after.get(failed, 0) > before.get(failed, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def added(key):
        return after.get(key, 0) - before.get(key, 0)

    infer = "/v2/models/{model}/infer"
    assert added(("http", infer, "200")) == 1
    assert added(("http", infer, "400")) == 1
    assert added(("http", infer, "404")) == 1
    assert added(("http", "other", "404")) == 1  # an unknown path adds no label of its own
    assert added(("grpc", "ModelInfer", "OK")) == 1
    assert added(("grpc", "ModelInfer", "INVALID_ARGUMENT")) == 1
    latency = http.get("/metrics").text
    assert (
        'fineserve_request_seconds_count{endpoint="/v2/models/{model}/infer",'
        f'model_name="{MODEL}",model_version="{VERSION}",protocol="http"}}' in (latency)
    )


def _samples(http, family: str, sample: str) -> dict[tuple, float]:
    families = text_string_to_metric_families(http.get("/metrics").text)
    found = next(f for f in families if f.name == family)
    return {tuple(sorted(s.labels.items())): s.value for s in found.samples if s.name == sample}


def test_metrics_count_predicted_labels_and_top_probabilities_by_model_version(http):
    model = {"model_name": MODEL, "model_version": VERSION}
    before = _samples(http, "fineserve_predictions", "fineserve_predictions_total")
    top_before = _samples(http, "fineserve_top_probability", "fineserve_top_probability_count")
    body = http.post(_INFER, json=v2_body(["great", "awful", "meh"])).json()
    predicted = next(o for o in body["outputs"] if o["name"] == "label")["data"]

    after = _samples(http, "fineserve_predictions", "fineserve_predictions_total")
    for label in LABELS:
        key = tuple(sorted({**model, "label": label}.items()))
        assert after.get(key, 0) - before.get(key, 0) == predicted.count(label), label
    top_after = _samples(http, "fineserve_top_probability", "fineserve_top_probability_count")
    key = tuple(sorted(model.items()))
    assert top_after[key] - top_before.get(key, 0) == 3
    # the request metrics name the model and the version that answered
    requests = _samples(http, "fineserve_requests", "fineserve_requests_total")
    labels = {"protocol": "http", "endpoint": "/v2/models/{model}/infer", "code": "200", **model}
    assert requests[tuple(sorted(labels.items()))] >= 1


def _texts_classified(http) -> float:
    families = text_string_to_metric_families(http.get("/metrics").text)
    texts = next(f for f in families if f.name == "fineserve_texts")
    return sum(s.value for s in texts.samples if s.name == "fineserve_texts_total")


def test_requests_whose_clients_hung_up_are_not_worked_on(http, server):
    import socket

    text = " ".join(["this film was surprisingly good and the acting was great"] * 6)
    body = json.dumps(v2_body([text] * MAX_TEXTS)).encode()
    head = (
        f"POST {_INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    before, hung_up_before = _texts_classified(http), _counts(http)
    abandoned = 100
    sockets = [socket.create_connection(("127.0.0.1", server.http_port)) for _ in range(abandoned)]
    for sock in sockets:
        sock.sendall(head + body)
    for sock in sockets:
        sock.close()
    assert http.post(_INFER, json=_GOOD).status_code == 200
    classified = _texts_classified(http) - before
    assert classified < abandoned * MAX_TEXTS / 2, classified  # all of them, without the fix
    key = ("http", "/v2/models/{model}/infer", "499")
    assert _counts(http).get(key, 0) - hung_up_before.get(key, 0) > abandoned / 2


def test_memory_returns_near_its_start_after_a_burst_of_maximum_size_requests(model_dir, tmp_path):
    """48 concurrent 1 MB requests took RSS from 0.6 to 1.7 GB, and it stayed there."""
    import psutil

    argv = serve_module_argv(model_dir, MODEL, "--device", "cpu")  # default 1 MiB body limit
    text = ("lorem ipsum dolor sit amet " * 40_000)[: (1 << 20) // 2 - 2000]
    body = json.dumps(v2_body([text, text])).encode()
    with ServerProcess(argv, log_path=tmp_path / "server.log") as server:
        process = psutil.Process(server.proc.pid)
        with httpx.Client(base_url=server.url, timeout=120) as client:
            assert client.post(_INFER, content=body, headers=_JSON).status_code == 200
        time.sleep(3)
        start = process.memory_info().rss

        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                calls = [client.post(_INFER, content=body, headers=_JSON) for _ in range(48)]
                return [response.status_code for response in await asyncio.gather(*calls)]

        for _ in range(2):
            assert set(asyncio.run(burst())) == {200}
        time.sleep(3)
        grown = (process.memory_info().rss - start) / 2**20
    assert grown < 100, f"RSS grew by {grown:.0f} MB after the bursts"


@pytest.mark.parametrize("taken", ["HTTP", "gRPC"])
def test_a_port_in_use_ends_the_server_before_it_loads_naming_the_port(model_dir, taken):
    ports = {"HTTP": free_port(), "gRPC": free_port()}
    argv = serve_module_argv(model_dir, MODEL, "--device", "cpu")
    argv += ["--http_port", str(ports["HTTP"]), "--grpc_port", str(ports["gRPC"])]
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", ports[taken]))
        holder.listen()
        started = time.monotonic()
        ended = subprocess.run(
            argv, cwd=REPO, env=server_env(), capture_output=True, text=True, timeout=120
        )
        took = time.monotonic() - started
    output = ended.stdout + ended.stderr
    assert ended.returncode == 1, output[-3000:]
    assert f"cannot listen on the {taken} port {ports[taken]}" in output
    assert "Address already in use" in output
    assert "loaded" not in output and "Loading weights" not in output  # no load, no children
    assert took < 60, f"{took:.1f} s: (imports only)"
