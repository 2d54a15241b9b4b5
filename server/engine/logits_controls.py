"""One decode step's token choice with the controls of vLLM and the OpenAI API, row by row:
repetition, presence and frequency penalties, logit bias, EOS held back until min_tokens, the grammar mask
of a guided request; then selection (hotlora.server.engine.sampling) and log-probabilities.

Log-probabilities are those of the model's own distribution (before penalties, bias, masks and
temperature), as vLLM reports them by default. Rows without controls cost nothing here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hotlora.server.engine.guided import mask_rows
from hotlora.server.engine.sampling import SamplingParams, select_tokens

MAX_LOGPROBS = 20  # as the OpenAI API: top_logprobs at most 20


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability, its rank (1 = most likely) and the `k` most likely tokens."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int = 1


def choose_tokens(
    logits: torch.Tensor, reqs: list, gens: list[torch.Generator], eos_ids: set[int]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [B, V]; reqs: the rows' GenerationRequests -> one token per row and its logprob entry
    (None where the request did not ask for logprobs). Guided rows' matchers advance by the token."""
    logits = logits.float().cpu()
    params: list[SamplingParams] = [r.params for r in reqs]
    want = [p.logprobs is not None for p in params]
    logprobs = torch.log_softmax(logits, dim=-1) if any(want) else None
    guided = [i for i, r in enumerate(reqs) if r.matcher is not None]
    controlled = [i for i, p in enumerate(params) if _has_controls(p, len(reqs[i].output_ids))]
    if controlled or guided:
        logits = logits.clone()  # the caller's tensor stays as the model produced it
        for i in controlled:
            _apply_controls(logits[i], reqs[i], eos_ids)
        mask_rows(logits, guided, [reqs[i].matcher for i in guided])
        for i in guided + controlled:
            if not torch.isfinite(logits[i]).any():  # nothing allowed (a grammar in error): end the row
                logits[i, next(iter(eos_ids), 0)] = 0.0
    tokens = select_tokens(logits, params, gens)
    for i in guided:
        reqs[i].matcher.accept(tokens[i])
    entries: list[TokenLogprob | None] = [None] * len(reqs)
    if logprobs is not None:
        for i, p in enumerate(params):
            if want[i]:
                entries[i] = _entry(logprobs[i], tokens[i], p.logprobs)
    return tokens, entries


def _has_controls(p: SamplingParams, generated: int) -> bool:
    return bool(p.penalized or p.logit_bias or generated < p.min_tokens)


def _apply_controls(row: torch.Tensor, req, eos_ids: set[int]) -> None:
    """row: [V] float32, changed in place."""
    p: SamplingParams = req.params
    vocab = row.shape[0]
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.prompt_ids) | set(req.output_ids)), dtype=torch.int64)
        seen = seen[seen < vocab]
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and req.output_ids:
        counts = torch.bincount(torch.tensor(req.output_ids, dtype=torch.int64), minlength=vocab)[:vocab]
        row -= p.frequency_penalty * counts.float() + p.presence_penalty * (counts > 0).float()
    for token_id, bias in p.logit_bias:
        if token_id < vocab:
            row[token_id] += bias
    if len(req.output_ids) < p.min_tokens and not p.ignore_eos:
        for token_id in (*eos_ids, *p.stop_token_ids):
            if token_id < vocab:
                row[token_id] = float("-inf")


def record_prompt_logprobs(req, logits: torch.Tensor, start: int) -> None:
    """logits: [n, V], the model's output at prompt positions start .. start+n-1; position p scores prompt
    token p+1. Positions already recorded (a preempted request computes them again) are skipped."""
    lp = torch.log_softmax(logits.float().cpu(), dim=-1)
    prompt, k = req.prompt_ids, req.params.prompt_logprobs
    for i in range(lp.shape[0]):
        p = start + i
        if p == len(req.prompt_logprobs) and p + 1 < len(prompt):
            req.prompt_logprobs.append(_entry(lp[i], prompt[p + 1], k))


def _entry(logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    top: tuple[tuple[int, float], ...] = ()
    if k:
        values, ids = torch.topk(logprobs, min(k, logprobs.shape[0]))
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    chosen = logprobs[token_id]
    return TokenLogprob(token_id, float(chosen), top, int((logprobs > chosen).sum()) + 1)
