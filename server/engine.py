"""The engine: one frozen model, a scheduler thread, iteration-level batching.

Each loop iteration (a "step") admits waiting requests, prefills the newcomers in one
left-padded forward pass, then runs one decode step for every running request. A
newcomer therefore joins at the next step and a finished request leaves at once; nobody
waits for another request to finish. Every row carries its own adapter slot (-1 = base),
handed to the adapter runtime before each forward so the multi-LoRA layers add the right
delta per token."""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from hotlora.adapters.errors import HotloraError, ResourceExhausted, Unavailable
from hotlora.server.detokenizer import IncrementalDetokenizer
from hotlora.server.kv_cache import BatchKVCache
from hotlora.server.requests import GenerationRequest, PoolingRequest, TokenEvent
from hotlora.server.sampling import make_generator, select_tokens

log = logging.getLogger("hotlora.engine")


class AdapterRuntime(Protocol):
    """What the engine needs from the adapter side (hotlora.adapters.runtime implements it)."""

    def try_acquire(self, handle: Any) -> int | None: ...  # device slot, or None = not resident yet
    def release(self, handle: Any) -> None: ...
    def begin_forward(self, row_slots: list[int], seq_len: int) -> None: ...
    def end_forward(self) -> None: ...
    def classify(self, handle: Any, pooled: torch.Tensor) -> torch.Tensor: ...
    def maintenance(self) -> None: ...  # engine thread, between steps: install loaded adapters


class BaseOnlyRuntime:
    """No adapters: every row runs on the base model."""

    def try_acquire(self, handle):
        return -1

    def release(self, handle):
        pass

    def begin_forward(self, row_slots, seq_len):
        pass

    def end_forward(self):
        pass

    def classify(self, handle, pooled):
        raise ValueError("the base model has no classification head")

    def maintenance(self):
        pass


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 64  # running generation rows
    max_queue: int = 1024  # waiting requests, all tenants
    max_queue_per_tenant: int = 256
    max_prefill_tokens: int = 4096  # padded tokens in one prefill forward


class Task(Protocol):
    """Background work (fine-tuning) run in bounded steps between serving steps."""

    def step(self) -> bool: ...  # run one bounded step; False when finished


@dataclass
class _Row:
    req: GenerationRequest
    slot: int
    detok: IncrementalDetokenizer
    gen: torch.Generator
    position: int  # position id of the next input token


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        limits: EngineLimits = EngineLimits(),
        runtime: AdapterRuntime | None = None,
        observer: Any = None,
        task_share: float = 0.3,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits
        self.runtime = runtime or BaseOnlyRuntime()
        self.observer = observer
        self.task_share = task_share  # max fraction of engine time given to background tasks
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.num_layers = model.config.num_hidden_layers
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = _pad_id(model, tokenizer)

        self._cond = threading.Condition()
        self._waiting: dict[str, collections.deque] = collections.OrderedDict()
        self._n_waiting = 0
        self._rr = 0
        self._running: list[_Row] = []
        self._cache = BatchKVCache(self.num_layers)
        self._tasks: collections.deque[Task] = collections.deque()
        self._task_time = 0.0
        self._serve_time = 0.0
        self._stop = False
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="hotlora-engine", daemon=True)
        self.steps = 0

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
        return not self._running and self._n_waiting == 0 and not self._tasks

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._n_waiting

    def submit(self, req: GenerationRequest | PoolingRequest) -> None:
        if not self._accepting or self._stop:
            raise Unavailable("the server is shutting down; retry on another replica")
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
                            self._cond.wait(0.005)  # waiting on an adapter load
        self._fail_all_running("server stopped")

    def _serve_step(self) -> bool:
        self._expire_running()
        newcomers = self._admit()
        self._newcomers = newcomers  # failed together if the step raises
        gen_new = [r for r in newcomers if isinstance(r, GenerationRequest)]
        pool_new = [r for r in newcomers if isinstance(r, PoolingRequest)]
        worked = False
        if gen_new or pool_new:
            self._prefill(gen_new, pool_new)
            worked = True
        if self._running:
            self._decode()
            worked = True
        if worked:
            self.steps += 1
        return worked

    def _run_task_step(self, served: bool) -> None:
        if not self._tasks:
            return
        if self._n_waiting and served:
            return  # admit the waiting requests first: they would wait a whole training unit
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

    def _admit(self) -> list:
        """Round-robin over tenants; a request whose adapter is not resident yet stays queued."""
        admitted: list = []
        free_rows = self.limits.max_batch_size - len(self._running)
        budget = self.limits.max_prefill_tokens
        rows, longest = 0, 0  # the prefill is left-padded: it costs rows x longest tokens
        now = time.monotonic()
        with self._cond:
            tenants = list(self._waiting.keys())
            if not tenants:
                return admitted
            progress = True
            skipped: dict[str, list] = collections.defaultdict(list)
            while progress and self._n_waiting:
                progress = False
                for i in range(len(tenants)):
                    tenant = tenants[(self._rr + i) % len(tenants)]
                    q = self._waiting.get(tenant)
                    if not q:
                        continue
                    req = q[0]
                    if req.cancelled.is_set() or (req.deadline is not None and now > req.deadline):
                        q.popleft()
                        self._n_waiting -= 1
                        self._finish_unadmitted(
                            req, "deadline" if not req.cancelled.is_set() else "cancelled"
                        )
                        progress = True
                        continue
                    is_gen = isinstance(req, GenerationRequest)
                    seqs = [req.prompt_ids] if is_gen else req.inputs
                    new_rows, new_longest = rows + len(seqs), max(longest, *(len(x) for x in seqs))
                    if (is_gen and free_rows <= 0) or (admitted and new_rows * new_longest > budget):
                        continue
                    try:
                        slot = self.runtime.try_acquire(req.adapter)
                    except HotloraError as exc:  # e.g. deleted or unloadable adapter: fail this one only
                        q.popleft()
                        self._n_waiting -= 1
                        self._fail_request(req, exc)
                        progress = True
                        continue
                    if slot is None:  # adapter loading: try the next one of this tenant later
                        skipped[tenant].append(q.popleft())
                        self._n_waiting -= 1
                        progress = True
                        continue
                    q.popleft()
                    self._n_waiting -= 1
                    req.slot = slot
                    req.admitted_at = now
                    admitted.append(req)
                    rows, longest = new_rows, new_longest
                    free_rows -= 1 if is_gen else 0
                    progress = True
            for tenant, reqs in skipped.items():  # back to the front, in order
                q = self._waiting.setdefault(tenant, collections.deque())
                q.extendleft(reversed(reqs))
                self._n_waiting += len(reqs)
            for tenant in [t for t, q in self._waiting.items() if not q]:
                del self._waiting[tenant]
            self._rr += 1
        return admitted

    def _prefill(self, gen_new: list[GenerationRequest], pool_new: list[PoolingRequest]) -> None:
        seqs: list[list[int]] = [r.prompt_ids for r in gen_new]
        slots: list[int] = [r.slot for r in gen_new]
        for p in pool_new:
            seqs.extend(p.inputs)
            slots.extend([p.slot] * len(p.inputs))
        n, L = len(seqs), max(len(s) for s in seqs)
        input_ids = torch.full((n, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, L), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, L - len(s) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = BatchKVCache(self.num_layers)
        cache.pad = torch.tensor([L - len(s) for s in seqs], dtype=torch.long)
        hidden = self._forward(input_ids, mask, positions, cache, slots, L)  # [n, L, H]

        # pooling rows: answer now, they never join the decode batch
        row = len(gen_new)
        for p in pool_new:
            k = len(p.inputs)
            try:
                h, m = hidden[row : row + k], mask[row : row + k].to(hidden.device)
                if p.mode == "mean":
                    pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
                    out = pooled.float().cpu()
                else:
                    pooled = h[:, -1]
                    out = self.runtime.classify(p.adapter, pooled).float().cpu()
                p.future.set_result(out)
            except Exception as exc:  # a broken head fails its request, not the batch
                p.future.set_exception(exc)
            finally:
                self.runtime.release(p.adapter)
            row += k

        if not gen_new:
            return
        logits = self.lm_head(hidden[: len(gen_new), -1])
        cache.keep_rows(list(range(len(gen_new))))
        rows = [
            _Row(
                r,
                r.slot,
                IncrementalDetokenizer(self.tokenizer, r.params.stop),
                make_generator(r.params.seed),
                len(r.prompt_ids) - 1,
            )
            for r in gen_new
        ]
        self._cache.merge(cache)
        self._running.extend(rows)
        self._emit(rows, logits)

    def _decode(self) -> None:
        rows = self._running
        input_ids = torch.tensor([[r.req.output_ids[-1]] for r in rows], dtype=torch.long)
        positions = torch.tensor([[r.position] for r in rows], dtype=torch.long)
        mask = self._cache.attention_mask(1, "cpu")
        hidden = self._forward(input_ids, mask, positions, self._cache, [r.slot for r in rows], 1)
        logits = self.lm_head(hidden[:, -1])
        self._emit(rows, logits)

    def _forward(self, input_ids, mask, positions, cache, slots, seq_len) -> torch.Tensor:
        dev = self.device
        t0 = time.perf_counter()
        self.runtime.begin_forward(slots, seq_len)
        try:
            out = self.decoder(
                input_ids=input_ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=positions.to(dev),
                past_key_values=cache,
                use_cache=True,
            )
        finally:
            self.runtime.end_forward()
        if self.observer is not None:
            # kind, rows in the batch, real tokens processed, seconds
            kind = "prefill" if seq_len > 1 or cache is not self._cache else "decode"
            self.observer.forward_finished(
                kind, len(slots), int(mask[:, -seq_len:].sum()), time.perf_counter() - t0
            )
        return out.last_hidden_state

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token, stream it, and retire finished rows."""
        tokens = select_tokens(logits, [r.req.params for r in rows], [r.gen for r in rows])
        now = time.monotonic()
        for row, tok in zip(rows, tokens, strict=True):
            req = row.req
            req.output_ids.append(tok)
            row.position += 1
            if req.first_token_at is None:
                req.first_token_at = now
            reason = None
            if tok in self.eos_ids and not req.params.ignore_eos:
                reason = "eos"
                text = row.detok.flush()
            else:
                text = row.detok.add(tok)
                if row.detok.stopped:
                    reason = "stop"
                elif len(req.output_ids) >= req.params.max_new_tokens or row.position >= self.max_positions:
                    reason = "length"
                    text += row.detok.flush()
            if reason is None and req.cancelled.is_set():
                reason = "cancelled"
            req.text += text
            if reason is not None:  # metrics first, so they are counted before the client sees the end
                self._finish(req, reason)
            req.events.put(TokenEvent([tok], text, reason))
        self._retire()

    def _expire_running(self) -> None:
        now = time.monotonic()
        changed = False
        for row in self._running:
            req = row.req
            if req.cancelled.is_set() or (req.deadline is not None and now > req.deadline):
                reason = "cancelled" if req.cancelled.is_set() else "deadline"
                req.events.put(TokenEvent([], "", reason))
                self._finish(req, reason)
                changed = True
        if changed:
            self._retire()

    def _retire(self) -> None:
        keep = [i for i, r in enumerate(self._running) if not r.req.done]
        if len(keep) == len(self._running):
            return
        for r in self._running:
            if r.req.done:
                self.runtime.release(r.req.adapter)
        self._running = [self._running[i] for i in keep]
        self._cache.keep_rows(keep)

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
            req.future.set_exception(exc)

    def _fail_request(self, req, exc: Exception) -> None:
        if isinstance(req, PoolingRequest):
            req.future.set_exception(exc)
            return
        req.error = exc
        req.events.put(TokenEvent([], "", "error"))
        self._finish(req, "error")

    def _fail_all_running(self, why: str) -> None:
        for req in getattr(self, "_newcomers", []):
            if isinstance(req, PoolingRequest):
                if not req.future.done():
                    req.future.set_exception(RuntimeError(why))
                    self.runtime.release(req.adapter)
            elif not req.done and not any(r.req is req for r in self._running):
                req.events.put(TokenEvent([], "", "error:" + why))
                self._finish(req, "error:" + why)
                self.runtime.release(req.adapter)
        self._newcomers = []
        for row in self._running:
            if not row.req.done:
                row.req.events.put(TokenEvent([], "", "error:" + why))
                self._finish(row.req, "error:" + why)
                self.runtime.release(row.req.adapter)
        self._running = []
        self._cache = BatchKVCache(self.num_layers)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _pad_id(model, tokenizer) -> int:
    for v in (tokenizer.pad_token_id, getattr(model.config, "pad_token_id", None), tokenizer.eos_token_id, 0):
        if isinstance(v, int):
            return v
    return 0
