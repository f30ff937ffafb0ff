"""The mean-pooling head: chosen for sentence-embedding checkpoints, trained, saved, served."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from steps import train_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fineserve.components.training import head_for
from fineserve.core.artifacts import MODEL_INFO_FILE
from fineserve.core.errors import DataError
from fineserve.serving.engine import TextClassifier
from fineserve.serving.pooling import MeanPoolingClassifier
from fineserve.serving.precision import ProbeSettings


@pytest.fixture(scope="module")
def sentence_encoder(tiny_base_model, tmp_path_factory):
    """The tiny base model as a sentence-transformers checkpoint (mean pooling)."""
    target = tmp_path_factory.mktemp("st") / "encoder"
    shutil.copytree(tiny_base_model, target)
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    return target


def test_the_head_is_chosen_from_the_checkpoint_and_can_be_overridden(
    tiny_base_model, sentence_encoder
):
    assert head_for(str(sentence_encoder), "", "auto") == "mean"
    assert head_for(str(tiny_base_model), "", "auto") == "model"
    assert head_for(str(sentence_encoder), "", "model") == "model"
    assert head_for(str(tiny_base_model), "", "mean") == "mean"
    with pytest.raises(DataError, match="pooling must be one of auto, mean, model"):
        head_for(str(tiny_base_model), "", "max")


def test_the_mean_of_the_real_tokens_decides_so_padding_changes_nothing(sentence_encoder):
    model = MeanPoolingClassifier.from_encoder(str(sentence_encoder), ["a", "b", "c"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(sentence_encoder)
    alone = tokenizer(["a fine day"], return_tensors="pt")
    padded = tokenizer(["a fine day", "a much longer text than the first one"],
                       padding=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        one, two = model(**alone).logits[0], model(**padded).logits[0]
    assert torch.allclose(one, two, atol=1e-5)


def test_a_trained_mean_pooling_model_is_saved_loaded_evaluated_and_served(
    raw_dir, tokenized_dir, sentence_encoder, tmp_path
):
    train_model(
        str(tokenized_dir), str(tmp_path / "m"), base_model=str(sentence_encoder),
        epochs=1.0, learning_rate=1e-3, batch_size=16,
    )  # fmt: skip
    info = json.loads((tmp_path / "m" / MODEL_INFO_FILE).read_text())
    assert info["recipe"]["pooling"] == "mean"
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, MeanPoolingClassifier)
    # the serving engine (with its padding-skipping Linear layers) answers as the model does
    engine = TextClassifier(tmp_path / "m", device="cpu")
    texts = ["a fine day", "what an awful, awful film that was", "meh"]
    served = engine.predict_proba(texts)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        direct = loaded(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    np.testing.assert_allclose(served, direct.numpy(), atol=1e-5)
    assert engine.unpadded is not None  # skipping padding kept: the outputs agree
    # loaded in bfloat16, the encoder is bfloat16 too (not the float32 its saved config names)
    half = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    engine = TextClassifier(tmp_path / "m", device="cpu", dtype="bfloat16", probe=ProbeSettings(0))
    np.testing.assert_allclose(engine.predict_proba(texts), served, atol=0.05)
    # the evaluate step reads its labels and scores it (in a fresh process, as in a pipeline)
    script = (
        "import sys; sys.path.insert(0, 'tests'); from steps import evaluate_model; "
        f"r = evaluate_model({str(raw_dir)!r}, {str(tmp_path / 'm')!r}, "
        f"results_path={str(tmp_path / 'r.json')!r}, report_path={str(tmp_path / 'r.md')!r}, "
        "n_bootstrap=10); print(r['recipe']['pooling'])"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("mean"), run.stderr[-2000:]
