"""Token selection for one decode step: greedy rows together, sampled rows each with
their own seeded generator so a seed reproduces the same text whatever the batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate past EOS until max_new_tokens (benchmarks)
    # the controls of vLLM and the OpenAI API (hotlora.server.engine.logits_controls applies them)
    logprobs: int | None = None  # None = off; k = the chosen token's log-probability and the top k
    prompt_logprobs: int | None = None  # the same for each prompt token after the first
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # prompt and generated tokens: logit / p if > 0, else logit * p
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are generated
    stop_token_ids: tuple[int, ...] = ()  # finish ("stop") on any of these; its text is not emitted
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    guided: Any = None  # a hotlora.server.engine.guided.GuidedSpec: the output must match it

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample_row(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """logits: [V] float32 on CPU -> one token id (temperature, then top-k, then top-p)."""
    # shift the max to 0 first: a tiny temperature then gives -inf, never inf (inf/inf = NaN in softmax)
    logits = (logits - logits.max()) / params.temperature
    if params.top_k and params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = cum - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=gen)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=gen))


def select_tokens(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]
) -> list[int]:
    """logits: [B, V] -> one token per row."""
    logits = logits.float().cpu()
    out = torch.argmax(logits, dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = sample_row(logits[i], p, gens[i])
    return out
