"""tokenize → train → evaluate on real text with a tiny random BERT; metrics against sklearn."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from sklearn import metrics as skm
from steps import download_dataset, evaluate_model, tokenize_dataset, train_model
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from fineserve.components.classification_metrics import ClassificationReport, bootstrap_ci
from fineserve.components.training import LengthBucketSampler
from fineserve.core.artifacts import MODEL_INFO_FILE, summary_metrics
from fineserve.core.errors import DataError

FAST = {"epochs": 2.0, "learning_rate": 1e-3, "batch_size": 16}


@pytest.fixture(scope="module")
def trained_dir(tokenized_dir, tiny_base_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "model"
    train_model(str(tokenized_dir), str(out), base_model=str(tiny_base_model), **FAST)
    return out


def test_tokenize_truncates_without_padding_and_reports_lengths(tokenized_dir, raw_dir):
    data = datasets.load_from_disk(str(tokenized_dir))
    lengths = [len(ids) for ids in data["train"]["input_ids"]]
    assert max(lengths) == 32 and min(lengths) < 32  # truncated, and not padded
    assert list(data["train"]["length"]) == lengths
    stats = json.loads((tokenized_dir / "token_stats.json").read_text())
    assert stats["token_lengths"]["train"]["max"] == 32
    assert 0 < stats["token_lengths"]["train"]["truncated_fraction"] < 1
    assert (
        stats["dataset"]["fingerprint"]
        == json.loads((raw_dir / "metadata.json").read_text())["fingerprint"]
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenized_dir / "tokenizer")
    assert tokenizer.is_fast and tokenizer.model_max_length == 32


def test_tokenize_refuses_a_length_over_the_model_limit(raw_dir, tiny_base_model, tmp_path):
    with pytest.raises(DataError, match="max_length 100 exceeds .* limit of 64"):
        tokenize_dataset(
            str(raw_dir), str(tmp_path), base_model=str(tiny_base_model), max_length=100
        )


def test_train_writes_a_servable_directory(trained_dir):
    config = AutoConfig.from_pretrained(trained_dir)
    assert config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    assert (trained_dir / "model.safetensors").exists()
    assert not list(trained_dir.glob("*.bin"))
    assert AutoTokenizer.from_pretrained(trained_dir).model_max_length == 32
    info = json.loads((trained_dir / MODEL_INFO_FILE).read_text())
    assert info["max_length"] == 32 and info["precision"] == "fp32"
    assert info["train_metrics"]["train_samples_per_second"] > 0
    assert info["train_metrics"]["epochs_completed"] == 2.0
    assert not Path(f"{trained_dir}.checkpoints").exists()  # removed once training succeeded


def test_training_is_reproducible_with_a_seed(
    tokenized_dir, tiny_base_model, trained_dir, tmp_path
):
    train_model(str(tokenized_dir), str(tmp_path / "m"), base_model=str(tiny_base_model), **FAST)
    first = AutoModelForSequenceClassification.from_pretrained(trained_dir)
    second = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert np.allclose(a.numpy(), b.numpy(), atol=1e-6), name


def test_train_learns_a_learnable_task(tiny_base_model, tmp_path):
    """Labels given by one word among random ones: a working training loop must find it."""
    import pandas as pd

    rng = np.random.default_rng(0)
    vocab = ["the", "a", "car", "phone", "game", "day", "film", "song", "team", "city", "road"]
    rows = []
    for i in range(400):
        label = ["negative", "positive"][i % 2]
        cue = {"negative": "awful", "positive": "wonderful"}[label]
        words = list(rng.choice(vocab, 6)) + [cue]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    download_dataset(str(tmp_path / "d.csv"), str(tmp_path / "raw"))
    tokenize_dataset(
        str(tmp_path / "raw"), str(tmp_path / "tok"), base_model=str(tiny_base_model), max_length=16
    )
    train_model(
        str(tmp_path / "tok"),
        str(tmp_path / "m"),
        base_model=str(tiny_base_model),
        epochs=4.0,
        learning_rate=3e-3,
        batch_size=16,
    )
    result = evaluate_model(
        str(tmp_path / "raw"),
        str(tmp_path / "m"),
        results_path=str(tmp_path / "r.json"),
        report_path=str(tmp_path / "r.md"),
        n_bootstrap=100,
        serving_precisions="int8,bfloat16",
    )
    assert result["model"]["accuracy"] > 0.9
    # the serving precisions are scored on the same test rows, against float32's answers
    for name in ("int8", "bfloat16"):
        scores = result["precisions"][name]
        assert scores["agreement"] >= 0.95 and scores["max_probability_diff"] < 0.5
        assert abs(scores["macro_f1"] - result["model"]["macro_f1"]) < 0.05
    assert "| int8 | " in (tmp_path / "r.md").read_text()
    assert {"int8_macro_f1", "int8_agreement"} <= summary_metrics(result).keys()
    # the probe texts the registered model will carry: test texts, both classes in turn
    probe = result["probe_texts"]
    assert len(probe) == min(256, result["test_rows"]) and len(set(probe)) == len(probe)
    assert {"awful" in text for text in probe[:2]} == {True, False}


def test_a_killed_train_step_resumes_and_ends_as_an_uninterrupted_run(
    tokenized_dir, tiny_base_model, tmp_path
):
    """SIGKILL the train step's process after its first checkpoint; run it again."""
    args = {"base_model": str(tiny_base_model), **FAST, "epochs": 3.0}
    reference = tmp_path / "reference"
    train_model(str(tokenized_dir), str(reference), checkpoint_dir=str(tmp_path / "r"), **args)
    checkpoints = tmp_path / "ckpt"
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from steps import train_model\n"
        f"train_model({str(tokenized_dir)!r}, {str(tmp_path / 'm')!r}, "
        f"checkpoint_dir={str(checkpoints)!r}, **{args!r})\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("run-*/checkpoint-*/trainer_state.json")):
        assert child.poll() is None, "the step ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL

    train_model(str(tokenized_dir), str(tmp_path / "m"), checkpoint_dir=str(checkpoints), **args)
    info = json.loads((tmp_path / "m" / MODEL_INFO_FILE).read_text())
    assert info["resumed_from"] in ("checkpoint-15", "checkpoint-30")
    assert info["train_metrics"]["epochs_completed"] == 3.0
    # CPU training is deterministic here: the resumed run ends with the uninterrupted weights
    first = AutoModelForSequenceClassification.from_pretrained(reference).state_dict()
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").state_dict()
    worst = max(float((first[k] - again[k]).abs().max()) for k in first)
    assert worst <= 1e-5, worst


def test_a_checkpoint_cut_short_is_removed_not_resumed(tmp_path):
    from fineserve.components.training import last_complete_checkpoint

    for step, state in ((15, "{}"), (30, "{"), (45, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-15")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-15"]


def test_checkpoints_of_another_run_are_neither_resumed_nor_cleared(
    tokenized_dir, tiny_base_model, tmp_path
):
    # a volume shared by runs: another run (other inputs) is checkpointing beside this one
    ckpt = tmp_path / "ckpt" / "run-0123456789abcdef" / "checkpoint-15"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    train_model(
        str(tokenized_dir),
        str(tmp_path / "m"),
        base_model=str(tiny_base_model),
        checkpoint_dir=str(tmp_path / "ckpt"),
        **FAST,
    )
    info = json.loads((tmp_path / "m" / MODEL_INFO_FILE).read_text())
    assert info["resumed_from"] is None
    assert (ckpt / "trainer_state.json").exists()  # the other run's checkpoint is still there


def test_classification_report_matches_sklearn():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    y_pred[:200] = y_true[:200]
    result = ClassificationReport().compute(predictions=y_pred, references=y_true, num_labels=4)
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert result["precision"] == pytest.approx(skm.precision_score(y_true, y_pred, average=None))
    assert result["recall"] == pytest.approx(skm.recall_score(y_true, y_pred, average=None))
    assert result["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred).tolist()


def test_bootstrap_interval_covers_the_point_estimate_and_narrows_with_data():
    rng = np.random.default_rng(1)

    def interval(n: int) -> tuple[float, float]:
        y_true = rng.integers(0, 3, n)
        y_pred = np.where(rng.random(n) < 0.7, y_true, rng.integers(0, 3, n))
        ci = bootstrap_ci(y_true, y_pred, 3, n_resamples=500)
        acc = float((y_true == y_pred).mean())
        assert ci["accuracy"][0] <= acc <= ci["accuracy"][1]
        return ci["macro_f1"]

    small, large = interval(200), interval(5000)
    assert (large[1] - large[0]) < (small[1] - small[0]) / 3


def test_evaluate_reports_model_and_baseline(trained_dir, raw_dir, tmp_path):
    result = evaluate_model(
        str(raw_dir),
        str(trained_dir),
        results_path=str(tmp_path / "r.json"),
        report_path=str(tmp_path / "r.md"),
        n_bootstrap=200,
    )
    report = (tmp_path / "r.md").read_text()
    assert "TF-IDF + logistic regression" in report and "| **neutral** |" in report
    # 30 test rows: said loudly, in the results and the report
    warning, *missed = result["warnings"]
    assert "the test split has only 30 rows" in warning and "max_eval_samples" in warning
    assert f"> **Warning:** {warning}" in report
    # the tiny model misses classes: each one is named, next to the baseline's F1
    model_f1 = result["model"]["f1"]
    assert len(missed) == sum(1 for f1 in model_f1 if f1 == 0)
    assert all(
        "scored F1 0.00 (TF-IDF + LR: " in w and f"> **Warning:** {w}" in report for w in missed
    )
    assert sum(map(sum, result["model"]["confusion_matrix"])) == result["test_rows"] == 30
    scalars = summary_metrics(result)
    assert scalars["macro_f1_ci_low"] <= scalars["macro_f1"] <= scalars["macro_f1_ci_high"]
    assert {"baseline_accuracy", "baseline_macro_f1", "f1_neutral"} <= scalars.keys()
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(result))
    # auto scores int8 everywhere (bfloat16 only where this machine runs it natively)
    assert "int8" in result["precisions"] and "## Serving precisions" in report


def test_evaluate_scores_a_model_trained_elsewhere(tiny_classifier, raw_dir, tmp_path):
    # no fineserve.json (e.g. the tutorial loop's model in benchmarks/train_throughput.py)
    result = evaluate_model(
        str(raw_dir), str(tiny_classifier), results_path=str(tmp_path / "r.json"),
        report_path=str(tmp_path / "r.md"), n_bootstrap=10, serving_precisions="none",
    )  # fmt: skip
    assert result["test_rows"] == 30 and "recipe" not in result


def test_evaluate_refuses_an_unknown_precision(trained_dir, raw_dir, tmp_path):
    with pytest.raises(DataError, match=r"serving_precisions: unknown \['int4'\]"):
        evaluate_model(
            str(raw_dir), str(trained_dir), results_path=str(tmp_path / "r.json"),
            report_path=str(tmp_path / "r.md"), serving_precisions="int8,int4",
        )  # fmt: skip


def test_evaluate_refuses_a_model_with_other_labels(trained_dir, tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"text": [f"t {i}" for i in range(40)], "label": ["a", "b"] * 20})
    frame.to_csv(tmp_path / "d.csv", index=False)
    download_dataset(str(tmp_path / "d.csv"), str(tmp_path / "data"))
    with pytest.raises(DataError, match=r"model's labels .* differ from the data's \['a', 'b'\]"):
        evaluate_model(
            str(tmp_path / "data"),
            str(trained_dir),
            results_path=str(tmp_path / "r.json"),
            report_path=str(tmp_path / "r.md"),
        )


def test_length_buckets_cover_every_row_once_with_little_padding_and_no_length_trend():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, 3200).tolist()
    sampler = LengthBucketSampler(lengths, batch_size=32, seed=1)
    sampler.set_epoch(0)
    order = list(sampler)
    assert sorted(order) == list(range(3200))
    assert list(sampler) == order  # the same epoch is the same order (what resuming relies on)
    sampler.set_epoch(1)
    assert list(sampler) != order
    batches = [order[i : i + 32] for i in range(0, 3200, 32)]
    padded = sum(32 * max(lengths[i] for i in batch) for batch in batches)
    random_padded = sum(
        32 * max(lengths[i] for i in batch) for batch in np.array_split(rng.permutation(3200), 100)
    )
    assert padded < 0.7 * random_padded
    means = [np.mean([lengths[i] for i in batch]) for batch in batches]
    trend = np.corrcoef(np.arange(len(means)), means)[0, 1]
    assert abs(trend) < 0.3


def test_length_buckets_keep_each_batchs_class_mix_when_length_predicts_the_class():
    # class 1's texts are all longer than class 0's: sorting by raw length would give batches
    # of one class; sorting by length quantile within each class mixes them in every batch
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 3200).tolist()
    lengths = [int(rng.integers(5, 40)) + 60 * label for label in labels]
    order = list(LengthBucketSampler(lengths, batch_size=32, seed=1, labels=labels))
    assert sorted(order) == list(range(3200))
    batches = [order[i : i + 32] for i in range(0, 3200, 32)]
    shares = [np.mean(labels_of) for labels_of in _batch_labels(order, labels)]
    assert min(shares) > 0.25 and max(shares) < 0.75
    within_class_spread = [
        max(lengths[i] for i in batch if labels[i] == c)
        - min(lengths[i] for i in batch if labels[i] == c)
        for batch in batches
        for c in (0, 1)
    ]
    assert np.mean(within_class_spread) < 10  # texts of a class still come in similar lengths
    unlabelled = list(LengthBucketSampler(lengths, batch_size=32, seed=1))
    raw_shares = [np.mean(labels_of) for labels_of in _batch_labels(unlabelled, labels)]
    assert sum(share in (0.0, 1.0) for share in raw_shares) > 80  # raw-length sort separates them


def _batch_labels(order: list[int], labels: list[int], size: int = 32) -> list[list[int]]:
    return [[labels[i] for i in order[k : k + size]] for k in range(0, len(order), size)]


def test_a_test_split_big_enough_has_no_warning():
    from fineserve.components.evaluation import small_test_split_warnings

    assert small_test_split_warnings(["a", "b"], [60, 40]) == []
    (warning,) = small_test_split_warnings(["a", "b"], [95, 5])
    assert "(5 of class 'b')" in warning


def test_a_base_model_that_is_not_a_model_fails_naming_it(tokenized_dir, tmp_path):
    not_a_model = tmp_path / "tokenizer-only"
    AutoTokenizer.from_pretrained(tokenized_dir / "tokenizer").save_pretrained(not_a_model)
    with pytest.raises(DataError, match=r"cannot load base_model '.*tokenizer-only' as a seq"):
        train_model(str(tokenized_dir), str(tmp_path / "m"), base_model=str(not_a_model), **FAST)


# ------------------------------------------------------------------------------ the recipe


def test_the_recipe_budgets_updates_not_epochs():
    from fineserve.components.training import MAX_RECIPE_EPOCHS, plan_epochs

    # 200 rows: 7 updates an epoch; 600 updates would need 86 epochs: the cap holds
    assert plan_epochs(200, 32, 0, 600)[0] == MAX_RECIPE_EPOCHS
    epochs, why = plan_epochs(2000, 32, 0, 600)  # 63 updates an epoch
    assert epochs == 9.6 and "605 updates of 32 rows" in why
    assert plan_epochs(100_000, 32, 0, 600)[0] == 1.0  # large data: at least one epoch
    assert plan_epochs(200, 32, 2.0, 600) == (2.0, "2 epochs, as given")  # a user's epochs


def test_the_recipe_validates_each_epoch_and_at_least_every_200_updates():
    from fineserve.components.training import plan_validation, recipe_patience

    assert plan_validation(240, 16, 0) == 15  # small data: each epoch's end
    assert plan_validation(100_000, 32, 0) == 200  # a 3,125-update epoch: every 200 updates
    assert plan_validation(100_000, 32, 50) == 50  # given: kept
    # patience: at least a fifth of the validations the run will make
    assert recipe_patience(2, updates=600, validate_every=15) == 8  # 40 validations
    assert recipe_patience(2, updates=60, validate_every=15) == 2  # 4 validations
    assert recipe_patience(0, updates=600, validate_every=15) == 0  # off stays off


def test_validate_every_validates_and_checkpoints_within_an_epoch(
    tokenized_dir, tiny_base_model, tmp_path
):
    # 240 rows in batches of 16: one epoch is 15 updates; validations at 4, 8, 12 and 15
    metadata = train_model(
        str(tokenized_dir), str(tmp_path / "m"), base_model=str(tiny_base_model),
        epochs=1.0, learning_rate=1e-3, batch_size=16, validate_every=4,
        early_stopping_patience=0,
    )  # fmt: skip
    assert metadata["validations"] == 4
    info = json.loads((tmp_path / "m" / MODEL_INFO_FILE).read_text())
    assert info["recipe"]["validate_every"] == 4
    best_step = int(info["best_checkpoint"].rsplit("-", 1)[1])
    assert best_step in (4, 8, 12, 15)
    with pytest.raises(DataError, match="validate_every must be 0"):
        train_model(
            str(tokenized_dir), str(tmp_path / "bad"), base_model=str(tiny_base_model),
            validate_every=-1,
        )  # fmt: skip


def test_balanced_class_weights_give_each_class_the_same_total_weight():
    from fineserve.components.training import class_weights

    labels = [0] * 90 + [1] * 10
    weights = class_weights(labels, 3, "balanced")
    assert weights == pytest.approx([100 / (2 * 90), 100 / (2 * 10), 0.0])
    assert weights[0] * 90 == pytest.approx(weights[1] * 10)
    assert class_weights(labels, 3, "none") is None
    with pytest.raises(DataError, match="class_weighting must be one of"):
        class_weights(labels, 3, "inverse")


def test_the_recipe_learning_rate_follows_the_encoder_width():
    from fineserve.components.training import recipe_learning_rate

    assert recipe_learning_rate(0.0, 384) == 1e-4  # MiniLM
    assert recipe_learning_rate(0.0, 768) == 5e-5  # BERT-base
    assert recipe_learning_rate(3e-5, 384) == 3e-5  # given: kept


def test_without_epochs_the_recipe_chooses_them_and_says_so(
    raw_dir, tokenized_dir, tiny_base_model, tmp_path
):
    # 240 rows in batches of 16: 15 updates an epoch; at least 30 updates: 2 epochs
    train_model(
        str(tokenized_dir), str(tmp_path / "m"), base_model=str(tiny_base_model),
        epochs=0.0, min_updates=30, batch_size=16, learning_rate=1e-3,
    )  # fmt: skip
    info = json.loads((tmp_path / "m" / MODEL_INFO_FILE).read_text())
    recipe = info["recipe"]
    assert recipe["epochs"] == 2.0 and recipe["recipe_chose_epochs"] is True
    assert "30 updates" in recipe["why"]
    assert recipe["class_weighting"] == "balanced" and recipe["learning_rate"] == 1e-3
    assert info["train_metrics"]["epochs_completed"] == 2.0
    assert recipe["validate_every"] == 15 and info["train_metrics"]["validations"] == 2
    assert recipe["validate_every"] == 15 and info["train_metrics"]["validations"] == 2
    # ... and the evaluation report (Kubeflow UI, MLflow) says what it chose
    results = evaluate_model(
        str(raw_dir), str(tmp_path / "m"), results_path=str(tmp_path / "r.json"),
        report_path=str(tmp_path / "report.md"), n_bootstrap=10,
    )  # fmt: skip
    assert results["recipe"]["epochs"] == 2.0
    report = (tmp_path / "report.md").read_text()
    assert (
        "Training recipe: 2 epochs (30 updates of 16 rows; the recipe trains at least 30" in report
    )
    assert "validation every 15 updates" in report


def test_a_class_the_model_never_gets_right_is_warned_about_next_to_the_baseline():
    from fineserve.components.evaluation import missed_class_warnings

    model = {"f1": [0.8, 0.0, 0.5], "support": [10, 5, 7]}
    (warning,) = missed_class_warnings(["a", "b", "c"], model, {"f1": [0.7, 0.45, 0.4]})
    assert "class 'b' scored F1 0.00 (TF-IDF + LR: 0.45)" in warning
    assert "min_updates" in warning
    # a class absent from the test split is not "missed"
    absent = {"f1": [0.8, 0.0, 0.5], "support": [10, 0, 7]}
    assert missed_class_warnings(["a", "b", "c"], absent, None) == []
