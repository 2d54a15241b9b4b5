"""The engine: one scheduler thread driving the model runner over the paged KV cache.

Every admitted request is a *sequence*: its tokens (prompt, then outputs) and how many of them already have
K/V in the cache (`num_computed`). Each step schedules, under a token budget, every decoding sequence's one
pending token and then prefill chunks of the sequences still reading their prompts (longest first come first;
a prompt longer than the budget is computed over several steps, so decode never waits for a long prefill),
runs them as one flat batch, and samples for each sequence whose tokens are now all computed. A newcomer
joins at the next step, a finished request leaves at once, and nobody waits for another to finish.
Embed and Classify texts are sequences too: chunked the same way, pooled when their last chunk is done.

Deadlines and cancellation are checked every step. When the cache runs out of blocks for a decoding
sequence, the most recently admitted one is preempted: its blocks go back (registered ones stay in the
prefix cache) and it is re-admitted first, recomputing what it held. The scheduler owns admission,
fairness (round-robin across tenants), deadlines, cancellation and co-serving of training; the runner owns
the forward pass; the block manager owns the cache's memory.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from hotlora.adapters.errors import ResourceExhausted, Unavailable
from hotlora.adapters.observer import NO_OBSERVER, Observer
from hotlora.server.engine.adapter_runtime import AdapterRuntime, BaseOnlyRuntime
from hotlora.server.engine.detokenizer import IncrementalDetokenizer
from hotlora.server.engine.device_io import tensor_on
from hotlora.server.engine.endings import Endings, after_token, eos_ids
from hotlora.server.engine.logits_controls import choose_tokens, read_pending, record_prompt_logprobs
from hotlora.server.engine.pooling import PoolingWork
from hotlora.server.engine.requests import FinishReason, GenerationRequest, PoolingRequest, TokenEvent
from hotlora.server.engine.runner.kv_cache import BlockManager
from hotlora.server.engine.sampling import make_generator
from hotlora.server.engine.sequences import GenerationSeqs, Seq, cache_key
from hotlora.server.engine.step_batch import StepBatch
from hotlora.server.engine.task_sharing import Task, TaskSharing
from hotlora.server.engine.waiting import WaitingLines

log = logging.getLogger("hotlora.engine")


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 64  # generation sequences admitted at once
    max_queue: int = 1024  # waiting requests, all tenants
    max_queue_per_tenant: int = 256
    max_prefill_tokens: int = 512  # prompt tokens computed in one step; longer prompts are chunked

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_queue_per_tenant", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class Engine:
    def __init__(
        self,
        runner,
        tokenizer,
        *,
        limits: EngineLimits = EngineLimits(),
        runtime: AdapterRuntime | None = None,
        observer: Observer | None = None,
        task_share: float = 0.3,
        static_decode: Any = None,
        task_idle_grace_s: float = 0.0,
    ):
        self.runner = runner
        self.tokenizer = tokenizer
        self.limits = limits
        self.runtime = runtime or BaseOnlyRuntime()
        self.observer = observer if observer is not None else NO_OBSERVER
        # max fraction of engine time given to background tasks; idle time goes to them only
        # `task_idle_grace_s` after the last serving step
        self.tasks = TaskSharing(task_share, task_idle_grace_s, self.observer)
        self.arrivals = 0  # requests submitted so far
        # runner.decode_graphs.StaticDecode: decode-only steps through per-bucket buffers (CUDA graphs)
        self.static_decode = static_decode
        self.device = runner.device
        self.max_positions = runner.spec.max_positions
        self.eos_ids = eos_ids(runner, tokenizer)
        self.blocks = BlockManager(runner.kv_config)
        self.block_size = runner.kv_config.block_size
        self.endings = Endings(self.observer)

        self._cond = threading.Condition()  # guards _queued and the stop flag; wakes the engine thread
        self._queued = WaitingLines(limits.max_queue, limits.max_queue_per_tenant)
        self._seqs = GenerationSeqs(self.blocks, self.runtime, self.endings)
        self.pooling = PoolingWork(self.blocks, self.runtime, self.endings, runner.spec.hidden_size)
        self._order = 0
        self._stop = False
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="hotlora-engine", daemon=True)
        self.steps = 0

    @property
    def _running(self) -> list[Seq]:  # generation sequences (prefilling or decoding), admission order
        return self._seqs.running

    @property
    def _resume(self) -> collections.deque[Seq]:  # preempted, re-admitted first
        return self._seqs.resume

    @property
    def preemptions(self) -> int:
        return self._seqs.preemptions

    # ---- public API (any thread) -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def drain(self) -> None:
        """Stop accepting; running and queued work continues."""
        self._accepting = False

    @property
    def idle(self) -> bool:
        return not (self._running or self.pooling or self._resume or len(self._queued) or self.tasks)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._queued) + len(self._resume)

    def running_requests(self) -> list:
        """The generation requests in the running batch (a snapshot, for metrics)."""
        return [s.req for s in list(self._running)]

    def waiting_requests(self) -> list:
        """The requests waiting for admission (a snapshot, for metrics)."""
        with self._cond:
            return [s.req for s in self._resume] + self._queued.requests()

    def adapter_refs_in_flight(self) -> tuple[list[str], list[str]]:
        """Adapter names (`tenant/name@N`) of the running generation requests and of the requests queued
        for admission (preempted ones not included), one entry per request, base-model requests left out;
        a snapshot taken under the engine's lock (for metrics)."""
        with self._cond:
            running = [s.req for s in self._running]
            waiting = self._queued.requests()
        return _adapter_names(running), _adapter_names(waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache's blocks held by sequences (cached-but-unused blocks count as free)."""
        return self.blocks.usage

    def submit(self, req: GenerationRequest | PoolingRequest) -> None:
        if not self._accepting or self._stop:
            raise Unavailable("the server is shutting down; retry on another replica")
        self._check_fits(req)
        with self._cond:
            self._queued.push(req)
            self.arrivals += 1  # read by a training unit running meanwhile: it then ends at its next layer
            self._cond.notify_all()

    def submit_task(self, task: Task) -> None:
        with self._cond:
            self.tasks.add(task)
            self._cond.notify_all()

    def _check_fits(self, req) -> None:
        """A sequence the whole KV cache cannot hold would wait forever: refuse it now."""
        longest = (
            len(req.prompt_ids) + req.params.max_new_tokens
            if isinstance(req, GenerationRequest)
            else max((len(x) for x in req.inputs), default=0)
        )
        capacity = (self.blocks.config.num_blocks - 1) * self.block_size
        if longest > capacity:
            raise ResourceExhausted(
                f"the request needs up to {longest} tokens of KV cache but this server holds {capacity} "
                "(--kv-cache-bytes); send a shorter prompt or fewer new tokens"
            )

    # ---- scheduler thread -------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    if self._stop:
                        break
                    if self.idle:
                        self._cond.wait(0.05)
                worked = False
                try:
                    self.runtime.maintenance()
                    t0 = time.perf_counter()
                    worked = self._serve_step()
                    self.tasks.served(time.perf_counter() - t0)
                    self.tasks.run_step(
                        worked,
                        bool(self._running),
                        self._cond,
                        lambda: len(self._queued),
                        lambda: self.arrivals,
                    )
                except Exception:  # never let one bad step kill the server
                    log.exception("engine step failed; failing the requests in it")
                    self._fail_all_running("internal error in the engine step")
                if not worked and not self.tasks:
                    with self._cond:
                        if not self._stop and len(self._queued):
                            self._cond.wait(0.005)  # waiting on an adapter load or on free blocks
        self._fail_all_running("server stopped")

    def _serve_step(self) -> bool:
        self._expire()
        decode, prefill = self._schedule()
        if not decode and not prefill:
            return False
        self._step(decode, prefill)
        self.steps += 1
        return True

    # ---- scheduling -------------------------------------------------------------------
    def _schedule(self) -> tuple[list[Seq], list[tuple[Seq, int]]]:
        """This step's work: decoding sequences (one token each) and (sequence, chunk length) prefills."""
        decode: list[Seq] = []
        prefill: list[tuple[Seq, int]] = []
        for seq in list(self._running):  # admission order: the newest are preempted first
            if seq in self._running and seq.pending == 1 and self._reserve(seq, decode, prefill):
                decode.append(seq)
        # prefill: newcomers first (at most half the budget while other prompts are being read, so a long
        # prompt or Embed never holds the queue), then the prompts already being read, then newcomers again
        budget = self.limits.max_prefill_tokens
        continuing = [s for s in self._running if s.pending > 1] + self.pooling.seqs
        share = max(1, budget // 2) if continuing else budget
        budget -= share - self._admit_newcomers(share, decode, prefill)
        for seq in continuing:
            if budget <= 0:
                break
            budget = self._take_chunk(seq, budget, prefill)
        if budget > 0:
            self._admit_newcomers(budget, decode, prefill)
        return decode, prefill

    def _admit_newcomers(self, budget: int, decode: list[Seq], prefill: list) -> int:
        """Admit waiting requests (the preempted first) while `budget` prompt tokens remain; returns what is
        left of the budget."""
        while budget > 0:
            admitted = self._admit_one()
            if not admitted:
                break
            taken = False
            for seq in admitted:
                if seq.is_generation and seq.pending == 1:
                    taken = self._reserve(seq, decode, prefill)
                    if taken:
                        decode.append(seq)
                elif budget > 0:
                    before = budget
                    budget = self._take_chunk(seq, budget, prefill)
                    taken = taken or budget < before
            if not taken:
                break  # no room in the cache for it this step: admit nobody else now
        return budget

    def _take_chunk(self, seq: Seq, budget: int, out: list) -> int:
        n = min(seq.pending, budget)
        if n > 0 and self.blocks.grow(seq.kv, seq.num_computed + n):
            out.append((seq, n))
            return budget - n
        return budget

    def _reserve(self, seq: Seq, decode: list[Seq], prefill: list) -> bool:
        """Blocks for a decoding sequence's next token; preempts the newest while the cache is full."""
        while not self.blocks.grow(seq.kv, seq.num_computed + 1):
            victim = self._seqs.newest()
            if victim in decode:
                decode.remove(victim)
            prefill[:] = [(s, n) for s, n in prefill if s is not victim]
            self._seqs.preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit_one(self) -> list[Seq]:
        """Admit the next request: its sequence (generation) or its texts' sequences (pooling)."""
        if self._resume and len(self._running) < self.limits.max_batch_size:
            return [self._seqs.readmit(self._next_order())]
        with self._cond:
            found = self._queued.pop_admissible(
                len(self._running) < self.limits.max_batch_size, self.runtime.try_acquire, self.endings.end
            )
        if found is None:
            return []
        req, slot = found
        req.admitted_at = time.monotonic()
        key = cache_key(req)
        if isinstance(req, GenerationRequest):
            # prompt logprobs need every prompt position's logits: no prefix-cache reuse for them
            kv = self.blocks.open(key, req.prompt_ids, lookup=req.params.prompt_logprobs is None)
            seq = Seq(req, list(req.prompt_ids), slot, kv, num_computed=kv.num_cached)
            seq.detok = IncrementalDetokenizer(self.tokenizer, req.params.stop)
            seq.gen = make_generator(req.params.seed, self.device)
            return [self._seqs.add(seq, self._next_order())]
        return self.pooling.admit(req, slot, self._next_order)

    def _next_order(self) -> int:
        self._order += 1
        return self._order

    # ---- one step ---------------------------------------------------------------------
    def _step(self, decode: list[Seq], prefill: list[tuple[Seq, int]]) -> None:
        batch = StepBatch.build(decode, prefill, self.block_size, self.device)
        self.runner.pool.zero_blocks(self.blocks.take_fresh(), batch.mapping)
        taps: dict = {}  # earlier layers' states that pooling texts read (PoolingWork.taps)
        t0 = time.perf_counter()
        if not prefill and self.static_decode is not None and self.static_decode.fits(len(decode)):
            hidden = self.static_decode.run(
                batch.ids, batch.pos, [s.kv.blocks for s in decode], batch.mapping, batch.slots
            )
        else:
            taps = self.pooling.taps([seq for seq, _ in prefill if not seq.is_generation])
            hidden = self._forward(batch, taps)
        kind = "prefill" if prefill else "decode"
        self.observer.forward_finished(
            kind, len(decode) + len(prefill), len(batch.ids), time.perf_counter() - t0
        )

        # advance every scheduled sequence; pick the rows whose next token is sampled now
        sample_rows: list[int] = []
        sample_seqs: list[Seq] = []
        reads = []  # prompt log-probabilities, read with the step's tokens
        for i, seq in enumerate(decode):
            seq.num_computed += 1
            self.blocks.commit(seq.kv, seq.tokens, seq.num_computed)
            sample_rows.append(i)
            sample_seqs.append(seq)
        for span, (seq, n) in zip(batch.spans, prefill, strict=True):
            seq.num_computed += n
            if seq.is_generation:
                self.blocks.commit(seq.kv, seq.tokens, seq.num_computed)
                if seq.req.params.prompt_logprobs is not None:
                    chunk = self.runner.logits(hidden[span.start : span.start + n])
                    read = record_prompt_logprobs(seq.req, chunk, seq.num_computed - n)
                    reads += [read] if read is not None else []
                if seq.pending == 0:
                    sample_rows.append(span.start + n - 1)
                    sample_seqs.append(seq)
            else:
                self.pooling.chunk(seq, slice(span.start, span.start + n), hidden, taps)
        if sample_seqs:
            if sample_rows == list(range(len(sample_rows))):  # decode rows only: the first rows
                rows = hidden[: len(sample_rows)]
            else:
                rows = hidden.index_select(0, tensor_on(sample_rows, torch.int64, hidden.device))
            self._emit(sample_seqs, self.runner.logits(rows), reads)
        else:
            read_pending(reads)
        self._seqs.retire()

    def _forward(self, batch: StepBatch, taps: dict) -> torch.Tensor:
        """One runner forward on the dynamic-shape path, with the step's adapter slots installed; the
        layers named in `taps` are filled with their states."""
        step = batch.step_input(self.block_size, self.device)
        self.runtime.begin_forward(batch.slots)
        try:
            return self.runner(step, taps=taps) if taps else self.runner(step)
        finally:
            self.runtime.end_forward()

    def _emit(self, seqs: list[Seq], logits: torch.Tensor, reads=()) -> None:
        """Pick each sequence's next token, stream it, and mark finished requests (`reads`: the step's
        other device results, read with the tokens)."""
        reqs, gens = [s.req for s in seqs], [s.gen for s in seqs]
        tokens, logprobs = choose_tokens(logits, reqs, gens, self.eos_ids, reads)
        now = time.monotonic()
        for seq, tok, lp in zip(seqs, tokens, logprobs, strict=True):
            req = seq.req
            req.output_ids.append(tok)
            if lp is not None:
                req.output_logprobs.append(lp)
            seq.tokens.append(tok)
            if req.first_token_at is None:
                req.first_token_at = now
            text, reason = after_token(req, tok, seq.detok, self.eos_ids, len(seq.tokens), self.max_positions)
            req.text += text
            if reason is not None:  # metrics first, so they are counted before the client sees the end
                error = req.matcher.failure() if reason is FinishReason.ERROR else None
                self.endings.finish(req, reason, error)
            req.events.put(TokenEvent([tok], text, reason, None if lp is None else [lp]))

    # ---- endings ----------------------------------------------------------------------
    def _expire(self) -> None:
        now = time.monotonic()
        self._seqs.expire(now)
        self.pooling.expire(now)
        self._seqs.retire()

    def _fail_all_running(self, why: str) -> None:
        self.pooling.fail_all(why)
        self._seqs.fail_all(why)


def _adapter_names(reqs: list) -> list[str]:
    """`tenant/name@N` of each request's adapter (as metrics label them); base-model requests left out."""
    return [f"{req.tenant}/{req.adapter.ref}" for req in reqs if req.adapter is not None]
