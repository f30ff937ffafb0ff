"""A classification head on the mean of the token states, for sentence-embedding checkpoints.

all-MiniLM-L6-v2 and its kin (sentence-transformers) are trained so that the *mean* of their
token states is the sentence's meaning; their [CLS] state and pooler are not trained for it,
and `BertForSequenceClassification` classifies from exactly those. `MeanPoolingClassifier`
classifies from the masked mean instead. It is registered with the `transformers` Auto
classes (model type `fineserve-mean-pooling`), so the trainer, the serving engine and
`AutoModelForSequenceClassification.from_pretrained` load a saved one like any other model,
once this module is imported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "fineserve-mean-pooling"
POOLINGS = ("auto", "mean", "model")


class MeanPoolingConfig(PretrainedConfig):
    """The encoder's own config (``encoder``), plus the head's labels and dropout."""

    model_type = MODEL_TYPE
    has_no_defaults_at_init = True

    def __init__(self, encoder: dict | None = None, classifier_dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder or {}
        self.classifier_dropout = classifier_dropout

    @property
    def hidden_size(self) -> int:
        """The encoder's width."""
        return int(self.encoder.get("hidden_size", 0))

    @property
    def max_position_embeddings(self) -> int | None:
        """The encoder's position limit (what the tokenizer and engine bound lengths by)."""
        return self.encoder.get("max_position_embeddings")


class MeanPoolingClassifier(PreTrainedModel):
    """Encoder → masked mean of the token states → dropout → linear layer over the labels."""

    config_class = MeanPoolingConfig
    base_model_prefix = "encoder"

    def __init__(self, config: MeanPoolingConfig) -> None:
        super().__init__(config)
        encoder_config = AutoConfig.for_model(**config.encoder)
        # the dtype being loaded (from_pretrained(dtype=...) sets the default while building),
        # not the one saved in the encoder's config: a bfloat16 load must not keep it float32
        self.encoder = _without_pooler(
            AutoModel.from_config, encoder_config, dtype=torch.get_default_dtype()
        )
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(encoder_config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.classifier:
            module.weight.data.normal_(mean=0.0, std=0.02)
            module.bias.data.zero_()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """Logits (and the cross-entropy loss when ``labels`` are given)."""
        encoded = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            encoded["token_type_ids"] = token_type_ids
        states = self.encoder(**encoded).last_hidden_state
        if attention_mask is None:
            pooled = states.mean(dim=1)
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @classmethod
    def from_encoder(
        cls, base_model: str, label_names: list[str], revision: str | None = None
    ) -> MeanPoolingClassifier:
        """The pretrained encoder ``base_model`` with a fresh mean-pooling head."""
        encoder = _without_pooler(AutoModel.from_pretrained, base_model, revision=revision)
        config = MeanPoolingConfig(
            encoder=encoder.config.to_dict(),
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
        model = cls(config)
        model.encoder.load_state_dict(encoder.state_dict())
        return model


def _without_pooler(load, *args, **kwargs):
    """``load`` an encoder without its pooler layer where it has one (BERT's is unused here)."""
    try:
        return load(*args, add_pooling_layer=False, **kwargs)
    except TypeError:  # an encoder without a pooler option (DistilBERT, ...)
        return load(*args, **kwargs)


def mean_pooled_checkpoint(base_model: str, revision: str | None = None) -> bool:
    """Whether ``base_model`` is a sentence-transformers checkpoint trained for mean pooling."""
    local = Path(base_model)
    if local.is_dir():
        path = local / "1_Pooling" / "config.json"
        if not path.is_file():
            return False
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(
                hf_hub_download(base_model, "1_Pooling/config.json", revision=revision or None)
            )
        except Exception:  # not on the Hub as a sentence-transformers model, or offline
            return False
    try:
        return bool(json.loads(path.read_text()).get("pooling_mode_mean_tokens"))
    except (OSError, ValueError):
        return False


AutoConfig.register(MODEL_TYPE, MeanPoolingConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MeanPoolingConfig, MeanPoolingClassifier, exist_ok=True)
