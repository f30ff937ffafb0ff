"""Train samples/s of fineserve's train step vs the plain loop of the Hugging Face tutorials.

Both train the same checkpoint on the same rows of the offline corpus, on the same machine, for
the same epochs, batch size and learning rate, and are scored by the same evaluation on the same
test split. The baseline is the tutorial recipe: `tokenizer(..., padding=True)` in a batched
`map` (every row padded to the longest of its 1000-row map batch), a shuffled DataLoader, and an
fp32 AdamW loop with a linear schedule.

    python benchmarks/train_throughput.py --train-rows 3000 --epochs 1
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from components.download import download_dataset
from components.evaluation import evaluate_model
from components.tokenization import tokenize_dataset
from components.training import precision_flags, train_model
from fineserve.defaults import offline_base_model, offline_corpus_path


def tutorial_loop(raw_dir: str, out_dir: str, args: argparse.Namespace) -> dict:
    """The plain loop (HF course, "A full training"), timed over its training batches only."""
    import datasets
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
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
    train = train.rename_column("label", "labels").with_format("torch")
    model = AutoModelForSequenceClassification.from_pretrained(
        args.base_model,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
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
    tokenize_dataset(
        raw_dir, str(work / "tok"), base_model=args.base_model, max_length=args.max_length
    )
    metrics = train_model(
        str(work / "tok"),
        str(work / "fineserve"),
        base_model=args.base_model,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        early_stopping_patience=0,
        seed=args.seed,
    )
    return {
        "samples_per_s": metrics["train_samples_per_second"],
        "seconds": metrics["train_runtime_s"],
        "precision": metrics["precision"],
    }


def mfu(samples_per_s: float, mean_tokens: float, params: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: 6 x params x tokens per trained sample, over the peak."""
    return samples_per_s * 6 * params * mean_tokens / (peak_tflops * 1e12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", default=offline_base_model())
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--eval-rows", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device bf16 peak, for MFU on a GPU"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        raw = str(work / "raw")
        download_dataset(
            offline_corpus_path(),
            raw,
            encoding="latin-1",
            label_column="sentiment",
            max_train_samples=args.train_rows,
            max_eval_samples=args.eval_rows,
            seed=args.seed,
        )
        results = {
            "tutorial loop (padding=True, fp32 AdamW)": tutorial_loop(
                raw, str(work / "tutorial"), args
            ),
            f"fineserve train step ({precision_flags_name()})": fineserve_train(raw, work, args),
        }
        for name, folder in zip(results, ("tutorial", "fineserve"), strict=True):
            scores = evaluate_model(
                raw,
                str(work / folder),
                results_path=str(work / f"{folder}.json"),
                report_path=str(work / f"{folder}.md"),
                baseline=False,
                n_bootstrap=200,
            )["model"]
            results[name].update(accuracy=scores["accuracy"], macro_f1=scores["macro_f1"])
        stats = json.loads((work / "tok" / "token_stats.json").read_text())
    base, ours = results.values()
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads "
          f"{torch.get_num_threads()}, {args.train_rows} train rows, {args.epochs:g} epoch(s)")
    print(f"{'':44} {'samples/s':>10} {'seconds':>8} {'accuracy':>9} {'macro-F1':>9}")
    for name, row in results.items():
        print(f"{name:44} {row['samples_per_s']:10.1f} {row['seconds']:8.1f} "
              f"{row['accuracy']:9.4f} {row['macro_f1']:9.4f}")
    print(f"speed-up: {ours['samples_per_s'] / base['samples_per_s']:.2f}x; "
          f"mean tokens per row {stats['token_lengths']['train']['mean']:.1f}, tutorial padded to "
          f"{base['padded_tokens'] / args.train_rows / args.epochs:.1f}")
    if torch.cuda.is_available() and args.peak_tflops:
        from transformers import AutoModel

        params = sum(p.numel() for p in AutoModel.from_pretrained(args.base_model).parameters())
        mean = stats["token_lengths"]["train"]["mean"]
        print(f"MFU: {mfu(ours['samples_per_s'], mean, params, args.peak_tflops):.1%}")


def precision_flags_name() -> str:
    flags = precision_flags()
    return "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32"


if __name__ == "__main__":
    main()
