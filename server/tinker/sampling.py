"""Sampling for the Tinker API: the engine generates, on the base model or on a version saved for sampling
(its weights were offered to the adapter cache's host tier when they were saved, so the first sample needs no
load from disk), batched with every other tenant's traffic.

An `asample` of n samples is n generation requests; their events go to a `SampleCollector`, which finishes
the future when the last one ends (in the engine thread: it only records and encodes)."""

from __future__ import annotations

import math
import threading

from hotlora.adapters.errors import InvalidArgument, ResourceExhausted
from hotlora.server.engine.requests import FinishReason
from hotlora.server.engine.sampling import SamplingParams
from hotlora.server.frontend.inference import GenerateInput
from hotlora.server.tinker import wire
from hotlora.server.tinker.futures import Future, Futures

MAX_SAMPLES = 64  # num_samples of one asample
UNSUPPORTED = {  # SampleRequest fields this server does not compute, and their "off" value
    "topk_prompt_logprobs": 0,
    "topk_sample_logprobs": 0,
    "target_prompt_logprobs": None,
    "prompt_alt_tokens_k": 0,
    "prompt_logprobs_last_n": None,
    "record_stability_info": None,
}


def sampling_params(p: dict, config, prompt_logprobs: bool) -> SamplingParams:
    """The engine's SamplingParams of a Tinker SamplingParams body (the sampled tokens' logprobs always)."""
    max_tokens = p.get("max_tokens")
    max_tokens = config.default_max_new_tokens if max_tokens is None else int(max_tokens)
    if max_tokens < 1:
        raise InvalidArgument(f"sampling_params.max_tokens must be >= 1 (got {max_tokens})")
    if max_tokens > config.max_new_tokens:
        raise InvalidArgument(
            f"sampling_params.max_tokens {max_tokens} is over this server's limit of {config.max_new_tokens} "
            "(--max-new-tokens)"
        )
    temperature = float(p.get("temperature", 1.0))
    top_p = float(p.get("top_p", 1.0))
    top_k = int(p.get("top_k", -1))
    if not math.isfinite(temperature) or not 0 <= temperature <= 100:
        raise InvalidArgument(f"sampling_params.temperature must be in [0, 100] (got {temperature})")
    if not 0 < top_p <= 1:
        raise InvalidArgument(f"sampling_params.top_p must be in (0, 1] (got {top_p})")
    if top_k < -1 or top_k == 0:
        raise InvalidArgument(f"sampling_params.top_k must be -1 (no limit) or >= 1 (got {top_k})")
    seed = p.get("seed")
    if seed is not None and not 0 <= int(seed) < 2**63:
        raise InvalidArgument("sampling_params.seed must be in [0, 2^63)")
    stop = p.get("stop")
    strings: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()
    if isinstance(stop, str):
        strings = (stop,)
    elif stop:
        if all(isinstance(s, str) for s in stop):
            strings = tuple(stop)
        elif all(isinstance(s, int) for s in stop):
            tokens = tuple(stop)
        else:
            raise InvalidArgument(
                "sampling_params.stop is a string, a list of strings or a list of token ids"
            )
    if len(strings) > 16 or any(not s or len(s) > 256 for s in strings) or len(tokens) > 64:
        raise InvalidArgument("sampling_params.stop: at most 16 strings of 1-256 characters or 64 token ids")
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        seed=None if seed is None else int(seed),
        stop=strings,
        ignore_eos=stop is not None,  # a stop given replaces the implicit EOS ([] stops on nothing)
        logprobs=0,
        prompt_logprobs=0 if prompt_logprobs else None,
        stop_token_ids=tokens,
    )


def check_sample_request(body: dict, vocab: int, config) -> tuple[list[int], int]:
    for name, off in UNSUPPORTED.items():
        if body.get(name) not in (off, None, False):
            raise InvalidArgument(f"{name} is not offered by this server (leave it at its default)")
    n = int(body.get("num_samples", 1))
    if not 1 <= n <= MAX_SAMPLES:
        raise InvalidArgument(f"num_samples must be in [1, {MAX_SAMPLES}] (got {n})")
    tokens = prompt_tokens(body.get("prompt") or {})
    if not tokens:
        raise InvalidArgument("prompt has no tokens")
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidArgument(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if len(tokens) > config.max_prompt_tokens:
        raise ResourceExhausted(
            f"the prompt has {len(tokens)} tokens; at most {config.max_prompt_tokens} (--max-prompt-tokens)"
        )
    return tokens, n


def prompt_tokens(model_input: dict) -> list[int]:
    out: list[int] = []
    for chunk in model_input.get("chunks") or ():
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise InvalidArgument(
                f"a prompt chunk of type {chunk.get('type')!r}: only text tokens are served"
            )
        toks = chunk.get("tokens") or []
        if not all(isinstance(t, int) for t in toks):
            raise InvalidArgument("prompt tokens must be integers")
        out += toks
    return out


class SampleCollector:
    """Receives the TokenEvents of n requests (their `events` queue); finishes the future once all end."""

    def __init__(self, futures: Futures, fut: Future, n: int, want_prompt_logprobs: bool):
        self.futures, self.fut, self.n = futures, fut, n
        self.want_prompt_logprobs = want_prompt_logprobs
        self.requests: list = []
        self._lock = threading.Lock()
        self._ended = 0

    def sink(self, i: int):
        collector = self

        class _Sink:
            def put(self, event) -> None:
                if event.finish_reason is not None:
                    collector._ended_one()

        return _Sink()

    def _ended_one(self) -> None:
        with self._lock:
            self._ended += 1
            if self._ended < self.n or len(self.requests) < self.n:
                return
        self._finish()

    def all_submitted(self) -> None:
        with self._lock:
            if self._ended < self.n:
                return
        self._finish()

    def _finish(self) -> None:
        seqs = []
        for req in self.requests:
            reason = req.finish_reason
            if reason is None or not reason.completed:
                why = f": {req.error}" if req.error else ""
                self.futures.fail(self.fut, f"sampling ended {reason}{why}", "server")
                return
            seqs.append(
                wire.Sequence(
                    list(req.output_ids),
                    [float(lp.logprob) for lp in req.output_logprobs],
                    stop=reason != FinishReason.LENGTH,
                )
            )
        prompt = None
        if self.want_prompt_logprobs:
            first = self.requests[0]
            prompt = [None] + [float(lp.logprob) for lp in first.prompt_logprobs]
        self.futures.finish(self.fut, wire.sample_response(seqs, prompt))

    def cancel(self) -> None:
        for req in self.requests:
            req.cancel()


def generate_input(adapter_ref: str, request_id: str) -> GenerateInput:
    return GenerateInput(adapter=adapter_ref, request_id=request_id)
