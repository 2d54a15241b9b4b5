"""The validated, in-memory form of one adapter version: host float32 tensors ready for the slot banks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hotlora.adapters.head_features import HeadFeatures

TASKS = ("CAUSAL_LM", "SEQ_CLS")


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: `delta_W = scale * b @ a`, so `y += scale * (x @ a.T) @ b.T`."""

    a: torch.Tensor
    """[r, in] float32, contiguous."""
    b: torch.Tensor
    """[out, r] float32, contiguous."""
    scale: float
    """lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (per-module r/alpha from the patterns)."""
    magnitude: torch.Tensor | None = None
    """DoRA (PEFT use_dora): [out] float32, the magnitude vector m; the layer then computes
    `m / ||W + scale·b@a||_row · (W + scale·b@a) x` (adapters/dora.py). None: plain LoRA."""

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta_weight(self) -> torch.Tensor:
        """[out, in]: what merging this module would add to the base weight."""
        return self.scale * (self.b @ self.a)


@dataclass(frozen=True)
class LoraWeights:
    task: str
    """"CAUSAL_LM" or "SEQ_CLS"."""
    rank: int
    """Largest rank over the modules."""
    alpha: float
    """The config's `lora_alpha` (per-module scales already include the patterns)."""
    target_modules: tuple[str, ...]
    """Short names that carry weights in at least one layer, sorted."""
    modules: dict[tuple[int, str], LoraModule] = field(hash=False)
    """(layer index, short name) -> weights."""
    head_weight: torch.Tensor | None = field(default=None, hash=False)
    """[num_labels, hidden] float32 for SEQ_CLS."""
    head_bias: torch.Tensor | None = field(default=None, hash=False)
    """[num_labels] float32, or None (Llama's `score` has no bias)."""
    labels: tuple[str, ...] = ()
    """Label names in head-row order: the upload's labels, or LABEL_0..N-1."""
    head_features: HeadFeatures = HeadFeatures()
    """What the head reads (`head_config.json`; the last token of the last layer without one)."""

    @property
    def is_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def num_labels(self) -> int:
        return 0 if self.head_weight is None else int(self.head_weight.shape[0])

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.modules}))

    @property
    def nbytes(self) -> int:
        """Host bytes of all tensors: what the host cache charges for this adapter."""
        total = sum(
            m.a.nbytes + m.b.nbytes + (0 if m.magnitude is None else m.magnitude.nbytes)
            for m in self.modules.values()
        )
        for t in (self.head_weight, self.head_bias):
            if t is not None:
                total += t.nbytes
        return total
