"""Batches for the kernel tests: adapter popularity patterns, mixed ranks, base-only rows (punica style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hotlora.kernels import LoraBackend

POPULARITY = ("distinct", "uniform", "zipf", "identical", "skewed")
MIXED_RANKS = (4, 8, 16, 64, 0, 16)  # slot 4 is empty: its tokens must get nothing
R_MAX = 64
# max |result - reference| <= ATOL + RTOL * |reference| (reference: fp32 math on the same inputs)
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1e-1, 2e-2),
}


@dataclass
class LoraCase:
    x: torch.Tensor  # [T, H_in]
    y: torch.Tensor  # [T, H_total]
    lora_a: torch.Tensor  # [S, R_max, H_in]
    lora_b: torch.Tensor  # [S, H_out, R_max]
    scales: torch.Tensor  # [S]
    token_slots: torch.Tensor  # [T]
    slot_ranks: torch.Tensor  # [S]

    def plan(self, backend: LoraBackend):
        return backend.plan(self.token_slots, self.slot_ranks)


def popularity_slots(pattern: str, num_tokens: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """[T] slot per token, grouped by request as in prefill (use shuffle_tokens to mix them)."""
    if pattern == "distinct":
        slots = torch.arange(num_tokens) % num_slots
    elif pattern == "uniform":
        slots = torch.randint(0, num_slots, (num_tokens,), generator=gen)
    elif pattern == "zipf":
        weights = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.5
        slots = torch.multinomial(weights, num_tokens, replacement=True, generator=gen)
    elif pattern == "identical":
        slots = torch.full((num_tokens,), 3)
    elif pattern == "skewed":  # one hot adapter, a few one-token segments
        slots = torch.full((num_tokens,), 1)
        slots[torch.randperm(num_tokens, generator=gen)[:3]] = torch.tensor([0, 3, 5])
    else:
        raise ValueError(pattern)
    return torch.sort(slots, stable=True).values if pattern != "distinct" else slots


def make_case(
    token_slots: torch.Tensor,
    h_in: int = 40,
    h_out: int = 72,
    dtype: torch.dtype = torch.float32,
    ranks: tuple[int, ...] = MIXED_RANKS,
    out_pad: tuple[int, int] = (0, 0),
    device: str = "cpu",
    seed: int = 0,
) -> LoraCase:
    """Random banks whose padding beyond each slot's rank is NaN: reading it (paying for it) shows up."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = len(ranks)
    a = torch.randn(num_slots, R_MAX, h_in, generator=gen) * 0.2
    b = torch.randn(num_slots, h_out, R_MAX, generator=gen) * 0.2
    for s, r in enumerate(ranks):
        a[s, r:] = float("nan")
        b[s, :, r:] = float("nan")
    num_tokens = token_slots.shape[0]
    x = torch.randn(num_tokens, h_in, generator=gen)
    y = torch.randn(num_tokens, out_pad[0] + h_out + out_pad[1], generator=gen)
    scales = torch.rand(num_slots, generator=gen) + 0.5
    return LoraCase(
        x.to(device, dtype),
        y.to(device, dtype),
        a.to(device, dtype),
        b.to(device, dtype),
        scales.to(device),
        token_slots.to(device, torch.int64),
        torch.tensor(ranks, dtype=torch.int64),
    )


def assert_matches_reference(result: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCE[result.dtype]
    assert result.shape == expected.shape
    assert not torch.isnan(result).any(), "NaN in the result: padding beyond a slot's rank was read"
    err = (result.float() - expected.float()).abs()
    bound = atol + rtol * expected.float().abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds tolerance (atol={atol}, rtol={rtol})"
