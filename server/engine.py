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
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from hotlora.adapters.errors import HotloraError, ResourceExhausted, Unavailable
from hotlora.server.detokenizer import IncrementalDetokenizer
from hotlora.server.logits_controls import choose_tokens, record_prompt_logprobs
from hotlora.server.requests import GenerationRequest, PoolingRequest, TokenEvent
from hotlora.server.runner.attention import AttentionMetadata, PrefillSpan, decode_mask
from hotlora.server.runner.kv_cache import NULL_BLOCK, BlockManager, SequenceKV
from hotlora.server.runner.model import StepInput
from hotlora.server.sampling import make_generator

log = logging.getLogger("hotlora.engine")


class AdapterRuntime(Protocol):
    """What the engine needs from the adapter side (hotlora.adapters.runtime implements it)."""

    def try_acquire(self, handle: Any) -> int | None: ...  # device slot, or None = not resident yet
    def release(self, handle: Any) -> None: ...
    def begin_forward(self, token_slots: list[int]) -> None: ...  # one slot per token of the step
    def end_forward(self) -> None: ...
    def classify(self, handle: Any, pooled: torch.Tensor) -> torch.Tensor: ...
    def maintenance(self) -> None: ...  # engine thread, between steps: install loaded adapters


class BaseOnlyRuntime:
    """No adapters: every row runs on the base model."""

    def try_acquire(self, handle):
        return -1

    def release(self, handle):
        pass

    def begin_forward(self, token_slots):
        pass

    def end_forward(self):
        pass

    def classify(self, handle, pooled):
        raise ValueError("the base model has no classification head")

    def maintenance(self):
        pass


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


class Task(Protocol):
    """Background work (fine-tuning) run in bounded steps between serving steps."""

    def step(self) -> bool: ...  # run one bounded step; False when finished


@dataclass(eq=False)
class _Seq:
    """A generation request, or one text of a pooling request, as the scheduler tracks it."""

    req: GenerationRequest | PoolingRequest
    tokens: list[int]
    slot: int
    kv: SequenceKV
    num_computed: int = 0
    admitted_order: int = 0
    # generation
    detok: IncrementalDetokenizer | None = None
    gen: torch.Generator | None = None
    # pooling
    part: int = 0  # which text of the request
    pooled_sum: torch.Tensor | None = None
    pooled: torch.Tensor | None = None

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def is_generation(self) -> bool:
        return isinstance(self.req, GenerationRequest)


@dataclass(eq=False)
class _Pooling:
    """A pooling request in flight: its texts' sequences and their results."""

    req: PoolingRequest
    results: list[torch.Tensor | None] = field(default_factory=list)
    remaining: int = 0


class Engine:
    def __init__(
        self,
        runner,
        tokenizer,
        *,
        limits: EngineLimits = EngineLimits(),
        runtime: AdapterRuntime | None = None,
        observer: Any = None,
        task_share: float = 0.3,
        static_decode: Any = None,
        task_idle_grace_s: float = 0.0,
    ):
        self.runner = runner
        self.tokenizer = tokenizer
        self.limits = limits
        self.runtime = runtime or BaseOnlyRuntime()
        self.observer = observer
        self.task_share = task_share  # max fraction of engine time given to background tasks
        # runner.decode_graphs.StaticDecode: decode-only steps through per-bucket buffers (CUDA graphs)
        self.static_decode = static_decode
        # idle engine time goes to background tasks only this long after the last serving step: a client's
        # next request, sent as the previous one ends, then finds the engine free instead of mid-unit
        self.task_idle_grace_s = task_idle_grace_s
        self._last_served = 0.0
        self.device = runner.device
        self.max_positions = runner.spec.max_positions
        self.eos_ids = _eos_ids(runner, tokenizer)
        self.pad_id = pad_id(runner.config, tokenizer)
        self.blocks = BlockManager(runner.kv_config)
        self.block_size = runner.kv_config.block_size

        self._cond = threading.Condition()
        self._waiting: dict[str, collections.deque] = collections.OrderedDict()
        self._n_waiting = 0
        self._rr = 0
        self._resume: collections.deque[_Seq] = collections.deque()  # preempted, admitted first
        self._running: list[_Seq] = []  # generation sequences (prefilling or decoding), admission order
        self._pooling: list[_Seq] = []  # pooling texts still being read
        self._pool_reqs: dict[int, _Pooling] = {}
        self._order = 0
        self._tasks: collections.deque[Task] = collections.deque()
        self._task_time = 0.0
        self._serve_time = 0.0
        self._stop = False
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="hotlora-engine", daemon=True)
        self.steps = 0
        self.preemptions = 0

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
        return not (self._running or self._pooling or self._resume or self._n_waiting or self._tasks)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._n_waiting + len(self._resume)

    def running_requests(self) -> list:
        """The generation requests in the running batch (a snapshot, for metrics)."""
        return [s.req for s in list(self._running)]

    def waiting_requests(self) -> list:
        """The requests waiting for admission (a snapshot, for metrics)."""
        with self._cond:
            return [s.req for s in self._resume] + [r for q in self._waiting.values() for r in q]

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache's blocks held by sequences (cached-but-unused blocks count as free)."""
        return self.blocks.usage

    def submit(self, req: GenerationRequest | PoolingRequest) -> None:
        if not self._accepting or self._stop:
            raise Unavailable("the server is shutting down; retry on another replica")
        self._check_fits(req)
        with self._cond:
            if self._n_waiting >= self.limits.max_queue:
                raise ResourceExhausted(
                    f"the request queue is full ({self.limits.max_queue} waiting requests, --max-queue); "
                    "retry later"
                )
            q = self._waiting.setdefault(req.tenant, collections.deque())
            if len(q) >= self.limits.max_queue_per_tenant:
                raise ResourceExhausted(
                    f"tenant {req.tenant!r} has {len(q)} waiting requests, the per-tenant limit "
                    "(--max-queue-per-tenant); retry later"
                )
            q.append(req)
            self._n_waiting += 1
            self._cond.notify_all()

    def submit_task(self, task: Task) -> None:
        with self._cond:
            self._tasks.append(task)
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
                    self._serve_time += time.perf_counter() - t0
                    self._run_task_step(worked)
                except Exception:  # never let one bad step kill the server
                    log.exception("engine step failed; failing the requests in it")
                    self._fail_all_running("internal error in the engine step")
                if not worked and not self._tasks:
                    with self._cond:
                        if not self._stop and self._n_waiting:
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

    def _run_task_step(self, served: bool) -> None:
        if not self._tasks:
            return
        if self._n_waiting and served:
            return  # admit the waiting requests first: they would wait a whole training unit
        now = time.perf_counter()
        if served:
            self._last_served = now
        elif now - self._last_served < self.task_idle_grace_s:
            with self._cond:  # a request submitted meanwhile wakes us
                if not self._n_waiting:
                    self._cond.wait(self.task_idle_grace_s - (now - self._last_served))
            return
        # while serving is busy, training gets at most `task_share` of engine time; idle time is free
        total = self._task_time + self._serve_time
        if served and total > 0 and self._task_time / total > self.task_share:
            return
        task = self._tasks[0]
        t0 = time.perf_counter()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                more = task.step()
        except Exception:
            log.exception("background task failed")
            more = False
        step_seconds = time.perf_counter() - t0
        if served or self._running:
            self._task_time += step_seconds
        if self.observer is not None:
            self.observer.finetune_step(step_seconds)
            self.observer.set_train_share(self._task_time / max(1e-9, self._task_time + self._serve_time))
        if not more:
            self._tasks.popleft()
            if not self._tasks:
                self._task_time = self._serve_time = 0.0

    # ---- scheduling -------------------------------------------------------------------
    def _schedule(self) -> tuple[list[_Seq], list[tuple[_Seq, int]]]:
        """This step's work: decoding sequences (one token each) and (sequence, chunk length) prefills."""
        decode: list[_Seq] = []
        prefill: list[tuple[_Seq, int]] = []
        for seq in list(self._running):  # admission order: the newest are preempted first
            if seq in self._running and seq.pending == 1 and self._reserve(seq, decode, prefill):
                decode.append(seq)
        # prefill: newcomers first (at most half the budget while other prompts are being read, so a long
        # prompt or Embed never holds the queue), then the prompts already being read, then newcomers again
        budget = self.limits.max_prefill_tokens
        continuing = [s for s in self._running if s.pending > 1] + list(self._pooling)
        share = max(1, budget // 2) if continuing else budget
        budget -= share - self._admit_newcomers(share, decode, prefill)
        for seq in continuing:
            if budget <= 0:
                break
            budget = self._take_chunk(seq, budget, prefill)
        if budget > 0:
            self._admit_newcomers(budget, decode, prefill)
        return decode, prefill

    def _admit_newcomers(self, budget: int, decode: list[_Seq], prefill: list) -> int:
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

    def _take_chunk(self, seq: _Seq, budget: int, out: list) -> int:
        n = min(seq.pending, budget)
        if n > 0 and self.blocks.grow(seq.kv, seq.num_computed + n):
            out.append((seq, n))
            return budget - n
        return budget

    def _reserve(self, seq: _Seq, decode: list[_Seq], prefill: list) -> bool:
        """Blocks for a decoding sequence's next token; preempts the newest while the cache is full."""
        while not self.blocks.grow(seq.kv, seq.num_computed + 1):
            victim = max(self._running, key=lambda s: s.admitted_order)
            if victim in decode:
                decode.remove(victim)
            prefill[:] = [(s, n) for s, n in prefill if s is not victim]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: _Seq) -> None:
        self.blocks.close(seq.kv)
        seq.num_computed = 0
        self._running.remove(seq)
        self._resume.appendleft(seq)
        self.preemptions += 1
        log.info(
            "KV cache full: preempted request %s (%d tokens); it is recomputed when re-admitted",
            seq.req.seq,
            len(seq.tokens),
        )

    def _admit_one(self) -> list[_Seq]:
        """Admit the next request: its sequence (generation) or its texts' sequences (pooling)."""
        if self._resume and len(self._running) < self.limits.max_batch_size:
            seq = self._resume.popleft()
            seq.kv = self.blocks.open(self._cache_key(seq.req), seq.tokens)
            seq.num_computed = seq.kv.num_cached
            seq.admitted_order = self._next_order()
            self._running.append(seq)
            return [seq]
        req = self._pop_waiting()
        if req is None:
            return []
        req.admitted_at = time.monotonic()
        key = self._cache_key(req)
        if isinstance(req, GenerationRequest):
            # prompt logprobs need every prompt position's logits: no prefix-cache reuse for them
            kv = self.blocks.open(key, req.prompt_ids, lookup=req.params.prompt_logprobs is None)
            seq = _Seq(req, list(req.prompt_ids), req.slot, kv, num_computed=kv.num_cached)
            seq.detok = IncrementalDetokenizer(self.tokenizer, req.params.stop)
            seq.gen = make_generator(req.params.seed)
            seq.admitted_order = self._next_order()
            self._running.append(seq)
            return [seq]
        # pooling: every text is a sequence; no prefix reuse (mean pooling needs every token's state)
        group = _Pooling(req, [None] * len(req.inputs), len(req.inputs))
        self._pool_reqs[req.seq] = group
        seqs = [
            _Seq(req, list(ids), req.slot, self.blocks.open(key, (), lookup=False), part=i)
            for i, ids in enumerate(req.inputs)
        ]
        for seq in seqs:
            seq.admitted_order = self._next_order()
        self._pooling.extend(seqs)
        if not seqs:
            self._finish_pooling(group)
        return seqs

    def _next_order(self) -> int:
        self._order += 1
        return self._order

    def _pop_waiting(self):
        """The next admissible request, round-robin over tenants. A request whose adapter is not resident yet
        stays queued, first in its tenant's line, while the tenant's later requests may go ahead."""
        now = time.monotonic()
        found = None
        with self._cond:
            tenants = list(self._waiting.keys())
            skipped: dict[str, list] = collections.defaultdict(list)
            start = self._rr % len(tenants) if tenants else 0
            for tenant in tenants[start:] + tenants[:start]:
                q = self._waiting[tenant]
                while q and found is None:
                    req = q[0]
                    if req.cancelled.is_set() or (req.deadline is not None and now > req.deadline):
                        q.popleft()
                        self._n_waiting -= 1
                        self._finish_unadmitted(
                            req, "deadline" if not req.cancelled.is_set() else "cancelled"
                        )
                        continue
                    if (
                        isinstance(req, GenerationRequest)
                        and len(self._running) >= self.limits.max_batch_size
                    ):
                        break  # no row free for this tenant's next generation
                    try:
                        slot = self.runtime.try_acquire(req.adapter)
                    except HotloraError as exc:  # e.g. deleted or unloadable adapter: fail this one only
                        q.popleft()
                        self._n_waiting -= 1
                        self._fail_request(req, exc)
                        continue
                    q.popleft()
                    self._n_waiting -= 1
                    if slot is None:  # adapter loading
                        skipped[tenant].append(req)
                        continue
                    req.slot = slot
                    found = req
                if found is not None:
                    break
            self._rr += 1
            for tenant, reqs in skipped.items():  # back to the front, in order
                q = self._waiting.setdefault(tenant, collections.deque())
                q.extendleft(reversed(reqs))
                self._n_waiting += len(reqs)
            for tenant in [t for t, q in self._waiting.items() if not q]:
                del self._waiting[tenant]
        return found

    def _cache_key(self, req) -> tuple:
        adapter = getattr(req.adapter, "key", None) if req.adapter is not None else None
        return (req.tenant, adapter)

    # ---- one step ---------------------------------------------------------------------
    def _step(self, decode: list[_Seq], prefill: list[tuple[_Seq, int]]) -> None:
        self.runner.pool.zero_blocks(self.blocks.take_fresh())
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        mapping: list[int] = []
        for seq in decode:
            p = seq.num_computed
            ids.append(seq.tokens[p])
            pos.append(p)
            slots.append(seq.slot)
            mapping.append(seq.kv.blocks[p // bs] * bs + p % bs)
        spans = []
        for seq, n in prefill:
            start, p0 = len(ids), seq.num_computed
            ids.extend(seq.tokens[p0 : p0 + n])
            pos.extend(range(p0, p0 + n))
            slots.extend([seq.slot] * n)
            blocks = seq.kv.blocks
            mapping.extend(blocks[p // bs] * bs + p % bs for p in range(p0, p0 + n))
            spans.append(
                PrefillSpan(start, n, p0, torch.tensor(blocks, dtype=torch.int64, device=self.device))
            )
        t0 = time.perf_counter()
        if not prefill and self.static_decode is not None and self.static_decode.fits(len(decode)):
            hidden = self.static_decode.run(ids, pos, [s.kv.blocks for s in decode], mapping, slots)
        else:
            hidden = self._forward(decode, ids, pos, slots, mapping, spans)
        if self.observer is not None:
            kind = "prefill" if prefill else "decode"
            self.observer.forward_finished(
                kind, len(decode) + len(prefill), len(ids), time.perf_counter() - t0
            )

        # advance every scheduled sequence; pick the rows whose next token is sampled now
        sample_rows: list[int] = []
        sample_seqs: list[_Seq] = []
        for i, seq in enumerate(decode):
            seq.num_computed += 1
            self.blocks.commit(seq.kv, seq.tokens, seq.num_computed)
            sample_rows.append(i)
            sample_seqs.append(seq)
        for span, (seq, n) in zip(spans, prefill, strict=True):
            seq.num_computed += n
            if seq.is_generation:
                self.blocks.commit(seq.kv, seq.tokens, seq.num_computed)
                if seq.req.params.prompt_logprobs is not None:
                    chunk = self.runner.logits(hidden[span.start : span.start + n])
                    record_prompt_logprobs(seq.req, chunk, seq.num_computed - n)
                if seq.pending == 0:
                    sample_rows.append(span.start + n - 1)
                    sample_seqs.append(seq)
            else:
                self._pool_chunk(seq, hidden[span.start : span.start + n])
        if sample_seqs:
            logits = self.runner.logits(hidden[torch.tensor(sample_rows, device=hidden.device)])
            self._emit(sample_seqs, logits)
        self._retire()

    def _forward(self, decode, ids, pos, slots, mapping, spans) -> torch.Tensor:
        """The step's tensors, then one runner forward (the dynamic-shape path)."""
        dev, bs = self.device, self.block_size
        if decode:
            width = max(len(s.kv.blocks) for s in decode)
            tables = torch.full((len(decode), width), NULL_BLOCK, dtype=torch.int64)
            for i, seq in enumerate(decode):
                tables[i, : len(seq.kv.blocks)] = torch.tensor(seq.kv.blocks, dtype=torch.int64)
            lens = torch.tensor([s.num_computed + 1 for s in decode], dtype=torch.int64)
            tables, lens = tables.to(dev), lens.to(dev)
            mask = decode_mask(lens, width * bs, None)
        else:
            tables = torch.zeros((0, 1), dtype=torch.int64, device=dev)
            lens = torch.zeros(0, dtype=torch.int64, device=dev)
            mask = None
        meta = AttentionMetadata(
            num_decode=len(decode),
            decode_tables=tables,
            decode_lens=lens,
            prefills=tuple(spans),
            slot_mapping=torch.tensor(mapping, dtype=torch.int64, device=dev),
            decode_mask=mask,
        )
        step = StepInput(
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(pos, dtype=torch.int64, device=dev),
            meta,
        )
        self.runtime.begin_forward(slots)
        try:
            return self.runner(step)
        finally:
            self.runtime.end_forward()

    def _pool_chunk(self, seq: _Seq, hidden: torch.Tensor) -> None:
        req = seq.req
        if req.mode == "mean":
            part = hidden.float().sum(0)
            seq.pooled_sum = part if seq.pooled_sum is None else seq.pooled_sum + part
        if seq.pending:
            return
        seq.pooled = seq.pooled_sum / len(seq.tokens) if req.mode == "mean" else hidden[-1]
        group = self._pool_reqs.get(req.seq)
        self.blocks.close(seq.kv)
        self._pooling.remove(seq)
        if group is None:
            return
        group.results[seq.part] = seq.pooled
        group.remaining -= 1
        if group.remaining == 0:
            self._finish_pooling(group)

    def _finish_pooling(self, group: _Pooling) -> None:
        req = group.req
        self._pool_reqs.pop(req.seq, None)
        try:
            if not group.results:
                out = torch.zeros(0, self.runner.spec.hidden_size)
            elif req.mode == "mean":
                out = torch.stack(group.results).float().cpu()
            else:
                out = self.runtime.classify(req.adapter, torch.stack(group.results)).float().cpu()
            req.future.set_result(out)
        except Exception as exc:  # a broken head fails its request, not the batch
            req.future.set_exception(exc)
        finally:
            self.runtime.release(req.adapter)

    def _emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Pick each sequence's next token, stream it, and mark finished requests."""
        tokens, logprobs = choose_tokens(logits, [s.req for s in seqs], [s.gen for s in seqs], self.eos_ids)
        now = time.monotonic()
        for seq, tok, lp in zip(seqs, tokens, logprobs, strict=True):
            req = seq.req
            req.output_ids.append(tok)
            if lp is not None:
                req.output_logprobs.append(lp)
            seq.tokens.append(tok)
            if req.first_token_at is None:
                req.first_token_at = now
            reason = None
            if tok in self.eos_ids and not req.params.ignore_eos:
                reason = "eos"
                text = seq.detok.flush()
            elif tok in req.params.stop_token_ids:
                reason = "stop"  # like EOS: the stop token's own text is not emitted
                text = seq.detok.flush()
            else:
                text = seq.detok.add(tok)
                if seq.detok.stopped:
                    reason = "stop"
                elif (
                    len(req.output_ids) >= req.params.max_new_tokens or len(seq.tokens) >= self.max_positions
                ):
                    reason = "length"
                    text += seq.detok.flush()
            if reason is None and req.cancelled.is_set():
                reason = "cancelled"
            req.text += text
            if reason is not None:  # metrics first, so they are counted before the client sees the end
                self._finish(req, reason)
            req.events.put(TokenEvent([tok], text, reason, None if lp is None else [lp]))

    # ---- endings ----------------------------------------------------------------------
    def _expire(self) -> None:
        now = time.monotonic()
        for seq in list(self._running) + list(self._resume):
            req = seq.req
            if not req.done and (req.cancelled.is_set() or (req.deadline is not None and now > req.deadline)):
                reason = "cancelled" if req.cancelled.is_set() else "deadline"
                req.events.put(TokenEvent([], "", reason))
                self._finish(req, reason)
        for seq in list(self._pooling):
            req = seq.req
            if req.cancelled.is_set() or (req.deadline is not None and now > req.deadline):
                self._drop_pooling(req, "cancelled" if req.cancelled.is_set() else "deadline")
        self._retire()

    def _drop_pooling(self, req: PoolingRequest, reason: str) -> None:
        for seq in [s for s in self._pooling if s.req is req]:
            self.blocks.close(seq.kv)
            self._pooling.remove(seq)
        if self._pool_reqs.pop(req.seq, None) is not None:
            self._finish_unadmitted(req, reason)
            self.runtime.release(req.adapter)

    def _retire(self) -> None:
        for seq in [s for s in self._running if s.req.done]:
            self.blocks.close(seq.kv)
            self._running.remove(seq)
            self.runtime.release(seq.req.adapter)
        for seq in [s for s in self._resume if s.req.done]:
            self._resume.remove(seq)
            self.runtime.release(seq.req.adapter)

    def _finish(self, req: GenerationRequest, reason: str) -> None:
        req.finish_reason = reason
        req.finished_at = time.monotonic()
        if self.observer is not None:
            self.observer.request_finished(req)

    def _finish_unadmitted(self, req, reason: str) -> None:
        if isinstance(req, GenerationRequest):
            req.events.put(TokenEvent([], "", reason))
            self._finish(req, reason)
        else:
            from hotlora.adapters.errors import Cancelled, DeadlineExceeded

            exc = (
                DeadlineExceeded("deadline exceeded while queued")
                if reason == "deadline"
                else Cancelled("cancelled")
            )
            if not req.future.done():
                req.future.set_exception(exc)

    def _fail_request(self, req, exc: Exception) -> None:
        if isinstance(req, PoolingRequest):
            req.future.set_exception(exc)
            return
        req.error = exc
        req.events.put(TokenEvent([], "", "error"))
        self._finish(req, "error")

    def _fail_all_running(self, why: str) -> None:
        for group in list(self._pool_reqs.values()):
            if not group.req.future.done():
                group.req.future.set_exception(RuntimeError(why))
            self.runtime.release(group.req.adapter)
        self._pool_reqs.clear()
        for seq in self._pooling:
            self.blocks.close(seq.kv)
        self._pooling = []
        for seq in list(self._running) + list(self._resume):
            if not seq.req.done:
                seq.req.events.put(TokenEvent([], "", "error:" + why))
                self._finish(seq.req, "error:" + why)
            self.blocks.close(seq.kv)
            self.runtime.release(seq.req.adapter)
        self._running = []
        self._resume.clear()

    def adapter_refs_in_flight(self) -> tuple[list[str], list[str]]:
        """`tenant/name@N` of each running generation request and each queued one that carries an adapter
        (one entry per request; for metrics), read under the engine's lock."""
        with self._cond:
            running, waiting = [s.req for s in self._running], [r for q in self._waiting.values() for r in q]
        return _tenant_refs(running), _tenant_refs(waiting)


def _tenant_refs(reqs) -> list[str]:
    return [f"{r.tenant}/{r.adapter.ref}" for r in reqs if r.adapter is not None]


def _eos_ids(runner, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(runner, "generation_config", None), runner.config):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def pad_id(config, tokenizer) -> int:
    """The one pad id of the server (engine, trainer): the tokenizer's, else the model's, else EOS, else 0."""
    for v in (tokenizer.pad_token_id, getattr(config, "pad_token_id", None), tokenizer.eos_token_id, 0):
        if isinstance(v, int):
            return v
    return 0
