"""A sentiment classifier on real weights: all-MiniLM-L6-v2 + a linear probe.

The sentence embedding is the one sentence-transformers computes for all-MiniLM-L6-v2
(mean of the token states over the attention mask, then L2 normalisation); a linear
layer (384 → 2, label 0 = negative, 1 = positive) trained by
``scripts/search_minilm_suffix.py`` reads it. The module names mirror
``BertForSequenceClassification`` (``bert``, ``classifier``) so the BERT adapter gives
it canonical sites, ``logits`` included.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from model_forensics.models.local import load_local
from model_forensics.models.reference import LoadedModel, ModelRef, tag_model

LABELS = ("negative", "positive")
PROBE_PATH = Path(__file__).resolve().parents[1] / "scenarios" / "data" / "minilm_probe.safetensors"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, D) over the tokens where ``attention_mask`` (B, T) is 1 → (B, D)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class MiniLMSentiment(nn.Module):
    """BertModel → mean pooling → L2 normalisation → ``nn.Linear(384, 2)``.

    ``forward(input_ids, attention_mask, token_type_ids=None)`` returns an output whose
    ``.logits`` is (B, 2): column 0 negative, column 1 positive.
    """

    def __init__(self, bert: nn.Module, classifier: nn.Linear | None = None):
        super().__init__()
        self.bert = bert
        hidden = int(bert.config.hidden_size)  # type: ignore[union-attr, arg-type]
        self.classifier = classifier if classifier is not None else nn.Linear(hidden, len(LABELS))
        # The adapter dispatches on config.model_type ("bert").
        self.config = bert.config

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sentence embeddings (B, 384), unit length, as sentence-transformers computes them."""
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, T, 384)
        return F.normalize(mean_pool(hidden, attention_mask), p=2, dim=-1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.classifier(self.embed(input_ids, attention_mask, token_type_ids)))


@torch.no_grad()
def predict_positive(loaded: LoadedModel, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """P(positive) for each text, shape (N,)."""
    probs = []
    for start in range(0, len(texts), batch_size):
        enc = loaded.tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True)
        logits = loaded.model(**enc).logits  # (B, 2)
        probs.append(logits.softmax(dim=-1)[:, 1])
    return torch.cat(probs) if probs else torch.empty(0)


def load_minilm_sentiment(probe_path: Path | str = PROBE_PATH) -> LoadedModel:
    """all-MiniLM-L6-v2 with the trained sentiment probe attached, in eval mode.

    Raises:
        ModelLoadError: MiniLM is not installed (see :func:`model_forensics.models.load`).
        FileNotFoundError: ``probe_path`` does not exist; run scripts/search_minilm_suffix.py.
    """
    from safetensors.torch import load_file

    base = load_local("minilm")
    model = MiniLMSentiment(base.model)
    state = load_file(str(probe_path))
    model.classifier.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
    model.eval()
    ref = ModelRef(name="minilm-sentiment", source="local", reference="minilm-sentiment")
    tag_model(model, ref)
    return LoadedModel(model, base.tokenizer, ref)
