"""Token selection for one decode step, on the device that holds the logits: greedy rows by argmax,
sampled rows by temperature, top-k and top-p in one batched pass, each drawing from its own generator so
a seed reproduces the same text whatever the batch. Nothing is read back here: the token ids stay on the
device until the step reads them with the log-probabilities (logits_controls.choose_tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hotlora.server.engine.device_io import read_back, tensor_on


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


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A row's own generator on the device its logits are on (seeded, or from fresh entropy)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample_on_device(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]
) -> torch.Tensor:
    """logits: [B, V] float32 -> [B] int64 token ids on the same device, nothing read back.

    A sampled row divides its logits (shifted so their max is 0) by its temperature, keeps its top_k
    largest (0 = all) and of those the smallest prefix of the sorted probabilities whose mass reaches top_p,
    and picks token i with probability p_i by the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1)
    drawn from the row's generator (one draw per vocabulary entry and step, whatever the batch)."""
    tokens = logits.argmax(dim=-1)
    picked = [i for i, p in enumerate(params) if not p.greedy]
    if not picked:
        return tokens
    device, vocab = logits.device, logits.shape[1]
    chosen = [params[i] for i in picked]
    rows = tensor_on(picked, torch.int64, device)
    temps = tensor_on([p.temperature for p in chosen], torch.float32, device)
    # shift the max to 0 first: a tiny temperature then gives -inf, never inf (inf/inf = NaN in softmax)
    x = logits.index_select(0, rows)
    x = (x - x.max(dim=-1, keepdim=True).values) / temps[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in chosen]
    top_p = [p.top_p if 0.0 < p.top_p < 1.0 else 1.0 for p in chosen]
    order = None
    if any(k < vocab for k in top_k) or any(q < 1.0 for q in top_p):
        x, order = torch.sort(x, dim=-1, descending=True, stable=True)
        ranks = torch.arange(vocab, device=device)
        x = x.masked_fill(ranks[None, :] >= tensor_on(top_k, torch.int64, device)[:, None], float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if order is not None and any(q < 1.0 for q in top_p):
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(mass_before >= tensor_on(top_p, torch.float32, device)[:, None], 0.0)
    race = torch.empty_like(probs)
    for j, i in enumerate(picked):
        race[j].exponential_(generator=gens[i])
    choice = (probs / race.clamp_min_(1e-30)).argmax(dim=-1)
    if order is not None:
        choice = order.gather(1, choice[:, None]).squeeze(1)
    return tokens.index_copy_(0, rows, choice)


def select_tokens(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]
) -> list[int]:
    """logits: [B, V] -> one token per row (sample_on_device, then one read)."""
    return read_back(sample_on_device(logits.float(), params, gens))
