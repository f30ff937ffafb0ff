"""Train samples/s of fineserve's train step vs the plain loop of the Hugging Face tutorials.

Both train the same checkpoint on the same rows of the offline corpus, on the same machine, with
the same optimizer recipe (epochs, batch size, learning rate, weight decay, warm-up, and no
gradient clipping, as the tutorial loop has none), and are scored by the same evaluation on the
same test split. The baseline is the tutorial recipe: `tokenizer(..., padding=True)` in a batched
`map` (every row padded to the longest of its 1000-row map batch), a shuffled DataLoader, and an
fp32 AdamW loop with a linear schedule.

    python benchmarks/train_throughput.py --train-rows 3000 --epochs 1 --seeds 1 2 3
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fineserve.components.decorator import call_component
from fineserve.components.download import download
from fineserve.components.evaluation import evaluate
from fineserve.components.tokenization import tokenize
from fineserve.components.training import precision_flags, precision_name, train
from fineserve.core.artifacts import read_evaluation_results, read_token_stats
from fineserve.core.defaults import offline_base_model, offline_corpus_path

TUTORIAL = "tutorial loop (padding=True, fp32 AdamW)"
FINESERVE = f"fineserve train step ({precision_name(precision_flags())})"


def tutorial_loop(raw_dir: str, out_dir: str, args: argparse.Namespace) -> dict:
    """The plain loop (HF course, "A full training"), timed over its training batches only."""
    import datasets
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        get_linear_schedule_with_warmup,
    )

    torch.manual_seed(args.seed)
    data = datasets.load_from_disk(raw_dir)
    names = data["train"].features["label"].names
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    tokenizer.model_max_length = args.max_length
    train = data["train"].map(
        lambda b: tokenizer(b["text"], padding=True, truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=["text"],
    )
    train = train.rename_column("label", "labels")
    model = AutoModelForSequenceClassification.from_pretrained(
        args.base_model,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    # rows of different 1000-row map batches differ in length: the collator stacks them (their
    # padding already happened in `map`, to the longest row of each map batch)
    collate = DataCollatorWithPadding(tokenizer)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    steps = int(args.epochs * len(loader))
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    samples, tokens = 0, 0
    started = time.perf_counter()
    for _ in range(int(args.epochs)):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            samples += len(batch["labels"])
            tokens += batch["input_ids"].numel()
    seconds = time.perf_counter() - started
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"samples_per_s": samples / seconds, "seconds": seconds, "padded_tokens": tokens}


def fineserve_train(raw_dir: str, work: Path, args: argparse.Namespace) -> dict:
    """The train step as the pipeline runs it (Trainer time includes its validation pass)."""
    call_component(
        tokenize,
        dataset=raw_dir,
        tokenized=work / "tok",
        base_model=args.base_model,
        max_length=args.max_length,
    )
    metrics = (
        call_component(
            train,
            tokenized=work / "tok",
            model=work / "fineserve",
            base_model=args.base_model,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            max_grad_norm=args.max_grad_norm,
            early_stopping_patience=0,
            seed=args.seed,
        )
        .artifacts["model"]
        .metadata
    )
    return {
        "samples_per_s": metrics["train_samples_per_second"],
        "seconds": metrics["train_runtime_s"],
        "precision": metrics["precision"],
    }


def mfu(samples_per_s: float, mean_tokens: float, params: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: 6 x params x tokens per trained sample, over the peak."""
    return samples_per_s * 6 * params * mean_tokens / (peak_tflops * 1e12)


def run_once(args: argparse.Namespace, seed: int) -> tuple[dict, dict]:
    """Both trainers on one seed's split and sample; returns their rows and the token stats."""
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        raw = str(work / "raw")
        call_component(
            download,
            dataset=raw,
            source=offline_corpus_path(),
            encoding="latin-1",
            label_column="sentiment",
            max_train_samples=args.train_rows,
            max_eval_samples=args.eval_rows,
            seed=seed,
        )
        results = {
            TUTORIAL: tutorial_loop(raw, str(work / "tutorial"), args),
            FINESERVE: fineserve_train(raw, work, args),
        }
        for name, folder in zip(results, ("tutorial", "fineserve"), strict=True):
            call_component(
                evaluate,
                dataset=raw,
                model=work / folder,
                results=work / f"{folder}.json",
                report=work / f"{folder}.md",
                baseline=False,
                n_bootstrap=200,
            )
            scores = read_evaluation_results(work / f"{folder}.json")["model"]
            results[name].update(accuracy=scores["accuracy"], macro_f1=scores["macro_f1"])
        stats = read_token_stats(work / "tok")
    padded = results[TUTORIAL]["padded_tokens"] / args.train_rows / args.epochs
    print(
        f"seed {seed}: "
        + "; ".join(
            f"{name}: {row['samples_per_s']:.1f} samples/s, macro-F1 {row['macro_f1']:.4f}"
            for name, row in results.items()
        ),
        flush=True,
    )
    return results, {"mean_tokens": stats["token_lengths"]["train"]["mean"], "padded": padded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", default=offline_base_model())
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--eval-rows", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=0.0,
        help="fineserve's gradient clipping (the train step's default is 1.0; the tutorial: none)",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device bf16 peak, for MFU on a GPU"
    )
    args = parser.parse_args()

    runs = [run_once(args, seed) for seed in args.seeds]
    print(
        f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads "
        f"{torch.get_num_threads()}, {args.train_rows} train rows, {args.epochs:g} epoch(s), "
        f"seeds {args.seeds} (mean ± sd over seeds)"
    )
    print(f"{'':44} {'samples/s':>14} {'accuracy':>16} {'macro-F1':>16}")
    summary = {}
    for name in (TUTORIAL, FINESERVE):
        rows = [results[name] for results, _ in runs]
        summary[name] = {
            k: _mean_sd([r[k] for r in rows]) for k in ("samples_per_s", "accuracy", "macro_f1")
        }
        cells = [
            f"{m:.1f} ± {sd:.1f}" if k == "samples_per_s" else f"{m:.4f} ± {sd:.4f}"
            for k, (m, sd) in summary[name].items()
        ]
        print(f"{name:44} {cells[0]:>14} {cells[1]:>16} {cells[2]:>16}")
    speedups = [r[FINESERVE]["samples_per_s"] / r[TUTORIAL]["samples_per_s"] for r, _ in runs]
    tokens = runs[0][1]
    print(
        f"speed-up: {statistics.mean(speedups):.2f}x (per seed: "
        f"{', '.join(f'{x:.2f}' for x in speedups)}); mean tokens per row "
        f"{tokens['mean_tokens']:.1f}, tutorial rows padded to {tokens['padded']:.1f}"
    )
    if torch.cuda.is_available() and args.peak_tflops:
        from transformers import AutoModel

        params = sum(p.numel() for p in AutoModel.from_pretrained(args.base_model).parameters())
        rate = summary[FINESERVE]["samples_per_s"][0]
        print(f"MFU: {mfu(rate, tokens['mean_tokens'], params, args.peak_tflops):.1%}")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
