"""One decode step's token choice with the controls of vLLM and the OpenAI API: repetition, presence and
frequency penalties, logit bias, EOS held back until min_tokens, the grammar mask of a guided request;
then selection (hotlora.server.engine.sampling) and log-probabilities.

Everything runs on the device that holds the logits, batched over the rows that ask for it: each control
is a few gathers and scatters over the controlled rows, its per-row numbers built on the host from the
requests and sent over (`device_io.tensor_on`). The host reads one tensor back per step: the token ids and
the log-probabilities asked for, packed together (`choose_tokens`, and the prompt log-probabilities of
`record_prompt_logprobs` ride in the same read).

Log-probabilities are those of the model's own distribution (before penalties, bias, masks and
temperature), as vLLM reports them by default. Rows without controls cost nothing here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hotlora.server.engine.device_io import read_back, tensor_on
from hotlora.server.engine.guided import mask_rows
from hotlora.server.engine.sampling import SamplingParams, sample_on_device

MAX_LOGPROBS = 20  # as the OpenAI API: top_logprobs at most 20


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability, its rank (1 = most likely) and the `k` most likely tokens."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int = 1


@dataclass(frozen=True)
class PendingRead:
    """Numbers on the device a step needs on the host, read with the step's tokens in one read:
    `then(values)` gets `values` (the tensor's elements as Python floats, in order)."""

    values: torch.Tensor  # float64, any shape
    then: Callable[[list[float]], None]


def choose_tokens(
    logits: torch.Tensor,
    reqs: list,
    gens: list[torch.Generator],
    eos_ids: set[int],
    also: Sequence[PendingRead] = (),
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [B, V] on the device; reqs: the rows' GenerationRequests -> one token per row and its logprob
    entry (None where the request did not ask for logprobs). Guided rows' matchers advance by the token.
    `also`: other reads of this step, made in the same one."""
    logits = logits.float()
    params: list[SamplingParams] = [r.params for r in reqs]
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    model_logprobs = rows = None
    if want:  # the model's own distribution, before the controls change the logits
        rows = tensor_on(want, torch.int64, logits.device)
        model_logprobs = torch.log_softmax(logits.index_select(0, rows), dim=-1)
    guided = [i for i, r in enumerate(reqs) if r.matcher is not None]
    controlled = [i for i, p in enumerate(params) if _has_controls(p, len(reqs[i].output_ids))]
    if controlled or guided:
        logits = logits.clone()  # the caller's tensor stays as the model produced it
        if controlled:
            _apply_controls(logits, controlled, [reqs[i] for i in controlled], eos_ids)
        mask_rows(logits, guided, [reqs[i].matcher for i in guided])
        _end_rows_with_nothing_allowed(logits, sorted(set(guided + controlled)), next(iter(eos_ids), 0))
    tokens = sample_on_device(logits, params, gens)
    parts = [PendingRead(tokens.double(), _ignore)]
    if model_logprobs is not None:
        chosen = tokens.index_select(0, rows)
        k = max(params[i].logprobs for i in want)
        parts.append(PendingRead(_logprob_pack(model_logprobs, chosen, k), _ignore))
    values = _read_together([*parts, *also])
    token_ids = [int(t) for t in values[0]]
    entries: list[TokenLogprob | None] = [None] * len(reqs)
    if model_logprobs is not None:
        ks = [params[i].logprobs for i in want]
        for i, entry in zip(want, _entries(values[1], [token_ids[i] for i in want], ks), strict=True):
            entries[i] = entry
    for i in guided:
        reqs[i].matcher.accept(token_ids[i])
    return token_ids, entries


def record_prompt_logprobs(req, logits: torch.Tensor, start: int) -> PendingRead | None:
    """logits: [n, V], the model's output at prompt positions start .. start+n-1; position p scores prompt
    token p+1. Positions already recorded (a preempted request computes them again) are skipped. Returns
    the read that appends the entries (pass it to choose_tokens' `also`, or `read_pending`), or None."""
    prompt, k = req.prompt_ids, req.params.prompt_logprobs
    first = max(len(req.prompt_logprobs) - start, 0)  # the first position not yet recorded
    last = min(logits.shape[0], len(prompt) - 1 - start)  # positions past it score no prompt token
    if first >= last:
        return None
    if start + first != len(req.prompt_logprobs):  # a gap: nothing to record in order
        return None
    lp = torch.log_softmax(logits[first:last].float(), dim=-1)
    targets = prompt[start + first + 1 : start + last + 1]

    def fill(values: list[float]) -> None:
        req.prompt_logprobs.extend(_entries(values, targets, [k] * len(targets)))

    return PendingRead(_logprob_pack(lp, tensor_on(targets, torch.int64, logits.device), k), fill)


def read_pending(reads: Sequence[PendingRead]) -> None:
    """Reads made on their own (a step that samples nothing)."""
    if reads:
        _read_together(reads)


def _read_together(reads: Sequence[PendingRead]) -> list[list[float]]:
    """One read for all: each PendingRead's `then` gets its values; returns them, in order."""
    sizes = [r.values.numel() for r in reads]
    flat = read_back(torch.cat([r.values.reshape(-1) for r in reads]))
    out, at = [], 0
    for r, n in zip(reads, sizes, strict=True):
        values = flat[at : at + n]
        at += n
        r.then(values)
        out.append(values)
    return out


def _logprob_pack(lp: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """lp: [R, V] log-probabilities, chosen: [R] token ids -> [R, 2 + 2k] float64: the chosen token's
    log-probability, its rank, then the k most likely tokens' ids and log-probabilities."""
    picked = lp.gather(1, chosen[:, None])  # [R, 1]
    rank = (lp > picked).sum(dim=-1, keepdim=True) + 1
    cols = [picked.double(), rank.double()]
    if k:
        top = torch.topk(lp, min(k, lp.shape[1]), dim=-1)
        cols += [top.indices.double(), top.values.double()]
    return torch.cat(cols, dim=1)


def _entries(values: list[float], token_ids: list[int], ks: list[int]) -> list[TokenLogprob]:
    """The rows of a _logprob_pack read back, for the chosen `token_ids`; row r keeps the first ks[r] of
    its top tokens."""
    rows = len(token_ids)
    width = len(values) // rows if rows else 0
    k = (width - 2) // 2
    out = []
    for r in range(rows):
        row = values[r * width : (r + 1) * width]
        ids, lps = row[2 : 2 + k], row[2 + k :]
        top = tuple((int(ids[j]), lps[j]) for j in range(min(ks[r], k)))
        out.append(TokenLogprob(token_ids[r], row[0], top, int(row[1])))
    return out


def _ignore(values: list[float]) -> None:
    pass


def _has_controls(p: SamplingParams, generated: int) -> bool:
    return bool(p.penalized or p.logit_bias or generated < p.min_tokens)


def _apply_controls(logits: torch.Tensor, rows: list[int], reqs: list, eos_ids: set[int]) -> None:
    """logits: [B, V] float32, the controlled rows changed in place, each control batched over the rows
    that use it (in the order vLLM applies them: repetition, presence/frequency, bias, min_tokens)."""
    device, vocab = logits.device, logits.shape[1]
    idx = tensor_on(rows, torch.int64, device)
    sub = logits.index_select(0, idx)  # [R, V]
    params: list[SamplingParams] = [r.params for r in reqs]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = [sorted(t for t in set(r.prompt_ids) | set(r.output_ids) if t < vocab) for r in reqs]
        ids = _padded(seen, device)
        factors = [p.repetition_penalty if s else 1.0 for p, s in zip(params, seen, strict=True)]
        penalty = tensor_on(factors, torch.float32, device)[:, None]
        vals = sub.gather(1, ids)
        sub.scatter_(1, ids, torch.where(vals > 0, vals / penalty, vals * penalty))
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        outs = [list(r.output_ids) for r in reqs]
        ids = _padded(outs, device)
        ones = _padded([[1] * len(o) for o in outs], device, pad=0).float()
        counts = torch.zeros_like(sub).scatter_add_(1, ids, ones)
        freq = tensor_on([p.frequency_penalty for p in params], torch.float32, device)[:, None]
        presence = tensor_on([p.presence_penalty for p in params], torch.float32, device)[:, None]
        sub -= freq * counts + presence * (counts > 0).float()
    if any(p.logit_bias for p in params):
        biased = [[(t, b) for t, b in p.logit_bias if t < vocab] for p in params]
        ids = _padded([[t for t, _ in b] for b in biased], device)
        bias = _padded([[b for _, b in row] for row in biased], device, pad=0, dtype=torch.float32)
        sub.scatter_add_(1, ids, bias)
    held = [
        [t for t in (*eos_ids, *p.stop_token_ids) if t < vocab]
        if len(r.output_ids) < p.min_tokens and not p.ignore_eos
        else []
        for r, p in zip(reqs, params, strict=True)
    ]
    if any(held):
        ids = _padded(held, device)  # a row's padding repeats its first held token: masked as well
        holds = tensor_on([bool(h) for h in held], torch.bool, device)[:, None]
        sub.scatter_(1, ids, torch.where(holds, float("-inf"), sub.gather(1, ids)))
    logits.index_copy_(0, idx, sub)


def _padded(rows: list[list], device, pad: int | None = None, dtype=torch.int64) -> torch.Tensor:
    """[R, L] of the rows' lists, each padded to the longest: with `pad`, or by repeating its first entry (a
    gather/scatter then touches that entry again with the same value). A row with nothing gets index 0 and
    the callers' neutral value there."""
    width = max((len(r) for r in rows), default=0) or 1
    out = []
    for r in rows:
        fill = pad if pad is not None else (r[0] if r else 0)
        out.append(list(r) + [fill] * (width - len(r)))
    return tensor_on(out, dtype, device)


def _end_rows_with_nothing_allowed(logits: torch.Tensor, rows: list[int], eos: int) -> None:
    """A row whose every logit is -inf (a grammar in error) ends: its EOS logit becomes 0, and
    `endings.after_token` ends a guided one as ERROR, never as a finished answer. No read: the rows are
    picked on the device."""
    idx = tensor_on(rows, torch.int64, logits.device)
    dead = ~torch.isfinite(logits.index_select(0, idx)).any(dim=-1)
    current = logits[:, eos].index_select(0, idx)
    logits[:, eos].index_copy_(0, idx, torch.where(dead, torch.zeros_like(current), current))
