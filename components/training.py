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
import math
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
    """The Trainer (class-weighted loss when given weights), length-bucketed if asked."""
    from transformers import Trainer

    class WeightedLossTrainer(Trainer):
        def __init__(self, *args, class_weights: list[float] | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.class_weights = class_weights

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.class_weights is None:
                return super().compute_loss(
                    model, inputs, return_outputs, num_items_in_batch=num_items_in_batch
                )
            import torch

            labels = inputs.pop("labels")
            outputs = model(**inputs)
            weight = torch.tensor(
                self.class_weights, dtype=outputs.logits.dtype, device=outputs.logits.device
            )
            loss = torch.nn.functional.cross_entropy(outputs.logits, labels, weight=weight)
            return (loss, outputs) if return_outputs else loss

    if not group_by_length:
        return WeightedLossTrainer

    class BucketingTrainer(WeightedLossTrainer):
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


#: The recipe's most epochs (small data); early stopping usually ends sooner.
MAX_RECIPE_EPOCHS = 40
CLASS_WEIGHTINGS = ("balanced", "none")


def plan_epochs(
    train_rows: int, batch_size: int, epochs: float, min_updates: int
) -> tuple[float, str]:
    """Epochs to train and why: ``epochs`` when given (> 0), else the recipe's choice.

    The recipe budgets by optimizer updates, not epochs: at least ``min_updates`` (a few
    hundred rows give a few updates per epoch, far too few to converge), at least one epoch,
    and at most `MAX_RECIPE_EPOCHS`.
    """
    if epochs > 0:
        return epochs, f"{epochs:g} epochs, as given"
    per_epoch = math.ceil(train_rows / batch_size)
    chosen = min(MAX_RECIPE_EPOCHS, max(1.0, math.ceil(10 * min_updates / per_epoch) / 10))
    return chosen, (
        f"{chosen:g} epochs ({math.ceil(chosen * per_epoch)} updates of {batch_size} rows; "
        f"the recipe trains at least {min_updates} updates)"
    )


#: On long epochs the recipe validates (and checkpoints) at least every this many updates.
RECIPE_VALIDATE_EVERY = 200


def plan_validation(train_rows: int, batch_size: int, validate_every: int) -> int:
    """Updates between validations: ``validate_every`` when given (> 0), else the recipe's.

    The recipe validates at each epoch's end, and every `RECIPE_VALIDATE_EVERY` updates when
    an epoch is longer, so early stopping and the best checkpoint see large data too.
    """
    if validate_every > 0:
        return validate_every
    return min(math.ceil(train_rows / batch_size), RECIPE_VALIDATE_EVERY)


def recipe_patience(patience: int, updates: int, validate_every: int) -> int:
    """Early-stopping patience when the recipe chose the epochs.

    At least a fifth of the validations the run will make: many short epochs on small data
    would otherwise stop on noise.
    """
    if patience <= 0:
        return patience
    return max(patience, math.ceil(math.ceil(updates / validate_every) / 5))


def recipe_learning_rate(learning_rate: float, hidden_size: int) -> float:
    """``learning_rate`` when given (> 0); else 1e-4 for small encoders, 5e-5 for base ones.

    Small sentence encoders (MiniLM-L6: 384 wide) want a larger step than BERT-base (768).
    """
    if learning_rate > 0:
        return learning_rate
    return 1e-4 if hidden_size < 768 else 5e-5


def class_weights(labels: list[int], num_classes: int, weighting: str) -> list[float] | None:
    """Loss weights per class: "balanced" gives each class the same total weight."""
    if weighting not in CLASS_WEIGHTINGS:
        raise DataError(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {weighting!r}")
    if weighting == "none":
        return None
    counts = [0] * num_classes
    for label in labels:
        counts[label] += 1
    present = sum(1 for c in counts if c)
    return [len(labels) / (present * c) if c else 0.0 for c in counts]


def check_hyperparameters(
    epochs: float,
    max_steps: int,
    batch_size: int,
    eval_batch_size: int,
    min_updates: int = 0,
    class_weighting: str = "none",
    validate_every: int = 0,
) -> None:
    """Refuse settings that cannot train, naming the parameter."""
    if validate_every < 0:
        raise DataError(f"validate_every must be 0 (the recipe's) or more, got {validate_every}")
    if epochs < 0:
        raise DataError(f"epochs must be positive (or 0 for the recipe's), got {epochs}")
    if min_updates < 0:
        raise DataError(f"min_updates must be 0 or more, got {min_updates}")
    if class_weighting not in CLASS_WEIGHTINGS:
        raise DataError(
            f"class_weighting must be one of {', '.join(CLASS_WEIGHTINGS)}, got {class_weighting!r}"
        )
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


def head_for(base_model: str, revision: str, pooling: str) -> str:
    """The head the recipe puts on ``base_model``: "mean" pooling or the "model"'s own.

    `auto` picks mean pooling for sentence-embedding checkpoints (trained for it), the model's
    own head ([CLS] and pooler) otherwise.
    """
    from fineserve.serving.pooling import POOLINGS, mean_pooled_checkpoint

    if pooling not in POOLINGS:
        raise DataError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if pooling != "auto":
        return pooling
    return "mean" if mean_pooled_checkpoint(base_model, revision) else "model"


def load_base_model(base_model: str, revision: str, label_names: list[str], head: str = "model"):
    """The base checkpoint with a fresh classification ``head`` for ``label_names``."""
    from transformers import AutoModelForSequenceClassification

    from fineserve.serving.pooling import MeanPoolingClassifier

    try:
        if head == "mean":
            return MeanPoolingClassifier.from_encoder(base_model, label_names, revision or None)
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


def make_trainer(
    args,
    model,
    data,
    tokenizer,
    early_stopping_patience: int,
    group_by_length: bool,
    weights: list[float] | None = None,
):
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
        class_weights=weights,
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
    epochs: float = 0.0,
    learning_rate: float = 0.0,
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
    min_updates: int = 600,
    class_weighting: str = "balanced",
    pooling: str = "auto",
    validate_every: int = 0,
):
    """Fine-tune a sequence-classification model on the tokenized data.

    Args:
        tokenized: Input DatasetDict and tokenizer from the tokenize step.
        base_model: Hub id or local directory of the base checkpoint.
        base_model_revision: Hub revision of the base checkpoint; empty for the default branch.
        epochs: Epochs to train (early stopping may end sooner); 0 for the recipe's choice:
            enough epochs for min_updates optimizer updates (1 to 40).
        learning_rate: Peak AdamW learning rate (linear decay after warm-up); 0 for the
            recipe's: 1e-4 for encoders narrower than 768 (MiniLM), else 5e-5.
        batch_size: Training batch size per device.
        eval_batch_size: Evaluation batch size per device.
        weight_decay: AdamW weight decay.
        warmup_ratio: Share of the training steps used for linear warm-up.
        max_grad_norm: Clip the gradient norm to this before each step; 0 for no clipping.
        early_stopping_patience: Validations without validation macro-F1 gain before
            stopping; 0 off. With the recipe's epochs, at least a fifth of the validations.
        max_steps: Stop after this many optimizer steps; -1 for no limit.
        seed: Seed for initialisation, shuffling and dropout.
        checkpoint_dir: Where epoch checkpoints go, in a folder per run's inputs and settings
            (mount a volume here so a retried or restarted step resumes); empty for a folder
            next to the model output.
        group_by_length: Batch texts of similar length (in random batch order) to spend little
            compute on padding; false for plain shuffled batches.
        min_updates: Fewest optimizer updates the recipe trains when epochs is 0 (small data
            gets more epochs).
        class_weighting: balanced (each class weighs the same in the loss, whatever its
            count) or none.
        pooling: The classification head: auto (mean pooling for sentence-embedding
            checkpoints such as all-MiniLM, the model's own head otherwise), mean or model.
        validate_every: Optimizer updates between validations (each one a checkpoint); 0 for
            the recipe's: every epoch, and every 200 updates when an epoch is longer.

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
    import math
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

    step.check_hyperparameters(
        epochs, max_steps, batch_size, eval_batch_size, min_updates, class_weighting,
        validate_every,
    )  # fmt: skip
    data = step.load_tokenized(tokenized.path)
    label_names = data["train"].features[artifacts.LABEL_COLUMN].names
    tokenizer = AutoTokenizer.from_pretrained(artifacts.tokenizer_dir(tokenized.path))
    token_stats = artifacts.read_token_stats(tokenized.path)

    set_seed(seed)
    head = step.head_for(base_model, base_model_revision, pooling)
    classifier = step.load_base_model(base_model, base_model_revision, label_names, head)
    flags = step.precision_flags()
    given_epochs = epochs
    epochs, epochs_why = step.plan_epochs(len(data["train"]), batch_size, epochs, min_updates)
    learning_rate = step.recipe_learning_rate(learning_rate, classifier.config.hidden_size)
    validate_every = step.plan_validation(len(data["train"]), batch_size, validate_every)
    updates = math.ceil(epochs * math.ceil(len(data["train"]) / batch_size))
    if max_steps > 0:
        updates = min(updates, max_steps)
    if given_epochs <= 0:
        early_stopping_patience = step.recipe_patience(
            early_stopping_patience, updates, validate_every
        )
    weights = step.class_weights(
        list(data["train"][artifacts.LABEL_COLUMN]), len(label_names), class_weighting
    )
    recipe = {
        "epochs": epochs,
        "why": epochs_why,
        "recipe_chose_epochs": given_epochs <= 0,
        "learning_rate": learning_rate,
        "class_weighting": class_weighting,
        "pooling": head,
        "validate_every": validate_every,
        "early_stopping_patience": early_stopping_patience,
        "min_updates": min_updates,
    }
    step.log.info("recipe: %s", recipe)
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
        eval_strategy="steps",
        eval_steps=validate_every,
        save_strategy="steps",
        save_steps=validate_every,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        seed=seed,
        data_seed=seed,
        logging_strategy="steps",
        logging_steps=validate_every,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        **flags,
    )
    trainer = step.make_trainer(
        args, classifier, data, tokenizer, early_stopping_patience, group_by_length, weights
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
        "validations": sum("eval_macro_f1" in entry for entry in trainer.state.log_history),
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
        "recipe": recipe,
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
