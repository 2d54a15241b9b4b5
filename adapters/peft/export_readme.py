"""The README.md an export carries when stock PEFT does not reproduce the adapter: a classification head on
other features than PEFT's classifier reads (the last token's final state). It says so, names the loader
that reproduces the server's outputs (hotlora.clients.exported_heads) and how it computes the features.
Uploads ignore a README.md, so an export uploads back as it is."""

from __future__ import annotations

import json

from hotlora.adapters.head_features import EXPORT_LOADER, HeadFeatures

README_FILE = "README.md"


def export_readme(features: HeadFeatures, labels: tuple[str, ...], config: bytes) -> bytes | None:
    """The README.md for an export whose head reads `features` (None when PEFT alone reproduces it);
    `config` is the export's adapter_config.json (its base model's name is shown)."""
    if features.peft_computes:
        return None
    try:
        base = json.loads(config).get("base_model_name_or_path") or "BASE_MODEL"
    except (ValueError, AttributeError):
        base = "BASE_MODEL"
    pooled = (
        "take the mean over the text's tokens"
        if features.pooling == "mean"
        else "take the last token's state"
    )
    rows = ", ".join(labels) if labels else "(not recorded)"
    text = f"""# A classification head on {features.describe()}

Stock PEFT does not reproduce this adapter. `PeftModel.from_pretrained` on
`AutoModelForSequenceClassification` applies the head (`score`) to the last token's final hidden state,
but this head was trained and is served on other features: {features.describe()}
(`head_config.json`: pooling `{features.pooling}`, layer `{features.layer}`, an index of transformers'
`output_hidden_states`; -1 is the last state, after the final norm).

Load it with hotlora's loader, which needs transformers and PEFT, not the server:

```python
from {EXPORT_LOADER} import load_classifier

clf = load_classifier("path/to/this/directory", "{base}")
probs = clf.probabilities(["first text", "second text"])  # one row per text, one column per label
```

It gives the server's Classify probabilities (float32: to about 1e-6) on the weights the server serves:
`"{base}"` stands for its `--model` directory, or for hotlora's embedded default model the directory
`hotlora prepare-model` prints (the GGUF weights, dequantized; the hub's original weights differ).

Without hotlora: run the PEFT model with `output_hidden_states=True` on `tokenizer(text)["input_ids"]`
(no chat template), take `hidden_states[{features.layer}]`, {pooled}, apply the `score` head, then a
softmax.

Labels, in the order of the head's rows: {rows}
"""
    return text.encode()
