"""tokenize: the base checkpoint's fast tokenizer over every split, truncated, not padded.

Padding happens per batch at train/eval time (`DataCollatorWithPadding`), so a batch of tweets
costs tweet-length compute, not `max_length` compute. The tokenizer itself is saved next to the
data (with `model_max_length = max_length`) so that training, evaluation and serving all use
exactly the tokenizer the data was made with.
"""

import logging

from kfp.dsl import Dataset, Input, Output

from fineserve.components.decorator import component
from fineserve.core.artifacts import (
    LENGTH_COLUMN,
    TEXT_COLUMN,
    TokenStats,
    read_dataset_metadata,
    tokenizer_dir,
    write_token_stats,
)
from fineserve.core.errors import DataError

log = logging.getLogger(__name__)

MIN_LENGTH = 8


def load_fast_tokenizer(base_model: str, revision: str = "", max_length: int = 128):
    """The base checkpoint's fast (Rust) tokenizer, set to truncate at ``max_length``.

    A slow-only checkpoint, or a ``max_length`` the checkpoint cannot take, is refused.
    """
    from transformers import AutoTokenizer

    if max_length < MIN_LENGTH:
        raise DataError(f"max_length must be at least {MIN_LENGTH}, got {max_length}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model, revision=revision or None)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load the tokenizer of {base_model!r}: {err}") from err
    if not tokenizer.is_fast:
        raise DataError(f"{base_model!r} has no fast tokenizer (tokenizer.json); one is required")
    limit = tokenizer.model_max_length
    if limit and limit < 1_000_000 and max_length > limit:
        raise DataError(f"max_length {max_length} exceeds {base_model!r}'s limit of {limit}")
    tokenizer.model_max_length = max_length
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


def tokenize_dataset(dataset_dir: str, out_dir: str, tokenizer, *, base_model: str) -> TokenStats:
    """Tokenize the text of every split (truncated at the tokenizer's `model_max_length`).

    Keeps `label`, adds `length`, saves the data, the tokenizer and `token_stats.json` to
    ``out_dir``, and returns those statistics.
    """
    import datasets

    max_length = tokenizer.model_max_length
    raw = datasets.load_from_disk(dataset_dir)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[TEXT_COLUMN], truncation=True, max_length=max_length)
        encoded[LENGTH_COLUMN] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    tokenized = raw.map(encode, batched=True, batch_size=1000, remove_columns=[TEXT_COLUMN])
    lengths = {
        split: _length_stats(tokenized[split][LENGTH_COLUMN], max_length) for split in tokenized
    }
    tokenized.save_to_disk(out_dir)
    tokenizer.save_pretrained(tokenizer_dir(out_dir))
    dataset_info = read_dataset_metadata(dataset_dir)
    stats: TokenStats = {
        "base_model": base_model,
        "max_length": max_length,
        "token_lengths": lengths,
        "dataset": {key: dataset_info[key] for key in ("source", "fingerprint", "rows")},
    }
    write_token_stats(out_dir, stats)
    log.info("token lengths: %s", lengths)
    return stats


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
    from fineserve.components import tokenization as step

    tokenizer = step.load_fast_tokenizer(base_model, base_model_revision, max_length)
    tokenized.metadata.update(
        step.tokenize_dataset(dataset.path, tokenized.path, tokenizer, base_model=base_model)
    )
