"""The domain side of inference requests: validation against limits, tokenization,
adapter resolution, submission to the engine, and waiting for results. Shared by the
hotlora.v1 servicer and the KServe servicer; no wire types here."""

from __future__ import annotations

import math
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch

from hotlora.adapters.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from hotlora.server.engine.guided import GrammarEngine, GuidedSpec
from hotlora.server.engine.logits_controls import MAX_LOGPROBS
from hotlora.server.engine.requests import FinishReason, GenerationRequest, PoolingRequest
from hotlora.server.engine.sampling import SamplingParams

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # as the OpenAI API


@dataclass
class GenerateInput:
    adapter: str = ""
    prompt: str = ""
    messages: list[tuple[str, str]] = field(default_factory=list)
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    request_id: str = ""
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 0.0  # 0 = off (as 1.0)
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    guided: GuidedSpec | None = None


@dataclass
class Classified:
    label: str
    score: float
    scores: list[tuple[str, float]]


class BaseModelAdapters:
    """Adapter resolution when no registry is attached: only the base model exists."""

    def resolve(self, tenant: str, ref: str):
        if ref:
            from hotlora.adapters.errors import NotFound

            raise NotFound(f"adapter {ref!r} not found (this server serves the base model only)")
        return None, ""

    def labels(self, handle) -> list[str]:
        raise FailedPrecondition("the base model has no classification head; name a SEQ_CLS adapter")

    def release_unadmitted(self, handle) -> None:
        pass


class InferenceFrontend:
    def __init__(self, engine, tokenizer, config, adapters=None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.adapters = adapters or BaseModelAdapters()
        self.vocab_size = int(engine.runner.config.vocab_size)
        self.grammar = GrammarEngine(tokenizer, self.vocab_size)

    # ---- validation ------------------------------------------------------------
    def _sampling(self, g: GenerateInput) -> SamplingParams:
        cfg = self.config
        n = g.max_new_tokens or cfg.default_max_new_tokens
        if n > cfg.max_new_tokens:
            raise ResourceExhausted(f"max_new_tokens {n} is over this server's limit of {cfg.max_new_tokens}")
        for name, v in (("temperature", g.temperature), ("top_p", g.top_p)):
            if not math.isfinite(v) or v < 0:
                raise InvalidArgument(f"{name} must be a finite number >= 0 (got {v})")
        if g.temperature > 100:
            raise InvalidArgument(f"temperature must be at most 100 (got {g.temperature})")
        if g.top_p > 1:
            raise InvalidArgument(f"top_p must be in [0, 1] (got {g.top_p})")
        if len(g.stop) > 16 or any(len(s) > 256 for s in g.stop):
            raise InvalidArgument("at most 16 stop strings of at most 256 characters each")
        if g.seed is not None and not 0 <= g.seed < 2**63:
            raise InvalidArgument("seed must be in [0, 2^63)")
        top_p = g.top_p if 0 < g.top_p < 1 else 1.0
        self._check_controls(g, n)
        return SamplingParams(
            n,
            g.temperature,
            top_p,
            g.top_k,
            g.seed,
            tuple(s for s in g.stop if s),
            g.ignore_eos,
            logprobs=g.logprobs,
            prompt_logprobs=g.prompt_logprobs,
            presence_penalty=g.presence_penalty,
            frequency_penalty=g.frequency_penalty,
            repetition_penalty=g.repetition_penalty or 1.0,
            min_tokens=g.min_tokens,
            stop_token_ids=tuple(g.stop_token_ids),
            logit_bias=tuple(sorted(g.logit_bias.items())),
            guided=g.guided,
        )

    def _check_controls(self, g: GenerateInput, max_new_tokens: int) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(g, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise InvalidArgument(f"{name} must be in [0, {MAX_LOGPROBS}] (got {k})")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(g, name)
            if not math.isfinite(v) or not -2.0 <= v <= 2.0:
                raise InvalidArgument(f"{name} must be in [-2, 2] (got {v})")
        r = g.repetition_penalty
        if not math.isfinite(r) or not 0.0 <= r <= 10.0:
            raise InvalidArgument(f"repetition_penalty must be in (0, 10], or 0 for off (got {r})")
        if not 0 <= g.min_tokens <= max_new_tokens:
            raise InvalidArgument(
                f"min_tokens must be in [0, max_new_tokens = {max_new_tokens}] (got {g.min_tokens})"
            )
        if len(g.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
        if len(g.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidArgument(f"at most {MAX_LOGIT_BIAS} logit_bias entries")
        for token_id in [*g.stop_token_ids, *g.logit_bias]:
            if not 0 <= token_id < self.vocab_size:
                raise InvalidArgument(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        for token_id, bias in g.logit_bias.items():
            if not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                raise InvalidArgument(f"logit_bias for token {token_id} must be in [-100, 100] (got {bias})")

    def _tokenize_prompt(self, g: GenerateInput) -> list[int]:
        if g.prompt and g.messages:
            raise InvalidArgument("give either prompt or messages, not both")
        if g.messages:
            msgs = []
            if len(g.messages) > 1024:
                raise ResourceExhausted(f"{len(g.messages)} chat messages; at most 1024 are accepted")
            self._check_text("".join(c for _, c in g.messages), "the chat messages")
            for role, content in g.messages:
                if role not in CHAT_ROLES:
                    raise InvalidArgument(f"message role {role!r} is not one of {', '.join(CHAT_ROLES)}")
                msgs.append({"role": role, "content": content})
            if not getattr(self.tokenizer, "chat_template", None):
                raise FailedPrecondition(
                    "this model has no chat template; send `prompt` instead of `messages`"
                )
            try:
                out = self.tokenizer.apply_chat_template(
                    msgs, add_generation_prompt=True, tokenize=True, return_dict=True
                )
            except Exception as exc:  # templates raise on e.g. role order they do not support
                raise InvalidArgument(f"the chat template rejected these messages: {exc}") from None
            ids = list(out["input_ids"])
        elif g.prompt:
            self._check_text(g.prompt, "prompt")
            ids = self.tokenizer(g.prompt)["input_ids"]
        else:
            raise InvalidArgument("a prompt or at least one message is required")
        self._check_length(len(ids), "the prompt")
        return ids

    def _check_text(self, text: str, what: str) -> None:
        # tokens are never fewer than ~chars/32: refuse absurd texts before tokenizing them
        if len(text) > self.config.max_prompt_tokens * 32:
            raise ResourceExhausted(
                f"{what} is {len(text)} characters, far over the {self.config.max_prompt_tokens}-token limit"
            )

    def _check_length(self, n: int, what: str) -> None:
        if n == 0:
            raise InvalidArgument(f"{what} is empty after tokenization")
        if n > self.config.max_prompt_tokens:
            raise ResourceExhausted(
                f"{what} has {n} tokens; this server accepts at most {self.config.max_prompt_tokens}"
            )

    def check_counts(self, texts: list[str], what: str) -> None:
        """The cheap bounds of one request's texts or prompts, checked before any is tokenized: how many
        (--max-texts), and their characters together (tokens are never fewer than ~chars/32, so far more
        characters than --max-request-tokens allows are refused without counting tokens)."""
        if len(texts) > self.config.max_texts:
            raise ResourceExhausted(
                f"{len(texts)} {what} in one request; the limit is {self.config.max_texts} (--max-texts)"
            )
        chars = sum(len(t) for t in texts)
        if chars > self.config.max_request_tokens * 32:
            raise ResourceExhausted(
                f"the {what} are {chars} characters together, far over the "
                f"{self.config.max_request_tokens}-token limit of one request (--max-request-tokens)"
            )

    def _texts(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            raise InvalidArgument("at least one text is required")
        self.check_counts(texts, "texts")
        out = []
        for i, t in enumerate(texts):
            if not t:
                raise InvalidArgument(f"texts[{i}] is empty")
            self._check_text(t, f"texts[{i}]")
            ids = self.tokenizer(t)["input_ids"]
            self._check_length(len(ids), f"texts[{i}]")
            out.append(ids)
        self.check_request_tokens(sum(len(ids) for ids in out), "texts")
        return out

    def check_request_tokens(self, n: int, what: str) -> None:
        """One request's tokens, all its texts or prompts together, against --max-request-tokens: the
        engine time a single request can claim grows with them."""
        if n > self.config.max_request_tokens:
            raise ResourceExhausted(
                f"this request's {what} have {n} tokens together; one request may have at most "
                f"{self.config.max_request_tokens} (--max-request-tokens): split it into several requests"
            )

    # ---- requests ----------------------------------------------------------------
    def prepare_generation(self, g: GenerateInput) -> tuple[list[int], SamplingParams]:
        """Validated sampling parameters and the prompt's token ids (nothing submitted yet)."""
        params = self._sampling(g)
        return self._tokenize_prompt(g), params

    def start_generation(
        self,
        tenant: str,
        g: GenerateInput,
        deadline: float | None,
        prepared: tuple[list[int], SamplingParams] | None = None,
        events=None,
    ) -> tuple[GenerationRequest, str]:
        """events: where the engine puts this request's TokenEvents (anything with `put`); default its
        own queue."""
        if prepared is None:
            params = self._sampling(g)
            ids = self._tokenize_prompt(g)
        else:
            ids, params = prepared
        matcher = self.grammar.matcher(params.guided) if params.guided is not None else None
        handle, resolved = self.adapters.resolve(tenant, g.adapter)
        req = GenerationRequest(
            ids,
            params,
            tenant=tenant,
            adapter=handle,
            deadline=deadline,
            request_id=g.request_id,
            matcher=matcher,
        )
        if events is not None:
            req.events = events
        try:
            self.engine.submit(req)
        except Exception:
            self.adapters.release_unadmitted(handle)
            raise
        return req, resolved

    def _pool(self, tenant, adapter, texts, mode, deadline):
        inputs = self._texts(texts)
        handle, resolved = self.adapters.resolve(tenant, adapter)
        labels = self.adapters.labels(handle) if mode == "last" else None
        req = PoolingRequest(inputs, mode, tenant=tenant, adapter=handle, deadline=deadline)
        try:
            self.engine.submit(req)
        except Exception:
            self.adapters.release_unadmitted(handle)
            raise
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            out = req.future.result(timeout=timeout)
        except FutureTimeout:
            req.cancel()
            raise DeadlineExceeded("deadline exceeded before the forward pass finished") from None
        return out, resolved, labels

    def embed(self, tenant: str, adapter: str, texts: list[str], deadline=None) -> tuple[torch.Tensor, str]:
        out, resolved, _ = self._pool(tenant, adapter, texts, "mean", deadline)
        return out, resolved

    def classify(
        self, tenant: str, adapter: str, texts: list[str], deadline=None
    ) -> tuple[list[Classified], str]:
        if not adapter:
            raise FailedPrecondition(
                "Classify needs an adapter with a classification head (a PEFT SEQ_CLS adapter)"
            )
        probs, resolved, labels = self._pool(tenant, adapter, texts, "last", deadline)
        results = []
        for row in probs:
            scores = [(labels[j], float(row[j])) for j in range(len(labels))]
            best = int(torch.argmax(row))
            results.append(Classified(labels[best], float(row[best]), scores))
        return results, resolved

    @staticmethod
    def raise_for_finish(reason: FinishReason | None, error: Exception | None = None) -> None:
        """Map an abnormal finish to the status the caller should see (the request's error, for ERROR)."""
        if error is not None:
            raise error
        if reason == FinishReason.DEADLINE:
            raise DeadlineExceeded("deadline exceeded while generating")
        if reason == FinishReason.CANCELLED:
            raise Cancelled("the request was cancelled")
