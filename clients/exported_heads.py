"""Load a classification adapter exported from hotlora and compute what the server's Classify computes,
with transformers and PEFT alone (no server, no hotlora.server import).

A head on the last token's final hidden state (every LORA and LORA_PROGRESSIVE head, a hand-picked
HEAD_ONLY, an AUTO head on those features) loads with stock PEFT and needs nothing from here:

    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=N, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, DIR)

AUTO may promote a head on other features: the mean over the text's tokens and/or an earlier layer's state.
Its export says so (`head_config.json`, a README.md, and GetAdapter's `export_loader`). PEFT's classifier
applies the head to the last token's final state whatever the file says, so load such a head here:

    from hotlora.clients.exported_heads import load_classifier

    clf = load_classifier(DIR, BASE)
    probs = clf.probabilities(["great film", "dull"])  # [texts, labels], columns in the head's row order

`load_classifier` builds the same PeftModel, runs it with `output_hidden_states=True`, takes
`hidden_states[layer]` (transformers' index: k is the residual stream after decoder layer k, -1 the last
state, after the final norm), pools it (the last token's state or the mean over the text's tokens) and
applies the adapter's `score` head and a softmax, as the server does. Texts are tokenized as Classify does:
`tokenizer(text)` with the base model's tokenizer, no chat template. For any head, also one PEFT
reproduces, the probabilities equal the server's (to about 1e-6 in float32).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hotlora.adapters.head_features import HEAD_FILE, HeadFeatures  # pure Python: no torch, no server


def read_head_features(adapter_dir: str | os.PathLike[str], num_layers: int) -> HeadFeatures:
    """What an exported head reads: its head_config.json (checked against the base model's
    `num_layers`), or the last token's final state without one."""
    path = Path(adapter_dir) / HEAD_FILE
    return HeadFeatures.from_bytes(path.read_bytes(), num_layers) if path.exists() else HeadFeatures()


class ExportedClassifier:
    """An exported SEQ_CLS adapter on its base model, computing the features its head was trained on."""

    def __init__(self, model, tokenizer, features: HeadFeatures):
        self.model = model
        """The PeftModel (AutoModelForSequenceClassification + the adapter), in eval mode."""
        self.tokenizer = tokenizer
        self.features = features

    @property
    def head(self):
        """The adapter's classification head (PEFT's copy of the base model's `score`)."""
        return self.model.base_model.model.score

    def logits(self, token_ids: list[list[int]]):
        """[texts, labels] logits of the head on its features; `token_ids` one list per text."""
        import torch

        if not token_ids or any(not ids for ids in token_ids):
            raise ValueError("give at least one text, each of at least one token")
        device = next(self.model.parameters()).device
        lengths = torch.tensor([len(ids) for ids in token_ids], device=device)
        width = int(lengths.max())
        pad = self.model.config.pad_token_id or 0
        ids = torch.tensor([list(x) + [pad] * (width - len(x)) for x in token_ids], device=device)
        mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()  # right-padded
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            states = out.hidden_states[self.features.layer]  # [texts, width, hidden]
            if self.features.pooling == "mean":  # over the text's tokens, not the padding
                real = mask[..., None].to(states.dtype)
                pooled = (states * real).sum(1) / real.sum(1)
            else:
                pooled = states[torch.arange(len(token_ids), device=device), lengths - 1]
            return self.head(pooled)

    def probabilities(self, texts: list[str]):
        """[texts, labels] class probabilities, as the server's Classify returns them (float32)."""
        import torch

        ids = [self.tokenizer(t)["input_ids"] for t in texts]
        return torch.softmax(self.logits(ids).float(), dim=-1)


def load_classifier(
    adapter_dir: str | os.PathLike[str],
    base_model: Any,
    *,
    tokenizer: Any = None,
    dtype: Any = None,
    **from_pretrained: Any,
) -> ExportedClassifier:
    """The exported adapter in `adapter_dir` on `base_model` (a name or path for
    `AutoModelForSequenceClassification.from_pretrained`, or such a model already built), computing its
    head's features. `dtype` defaults to float32 (the server's figures to compare with); `tokenizer`
    defaults to the base model's when `base_model` is a name or path."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if isinstance(base_model, str | os.PathLike):
        base = AutoModelForSequenceClassification.from_pretrained(
            base_model, num_labels=_num_labels(adapter_dir), dtype=dtype or torch.float32, **from_pretrained
        )
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(base_model)
    else:
        base = base_model
    if tokenizer is None:
        raise ValueError("give a tokenizer when base_model is a model rather than a name or path")
    features = read_head_features(adapter_dir, base.config.num_hidden_layers)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return ExportedClassifier(model, tokenizer, features)


def _num_labels(adapter_dir: Path) -> int:
    """Rows of the exported head (the `score` weight saved as a module to save)."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if key.endswith("score.weight"):
                return f.get_slice(key).get_shape()[0]
    raise ValueError(f"{adapter_dir} holds no classification head (score.weight): not a SEQ_CLS adapter")
