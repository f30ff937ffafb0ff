"""ONNX Runtime as a serving backend? Its in-process floor against torch's, at equal precision.

    # not dependencies of fineserve: install them to run this
    .venv/bin/python -m pip install onnxruntime==1.31.1 onnx==1.23.2 onnxscript==0.7.2
    .venv/bin/python benchmarks/onnx_runtime.py --model-dir DIR [--threads 1] [--rounds 3]

The model (a fineserve HF directory, e.g. the local run's registered one) is exported to ONNX,
optimized with ONNX Runtime's transformer fusions (attention, layer norm, GELU), and quantized
dynamically to int8 (per channel). Every backend then classifies the same texts, in the
engine's own length-sorted passes of 16, in one interleaved run: torch float32, bfloat16 and
int8 (what `--dtype` serves) and ONNX Runtime float32 and int8. Agreement is the share of
texts whose class matches torch float32's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_bench import corpus_texts  # noqa: E402

from fineserve.serving import precision  # noqa: E402
from fineserve.serving.engine import TextClassifier  # noqa: E402


class TorchBackend:
    """The serving engine's model in one precision (the probe off: measured as asked)."""

    def __init__(self, model_dir: Path, name: str) -> None:
        self.engine = TextClassifier(
            model_dir, device="cpu", dtype=name, probe=precision.ProbeSettings(texts=0)
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            logits = self.engine.model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits
        return torch.softmax(logits.float(), -1).numpy()


class OrtBackend:
    """An ONNX Runtime session over an exported model."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        (logits,) = self.session.run(None, {k: v for k, v in batch.items() if k in self.inputs})
        logits = logits - logits.max(-1, keepdims=True)
        return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def export(model_dir: Path, out: Path) -> tuple[Path, Path]:
    """The model as ONNX (fused by ONNX Runtime's transformer optimizer), and its int8 form."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    engine = TextClassifier(model_dir, device="cpu", dtype="float32", unpad="off")
    model, config = engine.model, engine.model.config
    sample = engine.tokenizer(["a fine day", "an awful, awful film"], padding=True,
                              return_tensors="pt")  # fmt: skip
    names = ["input_ids", "attention_mask"]
    raw = out / "model.onnx"
    torch.onnx.export(
        model,
        (sample["input_ids"], sample["attention_mask"]),
        str(raw),
        input_names=names,
        output_names=["logits"],
        dynamic_axes={n: {0: "batch", 1: "tokens"} for n in names} | {"logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    encoder = getattr(config, "encoder", None) or config.to_dict()
    optimized = optimize_model(
        str(raw),
        model_type="bert",
        num_heads=int(encoder["num_attention_heads"]),
        hidden_size=int(encoder["hidden_size"]),
    )
    fused = out / "model-fused.onnx"
    optimized.save_model_to_file(str(fused))
    print("ONNX Runtime fusions:", optimized.get_fused_operator_statistics(), flush=True)
    int8 = out / "model-int8.onnx"
    quantize_dynamic(
        str(fused),
        str(int8),
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},  # fused ops: no inference
    )
    return fused, int8


def batches(model_dir: Path, texts: list[str]) -> list[tuple[list[int], dict[str, np.ndarray]]]:
    """The engine's own passes (length-sorted chunks of up to 16 texts), padded as numpy."""
    engine = TextClassifier(model_dir, device="cpu", dtype="float32", max_batch_size=16)
    out = []
    for job in engine.plan(texts):
        padded = engine.tokenizer.pad({"input_ids": job.ids}, return_tensors="np")
        batch = {k: v.astype(np.int64) for k, v in padded.items() if k != "token_type_ids"}
        out.append((job.indices, batch))
    return out


def run(backend, work, n: int, classes: int) -> tuple[float, np.ndarray]:
    """Texts per second over one pass through ``work``, and every text's probabilities."""
    probs = np.empty((n, classes), dtype=np.float32)
    began = time.perf_counter()
    for indices, batch in work:
        probs[indices] = backend(batch)
    return n / (time.perf_counter() - began), probs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True, help="a fineserve HF directory")
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="threads per backend")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    texts = corpus_texts(args.texts, seed=11)
    work = batches(model_dir, texts)
    with tempfile.TemporaryDirectory(prefix="onnx-") as tmp:
        fused, int8 = export(model_dir, Path(tmp))
        backends = {
            "torch float32": TorchBackend(model_dir, "float32"),
            "torch bfloat16": TorchBackend(model_dir, "bfloat16"),
            "torch int8": TorchBackend(model_dir, "int8"),
            "onnxruntime float32": OrtBackend(fused, args.threads),
            "onnxruntime int8": OrtBackend(int8, args.threads),
        }
        classes = backends["torch float32"].engine.num_labels
        for backend in backends.values():  # warm-up: every shape once
            run(backend, work, len(texts), classes)
        rates: dict[str, list[float]] = {name: [] for name in backends}
        answers: dict[str, np.ndarray] = {}
        for round_ in range(args.rounds):
            for name, backend in backends.items():
                rate, answers[name] = run(backend, work, len(texts), classes)
                rates[name].append(rate)
                print(f"round {round_ + 1} {name:<20} {rate:7.1f} texts/s", flush=True)
    reference = answers["torch float32"]
    print(f"\n{len(texts)} texts, passes of up to 16, {args.threads} thread(s), medians of "
          f"{args.rounds} interleaved rounds")  # fmt: skip
    print("| backend | texts/s | vs torch float32 | class agreement | largest probability move |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(rates["torch float32"])
    for name, values in rates.items():
        rate = statistics.median(values)
        agree = (answers[name].argmax(1) == reference.argmax(1)).mean()
        move = np.abs(answers[name] - reference).max()
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {agree:.2%} | {move:.3g} |")


if __name__ == "__main__":
    main()
