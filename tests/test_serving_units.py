"""In-process tests of the predictor's parts: length bucketing, batcher, model loading, CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fineserve.serving.batcher import DynamicBatcher
from fineserve.serving.engine import ModelDirError, TextClassifier, plan_chunks, read_model_version
from fineserve.serving.entrypoint import (
    add_serve_arguments,
    build_parser,
    default_model_name,
    options_from_args,
)
from fineserve.serving.model_uri import find_hf_dir, resolve_model_dir
from fineserve.serving.server import use_event_loop, wrap_middleware
from fineserve.serving.unpad import UnpaddedLinears, feed_forward_pairs


@pytest.fixture(scope="module")
def classifier(tiny_classifier) -> TextClassifier:
    return TextClassifier(tiny_classifier, device="cpu", max_batch_size=8, max_batch_tokens=256)


@pytest.fixture(scope="module")
def corpus_texts(corpus_frame) -> list[str]:
    return corpus_frame["text"].sample(40, random_state=1).tolist()


# --- length bucketing -------------------------------------------------------------------------


def test_plan_chunks_groups_similar_lengths_within_limits():
    lengths = [30, 5, 12, 60, 6, 31, 11, 59, 7, 64]
    chunks = plan_chunks(lengths, max_texts=3, max_tokens=130)
    assert sorted(i for chunk in chunks for i in chunk.indices) == list(range(len(lengths)))
    for chunk in chunks:
        assert len(chunk.indices) <= 3
        assert chunk.padded_len == max(lengths[i] for i in chunk.indices)
        assert len(chunk.indices) * chunk.padded_len <= 130 or len(chunk.indices) == 1
    # ascending: every chunk's texts are no longer than the next chunk's
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert before.padded_len <= min(lengths[i] for i in after.indices)


def test_plan_chunks_gives_an_over_budget_text_its_own_chunk():
    chunks = plan_chunks([10, 500, 10], max_texts=8, max_tokens=100)
    assert [sorted(c.indices) for c in chunks] == [[0, 2], [1]]


# --- dynamic batcher --------------------------------------------------------------------------


def _scores(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in model: one row per text, derived from the text itself."""
    return np.array([[len(t), ord(t[0])] for t in texts], dtype=np.float32)


@dataclass(frozen=True)
class _Job:
    indices: list[int]
    texts: list[str]


class _Runner:
    """Stand-in for TextClassifier: passes of up to ``per_pass`` texts, recorded."""

    def __init__(self, per_pass: int = 1000, before_run=None) -> None:
        self.per_pass = per_pass
        self.before_run = before_run or (lambda job: None)
        self.batches: list[list[str]] = []
        self.threads: set[int] = set()

    def plan(self, texts: list[str]) -> list[_Job]:
        self.batches.append(list(texts))
        n, step = len(texts), self.per_pass
        return [
            _Job(list(range(i, min(i + step, n))), texts[i : i + step]) for i in range(0, n, step)
        ]

    def run(self, job: _Job) -> np.ndarray:
        self.threads.add(threading.get_ident())
        self.before_run(job)
        return _scores(job.texts)


def test_batcher_coalesces_concurrent_requests_and_keeps_answers_apart():
    runner = _Runner(per_pass=3)
    requests = [[chr(97 + i) * (i + 1)] * (1 + i % 3) for i in range(12)]

    async def main() -> list[np.ndarray]:
        batcher = DynamicBatcher(runner, max_batch_size=8, max_batch_wait_s=0.05, workers=2)
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.close()
        return results

    for request, result in zip(requests, asyncio.run(main()), strict=True):
        np.testing.assert_array_equal(result, _scores(request))
    sizes = [len(batch) for batch in runner.batches]
    assert sum(sizes) == sum(len(r) for r in requests)
    assert max(sizes) <= 8
    assert len(sizes) < len(requests), "concurrent requests were not coalesced"
    assert threading.get_ident() not in runner.threads, "a forward pass ran on the event loop"


def test_batcher_awaits_passes_from_its_forward_coroutine_instead_of_running_them():
    runner = _Runner(per_pass=2)
    awaited: list[list[str]] = []

    async def forward(job: _Job) -> np.ndarray:  # e.g. forward processes
        awaited.append(job.texts)
        await asyncio.sleep(0.01)
        return _scores(job.texts)

    requests = [["a", "bb"], ["ccc"], ["dd", "e", "ff"]]

    async def main() -> list[np.ndarray]:
        batcher = DynamicBatcher(runner, max_batch_size=8, workers=2, forward=forward)
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.close()
        return results

    for request, result in zip(requests, asyncio.run(main()), strict=True):
        np.testing.assert_array_equal(result, _scores(request))
    assert not runner.threads, "a pass ran in a worker thread"
    assert sorted(t for texts in awaited for t in texts) == sorted(sum(requests, []))


def test_batcher_runs_passes_in_parallel_worker_threads():
    both_running = threading.Barrier(2, timeout=5)  # breaks unless two passes overlap
    runner = _Runner(per_pass=1, before_run=lambda job: both_running.wait())

    async def main() -> list[np.ndarray]:
        batcher = DynamicBatcher(runner, max_batch_size=4, workers=2)
        results = await asyncio.gather(*(batcher.submit([t]) for t in ("ab", "cd", "ef", "gh")))
        await batcher.close()
        return results

    for text, result in zip(("ab", "cd", "ef", "gh"), asyncio.run(main()), strict=True):
        np.testing.assert_array_equal(result, _scores([text]))
    assert len(runner.threads) == 2


def test_batcher_answers_each_request_when_its_own_pass_ends():
    slow_may_finish = threading.Event()
    runner = _Runner(
        per_pass=1, before_run=lambda job: job.texts[0] == "slow" and slow_may_finish.wait(5)
    )

    async def main() -> None:
        batcher = DynamicBatcher(runner, max_batch_size=2, max_batch_wait_s=0.05, workers=2)
        fast = asyncio.ensure_future(batcher.submit(["fast"]))
        slow = asyncio.ensure_future(batcher.submit(["slow"]))
        await asyncio.wait_for(fast, 2)  # answered while "slow" of the same batch still runs
        assert not slow.done()
        slow_may_finish.set()
        np.testing.assert_array_equal(await slow, _scores(["slow"]))
        await batcher.close()

    asyncio.run(main())
    assert runner.batches == [["fast", "slow"]]


def test_batcher_size_one_runs_each_request_alone_and_big_requests_whole():
    runner = _Runner()

    async def main() -> None:
        batcher = DynamicBatcher(runner, max_batch_size=1, max_batch_wait_s=0.01)
        await asyncio.gather(*(batcher.submit(["x"]) for _ in range(5)), batcher.submit(["y"] * 3))
        await batcher.close()

    asyncio.run(main())
    assert sorted(len(batch) for batch in runner.batches) == [1, 1, 1, 1, 1, 3]


def test_batcher_reports_model_errors_to_their_callers_and_keeps_working():
    def explode(job: _Job) -> None:
        if "boom" in job.texts:
            raise RuntimeError("model exploded")

    runner = _Runner(per_pass=1, before_run=explode)

    async def main() -> None:
        batcher = DynamicBatcher(runner, max_batch_size=4, max_batch_wait_s=0.05)
        boom, ok = await asyncio.gather(
            batcher.submit(["boom"]), batcher.submit(["ok"]), return_exceptions=True
        )
        assert isinstance(boom, RuntimeError) and "model exploded" in str(boom)
        np.testing.assert_array_equal(ok, _scores(["ok"]))  # same batch, other pass: fine
        np.testing.assert_array_equal(await batcher.submit(["later"]), _scores(["later"]))
        await batcher.close()

    asyncio.run(main())


def test_batcher_fails_callers_whose_texts_the_runner_did_not_plan():
    class Forgetful(_Runner):
        def plan(self, texts: list[str]) -> list[_Job]:
            return super().plan(texts)[:-1]

    async def main() -> None:
        batcher = DynamicBatcher(Forgetful(per_pass=1), max_batch_size=2, max_batch_wait_s=0.05)
        results = await asyncio.wait_for(
            asyncio.gather(batcher.submit(["a"]), batcher.submit(["b"]), return_exceptions=True),
            5,
        )
        assert all(isinstance(r, RuntimeError) for r in results), results
        await batcher.close()

    asyncio.run(main())


def test_batcher_does_not_hold_back_a_request_that_already_waited_for_a_worker():
    release = threading.Event()
    runner = _Runner(before_run=lambda job: job.texts == ["busy"] and release.wait(5))

    async def main() -> float:
        batcher = DynamicBatcher(runner, max_batch_size=4, max_batch_wait_s=1.0, workers=1)
        busy = asyncio.ensure_future(batcher.submit(["busy"]))
        await asyncio.sleep(1.2)  # "busy" waited its 1 s for company and is now running
        late = asyncio.ensure_future(batcher.submit(["late"]))
        await asyncio.sleep(1.2)  # "late" has waited longer than max_batch_wait_s already
        release.set()
        await busy
        freed = time.perf_counter()
        await late
        await batcher.close()
        return time.perf_counter() - freed

    assert asyncio.run(main()) < 0.5  # not another full second of waiting for company
    assert runner.batches == [["busy"], ["late"]]


def test_batcher_skips_requests_whose_caller_gave_up():
    release = threading.Event()
    runner = _Runner(before_run=lambda job: release.wait(5))

    async def main() -> None:
        batcher = DynamicBatcher(runner, max_batch_size=1, max_batch_wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit(["first"]))
        await asyncio.sleep(0.05)  # "first" is now in its forward pass
        gone = asyncio.ensure_future(batcher.submit(["gone"]))
        await asyncio.sleep(0.01)
        gone.cancel()
        release.set()
        await first
        np.testing.assert_array_equal(await batcher.submit(["last"]), _scores(["last"]))
        await batcher.close()

    asyncio.run(main())
    assert runner.batches == [["first"], ["last"]]


def test_classifier_plans_length_sorted_passes_that_cover_the_batch(classifier, corpus_texts):
    jobs = classifier.plan(corpus_texts)
    assert sorted(i for job in jobs for i in job.indices) == list(range(len(corpus_texts)))
    assert all(len(job.ids) <= classifier.max_batch_size for job in jobs)
    longest = [max(len(ids) for ids in job.ids) for job in jobs]
    assert longest == sorted(longest)


# --- model loading and inference --------------------------------------------------------------


def test_batched_results_equal_single_results(classifier, corpus_texts):
    batched = classifier.predict_proba(corpus_texts)
    single = np.concatenate([classifier.predict_proba([t]) for t in corpus_texts])
    assert batched.shape == (len(corpus_texts), 3)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert (batched.argmax(1) == single.argmax(1)).all()
    np.testing.assert_allclose(batched.sum(1), 1.0, atol=1e-5)


def test_classifier_is_safe_to_call_from_several_threads(classifier, corpus_texts):
    from concurrent.futures import ThreadPoolExecutor

    expected = classifier.predict_proba(corpus_texts)
    chunks = [corpus_texts[i : i + 5] for i in range(0, len(corpus_texts), 5)] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(classifier.predict_proba, chunks))
    np.testing.assert_allclose(np.concatenate(results[: len(chunks) // 4]), expected, atol=1e-5)


def test_inference_matches_plain_transformers(tiny_classifier, classifier, corpus_texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    texts = corpus_texts[:8]
    with torch.inference_mode():
        enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        expected = torch.softmax(model(**enc).logits, -1).numpy()
    np.testing.assert_allclose(classifier.predict_proba(texts), expected, atol=1e-5)


def _padded_batch(classifier: TextClassifier, texts: list[str]) -> dict[str, torch.Tensor]:
    return classifier.tokenizer(texts, padding=True, return_tensors="pt")


def test_unpadded_linears_multiply_real_tokens_only_and_keep_the_outputs(
    tiny_classifier, monkeypatch
):
    plain = TextClassifier(tiny_classifier, device="cpu", unpad="off")
    assert plain.unpadded is None
    texts = ["good", "a much longer text that needs padding on the others", "fine then"]
    batch = _padded_batch(plain, texts)
    with torch.inference_mode():
        expected = plain.model(**batch).logits
    unpadded = UnpaddedLinears(plain.model)
    rows: list[int] = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda x, *a: rows.append(x.shape[0]) or linear(x, *a)
    )
    pairs = feed_forward_pairs(plain.model)
    assert len(pairs) == plain.model.config.num_hidden_layers  # intermediate -> output, each layer
    between: list[torch.Size] = []  # what the activation hands the second Linear of each pair
    hooks = [second.register_forward_pre_hook(lambda m, a: between.append(a[0].shape))
             for _, second in pairs]  # fmt: skip
    with torch.inference_mode(), unpadded.tokens(batch["attention_mask"], plain.device):
        got = plain.model(**batch).logits
    real_tokens = int(batch["attention_mask"].sum())
    assert real_tokens < batch["attention_mask"].numel()  # the batch does have padding
    per_token = [n for n in rows if n != len(texts)]  # the pooler and head see one row per text
    assert per_token and set(per_token) == {real_tokens}
    # the feed-forward stays packed: real rows only, never scattered into the padded layout
    intermediate = plain.model.config.intermediate_size
    assert between == [torch.Size([real_tokens, intermediate])] * len(pairs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    for hook in hooks:
        hook.remove()
    unpadded.remove()
    assert all("forward" not in vars(m) for m in plain.model.modules())


def test_a_feed_forward_that_refuses_packed_rows_runs_padded(tiny_classifier, monkeypatch, caplog):
    from transformers.models.bert import modeling_bert

    def three_dimensional_only(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dense(hidden_states).transpose(1, 2).transpose(1, 2)
        return self.intermediate_act_fn(hidden_states)

    monkeypatch.setattr(modeling_bert.BertIntermediate, "forward", three_dimensional_only)
    classifier = TextClassifier(tiny_classifier, device="cpu")
    assert classifier.unpadded is None
    assert "skipping padding failed" in caplog.text and "running padded passes" in caplog.text
    assert all("forward" not in vars(m) for m in classifier.model.modules())
    texts = ["good", "a much longer text that needs padding on the others"]
    plain = TextClassifier(tiny_classifier, device="cpu", unpad="off")
    np.testing.assert_allclose(classifier.predict_proba(texts), plain.predict_proba(texts))


def test_unpadded_linears_keep_each_threads_mask_apart(tiny_classifier):
    classifier = TextClassifier(tiny_classifier, device="cpu", unpad="off")
    unpadded = UnpaddedLinears(classifier.model)
    # same shape, different padding: a mask shared between threads would mix them up
    batches = [
        _padded_batch(classifier, ["one two three four five six", "x"]),
        _padded_batch(classifier, ["x", "one two three four five six"]),
    ]
    with torch.inference_mode():
        expected = [classifier.model(**b).logits for b in batches]
    start = threading.Barrier(2)

    def run(i: int) -> list[torch.Tensor]:
        start.wait()
        out = []
        for _ in range(30):
            with torch.inference_mode(), unpadded.tokens(batches[i]["attention_mask"], "cpu"):
                out.append(classifier.model(**batches[i]).logits)
        return out

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, [0, 1]))
    for i, outs in enumerate(results):
        for got in outs:
            torch.testing.assert_close(got, expected[i], atol=1e-6, rtol=0)


def test_classifier_runs_padded_passes_when_unpadding_changes_outputs(
    tiny_classifier, monkeypatch, caplog
):
    from fineserve.serving import engine

    monkeypatch.setitem(engine._UNPAD_TOLERANCE, "float32", -1.0)  # any drift is too much
    classifier = TextClassifier(tiny_classifier, device="cpu")
    assert classifier.unpadded is None
    assert "running padded passes" in caplog.text
    assert all("forward" not in vars(m) for m in classifier.model.modules())
    assert TextClassifier(tiny_classifier, device="cpu").unpadded is None
    monkeypatch.undo()
    assert TextClassifier(tiny_classifier, device="cpu").unpadded is not None


def test_long_texts_are_truncated_to_the_tokenizer_max_length(classifier):
    assert classifier.max_length == 64  # the fixture's tokenizer model_max_length
    head = " ".join(["good"] * 100)
    ids = classifier.token_ids([head + " bad" * 2000])
    assert len(ids[0]) == 64
    a, b = classifier.predict_proba([head + " awful" * 3000, head + " lovely" * 10])
    np.testing.assert_allclose(a, b, atol=1e-6)  # only the first 64 tokens count


def test_labels_come_from_id2label(classifier):
    assert classifier.labels == ["negative", "neutral", "positive"]


def test_model_version_from_fineserve_json_then_env(tmp_path, monkeypatch):
    monkeypatch.delenv("FINESERVE_MODEL_VERSION", raising=False)
    assert read_model_version(tmp_path) == "unknown"
    monkeypatch.setenv("FINESERVE_MODEL_VERSION", "from-env")
    assert read_model_version(tmp_path) == "from-env"
    (tmp_path / "fineserve.json").write_text(json.dumps({"max_length": 64, "model_version": 7}))
    assert read_model_version(tmp_path) == "7"
    (tmp_path / "fineserve.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="fineserve.json"):
        read_model_version(tmp_path)


def test_only_safetensors_weights_are_loaded(tiny_classifier, tmp_path):
    from safetensors.torch import load_file

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_classifier / name, tmp_path / name)
    torch.save(load_file(tiny_classifier / "model.safetensors"), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        TextClassifier(tmp_path, device="cpu")


def test_a_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelDirError, match="config.json"):
        TextClassifier(tmp_path, device="cpu")


# --- model URIs -------------------------------------------------------------------------------


def test_find_hf_dir_at_root_or_in_pyfunc_artifacts(tiny_classifier, tmp_path):
    assert find_hf_dir(tiny_classifier) == tiny_classifier
    nested = tmp_path / "artifacts" / "hf_model"
    shutil.copytree(tiny_classifier, nested)
    assert find_hf_dir(tmp_path) == nested
    assert resolve_model_dir(str(tmp_path)) == nested
    with pytest.raises(FileNotFoundError, match="config.json"):
        find_hf_dir(tmp_path / "artifacts")


def test_find_hf_dir_follows_the_mlmodel_file(tiny_classifier, tmp_path):
    # MLflow names the copied artifact after its source directory, not after the artifact key
    shutil.copytree(tiny_classifier, tmp_path / "artifacts" / "checkpoint-final")
    (tmp_path / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n      hf_model:\n"
        "        path: artifacts/checkpoint-final\n"
    )
    assert find_hf_dir(tmp_path) == tmp_path / "artifacts" / "checkpoint-final"


# --- command lines ----------------------------------------------------------------------------


def test_fineserve_serve_arguments():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(
        ["--model-uri", "models:/sentiment@prod", "--http-port", "9000", "--max-batch-size", "8"]
    )
    assert (args.model_uri, args.model_dir, args.http_port, args.grpc_port) == (
        "models:/sentiment@prod",
        None,
        9000,
        8081,
    )
    options = options_from_args(args)
    assert (options.max_batch_size, options.max_batch_wait_ms, options.device) == (8, 5.0, "auto")
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-dir", "a", "--model-uri", "models:/b@c"])
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_python_m_serving_arguments_extend_kserve():
    args = build_parser().parse_args(
        ["--model_name", "m", "--model_dir", "/mnt/models", "--max_batch_wait_ms", "2"]
    )
    assert (args.model_name, args.model_dir, args.max_batch_wait_ms) == ("m", "/mnt/models", 2.0)
    assert args.http_port == 8080 and args.enable_grpc  # KServe's own options are there


def test_default_model_name_from_registry_uri():
    assert default_model_name("models:/sentiment@champion") == "sentiment"
    assert default_model_name("models:/sentiment/3") == "sentiment"
    assert default_model_name("runs:/abc/model") == "model"
    assert default_model_name(None) == "model"


def test_bad_knobs_are_rejected():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(ValueError, match="max_batch_size"):
        options_from_args(parser.parse_args(["--model-dir", "x", "--max-batch-size", "0"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-dir", "x", "--unpad", "sometimes"])
    args = parser.parse_args(["--model-dir", "x", "--unpad", "off"])
    assert options_from_args(args).unpad == "off"


def test_readiness_means_a_model_can_answer():
    from kserve.model_repository import ModelRepository

    from fineserve.serving.http_guards import GuardedDataPlane

    class Stub:
        name, ready = "m", True

        async def healthy(self) -> bool:
            return self.ready

    repository = ModelRepository()
    plane = GuardedDataPlane(model_registry=repository)
    assert asyncio.run(plane.ready()) is False  # nothing loaded: KServe's own says True
    repository.update(Stub())
    assert asyncio.run(plane.ready()) is True
    Stub.ready = False
    assert asyncio.run(plane.ready()) is False


def test_a_model_that_cannot_answer_now_is_a_503_saying_why_and_is_not_loaded_again():
    from kserve.model_repository import ModelRepository

    from fineserve.serving.http_guards import GuardedDataPlane, ModelUnavailable
    from fineserve.serving.protocol import NotServed

    class Stub:
        name, ready, loads = "m", False, 0
        unavailable_reason = "no forward process is running (2 starting)"

        async def healthy(self) -> bool:
            return self.ready

        def load(self) -> bool:  # KServe's get_model loads a model that is not ready
            Stub.loads += 1
            return True

    repository = ModelRepository()
    repository.update(Stub())
    plane = GuardedDataPlane(model_registry=repository)
    why = r"model 'm' cannot answer now: no forward process is running \(2 starting\)"
    with pytest.raises(ModelUnavailable, match=why) as unavailable:  # gRPC's inference path
        asyncio.run(plane.get_model("m"))
    assert unavailable.value.reason == str(unavailable.value)  # what gRPC's status carries
    with pytest.raises(ModelUnavailable, match=why):  # HTTP's inference paths
        asyncio.run(plane.model_ready("m", disable_predictor_health_check=True))
    assert asyncio.run(plane.model_ready("m")) is False  # the readiness endpoints
    assert Stub.loads == 0
    with pytest.raises(
        NotServed, match="model 'nope' does not exist here; this predictor serves 'm'"
    ):
        asyncio.run(plane.model_ready("nope"))


def test_a_port_in_use_is_refused_naming_it_before_anything_loads():
    import socket

    from serving_helpers import free_port

    from fineserve.serving.server import PortInUse, check_ports_free

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken, free = holder.getsockname()[1], free_port()
        with pytest.raises(PortInUse, match=f"HTTP port {taken} .*Address already in use"):
            check_ports_free(taken, free)
        with pytest.raises(PortInUse, match=f"gRPC port {taken} "):
            check_ports_free(free, taken)
        check_ports_free(free, None)  # gRPC off: its port is not needed
    with pytest.raises(PortInUse, match=f"both given port {free}"):
        check_ports_free(free, free)
    check_ports_free(free, free_port())


def test_the_tokenizer_sees_a_bounded_prefix_of_a_huge_text(tiny_classifier):
    from fineserve.serving.engine import CHARS_PER_TOKEN_BOUND

    classifier = TextClassifier(tiny_classifier, device="cpu", unpad="off")
    seen = []
    tokenize = classifier.tokenizer

    def recording(texts, **kwargs):
        seen.extend(len(t) for t in texts)
        return tokenize(texts, **kwargs)

    classifier.tokenizer = recording
    huge = "word " * 400_000  # 2 MB
    (ids,) = classifier.token_ids([huge])
    assert len(ids) == classifier.max_length
    assert seen == [classifier.max_length * CHARS_PER_TOKEN_BOUND]


def test_memory_is_trimmed_once_idle_and_at_most_every_interval():
    from fineserve.serving.memory import IdleMemoryTrimmer

    trims = []

    async def scenario():
        trimmer = IdleMemoryTrimmer(min_interval_s=0.2, trim=trims.append)
        trimmer.started()
        trimmer.started()
        trimmer.finished()
        await asyncio.sleep(0.01)
        assert trims == []  # one still in flight
        trimmer.finished()
        await asyncio.sleep(0.01)
        assert trims == [0]  # idle: trimmed
        trimmer.started()
        trimmer.finished()
        await asyncio.sleep(0.05)
        assert trims == [0]  # too soon after the last trim...
        await asyncio.sleep(0.25)
        assert trims == [0, 0]  # ...so it comes when the interval is over
        trimmer.started()
        await asyncio.sleep(0.3)
        trimmer.finished()
        await asyncio.sleep(0.01)
        assert trims == [0, 0, 0]

    asyncio.run(scenario())


# --- the HTTP server's event loop and per-request logging --------------------------------------


@pytest.mark.parametrize(("kind", "module"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_the_event_loop_asked_for_is_the_one_that_runs(kind, module):
    async def running_loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    before = asyncio.get_event_loop_policy()
    try:
        assert use_event_loop(kind) == module
        assert asyncio.run(running_loop_module()).split(".")[0] == module
    finally:
        asyncio.set_event_loop_policy(before)
    with pytest.raises(ValueError, match="--event-loop"):
        use_event_loop("trio")


@pytest.mark.parametrize("latency_logging", [False, True])
def test_kserve_timing_lines_follow_latency_logging(latency_logging):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from timing_asgi import TimingClient, TimingMiddleware
    from timing_asgi.integrations import StarletteScopeToName

    class Recorded(TimingClient):
        def __init__(self) -> None:
            self.names: list[str] = []

        def timing(self, metric_name, timing, tags) -> None:
            self.names.append(metric_name)

    app, timings = FastAPI(), Recorded()

    @app.get("/ping")
    def ping() -> str:
        return "pong"

    # as KServe's RESTServer adds it
    app.add_middleware(
        TimingMiddleware, client=timings, metric_namer=StarletteScopeToName("kserve.io", app)
    )
    wrap_middleware(app, latency_logging=latency_logging)
    with TestClient(app) as client:
        assert client.get("/ping").json() == "pong"
    assert timings.names == (["kserve.io.test_serving_units.ping"] * 2 if latency_logging else [])


def test_the_inference_request_series_exist_at_zero_from_the_load():
    """Prometheus' increase() skips a series' first sample: a canary's first 500 must count."""
    from prometheus_client import REGISTRY, generate_latest

    from fineserve.serving.prometheus_metrics import ModelMetrics

    ModelMetrics("zeroed", "v9", "cpu", ["a", "b"])
    exposed = generate_latest(REGISTRY).decode()
    for protocol, endpoint, code in [
        ("http", "/v2/models/{model}/infer", "500"),
        ("http", "/v1/models/{model}:predict", "500"),
        ("http", "/v2/models/{model}/infer", "200"),
        ("grpc", "ModelInfer", "INTERNAL"),
    ]:
        series = (
            f'fineserve_requests_total{{code="{code}",endpoint="{endpoint}",'
            f'model_name="zeroed",model_version="v9",protocol="{protocol}"}} 0.0'
        )
        assert series in exposed
