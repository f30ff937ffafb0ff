"""Serving precision: --dtype auto, the accuracy probe, its fallback, int8, what is reported."""

from __future__ import annotations

import argparse
import logging
import shutil

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import ServerProcess, serve_module_argv, v2_body
from transformers import AutoModelForSequenceClassification

from fineserve.core.artifacts import PROBE_FILE, write_probe
from fineserve.serving import compiled, precision
from fineserve.serving.engine import CompileError, TextClassifier
from fineserve.serving.entrypoint import add_serve_arguments, options_from_args
from fineserve.serving.precision import ProbeSettings, compare
from fineserve.serving.predictor import ServeOptions

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def probe_texts(corpus_frame) -> list[str]:
    return corpus_frame["text"].sample(128, random_state=5).tolist()


@pytest.fixture(scope="module")
def decisive_model(tiny_classifier, probe_texts, tmp_path_factory):
    """The tiny classifier with a confident head (top probability ~0.95) and probe texts."""
    path = tmp_path_factory.mktemp("decisive") / "model"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier)
    with torch.no_grad():
        model.classifier.weight.mul_(300.0)
    model.save_pretrained(path)
    shutil.copy(tiny_classifier / "tokenizer.json", path)
    shutil.copy(tiny_classifier / "tokenizer_config.json", path)
    write_probe(path, probe_texts, "test split")
    return path


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend this CPU has AMX / AVX-512 BF16 (or not): `native_bf16(True)`."""

    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)

    return set_native


# --- the probe's judgement --------------------------------------------------------------------


def test_the_probe_accepts_small_moves_and_rejects_changed_classes_or_large_moves():
    reference = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]], dtype=np.float32)
    settings = ProbeSettings(min_agreement=0.99, max_probability_diff=0.1)
    faithful = compare(reference, reference + [[-0.01, 0.01]] * 4, settings)
    assert faithful.passed and faithful.agreement == 1.0
    flipped = reference.copy()
    flipped[2] = [0.45, 0.55]  # one text of four changes class, by a small move
    result = compare(reference, flipped, settings)
    assert not result.passed and result.agreement == 0.75
    moved = reference.copy()
    moved[0] = [0.7, 0.3]  # same class, probability moved by 0.2
    assert not compare(reference, moved, settings).passed
    near_tie = np.vstack([reference, [[0.505, 0.495]]])  # float32 can hardly tell them apart
    flipped_tie = np.vstack([reference, [[0.497, 0.503]]])
    tie = compare(near_tie, flipped_tie, settings)
    assert tie.passed and tie.agreement == 1.0 and tie.near_ties == 1
    assert "(1 near-ties changed)" in tie.describe()
    strict = ProbeSettings(min_agreement=0.99, max_probability_diff=0.1, tie_margin=0.0)
    assert not compare(near_tie, flipped_tie, strict).passed
    broken = reference.copy()
    broken[1] = [np.nan, np.nan]
    assert not compare(reference, broken, settings).passed
    assert "75.00% of 4 probe texts keep their class" in result.describe()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"texts": -1}, "probe_texts must be 0"),
        ({"min_agreement": 1.5}, "probe_min_agreement must be between 0 and 1"),
        ({"max_probability_diff": -0.1}, "probe_max_probability_diff must be between 0 and 1"),
        ({"tie_margin": 2.0}, "probe_tie_margin must be between 0 and 1"),
    ],
)
def test_bad_probe_settings_are_refused_naming_the_flag(settings, message):
    with pytest.raises(ValueError, match=message):
        ProbeSettings(**settings)


# --- which precision ----------------------------------------------------------------------------


def test_auto_means_bfloat16_only_where_the_cpu_runs_it_natively(native_bf16):
    native_bf16(True)
    assert precision.choose("auto", CPU)[0] == "bfloat16"
    native_bf16(False)
    target, why = precision.choose("auto", CPU)
    assert target == "float32" and "no native bfloat16" in why
    assert precision.choose("int8", CPU) == ("int8", "asked for")
    with pytest.raises(ValueError, match="runs on the CPU only"):
        precision.choose("int8", torch.device("cuda"))


def test_dtype_is_validated_by_the_command_line_and_the_engine(tiny_classifier):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-dir", "x", "--dtype", "fp8"])
    args = parser.parse_args(["--model-dir", "x", "--dtype", "int8", "--probe-texts", "64"])
    options = options_from_args(args)
    assert (options.dtype, options.probe.texts, options.probe.min_agreement) == ("int8", 64, 0.99)
    bad = parser.parse_args(["--model-dir", "x", "--probe-min-agreement", "2"])
    with pytest.raises(ValueError, match="probe_min_agreement"):
        options_from_args(bad)
    with pytest.raises(ValueError, match="unknown --dtype 'fp8'"):
        TextClassifier(tiny_classifier, dtype="fp8")


# --- the engine: probe, fallback, report --------------------------------------------------------


def test_auto_serves_bfloat16_when_the_probe_passes(decisive_model, probe_texts, native_bf16):
    native_bf16(True)
    reference = TextClassifier(decisive_model, dtype="float32").predict_proba(probe_texts)
    classifier = TextClassifier(decisive_model, device="cpu", dtype="auto")
    assert classifier.precision == "bfloat16"
    assert {p.dtype for p in classifier.model.parameters()} == {torch.bfloat16}  # converted
    assert classifier.probe.passed and classifier.probe.texts == len(probe_texts)
    assert "probe: 100.00% of 128 probe texts keep their class" in classifier.precision_reason
    served = classifier.predict_proba(probe_texts)
    assert (served.argmax(1) == reference.argmax(1)).all()
    assert np.abs(served - reference).max() <= 0.1


def test_auto_stays_float32_where_the_cpu_has_no_native_bfloat16(decisive_model, native_bf16):
    native_bf16(False)
    classifier = TextClassifier(decisive_model, device="cpu", dtype="auto")
    assert classifier.precision == "float32" and classifier.probe is None
    assert {p.dtype for p in classifier.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("scale", [0.5, -1.0])  # probabilities move; classes change
def test_a_corrupted_reduced_model_fails_the_probe_and_float32_is_served(
    decisive_model, probe_texts, native_bf16, monkeypatch, caplog, scale
):
    native_bf16(True)
    convert = precision.reduce

    def broken_reduce(model, name):  # a conversion that damages a layer's weights
        with torch.no_grad():
            model.classifier.weight.mul_(scale)
        return convert(model, name)

    monkeypatch.setattr(precision, "reduce", broken_reduce)
    reference = TextClassifier(decisive_model, dtype="float32").predict_proba(probe_texts)
    with caplog.at_level(logging.WARNING, logger="fineserve.serving.engine"):
        classifier = TextClassifier(decisive_model, device="cpu", dtype="auto")
    assert classifier.precision == "float32"
    assert {p.dtype for p in classifier.model.parameters()} == {torch.float32}
    assert not classifier.probe.passed
    assert "serving float32 instead of bfloat16" in caplog.text
    assert "the probe failed" in classifier.precision_reason
    # the float32 weights were reloaded: answers are float32's, untouched by the damage
    np.testing.assert_allclose(classifier.predict_proba(probe_texts), reference, atol=1e-6)


def test_a_reduced_precision_that_does_not_run_here_falls_back_to_float32(
    decisive_model, probe_texts, monkeypatch, caplog
):
    def no_kernel(model, name):
        raise RuntimeError(f'"addmm" not implemented for {name}')

    monkeypatch.setattr(precision, "reduce", no_kernel)
    with caplog.at_level(logging.WARNING, logger="fineserve.serving.engine"):
        classifier = TextClassifier(decisive_model, device="cpu", dtype="float16")
    assert classifier.precision == "float32"
    assert "float16 does not run here" in caplog.text
    assert classifier.predict_proba(probe_texts[:2]).shape == (2, 3)


def test_without_probe_texts_auto_serves_float32_and_a_named_precision_is_unchecked(
    decisive_model, tmp_path, native_bf16, caplog
):
    native_bf16(True)
    bare = tmp_path / "bare"
    shutil.copytree(decisive_model, bare)
    (bare / PROBE_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="fineserve.serving.engine"):
        auto = TextClassifier(bare, device="cpu", dtype="auto")
    assert auto.precision == "float32" and "has no probe texts" in auto.precision_reason
    assert "serving float32" in caplog.text
    named = TextClassifier(bare, device="cpu", dtype="bfloat16")
    assert named.precision == "bfloat16" and named.probe is None
    assert {p.dtype for p in named.model.parameters()} == {torch.bfloat16}
    assert "unchecked" in named.precision_reason


def test_int8_quantizes_the_linear_layers_and_keeps_skipping_padding(decisive_model, probe_texts):
    reference = TextClassifier(decisive_model, dtype="float32").predict_proba(probe_texts)
    classifier = TextClassifier(
        decisive_model, dtype="int8", probe=ProbeSettings(max_probability_diff=0.2)
    )
    assert classifier.precision == "int8" and classifier.probe.passed
    quantized = [m for m in classifier.model.modules() if type(m).__name__ == "Linear"]
    assert quantized and all(type(m) is not torch.nn.Linear for m in quantized)
    assert classifier.unpadded is not None and len(classifier.unpadded.linears) == len(quantized)
    served = classifier.predict_proba(probe_texts)
    assert (served.argmax(1) == reference.argmax(1)).mean() >= 0.99


# --- compiled passes (--compile) -----------------------------------------------------------------


def test_auto_compiles_bfloat16_on_a_cpu_only():
    assert compiled.wanted("auto", "bfloat16", CPU)
    assert not compiled.wanted("auto", "float32", CPU)  # no faster than skipping padding
    assert not compiled.wanted("auto", "int8", CPU)
    assert not compiled.wanted("auto", "bfloat16", torch.device("cuda"))
    assert compiled.wanted("on", "float32", CPU) and not compiled.wanted("off", "bfloat16", CPU)


def test_compile_is_validated_by_the_command_line_the_options_and_the_engine(tiny_classifier):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-dir", "x", "--compile", "fast"])
    assert options_from_args(parser.parse_args(["--model-dir", "x"])).compile == "auto"
    with pytest.raises(ValueError, match="compile must be one of"):
        ServeOptions(compile="fast")
    with pytest.raises(ValueError, match="unknown --compile 'fast'"):
        TextClassifier(tiny_classifier, compile="fast")


def test_auto_serves_bfloat16_compiled_answering_like_eager_with_no_compile_after_load(
    decisive_model, probe_texts, native_bf16
):
    from torch._dynamo.utils import counters

    native_bf16(True)
    eager = TextClassifier(decisive_model, device="cpu", dtype="auto", compile="off")
    classifier = TextClassifier(decisive_model, device="cpu", dtype="auto")
    assert classifier.precision == "bfloat16" and classifier.compiled
    assert classifier.probe.passed
    assert classifier.unpadded is None  # compiled passes run padded
    graphs = counters["stats"]["unique_graphs"]
    one = classifier.predict_proba(probe_texts[:1])
    served = classifier.predict_proba(probe_texts)  # passes of many sizes and lengths
    assert counters["stats"]["unique_graphs"] == graphs  # the warm-up compiled them all
    # a pass no graph fits (here: another argument) runs eager instead of compiling in a worker
    batch = classifier.tokenizer(probe_texts[:3], padding=True, return_tensors="pt")
    with torch.inference_mode():
        outputs = classifier.model(**batch, output_hidden_states=True)
    assert outputs.hidden_states and counters["stats"]["unique_graphs"] == graphs
    expected = eager.predict_proba(probe_texts)
    assert (served.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(served, expected, atol=0.02)
    np.testing.assert_allclose(one, served[:1], atol=0.02)


def test_compiled_passes_run_with_the_weights_frozen_into_the_graph(
    decisive_model, probe_texts, native_bf16
):
    """Frozen weights are the graph's own (packed for oneDNN at load): 1.28x faster passes."""
    native_bf16(True)
    classifier = TextClassifier(decisive_model, device="cpu", dtype="auto")
    assert classifier.compiled
    _assert_weights_frozen(classifier, probe_texts)


def test_a_process_that_loads_again_and_again_still_serves_frozen_graphs(
    decisive_model, probe_texts, native_bf16
):
    """Each load's graphs are guarded on its model; the earlier ones must go.

    Otherwise dynamo's recompile limit (8; 2 here, to keep the test short) turns later loads
    eager.
    """
    native_bf16(True)
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(3):
            classifier = TextClassifier(decisive_model, device="cpu", dtype="auto")
    _assert_weights_frozen(classifier, probe_texts)


def _assert_weights_frozen(classifier: TextClassifier, texts: list[str]) -> None:
    """The compiled graph answers with its own weights: the module's no longer reach it."""
    served = classifier.predict_proba(texts)
    with torch.no_grad():
        classifier.model.classifier.weight.mul_(-1.0)
    np.testing.assert_array_equal(classifier.predict_proba(texts), served)


class _Uncompilable(torch.nn.Module):
    """What torch.compile gives where inductor cannot build: it fails on its first pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.eager = model

    def forward(self, **batch):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")


def test_when_compiling_fails_auto_serves_eager_with_a_warning_and_on_refuses(
    decisive_model, probe_texts, native_bf16, monkeypatch, caplog
):
    native_bf16(True)
    monkeypatch.setattr(compiled, "compile_model", _Uncompilable)
    with caplog.at_level(logging.WARNING, logger="fineserve.serving.engine"):
        classifier = TextClassifier(decisive_model, device="cpu", dtype="auto")
    assert "serving eager passes: torch.compile failed (InvalidCxxCompiler" in caplog.text
    assert classifier.precision == "bfloat16" and not classifier.compiled
    assert classifier.probe.passed and classifier.unpadded is not None
    assert classifier.predict_proba(probe_texts[:3]).shape == (3, 3)
    for dtype in ("float32", "bfloat16"):  # not a reduced precision's fallback to float32
        with pytest.raises(CompileError, match="--compile on, but torch.compile fails here"):
            TextClassifier(decisive_model, device="cpu", dtype=dtype, compile="on")


def test_a_precision_without_kernels_is_not_blamed_on_the_compiler(
    decisive_model, monkeypatch, caplog
):
    convert = precision.reduce

    def without_kernels(model, name):
        reduced = convert(model, name)

        def forward(*args, **kwargs):
            raise RuntimeError(f'"addmm" not implemented for {name}')

        reduced.forward = forward
        return reduced

    monkeypatch.setattr(precision, "reduce", without_kernels)
    with caplog.at_level(logging.WARNING, logger="fineserve.serving.engine"):
        classifier = TextClassifier(decisive_model, device="cpu", dtype="float16", compile="on")
    assert "float16 does not run here" in caplog.text and "torch.compile" not in caplog.text
    assert classifier.precision == "float32" and classifier.compiled  # float32, compiled


def test_a_compiled_model_that_answers_differently_fails_the_probe(
    decisive_model, probe_texts, native_bf16, monkeypatch
):
    native_bf16(True)

    def miscompiled(model):  # a compiler bug: one layer's weights come out wrong
        with torch.no_grad():
            model.classifier.weight.mul_(-1.0)
        return model

    monkeypatch.setattr(compiled, "compile_model", miscompiled)
    classifier = TextClassifier(decisive_model, device="cpu", dtype="auto")
    assert classifier.precision == "float32" and not classifier.compiled
    assert "the probe failed" in classifier.precision_reason


# --- what the server reports --------------------------------------------------------------------


def test_the_server_reports_its_precision_in_metadata_logs_and_metrics(
    decisive_model, tmp_path, probe_texts
):
    # bfloat16 by name: the probe runs on every CPU (emulated where not native)
    argv = serve_module_argv(decisive_model, "tiny", "--dtype", "bfloat16", "--device", "cpu")
    log_path = tmp_path / "server.log"
    with (
        ServerProcess(argv, log_path=log_path) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        meta = http.get("/v2/models/tiny").json()
        assert meta["platform"] == "pytorch_bfloat16" and meta["versions"] == ["unknown"]
        answer = http.post("/v2/models/tiny/infer", json=v2_body(probe_texts[:4]))
        assert answer.status_code == 200, answer.text
        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    (info,) = families["fineserve_model_info"].samples
    assert info.labels["precision"] == "bfloat16" and info.value == 1
    (agreement,) = families["fineserve_precision_probe_agreement"].samples
    assert agreement.value == 1.0 and agreement.labels["precision"] == "bfloat16"
    assert "fineserve_precision_probe_max_probability_diff" in families
    log = log_path.read_text()
    assert "in bfloat16 (asked for; probe: 100.00% of 128 probe texts" in log
    assert "compiled (torch.compile), padding rows padded" in log


def test_a_server_whose_probe_fails_serves_float32_and_logs_a_warning(decisive_model, tmp_path):
    argv = serve_module_argv(
        decisive_model, "tiny", "--dtype", "int8", "--probe_max_probability_diff", "0"
    )  # int8 always moves some probability a little: this limit fails it
    log_path = tmp_path / "server.log"
    with ServerProcess(argv, log_path=log_path) as server:
        meta = httpx.get(f"{server.url}/v2/models/tiny", timeout=30).json()
    assert meta["platform"] == "pytorch_float32"
    log = log_path.read_text()
    assert "fineserve.serving.engine WARNING" in log  # in KServe's log format
    assert "serving float32 instead of int8: asked for, but the probe failed" in log
