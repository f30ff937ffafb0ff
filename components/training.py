"""train: fine-tune `AutoModelForSequenceClassification` with the `transformers` Trainer.

What makes it fast and safe: dynamic padding and length-bucketed batches in random order
(little compute spent on padding, no length curriculum), bf16 (fp16 where bf16 is missing) on
CUDA, evaluation on validation each epoch with
early stopping and best-model selection, checkpoints that a restarted step resumes from, a seed.
The output is a servable HF directory: weights (safetensors), config with id2label/label2id,
the tokenizer the data was made with, and `fineserve.json` describing how it was trained.
"""

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from fineserve.components.decorator import component
from fineserve.core.artifacts import LABEL_COLUMN, LENGTH_COLUMN
from fineserve.core.errors import DataError

log = logging.getLogger(__name__)

#: A checkpoint is complete once the Trainer has written this file, last of all.
TRAINER_STATE_FILE = "trainer_state.json"


def precision_flags() -> dict[str, bool]:
    """bf16 on CUDA devices that support it, fp16 on other CUDA devices, fp32 on CPU."""
    import torch

    if not torch.cuda.is_available():
        return {"bf16": False, "fp16": False}
    bf16 = torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": not bf16}


def precision_name(flags: dict[str, bool]) -> str:
    """The name (bf16, fp16 or fp32) of the `precision_flags` in use."""
    return "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32"


class LengthBucketSampler:
    """Batches of texts of similar length and a representative class mix, in random order.

    Every epoch: shuffle, cut into mega-batches of ``mega`` batches, sort each mega-batch by
    each text's length quantile *within its own class*, cut into batches, shuffle the batches.
    Padding stays small (like `group_by_length`), yet every batch holds about the mega-batch's
    class mix: sorting by raw length would gather the short texts of one class together, and
    on the offline corpus cost 1-2 points of macro-F1 against random order
    (docs/benchmarks.md). Unlike `transformers`' LengthGroupedSampler, which walks each
    mega-batch from its longest batch to its shortest, the order of batches carries no length
    trend. Without ``labels`` it sorts by raw length. A partial batch goes last so that
    batches stay aligned.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int,
        labels: list[int] | None = None,
        mega: int = 8,
    ) -> None:
        self.lengths, self.batch_size, self.seed, self.mega = lengths, batch_size, seed, mega
        self.labels = labels if labels is not None else [0] * len(lengths)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer: each epoch (also a resumed one) has its own fixed order."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def _sorted(self, chunk: list[int]) -> list[int]:
        """``chunk`` ordered by length quantile within each class (ties: shorter first)."""
        by_class: dict[int, list[int]] = {}
        for index in chunk:
            by_class.setdefault(self.labels[index], []).append(index)
        quantile = {}
        for members in by_class.values():
            members.sort(key=self.lengths.__getitem__)
            for rank, index in enumerate(members):
                quantile[index] = (rank + 0.5) / len(members)
        return sorted(chunk, key=lambda i: (quantile[i], self.lengths[i]))

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size, step = self.batch_size, self.batch_size * self.mega
        batches = []
        for start in range(0, len(order), step):
            chunk = self._sorted(order[start : start + step])
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        full = [batch for batch in batches if len(batch) == size]
        partial = [batch for batch in batches if len(batch) < size]
        for k in torch.randperm(len(full), generator=generator).tolist():
            yield from full[k]
        for batch in partial:
            yield from batch


def _trainer_class(group_by_length: bool):
    """The Trainer, with length-bucketed batches when ``group_by_length``."""
    from transformers import Trainer

    if not group_by_length:
        return Trainer

    class BucketingTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            # the `length` column (written by tokenize) is gone from the column-pruned copy
            data = self.train_dataset
            return LengthBucketSampler(
                list(data[LENGTH_COLUMN]),
                self.args.train_batch_size,
                self.args.data_seed,
                labels=list(data[LABEL_COLUMN]) if LABEL_COLUMN in data.column_names else None,
            )

    return BucketingTrainer


def _compute_metrics(num_labels: int):
    from fineserve.components.classification_metrics import ClassificationReport

    report = ClassificationReport()

    def compute(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred
        result = report.compute(
            predictions=logits.argmax(-1), references=labels, num_labels=num_labels
        )
        return {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"]}

    return compute


def check_hyperparameters(
    epochs: float, max_steps: int, batch_size: int, eval_batch_size: int
) -> None:
    """Refuse settings that cannot train, naming the parameter."""
    if epochs <= 0 and max_steps <= 0:
        raise DataError(f"epochs must be positive, got {epochs}")
    if batch_size < 1 or eval_batch_size < 1:
        raise DataError(f"batch sizes must be at least 1, got {batch_size} and {eval_batch_size}")


def load_tokenized(tokenized_dir: str):
    """The tokenize step's DatasetDict, checked to have train and validation rows."""
    import datasets

    data = datasets.load_from_disk(tokenized_dir)
    for split in ("train", "validation"):
        if split not in data or len(data[split]) == 0:
            raise DataError(f"the tokenized dataset has no rows in split {split!r}")
    return data


def clean_up(model_dir: str, checkpoint_dir: str) -> None:
    """Drop what a finished run no longer needs from the model and checkpoint folders.

    The checkpoints go too: their optimizer state is 3x the model, and a finished run must not
    be resumed.
    """
    Path(model_dir, "training_args.bin").unlink(missing_ok=True)
    shutil.rmtree(checkpoint_dir)


def load_base_model(base_model: str, revision: str, label_names: list[str]):
    """The base checkpoint with a fresh classification head for ``label_names``."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(
            base_model,
            revision=revision or None,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
    except (OSError, ValueError) as err:
        raise DataError(
            f"cannot load base_model {base_model!r} as a sequence classifier: {err}"
        ) from err


def make_trainer(args, model, data, tokenizer, early_stopping_patience: int, group_by_length: bool):
    """The Trainer: dynamic padding, macro-F1 model selection, optional early stopping."""
    import torch
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback

    collator = DataCollatorWithPadding(
        tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None
    )
    callbacks = []
    if early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
    return _trainer_class(group_by_length)(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=_compute_metrics(data["train"].features[LABEL_COLUMN].num_classes),
        callbacks=callbacks,
    )


def last_complete_checkpoint(checkpoint_dir: str) -> str | None:
    """The newest checkpoint the Trainer finished writing, if any.

    The Trainer writes `trainer_state.json` last: a checkpoint without a readable one was cut
    short (the step was killed while saving) and is removed, not resumed from.
    """

    def step(path: Path) -> int:
        return int(path.name.rsplit("-", 1)[-1])

    checkpoints = [p for p in Path(checkpoint_dir).glob("checkpoint-*") if p.name[11:].isdigit()]
    newest = None
    for path in sorted(checkpoints, key=step):
        try:
            json.loads((path / TRAINER_STATE_FILE).read_text())
            newest = path
        except (OSError, ValueError):
            log.warning("removing %s: the run was stopped before it finished writing it", path)
            shutil.rmtree(path)
    return str(newest) if newest else None


def run_digest(run_key: dict[str, Any]) -> str:
    """A short name for a run's inputs and settings (its checkpoint folder on a shared volume)."""
    import hashlib

    encoded = json.dumps(run_key, sort_keys=True, default=str).encode()
    return "run-" + hashlib.sha256(encoded).hexdigest()[:16]


def resumable_checkpoint(checkpoint_dir: str, run_key: dict[str, Any]) -> str | None:
    """The last complete checkpoint of an interrupted run with the same inputs and settings.

    Checkpoints of a different run (other data, model or hyperparameters) are cleared rather
    than resumed: resuming them would silently train on the wrong inputs.
    """
    key_file = Path(checkpoint_dir, "fineserve_run.json")
    if os.path.isdir(checkpoint_dir):
        if key_file.exists() and json.loads(key_file.read_text()) == run_key:
            return last_complete_checkpoint(checkpoint_dir)
        if any(Path(checkpoint_dir).glob("checkpoint-*")):
            log.warning("ignoring checkpoints in %s: they belong to another run", checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    Path(checkpoint_dir).mkdir(parents=True)
    key_file.write_text(json.dumps(run_key))
    return None


@component
def train(
    tokenized: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    base_model: str,
    base_model_revision: str = "",
    epochs: float = 3.0,
    learning_rate: float = 5e-5,
    batch_size: int = 32,
    eval_batch_size: int = 128,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.06,
    max_grad_norm: float = 1.0,
    early_stopping_patience: int = 2,
    max_steps: int = -1,
    seed: int = 42,
    checkpoint_dir: str = "",
    group_by_length: bool = True,
):
    """Fine-tune a sequence-classification model on the tokenized data.

    Args:
        tokenized: Input DatasetDict and tokenizer from the tokenize step.
        base_model: Hub id or local directory of the base checkpoint.
        base_model_revision: Hub revision of the base checkpoint; empty for the default branch.
        epochs: Maximum number of epochs (early stopping may end sooner).
        learning_rate: Peak AdamW learning rate (linear decay after warm-up).
        batch_size: Training batch size per device.
        eval_batch_size: Evaluation batch size per device.
        weight_decay: AdamW weight decay.
        warmup_ratio: Share of the training steps used for linear warm-up.
        max_grad_norm: Clip the gradient norm to this before each step; 0 for no clipping.
        early_stopping_patience: Epochs without validation macro-F1 gain before stopping; 0 off.
        max_steps: Stop after this many optimizer steps; -1 for no limit.
        seed: Seed for initialisation, shuffling and dropout.
        checkpoint_dir: Where epoch checkpoints go, in a folder per run's inputs and settings
            (mount a volume here so a retried or restarted step resumes); empty for a folder
            next to the model output.
        group_by_length: Batch texts of similar length (in random batch order) to spend little
            compute on padding; false for plain shuffled batches.

    Returns:
        model: Output HF directory (safetensors, config with id2label, tokenizer, fineserve.json).
        metrics: Output training metrics, including train samples/s.
    """
    arguments = dict(locals())  # first statement: exactly this step's arguments
    hyperparameters = {  # recorded in fineserve.json; a resumed checkpoint must match them
        name: value
        for name, value in arguments.items()
        if name not in ("tokenized", "model", "metrics", "checkpoint_dir")
    }
    import os
    from pathlib import Path

    import torch
    from transformers import (
        AutoTokenizer,
        TrainingArguments,
        set_seed,
    )

    from fineserve.components import training as step
    from fineserve.core import artifacts

    step.check_hyperparameters(epochs, max_steps, batch_size, eval_batch_size)
    data = step.load_tokenized(tokenized.path)
    label_names = data["train"].features[artifacts.LABEL_COLUMN].names
    tokenizer = AutoTokenizer.from_pretrained(artifacts.tokenizer_dir(tokenized.path))
    token_stats = artifacts.read_token_stats(tokenized.path)

    set_seed(seed)
    classifier = step.load_base_model(base_model, base_model_revision, label_names)
    flags = step.precision_flags()
    run_key = {"data": token_stats, "rows": data.num_rows, "hyperparameters": hyperparameters}
    # a shared volume holds each run's checkpoints in its own folder, named by its inputs: a
    # retried step finds its own, and another run's never clears them
    checkpoint_dir = (
        str(Path(checkpoint_dir) / step.run_digest(run_key))
        if checkpoint_dir
        else f"{model.path.rstrip('/')}.checkpoints"
    )
    args = TrainingArguments(
        output_dir=checkpoint_dir,
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size,
        weight_decay=weight_decay,
        warmup_steps=warmup_ratio,
        max_grad_norm=max_grad_norm,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        seed=seed,
        data_seed=seed,
        logging_strategy="epoch",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        **flags,
    )
    trainer = step.make_trainer(
        args, classifier, data, tokenizer, early_stopping_patience, group_by_length
    )
    resume_from = step.resumable_checkpoint(checkpoint_dir, run_key)
    if resume_from:
        step.log.info("resuming from checkpoint %s", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)

    trainer.save_model(model.path)  # the best model (load_best_model_at_end), safetensors
    tokenizer.save_pretrained(model.path)
    best = trainer.state.best_metric
    train_metrics = {
        "train_samples_per_second": round(result.metrics["train_samples_per_second"], 3),
        "train_runtime_s": round(result.metrics["train_runtime"], 2),
        "train_loss": round(result.training_loss, 5),
        "epochs_completed": round(trainer.state.epoch or 0.0, 3),
        "best_validation_macro_f1": round(best, 5) if best is not None else None,
        "train_rows": len(data["train"]),
        "validation_rows": len(data["validation"]),
    }
    info: artifacts.ModelInfo = {
        "base_model": base_model,
        "base_model_revision": base_model_revision,
        "dataset": token_stats["dataset"],
        "max_length": token_stats["max_length"],
        "labels": label_names,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "precision": step.precision_name(flags),
        "resumed_from": os.path.basename(resume_from) if resume_from else None,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "hyperparameters": hyperparameters,
        "train_metrics": train_metrics,
    }
    artifacts.write_model_info(model.path, info)
    step.clean_up(model.path, checkpoint_dir)
    model.metadata.update(
        {"framework": "transformers", "device": info["device"], "precision": info["precision"]}
    )
    for name, value in train_metrics.items():
        if value is not None:
            model.metadata[name] = value
            metrics.log_metric(name, value)
