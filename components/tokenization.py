"""tokenize: the base checkpoint's fast tokenizer over every split, truncated, not padded.

Padding happens per batch at train/eval time (`DataCollatorWithPadding`), so a batch of tweets
costs tweet-length compute, not `max_length` compute. The tokenizer itself is saved next to the
data (with `model_max_length = max_length`) so that training, evaluation and serving all use
exactly the tokenizer the data was made with.
"""

import json
import logging
from pathlib import Path
from typing import Any

from kfp.dsl import Dataset, Input, Output

from components.download import read_metadata
from components.errors import DataError
from components.kfp_wrapper import component

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
STATS_FILE = "token_stats.json"


def load_fast_tokenizer(base_model: str, revision: str = ""):
    """The base checkpoint's fast (Rust) tokenizer; a slow-only checkpoint is refused."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model, revision=revision or None)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load the tokenizer of {base_model!r}: {err}") from err
    if not tokenizer.is_fast:
        raise DataError(f"{base_model!r} has no fast tokenizer (tokenizer.json); one is required")
    return tokenizer


def _length_stats(lengths: list[int], max_length: int) -> dict[str, float]:
    import numpy as np

    values = np.asarray(lengths)
    return {
        "mean": round(float(values.mean()), 2),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": int(values.max()),
        "truncated_fraction": round(float((values >= max_length).mean()), 4),
    }


def tokenize_dataset(
    dataset_dir: str,
    out_dir: str,
    *,
    base_model: str,
    max_length: int = 128,
    revision: str = "",
) -> dict[str, Any]:
    """Tokenize the `text` column of every split; keep `label`; save data and tokenizer.

    Returns token-length statistics per split (also written to ``out_dir/token_stats.json``).
    """
    import datasets

    if max_length < 8:
        raise DataError(f"max_length must be at least 8, got {max_length}")
    tokenizer = load_fast_tokenizer(base_model, revision)
    limit = tokenizer.model_max_length
    if limit and limit < 1_000_000 and max_length > limit:
        raise DataError(f"max_length {max_length} exceeds {base_model!r}'s limit of {limit}")
    tokenizer.model_max_length = max_length

    raw = datasets.load_from_disk(dataset_dir)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    tokenized = raw.map(encode, batched=True, batch_size=1000, remove_columns=["text"])
    stats = {split: _length_stats(tokenized[split]["length"], max_length) for split in tokenized}
    tokenized.save_to_disk(out_dir)
    tokenizer.save_pretrained(Path(out_dir, TOKENIZER_DIR))
    dataset_info = read_metadata(dataset_dir)
    result = {
        "base_model": base_model,
        "max_length": max_length,
        "token_lengths": stats,
        "dataset": {key: dataset_info[key] for key in ("source", "fingerprint", "rows")},
    }
    Path(out_dir, STATS_FILE).write_text(json.dumps(result, indent=2))
    log.info("token lengths: %s", stats)
    return result


@component
def tokenize(
    dataset: Input[Dataset],
    tokenized: Output[Dataset],
    base_model: str,
    max_length: int = 128,
    base_model_revision: str = "",
):
    """Tokenize every split with the base checkpoint's fast tokenizer (truncation, no padding).

    Args:
        dataset: Input DatasetDict from the download step (`text`, `label`).
        base_model: Hub id or local directory of the base checkpoint.
        max_length: Truncation length in tokens.
        base_model_revision: Hub revision of the base checkpoint; empty for the default branch.

    Returns:
        tokenized: Output DatasetDict (`input_ids`, `attention_mask`, `label`, `length`) and the
            tokenizer in its `tokenizer/` folder; token-length stats in its metadata.
    """
    from components.tokenization import tokenize_dataset

    tokenized.metadata.update(
        tokenize_dataset(
            dataset.path,
            tokenized.path,
            base_model=base_model,
            max_length=max_length,
            revision=base_model_revision,
        )
    )
