"""The download step: sources, formats, splits, labels, caps and every bad-input message."""

import csv
import functools
import http.server
import json
import re
import threading
from pathlib import Path

import datasets
import pandas as pd
import pytest
from steps import download_dataset

from fineserve.core.artifacts import read_dataset_metadata as read_metadata
from fineserve.core.errors import DataError


def _load(out: Path) -> datasets.DatasetDict:
    return datasets.load_from_disk(str(out))


def test_single_file_gets_stratified_validation_and_test_splits(small_corpus_csv, tmp_path):
    meta = download_dataset(str(small_corpus_csv), str(tmp_path / "out"), seed=7)
    data = _load(tmp_path / "out")
    assert meta["rows"] == {"train": 240, "validation": 30, "test": 30}
    assert meta["created_splits"] == ["validation", "test"]
    assert data["train"].features["label"].names == ["negative", "neutral", "positive"]
    assert meta["class_counts"]["test"] == {"negative": 10, "neutral": 10, "positive": 10}
    assert set(data.column_names["train"]) == {"text", "label"}
    # no row lands in two splits
    texts = [set(data[s]["text"]) for s in ("train", "validation", "test")]
    assert not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert read_metadata(str(tmp_path / "out")) == meta


def test_fingerprint_follows_content_not_paths(small_corpus_csv, tmp_path):
    first = download_dataset(str(small_corpus_csv), str(tmp_path / "a"), seed=1)
    again = download_dataset(str(small_corpus_csv), str(tmp_path / "b"), seed=1)
    other_split = download_dataset(str(small_corpus_csv), str(tmp_path / "c"), seed=2)
    assert first["fingerprint"] == again["fingerprint"]
    assert first["fingerprint"] != other_split["fingerprint"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "tsv"])
def test_formats_give_the_same_dataset(small_corpus_csv, tmp_path, fmt):
    frame = pd.read_csv(small_corpus_csv)
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t", index=False, quoting=csv.QUOTE_ALL)
    reference = download_dataset(str(small_corpus_csv), str(tmp_path / "csv"))
    converted = download_dataset(str(path), str(tmp_path / fmt))
    assert converted["fingerprint"] == reference["fingerprint"]


def test_directory_with_split_files_keeps_given_splits(small_corpus_csv, tmp_path):
    frame = pd.read_csv(small_corpus_csv)
    folder = tmp_path / "data"
    folder.mkdir()
    _write(folder, frame.iloc[:250], "train.csv")
    _write(folder, frame.iloc[250:], "test.csv")
    meta = download_dataset(str(folder), str(tmp_path / "out"))
    assert meta["created_splits"] == ["validation"]
    assert meta["rows"]["test"] == 50
    assert meta["rows"]["train"] + meta["rows"]["validation"] == 250


def test_custom_column_names_and_integer_labels(tmp_path):
    frame = pd.DataFrame(
        {"review": [f"text number {i}" for i in range(60)], "stars": [1, 5] * 30, "x": 0}
    )
    frame.to_csv(tmp_path / "d.csv", index=False)
    download_dataset(
        str(tmp_path / "d.csv"), str(tmp_path / "out"), text_column="review", label_column="stars"
    )
    data = _load(tmp_path / "out")
    assert data["train"].features["label"].names == ["1", "5"]
    assert set(data["train"]["label"]) == {0, 1}
    assert data.column_names["train"] == ["text", "label"]


def test_caps_rows_per_split(corpus_frame, tmp_path):
    corpus_frame.sample(n=3000, random_state=0).to_parquet(tmp_path / "d.parquet")
    meta = download_dataset(
        str(tmp_path / "d.parquet"),
        str(tmp_path / "out"),
        max_train_samples=200,
        max_eval_samples=50,
    )
    assert meta["rows"] == {"train": 200, "validation": 50, "test": 50}


def test_hub_dataset_with_classlabel_names(small_corpus_csv, tmp_path):
    """The Hub code path (`datasets.load_dataset`) on a dataset repo laid out like the Hub's."""
    frame = pd.read_csv(small_corpus_csv)
    names = ["negative", "neutral", "positive"]
    frame["label"] = frame["label"].map(names.index)
    repo = tmp_path / "repo"
    (repo / "sentiment").mkdir(parents=True)
    frame.iloc[:240].to_parquet(repo / "sentiment" / "train.parquet")
    frame.iloc[240:].to_parquet(repo / "sentiment" / "test.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: sentiment\n  data_files:\n"
        "  - split: train\n    path: sentiment/train.parquet\n"
        "  - split: test\n    path: sentiment/test.parquet\n"
        "dataset_info:\n- config_name: sentiment\n  features:\n"
        "  - name: text\n    dtype: string\n  - name: label\n    dtype:\n      class_label:\n"
        "        names:\n          '0': negative\n          '1': neutral\n          '2': positive\n"
        "---\n"
    )
    meta = download_dataset(str(repo), str(tmp_path / "out"), source_type="hub", config="sentiment")
    assert meta["label_names"] == names
    assert meta["rows"]["test"] == 60
    assert meta["created_splits"] == ["validation"]


def test_reads_a_url(small_corpus_csv, tmp_path):
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(small_corpus_csv.parent)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{small_corpus_csv.name}"
        meta = download_dataset(url, str(tmp_path / "out"))
    finally:
        server.shutdown()
    local = download_dataset(str(small_corpus_csv), str(tmp_path / "local"))
    assert meta["fingerprint"] == local["fingerprint"]


def test_invalid_rows_fail_by_default_and_are_counted_when_dropped(small_corpus_csv, tmp_path):
    frame = pd.read_csv(small_corpus_csv)
    frame.loc[3, "text"] = "   "
    frame.loc[5, "text"] = None
    frame.loc[7, "label"] = None
    _write(tmp_path, frame)
    with pytest.raises(DataError, match=r"3 invalid rows .*2 with null or empty text, 1 with null"):
        download_dataset(str(tmp_path / "d.csv"), str(tmp_path / "out"))
    meta = download_dataset(str(tmp_path / "d.csv"), str(tmp_path / "out"), drop_invalid_rows=True)
    assert meta["dropped_rows"] == {"train": {"null or empty text": 2, "null label": 1}}
    assert sum(meta["rows"].values()) == 297


def _write(tmp_path: Path, frame: pd.DataFrame, name: str = "d.csv") -> str:
    """CSV with every field quoted: some tweets hold a bare carriage return."""
    path = tmp_path / name
    frame.to_csv(path, index=False, quoting=csv.QUOTE_ALL)
    return str(path)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "missing_text",
            r"text column 'text' is missing from split 'train'; columns present: "
            r"\['body', 'label'\]",
        ),
        ("missing_label", r"label column 'label' is missing .*\['text', 'sentiment'\]"),
        (
            "one_class",
            r"train split has 1 class\(es\) \(\['pos'\]\); a classifier needs at least 2",
        ),
        ("unseen_label", r"split 'test' has labels never seen in train: \['maybe'\]"),
        ("empty_split", r"split 'test' is empty"),
        ("unknown_format", r"unknown file format \.xlsx .*supported: \.csv"),
        ("missing_path", r"cannot read '.*nope\.csv'"),
        ("bad_encoding", r"is not valid utf-8 \(byte 0xe9 at offset \d+\); set encoding"),
        (
            "tiny_class",
            r"cannot make the validation/test split from train: it needs 2 classes with "
            r"min_class_rows rows or more, and 1 have them \(\['a'\]\); the rare ones stay in "
            r"train \('b' 1\)",
        ),
    ],
)
def test_bad_input_fails_with_a_message_naming_the_problem(tmp_path, case, message):
    texts = [f"sample text {i}" for i in range(40)]
    two_class = pd.DataFrame({"text": texts, "label": ["pos", "neg"] * 20})
    source = str(tmp_path / "d.csv")
    if case == "missing_text":
        source = _write(tmp_path, two_class.rename(columns={"text": "body"}))
    elif case == "missing_label":
        source = _write(tmp_path, two_class.rename(columns={"label": "sentiment"}))
    elif case == "one_class":
        source = _write(tmp_path, two_class.assign(label="pos"))
    elif case in ("unseen_label", "empty_split"):
        folder = tmp_path / "data"
        folder.mkdir()
        _write(folder, two_class, "train.csv")
        test = two_class.iloc[:4].assign(label="maybe") if case == "unseen_label" else two_class[:0]
        _write(folder, test, "test.csv")
        source = str(folder)
    elif case == "unknown_format":
        source = str(tmp_path / "d.xlsx")
        Path(source).write_bytes(b"PK")
    elif case == "missing_path":
        source = str(tmp_path / "nope.csv")
    elif case == "bad_encoding":
        Path(source).write_bytes("text,label\ncaf\u00e9,pos\nbar,neg\n".encode("latin-1"))
    elif case == "tiny_class":
        source = _write(tmp_path, pd.DataFrame({"text": texts[:21], "label": ["a"] * 20 + ["b"]}))
    with pytest.raises(DataError, match=message):
        download_dataset(source, str(tmp_path / "out"))


def test_metadata_is_json_serialisable_for_kfp(small_corpus_csv, tmp_path):
    meta = download_dataset(str(small_corpus_csv), str(tmp_path / "out"))
    assert json.loads(json.dumps(meta)) == meta


def test_strings_that_look_missing_are_text_and_labels(tmp_path):
    rows = ["text,label"]
    for i in range(30):
        rows += [f"good {i},pos", f"bad {i},NA", "null,None"]  # a class literally named "NA"
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    meta = download_dataset(str(tmp_path / "d.csv"), str(tmp_path / "out"))
    assert meta["label_names"] == ["NA", "None", "pos"]
    assert meta["dropped_rows"] == {}
    data = datasets.load_from_disk(str(tmp_path / "out"))
    assert "null" in data["train"]["text"]


def _three_classes_csv(path, per_class=20):
    rows = [
        {"text": f"{label} text {i}", "label": label}
        for i in range(per_class)
        for label in ("neg", "neu", "pos")
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_a_cap_below_the_class_count_fails_naming_it(tmp_path):
    source = _three_classes_csv(tmp_path / "d.csv")
    with pytest.raises(DataError, match=r"max_train_samples=2 cannot keep the 3 classes"):
        download_dataset(str(source), str(tmp_path / "out"), max_train_samples=2)
    with pytest.raises(DataError, match=r"max_eval_samples=1 cannot keep the 3 classes"):
        download_dataset(str(source), str(tmp_path / "out2"), max_eval_samples=1)


def test_a_cap_keeps_every_class_even_one_with_a_single_row(tmp_path):
    rows = [{"text": f"t {i}", "label": "big"} for i in range(60)] + [
        {"text": "lonely", "label": "rare"}
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(rows[:10] + rows[-1:]).to_csv(tmp_path / "validation.csv", index=False)
    pd.DataFrame(rows[10:20] + rows[-1:]).to_csv(tmp_path / "test.csv", index=False)
    meta = download_dataset(str(tmp_path), str(tmp_path / "out"), max_train_samples=5)
    assert meta["rows"]["train"] == 5
    assert meta["class_counts"]["train"] == {"big": 4, "rare": 1}


@pytest.mark.parametrize(
    ("value", "shown"), [(42, "int 42"), (["a", "b"], "list ['a', 'b']"), (1.5, "float 1.5")]
)
def test_texts_that_are_not_strings_are_refused_with_column_and_row(tmp_path, value, shown):
    rows = [{"body": f"text {i}", "label": ["a", "b"][i % 2]} for i in range(40)]
    rows[7]["body"] = value
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pattern = rf"text column 'body' holds 1 values .*row \d+: {re.escape(shown)}"
    with pytest.raises(DataError, match=pattern):
        download_dataset(str(tmp_path / "d.jsonl"), str(tmp_path / "out"), text_column="body")


def test_csv_texts_that_look_like_numbers_stay_text(tmp_path):
    rows = [{"text": f"00{i}", "label": ["a", "b"][i % 2]} for i in range(40)]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    download_dataset(str(tmp_path / "d.csv"), str(tmp_path / "out"))
    data = datasets.load_from_disk(str(tmp_path / "out"))
    texts = {*data["train"]["text"], *data["validation"]["text"], *data["test"]["text"]}
    assert texts == {f"00{i}" for i in range(40)}


def test_a_url_that_never_answers_fails_naming_url_and_timeout(tmp_path):
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts connections (the kernel does) and never answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/data.csv"
    started = time.monotonic()
    try:
        with pytest.raises(DataError, match=rf"cannot read '{url}': no answer within 1 s"):
            download_dataset(url, str(tmp_path / "out"), network_timeout=1.0)
    finally:
        listener.close()
    assert time.monotonic() - started < 10


# ------------------------------------------------------------------------------ inputs named


def test_the_same_column_for_text_and_label_is_refused_naming_it(tmp_path):
    source = _three_classes_csv(tmp_path / "d.csv")
    with pytest.raises(DataError) as err:
        download_dataset(str(source), str(tmp_path / "out"), text_column="label")
    assert str(err.value) == (
        "text_column and label_column are both 'label': the text and the label must come from "
        "two different columns (columns present: ['text', 'label'])"
    )


@pytest.mark.parametrize(
    ("labels", "found"),
    [
        ([["a", "b"], ["c"]], r"a list \(ndarray\) array\(\['a', 'b'\]"),
        ([{"x": 1}, {"x": 2}], r"a struct \{'x': 1\}"),
    ],
)
def test_a_label_column_of_lists_or_structs_is_refused_naming_column_and_type(
    tmp_path, labels, found
):
    frame = pd.DataFrame({"text": [f"text {i}" for i in range(40)], "tags": labels * 20})
    frame.to_parquet(tmp_path / "d.parquet")
    pattern = (
        r"^split 'train': label column 'tags' holds 40 values that are not one class each "
        rf"\(first at row 0: {found}.*give each row one label"
    )
    with pytest.raises(DataError, match=pattern):
        download_dataset(str(tmp_path / "d.parquet"), str(tmp_path / "out"), label_column="tags")


def _jsonl(path: Path, bad_line: int, text: str, rows: int = 40) -> str:
    lines = [json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) for i in range(rows)]
    lines[bad_line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"text": "broken, "label": "a"}',
            r"line 18 is not JSON \(Expecting ',' delimiter, column 20\): "
            r"'\{\"text\": \"broken, \"label\": \"a\"\}'$",
        ),
        ("[1, 2]", r"line 18 holds a JSON list, not an object .*: '\[1, 2\]'$"),
        ('"just text"', r"line 18 holds a JSON str, not an object"),
    ],
)
def test_a_jsonl_line_that_is_not_a_json_object_is_named_with_its_number(tmp_path, text, message):
    source = _jsonl(tmp_path / "d.jsonl", 18, text)
    with pytest.raises(DataError, match=rf"^cannot read '.*d\.jsonl' as JSON Lines: {message}"):
        download_dataset(source, str(tmp_path / "out"))


def test_a_bad_line_in_a_compressed_jsonl_file_is_named_too(tmp_path):
    import gzip

    plain = _jsonl(tmp_path / "d.jsonl", 31, '{"text": "cut off"')
    packed = tmp_path / "d.jsonl.gz"
    packed.write_bytes(gzip.compress(Path(plain).read_bytes()))
    with pytest.raises(DataError, match=r"d\.jsonl\.gz' as JSON Lines: line 31 is not JSON"):
        download_dataset(str(packed), str(tmp_path / "out"))


def test_a_label_column_of_ids_is_refused_with_the_reason_first_in_a_short_message(tmp_path):
    frame = pd.DataFrame(
        {
            "text": [f"text {i}" for i in range(6000)],
            "label": [f"id-{i % 5000:05d}" for i in range(6000)],
        }
    )
    frame.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError) as err:
        download_dataset(str(tmp_path / "d.csv"), str(tmp_path / "out"))
    message = str(err.value)
    assert message.startswith(
        "label column 'label' has 5000 distinct values in 6000 rows: it looks like an id or "
        "free text, not a class"
    )
    assert "'id-00000', 'id-00001'" in message and "(4995 more)" in message
    assert len(message) < 500


def test_labels_never_seen_in_train_are_listed_briefly(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    classes = [f"c{i:03d}" for i in range(200)]
    train = pd.DataFrame({"text": [f"t {i}" for i in range(400)], "label": classes * 2})
    _write(folder, train, "train.csv")
    test = pd.DataFrame({"text": [f"u {i}" for i in range(100)]})
    test["label"] = [f"new{i}" for i in range(100)]
    _write(folder, test, "test.csv")
    with pytest.raises(DataError) as err:
        download_dataset(str(folder), str(tmp_path / "out"))
    message = str(err.value)
    assert message.startswith("split 'test' has labels never seen in train: ['new0', 'new1'")
    assert "(90 more)" in message and "(190 more)" in message and len(message) < 600


# ------------------------------------------------------------------------------ rare classes

#: Question types as in TREC: most classes have tens of rows, seven have fewer than 10.
RARE = {"ENTY:currency": 2, "NUM:ord": 2, "ENTY:religion": 3, "NUM:temp": 3, "ABBR:abb": 4}
RARE |= {"NUM:code": 6, "ENTY:letter": 9}


def _trec_like(path: Path) -> str:
    counts = {f"TYPE:{i:02d}": 12 + 3 * i for i in range(43)} | RARE
    rows = [
        {"text": f"question {i} of {name}", "label": name}
        for name, n in counts.items()
        for i in range(n)
    ]
    pd.DataFrame(rows).sample(frac=1.0, random_state=0).to_csv(path, index=False)
    return str(path)


def test_rare_classes_are_kept_in_train_named_and_the_run_goes_on(tmp_path):
    source = _trec_like(tmp_path / "trec.csv")
    meta = download_dataset(source, str(tmp_path / "out"), max_train_samples=600)
    assert meta["rare_classes"] == {
        "policy": "keep",
        "min_class_rows": 10,
        "classes": dict(sorted(RARE.items(), key=lambda item: (item[1], item[0]))),
    }
    assert meta["rows"]["train"] == 600
    assert len(meta["label_names"]) == 50
    counts = meta["class_counts"]
    assert set(counts["train"]) == set(meta["label_names"])  # the cap keeps every class
    for split in ("validation", "test"):
        assert not set(RARE) & set(counts[split]), split  # never held out
        assert len(counts[split]) == 43


def test_rare_classes_can_be_dropped_from_every_split_and_the_labels(tmp_path):
    source = _trec_like(tmp_path / "trec.csv")
    meta = download_dataset(source, str(tmp_path / "out"), rare_classes="drop")
    assert len(meta["label_names"]) == 43 and not set(RARE) & set(meta["label_names"])
    assert meta["dropped_rows"] == {"train": {"rare class": sum(RARE.values())}}
    assert meta["rare_classes"]["policy"] == "drop"
    data = _load(tmp_path / "out")
    assert data["train"].features["label"].names == meta["label_names"]
    assert max(data["train"]["label"]) == 42


def test_rare_classes_fail_only_when_asked_naming_each_with_its_rows(tmp_path):
    source = _trec_like(tmp_path / "trec.csv")
    with pytest.raises(DataError) as err:
        download_dataset(source, str(tmp_path / "out"), rare_classes="fail")
    assert str(err.value).startswith(
        "7 of 50 classes have fewer than min_class_rows=10 train rows: 'ENTY:currency' 2, "
        "'NUM:ord' 2, 'ENTY:religion' 3, 'NUM:temp' 3, 'ABBR:abb' 4, 'NUM:code' 6, "
        "'ENTY:letter' 9; set rare_classes=keep"
    )
    assert not (tmp_path / "out").exists()


def test_a_class_too_small_to_split_is_named_when_min_class_rows_lets_it_through(tmp_path):
    source = _trec_like(tmp_path / "trec.csv")
    with pytest.raises(DataError) as err:
        download_dataset(source, str(tmp_path / "out"), min_class_rows=1)
    assert str(err.value) == (
        "cannot make the validation/test split from train, stratified by class: each class "
        "needs at least 10 train rows to reach validation and test, and these have fewer: "
        "'ENTY:currency' 2, 'NUM:ord' 2, 'ENTY:religion' 3, 'NUM:temp' 3, 'ABBR:abb' 4, "
        "'NUM:code' 6, 'ENTY:letter' 9; set min_class_rows to 10 or more so that smaller "
        "classes stay in train (rare_classes=keep), or give the split as its own file"
    )


def test_a_cap_keeps_a_class_far_rarer_than_one_row_in_the_sample(tmp_path):
    rows = [{"text": f"t {i}", "label": "big"} for i in range(3000)]
    rows += [{"text": f"m {i}", "label": "mid"} for i in range(2000)]
    rows += [{"text": f"r {i}", "label": "rare"} for i in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(rows[:20] + rows[3000:3020] + rows[-1:]).to_csv(
        tmp_path / "validation.csv", index=False
    )
    pd.DataFrame(rows[20:40] + rows[3020:3040] + rows[-1:]).to_csv(
        tmp_path / "test.csv", index=False
    )
    meta = download_dataset(str(tmp_path), str(tmp_path / "out"), max_train_samples=100)
    assert meta["rows"]["train"] == 100
    assert meta["class_counts"]["train"]["rare"] >= 1
    assert meta["rare_classes"]["classes"] == {"rare": 3}  # kept (the default), and named
