"""download: read a Hub dataset or CSV/JSONL/Parquet files into train/validation/test splits.

The output is a `datasets.DatasetDict` saved with `save_to_disk`, with exactly two columns:
`text` (string) and `label` (`ClassLabel`, so id2label travels with the data), plus
`metadata.json` (rows and class counts per split, label names, a content fingerprint).
"""

import hashlib
import io
import json
import logging
import math
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from kfp.dsl import Dataset, Output

from fineserve.components.decorator import component
from fineserve.core.artifacts import (
    LABEL_COLUMN,
    SPLITS,
    TEXT_COLUMN,
    DatasetMetadata,
    RareClasses,
    write_dataset_metadata,
)
from fineserve.core.errors import DataError, preview, shown

log = logging.getLogger(__name__)

_READERS = {"csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl", "parquet": "parquet"}
_URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://", "abfs://", "hf://", "file://")


def _file_format(path: str, file_format: str) -> str:
    if file_format != "auto":
        if file_format not in _READERS:
            raise DataError(f"unknown file_format {file_format!r}; supported: {sorted(_READERS)}")
        return _READERS[file_format]
    name = path.lower().split("?")[0]
    for compression in (".gz", ".bz2", ".zst", ".xz"):
        name = name.removesuffix(compression)
    ext = os.path.splitext(name)[1].lstrip(".")
    if ext not in _READERS:
        raise DataError(
            f"unknown file format {('.' + ext) if ext else '(no extension)'} for {path!r}; "
            f"supported: .csv, .tsv, .jsonl, .json (JSON Lines), .parquet; or set file_format"
        )
    return _READERS[ext]


_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".xz": "xz"}


def fetch_url(url: str, timeout: float) -> io.BytesIO:
    """The body of an http(s) URL; no answer for ``timeout`` seconds on any read is an error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return io.BytesIO(response.read())
    except urllib.error.HTTPError as err:
        raise DataError(f"cannot read {url!r}: HTTP {err.code} {err.reason}") from err
    except (TimeoutError, urllib.error.URLError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(err, TimeoutError) or isinstance(reason, TimeoutError):
            raise DataError(
                f"cannot read {url!r}: no answer within {timeout:g} s (network_timeout); "
                "check the URL, or raise network_timeout for a slow server"
            ) from err
        raise DataError(f"cannot read {url!r}: {reason}") from err


def read_table(
    path: str,
    *,
    file_format: str = "auto",
    encoding: str = "utf-8",
    text_column: str | None = None,
    timeout: float = 60.0,
) -> pd.DataFrame:
    """Read one CSV/TSV/JSONL/Parquet file (local path or URL) into a DataFrame.

    In CSV/TSV only an empty field is missing ("NA", "null" or "None" are text), and
    ``text_column`` is read as text even when every value looks like a number. An http(s)
    URL is fetched with ``timeout``.
    """
    kind = _file_format(path, file_format)
    source: Any = path
    compression: Any = "infer"
    if path.startswith(("http://", "https://")):
        source = fetch_url(path, timeout)
        suffix = os.path.splitext(path.lower().split("?")[0])[1]
        compression = _COMPRESSIONS.get(suffix)
    try:
        if kind in ("csv", "tsv"):
            return pd.read_csv(
                source,
                sep="\t" if kind == "tsv" else ",",
                encoding=encoding,
                keep_default_na=False,
                na_values=[""],
                dtype={text_column: str} if text_column else None,
                compression=compression,
            )
        if kind == "jsonl":
            return _read_json_lines(path, source, encoding, compression)
        return pd.read_parquet(source)
    except DataError:
        raise
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path!r} is not valid {encoding} (byte {err.object[err.start]:#04x} at offset "
            f"{err.start}); set encoding to the file's encoding, e.g. encoding=latin-1"
        ) from err
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        raise DataError(f"cannot read {path!r}: {err.strerror or err}") from err
    except (ValueError, OSError, ImportError) as err:
        raise DataError(f"cannot read {path!r} as {kind}: {err}") from err


def _read_json_lines(path: str, source: Any, encoding: str, compression: Any) -> pd.DataFrame:
    """A JSON Lines file as a DataFrame; a line that is not a JSON object is named."""
    try:
        return pd.read_json(
            source, lines=True, encoding=encoding, dtype=False, compression=compression
        )
    except (ValueError, AttributeError) as err:  # AttributeError: a line holds a list, a number
        if isinstance(err, UnicodeDecodeError):
            raise
        problem = _json_lines_problem(path, source, encoding, compression)
        if problem is None and isinstance(err, ValueError):
            raise
        problem = problem or "every line must hold one JSON object"
        raise DataError(f"cannot read {path!r} as JSON Lines: {problem}") from err


def _json_lines_problem(path: str, source: Any, encoding: str, compression: Any) -> str | None:
    """The first line of a JSON Lines file that is not one JSON object, in words (or None)."""
    from fsspec.compression import compr

    if compression == "infer":
        name = path.lower().split("?")[0]
        compression = next((c for s, c in _COMPRESSIONS.items() if name.endswith(s)), None)
    if compression not in compr:  # a compression fsspec cannot open here (zstd): no line
        return None
    try:
        if isinstance(source, io.BytesIO):
            source.seek(0)
            raw = compr[compression](source, mode="rb") if compression else source
            handle = io.TextIOWrapper(raw, encoding=encoding)
        else:
            import fsspec

            handle = fsspec.open(path, "rt", compression=compression, encoding=encoding).open()
        with handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                start = shown(line.strip())
                try:
                    value = json.loads(line)
                except ValueError as err:
                    why = getattr(err, "msg", str(err))
                    column = getattr(err, "colno", None)
                    at = f", column {column}" if column else ""
                    return f"line {number} is not JSON ({why}{at}): {start}"
                if not isinstance(value, dict):
                    return (
                        f"line {number} holds a JSON {type(value).__name__}, not an object of "
                        f'"column": value pairs: {start}'
                    )
    except (OSError, ValueError):
        return None
    return None


def _is_file_source(source: str) -> bool:
    if source.startswith(_URL_SCHEMES) or os.path.exists(source):
        return True
    looks_like_path = source.startswith(("/", "./", "../", "~")) or os.path.splitext(source)[1]
    return bool(looks_like_path)


def _read_files(source: str, split_names: dict[str, str], **read: Any):
    """A file is the train split; a directory holds one file per split, named after the split.

    ``read`` are the keyword arguments of `read_table`.
    """
    if source.startswith(_URL_SCHEMES) or os.path.isfile(source):
        return {"train": read_table(source, **read)}
    if not os.path.isdir(source):
        raise DataError(f"cannot read {source!r}: no such file or directory")
    files = sorted(p for p in Path(source).iterdir() if p.is_file() and not p.name.startswith("."))
    frames: dict[str, pd.DataFrame] = {}
    for split, wanted in split_names.items():
        matches = [p for p in files if p.name.split(".")[0] == wanted]
        if len(matches) > 1:
            raise DataError(f"{source!r} holds several files for split {wanted!r}: {matches}")
        if matches:
            frames[split] = read_table(str(matches[0]), **read)
    if "train" not in frames:
        raise DataError(
            f"{source!r} has no file for the train split {split_names['train']!r} "
            f"(found: {[p.name for p in files]}); name files <split>.csv/.jsonl/.parquet"
        )
    return frames


def _read_hub(source: str, config: str, revision: str, split_names: dict[str, str]):
    """Load a Hugging Face Hub dataset (or a local dataset repo) with `datasets.load_dataset`."""
    import datasets

    try:
        loaded = datasets.load_dataset(source, config or None, revision=revision or None)
    except Exception as err:  # the datasets library raises many types; all mean "cannot load"
        raise DataError(f"cannot load Hub dataset {source!r} (config {config!r}): {err}") from err
    frames = {}
    for split, wanted in split_names.items():
        if wanted in loaded:
            frames[split] = loaded[wanted].to_pandas()
    if "train" not in frames:
        raise DataError(
            f"Hub dataset {source!r} has no split {split_names['train']!r}; "
            f"its splits: {list(loaded)}"
        )
    return frames, loaded[split_names["train"]].features


def _check_columns(frames: dict[str, pd.DataFrame], text_column: str, label_column: str) -> None:
    if text_column == label_column:
        present = [str(c) for c in frames["train"].columns]
        raise DataError(
            f"text_column and label_column are both {text_column!r}: the text and the label "
            f"must come from two different columns (columns present: [{preview(present, 20)}])"
        )
    for split, frame in frames.items():
        for role, column in (("text", text_column), ("label", label_column)):
            if column not in frame.columns:
                present = [str(c) for c in frame.columns]
                raise DataError(
                    f"{role} column {column!r} is missing from split {split!r}; "
                    f"columns present: [{preview(present, 20)}]"
                )


def _clean(frame: pd.DataFrame, split: str, drop_invalid_rows: bool) -> tuple[pd.DataFrame, dict]:
    """Find rows with a null/empty text or a null label: fail, or drop them and say so."""
    text = frame[TEXT_COLUMN]
    problems = {
        "null or empty text": text.isna() | (text.astype(str).str.strip() == ""),
        "null label": frame[LABEL_COLUMN].isna(),
    }
    counts = {why: int(mask.sum()) for why, mask in problems.items() if mask.any()}
    if not counts:
        return frame, {}
    bad = problems["null or empty text"] | problems["null label"]
    where = ", ".join(f"{n} with {why}" for why, n in counts.items())
    if not drop_invalid_rows:
        rows = frame.index[bad][:5].tolist()
        raise DataError(
            f"split {split!r}: {int(bad.sum())} invalid rows ({where}; first row numbers: {rows}); "
            "fix the data or set drop_invalid_rows=true to drop them"
        )
    log.warning("split %r: dropping %d rows (%s)", split, int(bad.sum()), where)
    return frame[~bad].reset_index(drop=True), counts


def _check_texts(frame: pd.DataFrame, split: str, text_column: str) -> None:
    """Every text must be a string: a number or a list is refused, not trained on as text."""
    texts = frame[TEXT_COLUMN]
    not_text = ~texts.map(lambda value: isinstance(value, str))
    if not_text.any():
        row = int(not_text.idxmax())
        value = texts[row]
        raise DataError(
            f"split {split!r}: text column {text_column!r} holds {int(not_text.sum())} values "
            f"that are not text (first at row {row}: {type(value).__name__} {value!r:.60}); "
            "give every row its text as a string"
        )


def _check_labels(frame: pd.DataFrame, split: str, label_column: str) -> None:
    """Every label must be one value (a string or a number): a list or a struct is refused."""
    labels = frame[LABEL_COLUMN]
    if labels.dtype != object:
        return
    not_one = ~labels.map(pd.api.types.is_scalar)
    if not_one.any():
        row = int(not_one.idxmax())
        value = labels[row]
        found = "a struct" if isinstance(value, dict) else f"a list ({type(value).__name__})"
        raise DataError(
            f"split {split!r}: label column {label_column!r} holds {int(not_one.sum())} values "
            f"that are not one class each (first at row {row}: {found} {shown(value, 50)}); "
            "give each row one label, a string or an integer (a classifier picks one class)"
        )


#: A label column with at least this many distinct values and fewer than 2 rows per value on
#: average holds ids or free text, not classes.
ID_LIKE_DISTINCT = 20


def check_label_cardinality(frame: pd.DataFrame, label_column: str, columns: list[str]) -> None:
    """Refuse a label column that looks like an id or free text: most values are unique."""
    counts = frame[LABEL_COLUMN].value_counts()
    distinct, rows = len(counts), len(frame)
    if distinct >= ID_LIKE_DISTINCT and 2 * distinct > rows:
        raise DataError(
            f"label column {label_column!r} has {distinct} distinct values in {rows} rows: it "
            "looks like an id or free text, not a class (a class needs several rows); set "
            f"label_column to the column that holds the class (columns: [{preview(columns)}]); "
            f"its values: {preview(list(counts.index), 5)}"
        )


def encode_labels(frames: dict[str, pd.DataFrame], features: Any) -> list[str]:
    """Turn labels into ids 0..C-1 in place and return the names (id2label)."""
    import datasets

    train = frames["train"][LABEL_COLUMN]
    feature = features.get(LABEL_COLUMN) if features is not None else None
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        for split, frame in frames.items():
            outside = sorted(set(frame[LABEL_COLUMN].astype(int)) - set(range(len(names))))
            if outside:
                raise DataError(
                    f"split {split!r} has label ids [{preview(outside)}] outside the "
                    f"{len(names)} classes [{preview(names)}]"
                )
            frames[split][LABEL_COLUMN] = frame[LABEL_COLUMN].astype(int)
    else:
        values = sorted(train.unique(), key=lambda v: (str(type(v)), v))
        names = [str(v) for v in values]
        ids = {v: i for i, v in enumerate(values)}
        for split, frame in frames.items():
            unseen = sorted(set(frame[LABEL_COLUMN].unique()) - ids.keys(), key=str)
            if unseen:
                raise DataError(
                    f"split {split!r} has labels never seen in train: [{preview(unseen)}]; "
                    f"train labels: [{preview(names)}]"
                )
            frames[split][LABEL_COLUMN] = frame[LABEL_COLUMN].map(ids).astype(int)
    present = sorted(set(frames["train"][LABEL_COLUMN]))
    if len(present) < 2:
        raise DataError(
            f"the train split has {len(present)} class(es) ({[names[i] for i in present]}); "
            "a classifier needs at least 2"
        )
    return names


def class_counts_text(counts: dict[str, int], limit: int = 20) -> str:
    """Classes and their row counts for a message: the first ``limit``, then how many more."""
    listed = ", ".join(f"{shown(name, 40)} {n}" for name, n in list(counts.items())[:limit])
    more = len(counts) - limit
    return f"{listed}, ... ({more} more)" if more > 0 else listed


def _fewest(frame: pd.DataFrame, label_names: list[str]) -> dict[str, int]:
    """Each class of ``frame`` with its rows, fewest first (then by name)."""
    counts = ((label_names[i], int(n)) for i, n in frame[LABEL_COLUMN].value_counts().items())
    return dict(sorted(counts, key=lambda item: (item[1], item[0])))


def _stratified_split(frame: pd.DataFrame, size: float | int, seed: int):
    """Split ``frame`` into (rest, part), ``part`` having ``size`` rows or that fraction.

    A ValueError when a class has too few rows, or a part fewer rows than there are classes.
    """
    from sklearn.model_selection import train_test_split

    rest, part = train_test_split(
        frame, test_size=size, stratify=frame[LABEL_COLUMN], random_state=seed
    )
    return rest.reset_index(drop=True), part.reset_index(drop=True)


def _cap(frame: pd.DataFrame, limit: int, seed: int, split: str, cap_name: str) -> pd.DataFrame:
    """A sample of ``limit`` rows, stratified, that keeps at least one row of every class."""
    from sklearn.model_selection import train_test_split

    if limit <= 0 or len(frame) <= limit:
        return frame
    counts = frame[LABEL_COLUMN].value_counts()
    if limit < len(counts):
        raise DataError(
            f"{cap_name}={limit} cannot keep the {len(counts)} classes of split {split!r}; "
            f"set {cap_name} to at least {len(counts)} (better: tens of rows per class), or 0"
        )
    try:
        _, kept = train_test_split(
            frame, test_size=limit, stratify=frame[LABEL_COLUMN], random_state=seed
        )
    except ValueError:  # a class with one row, or too few rows left out to stratify
        kept = frame.sample(n=limit, random_state=seed)
    kept = _with_every_class(kept, frame, seed)
    log.info("split %r: kept %d of %d rows (%s)", split, limit, len(frame), cap_name)
    return kept.reset_index(drop=True)


def _with_every_class(kept: pd.DataFrame, frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    """``kept`` with a row of each class of ``frame`` it lacks, in place of its commonest rows.

    A proportional sample leaves out classes much rarer than one in ``len(kept)`` rows.
    """
    missing = sorted(set(frame[LABEL_COLUMN]) - set(kept[LABEL_COLUMN]))
    if not missing:
        return kept
    added = (
        frame[frame[LABEL_COLUMN].isin(missing)]
        .groupby(LABEL_COLUMN)
        .sample(n=1, random_state=seed)
    )
    left = kept[LABEL_COLUMN].value_counts()
    removed = []
    for _ in missing:
        largest = left.idxmax()
        left[largest] -= 1
        removed.append(kept.index[kept[LABEL_COLUMN] == largest][left[largest]])
    kept = pd.concat([kept.drop(index=removed), added])
    return kept.sample(frac=1.0, random_state=seed)


def fingerprint(frames: dict[str, pd.DataFrame], label_names: list[str]) -> str:
    """A SHA-256 over every split's texts and labels (order included) and the label names."""
    digest = hashlib.sha256(json.dumps(label_names).encode())
    for split in SPLITS:
        digest.update(split.encode())
        hashes = pd.util.hash_pandas_object(frames[split][[TEXT_COLUMN, LABEL_COLUMN]], index=False)
        digest.update(hashes.to_numpy().tobytes())
    return digest.hexdigest()


def check_fractions(**fractions: float) -> None:
    """Each held-out fraction must lie strictly between 0 and 1."""
    for name, fraction in fractions.items():
        if not 0 < fraction < 1:
            raise DataError(f"{name} must be between 0 and 1, got {fraction}")


def read_source(
    source: str,
    *,
    source_type: str,
    config: str,
    revision: str,
    split_names: dict[str, str],
    **read: Any,
) -> tuple[dict[str, pd.DataFrame], Any]:
    """The splits of ``source`` as DataFrames, and the Hub features (None for files).

    ``read`` are the keyword arguments of `read_table` (format, encoding, text column,
    timeout) for a file source.
    """
    if source_type not in ("auto", "hub", "files"):
        raise DataError(f"source_type must be auto, hub or files, not {source_type!r}")
    use_files = source_type == "files" or (source_type == "auto" and _is_file_source(source))
    if use_files:
        return _read_files(source, split_names, **read), None
    return _read_hub(source, config, revision, split_names)


def select_columns(
    frames: dict[str, pd.DataFrame], text_column: str, label_column: str, drop_invalid_rows: bool
) -> dict[str, dict[str, int]]:
    """Keep the text and label columns as `text`/`label` (in place); return rows dropped."""
    _check_columns(frames, text_column, label_column)
    columns = [str(c) for c in frames["train"].columns]
    dropped: dict[str, dict[str, int]] = {}
    for split in list(frames):
        frame = frames[split][[text_column, label_column]]
        frame = frame.rename(columns={text_column: TEXT_COLUMN, label_column: LABEL_COLUMN})
        frames[split], counts = _clean(frame.reset_index(drop=True), split, drop_invalid_rows)
        if counts:
            dropped[split] = counts
        _check_texts(frames[split], split, text_column)
        _check_labels(frames[split], split, label_column)
    check_label_cardinality(frames["train"], label_column, columns)
    return dropped


#: What `rare_classes` may say to do with a class under `min_class_rows` train rows.
RARE_CLASS_POLICIES = ("keep", "drop", "fail")


def find_rare_classes(frame: pd.DataFrame, label_names: list[str], min_rows: int) -> dict[str, int]:
    """Classes with fewer than ``min_rows`` rows in ``frame`` (at least one), fewest first."""
    return {name: n for name, n in _fewest(frame, label_names).items() if n < min_rows}


def handle_rare_classes(
    frames: dict[str, pd.DataFrame], label_names: list[str], *, min_class_rows: int, policy: str
) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """Apply ``policy`` to the classes with fewer than ``min_class_rows`` train rows.

    keep: nothing changes here (`make_missing_splits` keeps them out of the splits it makes);
    drop: their rows leave every split, and their names the label names; fail: a DataError.
    Returns the label names, the rare classes (name: train rows) and rows dropped per split.
    """
    if policy not in RARE_CLASS_POLICIES:
        raise DataError(f"rare_classes must be keep, drop or fail, not {shown(policy)}")
    if min_class_rows < 1:
        raise DataError(f"min_class_rows must be at least 1, got {min_class_rows}")
    rare = find_rare_classes(frames["train"], label_names, min_class_rows)
    if not rare:
        return label_names, rare, {}
    what = (
        f"{len(rare)} of {len(label_names)} classes have fewer than min_class_rows="
        f"{min_class_rows} train rows: {class_counts_text(rare)}"
    )
    if policy == "fail":
        raise DataError(
            f"{what}; set rare_classes=keep (trained on, kept out of the validation and test "
            "splits made here, reported) or rare_classes=drop (left out), lower min_class_rows, "
            "or merge them into broader classes in the data"
        )
    if policy == "keep":
        log.warning(
            "%s; kept in train only (not held out for validation or test; scored only where "
            "a given test split holds them)",
            what,
        )
        return label_names, rare, {}
    kept_names = [name for name in label_names if name not in rare]
    left = frames["train"][LABEL_COLUMN].map(lambda i: label_names[i] not in rare)
    if frames["train"][LABEL_COLUMN][left].nunique() < 2:
        raise DataError(
            f"{what}; dropping them (rare_classes=drop) leaves fewer than 2 classes to "
            "classify: lower min_class_rows or keep them (rare_classes=keep)"
        )
    new_ids = {label_names.index(name): i for i, name in enumerate(kept_names)}
    dropped = {}
    for split, frame in frames.items():
        keep = frame[LABEL_COLUMN].isin(new_ids.keys())
        if not keep.all():
            dropped[split] = int((~keep).sum())
        frame = frame[keep].reset_index(drop=True)
        frame[LABEL_COLUMN] = frame[LABEL_COLUMN].map(new_ids)
        frames[split] = frame
    log.warning("%s; dropped (rare_classes=drop): %s rows by split", what, dropped)
    return kept_names, rare, dropped


def make_missing_splits(
    frames: dict[str, pd.DataFrame],
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    label_names: list[str],
    train_only: Mapping[str, int] | None = None,
) -> list[str]:
    """Hold validation and/or test out of train when missing (stratified); return their names.

    The classes of ``train_only`` (rare classes kept: name → rows) stay whole in train.
    """
    created = [s for s in ("validation", "test") if s not in frames]
    if not created:
        return created
    total = test_fraction * ("test" in created) + validation_fraction * ("validation" in created)
    train, train_only = frames["train"], train_only or {}
    aside = train[LABEL_COLUMN].isin([label_names.index(name) for name in train_only])
    pool = train[~aside]
    if aside.any() and pool[LABEL_COLUMN].nunique() < 2:
        left = sorted(label_names[i] for i in pool[LABEL_COLUMN].unique())
        raise DataError(
            f"cannot make the {'/'.join(created)} split from train: it needs 2 classes with "
            f"min_class_rows rows or more, and {len(left)} have them ([{preview(left)}]); the "
            f"rare ones stay in train ({class_counts_text(dict(train_only))}); add rows, give "
            "the split as its own file, or lower min_class_rows"
        )
    try:
        rest, held_out = _stratified_split(pool, total, seed)
        if len(created) == 2:
            validation, test = _stratified_split(held_out, test_fraction / total, seed)
    except ValueError as err:
        # each created split needs a row of every class: about 2 / total rows of it for two
        needed = max(2, math.ceil(2 / total - 1e-9)) if len(created) == 2 else 2
        small = {name: n for name, n in _fewest(pool, label_names).items() if n < needed}
        reason = (
            f"each class needs at least {needed} train rows to reach "
            f"{' and '.join(created)}, and these have fewer: {class_counts_text(small, 10)}"
            if small
            else f"{err}".split(". ")[0]  # a split with fewer rows than there are classes
        )
        raise DataError(
            f"cannot make the {'/'.join(created)} split from train, stratified by class: "
            f"{reason}; set min_class_rows to {needed} or more so that smaller classes stay in "
            "train (rare_classes=keep), or give the split as its own file"
        ) from err
    frames["train"] = pd.concat([rest, train[aside]], ignore_index=True) if aside.any() else rest
    if len(created) == 2:
        frames["validation"], frames["test"] = validation, test
    else:
        frames[created[0]] = held_out
    log.info("created %s from the train split (stratified, seed %d)", created, seed)
    return created


def cap_splits(
    frames: dict[str, pd.DataFrame], max_train_samples: int, max_eval_samples: int, seed: int
) -> None:
    """Sample splits down to their caps (in place); an empty split is an error."""
    caps = {
        "train": ("max_train_samples", max_train_samples),
        "validation": ("max_eval_samples", max_eval_samples),
        "test": ("max_eval_samples", max_eval_samples),
    }
    for split in SPLITS:
        cap_name, limit = caps[split]
        frames[split] = _cap(frames[split], limit, seed, split, cap_name)
        if frames[split].empty:
            raise DataError(f"split {split!r} is empty")


def save_splits(
    frames: dict[str, pd.DataFrame],
    label_names: list[str],
    out_dir: str,
    *,
    source: str,
    created: list[str],
    dropped: dict[str, dict[str, int]],
    rare_classes: RareClasses,
) -> DatasetMetadata:
    """Save the splits as a DatasetDict and its `metadata.json`; return the metadata."""
    import datasets

    features = datasets.Features(
        {
            TEXT_COLUMN: datasets.Value("string"),
            LABEL_COLUMN: datasets.ClassLabel(names=label_names),
        }
    )
    dataset = datasets.DatasetDict(
        {split: datasets.Dataset.from_pandas(frames[split], features=features) for split in SPLITS}
    )
    dataset.save_to_disk(out_dir)
    metadata: DatasetMetadata = {
        "source": source,
        "label_names": label_names,
        "rows": {split: len(frames[split]) for split in SPLITS},
        "class_counts": {
            split: {
                label_names[i]: int(n)
                for i, n in frames[split][LABEL_COLUMN].value_counts().sort_index().items()
            }
            for split in SPLITS
        },
        "created_splits": created,
        "dropped_rows": dropped,
        "rare_classes": rare_classes,
        "fingerprint": fingerprint(frames, label_names),
    }
    write_dataset_metadata(out_dir, metadata)
    return metadata


@component
def download(
    dataset: Output[Dataset],
    source: str,
    source_type: str = "auto",
    config: str = "",
    revision: str = "",
    file_format: str = "auto",
    encoding: str = "utf-8",
    text_column: str = "text",
    label_column: str = "label",
    train_split: str = "train",
    validation_split: str = "validation",
    test_split: str = "test",
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_train_samples: int = 0,
    max_eval_samples: int = 0,
    drop_invalid_rows: bool = False,
    min_class_rows: int = 10,
    rare_classes: str = "keep",
    seed: int = 42,
    network_timeout: float = 60.0,
):
    """Download a labelled text dataset and split it into train/validation/test.

    Args:
        source: Hugging Face Hub dataset id, or a local file, directory or URL of
            CSV/TSV/JSONL/Parquet data.
        source_type: `auto` (files when the source is a path or URL, else Hub), `hub` or `files`.
        config: Hub dataset configuration name (e.g. `sentiment`); empty for none.
        revision: Hub dataset revision (branch, tag or commit); empty for the default branch.
        file_format: `auto` (from the extension), `csv`, `tsv`, `jsonl` or `parquet`.
        encoding: Text encoding of CSV/TSV/JSONL files.
        text_column: Name of the column holding the text.
        label_column: Name of the column holding the label (strings or ints).
        train_split: Name of the training split (Hub split or file stem in a directory).
        validation_split: Name of the validation split; created from train when missing.
        test_split: Name of the test split; created from train when missing.
        validation_fraction: Share of train held out as validation when that split is missing.
        test_fraction: Share of train held out as test when that split is missing.
        max_train_samples: Cap on train rows (stratified sample); 0 keeps all.
        max_eval_samples: Cap on validation and test rows each; 0 keeps all.
        drop_invalid_rows: Drop rows with null/empty text or null label (counted in the
            metadata) instead of failing.
        min_class_rows: A class with fewer train rows than this is rare (10: the fewest that
            put a class in both the validation and test splits made with the default
            fractions); 1: no class is rare.
        rare_classes: What to do with rare classes: `keep` (trained on, kept whole in train
            when validation/test are made from it, so not scored unless a given test split
            holds them), `drop` (left out of every split and of the model's labels) or `fail`.
            Rare classes are listed by name in the log, the dataset metadata and the
            evaluation report.
        seed: Seed for splitting and sampling.
        network_timeout: Seconds a URL may go without answering before the download fails
            (the step's retries then apply).

    Returns:
        dataset: Output DatasetDict (`save_to_disk`) with `text` and `label` (ClassLabel) columns.
    """
    from fineserve.components import download as step

    step.check_fractions(validation_fraction=validation_fraction, test_fraction=test_fraction)
    frames, features = step.read_source(
        source,
        source_type=source_type,
        config=config,
        revision=revision,
        split_names={"train": train_split, "validation": validation_split, "test": test_split},
        file_format=file_format,
        encoding=encoding,
        text_column=text_column,
        timeout=network_timeout,
    )
    dropped = step.select_columns(frames, text_column, label_column, drop_invalid_rows)
    label_names = step.encode_labels(frames, features)
    label_names, rare, rare_dropped = step.handle_rare_classes(
        frames, label_names, min_class_rows=min_class_rows, policy=rare_classes
    )
    for split, rows in rare_dropped.items():
        dropped.setdefault(split, {})["rare class"] = rows
    created = step.make_missing_splits(
        frames,
        validation_fraction,
        test_fraction,
        seed,
        label_names,
        train_only=rare if rare_classes == "keep" else None,
    )
    step.cap_splits(frames, max_train_samples, max_eval_samples, seed)
    metadata = step.save_splits(
        frames,
        label_names,
        dataset.path,
        source=source,
        created=created,
        dropped=dropped,
        rare_classes={"policy": rare_classes, "min_class_rows": min_class_rows, "classes": rare},
    )
    dataset.metadata.update(metadata)
