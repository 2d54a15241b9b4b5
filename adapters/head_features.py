"""Which hidden state a classification head reads: pooled how (the last token, or the mean over the text's
tokens) and from which layer. Trained heads carry their choice; Classify computes exactly those features.

The layer is an index into transformers' `output_hidden_states` tuple: k (1..num_layers-1) is the
residual stream after decoder layer k, and -1 (the default) the last state, after the final norm — what
every head read before feature choices existed (and what PEFT's `score` head reads). A head that reads
anything else carries `head_config.json` beside its weights; a head without one reads the default."""

from __future__ import annotations

import json
from dataclasses import dataclass

from hotlora.adapters.errors import FailedPrecondition, InvalidArgument

HEAD_FILE = "head_config.json"
EXPORT_LOADER = "hotlora.clients.exported_heads"
"""The module that loads an exported head PEFT's classifier does not reproduce (importable without the
server: it needs transformers and PEFT only)."""
POOLINGS = ("last", "mean")
LAST_LAYER = -1
UPPER_MIDDLE = 0.6
"""Where the middle-layer head reads, as a share of the depth. Measured on SmolLM2-135M (30 layers): 5-fold
accuracy of a head on every layer's features, 80 examples per task (se about 0.04). A topic task scored
0.94-1.00 on every layer (nothing to choose); a word-order task ("The fox bit the owl.", which animal acted)
scored 0.80-0.93 with last-token features, best at layers 17-18 (0.91, 0.93), 0.84 at 22-24 and 0.81 on
the last, while mean pooling was flat (0.75-0.88). So not 3/4 of the depth but about 0.6 (layer 18 of 30);
one task decides it, and AUTO keeps whichever of the four choices scores best anyway."""


@dataclass(frozen=True)
class HeadFeatures:
    pooling: str = "last"
    """"last": the last token's state; "mean": the mean over the text's tokens."""
    layer: int = LAST_LAYER
    """An `output_hidden_states` index: 1..num_layers-1, or -1 for the last (final-norm) state."""

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise InvalidArgument(f"head pooling {self.pooling!r} is not supported; allowed: last, mean")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < LAST_LAYER:
            raise InvalidArgument(f"head layer must be -1 (the last) or a layer index, got {self.layer!r}")
        if self.layer == 0:
            raise InvalidArgument("head layer 0 (the token embeddings) is not supported; use 1.. or -1")

    @property
    def is_default(self) -> bool:
        return self == HeadFeatures()

    @property
    def peft_computes(self) -> bool:
        """Whether stock PEFT computes these features: `AutoModelForSequenceClassification` applies its
        `score` head to the last token's final state, so an exported head on them loads with
        `PeftModel.from_pretrained` alone; a head on others needs `hotlora.clients.exported_heads`."""
        return self.is_default

    @property
    def export_loader(self) -> str:
        """Empty when stock PEFT reproduces an export of a head on these features, else the loader."""
        return "" if self.peft_computes else EXPORT_LOADER

    def describe(self, num_layers: int | None = None) -> str:
        pool = "last token" if self.pooling == "last" else "mean pooling"
        if self.layer == LAST_LAYER:
            return f"{pool}, last layer"
        return f"{pool}, layer {self.layer}" + (f"/{num_layers}" if num_layers else "")

    def to_bytes(self) -> bytes:
        return json.dumps({"pooling": self.pooling, "layer": self.layer}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, num_layers: int) -> HeadFeatures:
        """Parse `head_config.json` (hostile input) and check the layer against the base model; the last
        layer by number is normalised to -1, so equal features compare equal."""
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InvalidArgument(f"{HEAD_FILE} is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(raw, dict) or set(raw) - {"pooling", "layer"}:
            raise InvalidArgument(f'{HEAD_FILE} must be a JSON object with "pooling" and "layer" only')
        features = cls(raw.get("pooling", "last"), raw.get("layer", LAST_LAYER))
        if features.layer > num_layers:
            raise FailedPrecondition(
                f"{HEAD_FILE} reads layer {features.layer}, but the base model has layers 1..{num_layers}"
            )
        if features.layer == num_layers:
            return cls(features.pooling, LAST_LAYER)
        return features


def upper_middle_layer(num_layers: int) -> int:
    """The middle-layer choice AUTO compares (an `output_hidden_states` index below the last)."""
    return min(max(1, round(UPPER_MIDDLE * num_layers)), max(1, num_layers - 1))


def auto_choices(num_layers: int) -> tuple[HeadFeatures, ...]:
    """The head features AUTO compares, cheapest to explain first: last token and mean pooling, on the
    last layer and on the upper-middle one."""
    mid = upper_middle_layer(num_layers)
    layers = (LAST_LAYER, mid) if num_layers > 1 else (LAST_LAYER,)
    return tuple(HeadFeatures(p, layer) for layer in layers for p in POOLINGS)
