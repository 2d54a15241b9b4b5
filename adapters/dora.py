"""DoRA (weight-decomposed LoRA, PEFT `use_dora=True`) at inference, as PEFT's `DoraLinearLayer` computes it.

PEFT's forward for a module with weight W [out, in], bias b, LoRA A [r, in], B [out, r], scale s and magnitude
m [out] is `y = g ⊙ (W x + s·B A x) + b` with `g = m / ||W + s·B A||` -- the norm of each output row of the
adapted weight (`torch.linalg.norm(W + s·BA, dim=1)`, the "column norm" of its transpose), detached. It
depends on nothing but the weights, so it is computed once when the adapter is installed into a slot (a
per-slot vector over the output channels), and a step applies it to the rows of DoRA adapters after the
ordinary LoRA update: `y ← (y − b) ⊙ g[slot] + b`."""

from __future__ import annotations

import torch


def magnitude_scale(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor
) -> torch.Tensor:
    """g [out] = magnitude / ||weight + scale·b@a|| over each output row (float32). weight: [out, in]."""
    adapted = weight.to(torch.float32) + scale * (b.to(torch.float32) @ a.to(torch.float32))
    norm = torch.linalg.norm(adapted, dim=1)
    return magnitude.to(torch.float32) / norm


def scale_rows(y: torch.Tensor, rows: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None) -> None:
    """In place: y[rows] = (y[rows] − bias) ⊙ g + bias. rows: [n] int64, g: [n, out] float32."""
    picked = y.index_select(0, rows).to(torch.float32)
    if bias is None:
        picked.mul_(g)
    else:
        b = bias.to(torch.float32)
        picked.sub_(b).mul_(g).add_(b)
    y.index_copy_(0, rows, picked.to(y.dtype))


def scale_all_rows(
    y: torch.Tensor, token_slots: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """The same for every row at once, reading nothing back (a captured CUDA graph's step): rows of no
    slot or of a plain LoRA slot have g = 1. scales: [S, out] float32 (ones where no DoRA)."""
    g = scales.index_select(0, token_slots.clamp(min=0))
    g = torch.where((token_slots >= 0).unsqueeze(1), g, torch.ones_like(g))
    out = y.to(torch.float32)
    if bias is None:
        out.mul_(g)
    else:
        b = bias.to(torch.float32)
        out.sub_(b).mul_(g).add_(b)
    y.copy_(out.to(y.dtype))
