"""The Tinker API on the resident model: sessions, training runs, checkpoints and samplers per tenant.

Everything a route does goes through `TinkerService`; the routes (routes.py) only parse and render. A session
lives while its SDK heartbeats (`--session-idle-seconds` without a call or heartbeat ends it: its runs' state
is dropped and their open futures fail saying so). Limits per tenant: live training runs, the memory they
hold (weights, gradients and AdamW's moments), tokens per forward_backward."""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hotlora.adapters.errors import (
    FailedPrecondition,
    HotloraError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from hotlora.adapters.names import validate_name
from hotlora.adapters.peft.format import parse_peft_adapter
from hotlora.adapters.peft.writer import write_peft_adapter
from hotlora.adapters.training.loop_lora import AdamStep, LoopLora, lora_targets, state_bytes
from hotlora.adapters.training.loop_losses import check_datum, check_loss
from hotlora.server.tinker import sampling
from hotlora.server.tinker.checkpoints import (
    Checkpoint,
    CheckpointStore,
    TinkerPath,
    check_name,
    tensors_bytes,
    tensors_of,
)
from hotlora.server.tinker.futures import Futures
from hotlora.server.tinker.runs import RunInfo, TrainingRun, optim_args, pass_args
from hotlora.server.tinker.wire import ForwardBackwardCall

log = logging.getLogger("hotlora.tinker")

OPTIMIZER_FILE = "optimizer.safetensors"
EXPIRED_KEPT = 4096  # ended sessions remembered, to say why a call on one is refused


class Gone(HotloraError):
    """The session ended (HTTP 410: the SDK stops its heartbeat)."""


class Session:
    def __init__(self, sid: str, tenant: str, display_name: str):
        self.id, self.tenant, self.display_name = sid, tenant, display_name
        self.last_seen = time.monotonic()
        self.runs: dict[str, TrainingRun] = {}
        self.samplers: dict[str, str] = {}  # sampling session id -> adapter ref ("" = base model)


class TinkerService:
    def __init__(self, *, config, loaded, adapters, frontend, queue, base, ctx, targets, data_dir):
        self.config, self.loaded, self.adapters, self.frontend = config, loaded, adapters, frontend
        self.queue, self.base, self.ctx, self.targets = queue, base, ctx, tuple(targets)
        self.futures = Futures()
        self.store = CheckpointStore(data_dir)
        self.io = ThreadPoolExecutor(2, thread_name_prefix="hotlora-tinker-io")
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()  # session -> why
        self._ended_tenant: dict[str, str] = {}  # ended session -> its tenant
        self._samplers: dict[str, Session] = {}
        self._closed = threading.Event()
        self.vocab = int(frontend.vocab_size)
        self.max_positions = int(frontend.engine.max_positions)
        self._reaper = threading.Thread(target=self._reap, name="hotlora-tinker-sessions", daemon=True)
        self._reaper.start()

    @property
    def served_name(self) -> str:
        return self.config.served_model_name or self.loaded.name

    # ---- sessions ------------------------------------------------------------------------------
    def create_session(self, tenant: str, display_name: str = "") -> dict:
        self._check_open()
        s = Session(uuid.uuid4().hex[:16], tenant, display_name or "")
        with self._lock:
            self._sessions[s.id] = s
        out = {"type": "create_session", "session_id": s.id}
        if self.config.tinker_unembed == "without":
            out["warning_message"] = (
                "this server trains no LM head LoRA: a training client asking train_unembed=True trains its "
                "attention and MLP LoRA only (--tinker-unembed without)"
            )
        return out

    def heartbeat(self, tenant: str, session_id: str) -> dict:
        self._session(tenant, session_id)
        return {"type": "session_heartbeat"}

    def end_session(self, tenant: str, session_id: str) -> None:
        s = self._session(tenant, session_id)
        self._end(s, f"session {s.id} was ended by its client; its training state was dropped")

    def _session(self, tenant: str, session_id: str) -> Session:
        with self._lock:
            s = self._sessions.get(session_id)
            why = self._ended.get(session_id)
        if s is None or s.tenant != tenant:
            if why is not None and s is None and self._ended_tenant.get(session_id) == tenant:
                raise Gone(why)
            raise NotFound(f"session {session_id!r} not found")
        s.last_seen = time.monotonic()
        return s

    def _end(self, s: Session, why: str) -> None:
        with self._lock:
            if self._sessions.pop(s.id, None) is None:
                return
            self._ended[s.id] = why
            self._ended_tenant[s.id] = s.tenant
            while len(self._ended) > EXPIRED_KEPT:
                old, _ = self._ended.popitem(last=False)
                self._ended_tenant.pop(old, None)
            for sid in s.samplers:
                self._samplers.pop(sid, None)
        for run in s.runs.values():
            run.close(why)
        self.futures.fail_session(s.id, why)
        log.info("tinker session %s of %s ended: %s", s.id, s.tenant, why)

    def _reap(self) -> None:
        idle = self.config.session_idle_seconds
        while not self._closed.wait(min(5.0, max(idle / 4, 0.05))):
            now = time.monotonic()
            with self._lock:
                stale = [s for s in self._sessions.values() if now - s.last_seen > idle]
            for s in stale:
                self._end(
                    s,
                    f"session {s.id} expired after {idle:g} s without a heartbeat or call "
                    "(--session-idle-seconds); its training state was dropped, saved checkpoints are kept",
                )

    # ---- training runs -------------------------------------------------------------------------
    def create_model(self, tenant: str, body: dict) -> str:
        s = self._session(tenant, body.get("session_id", ""))
        self._check_base(body.get("base_model", ""))
        lora = body.get("lora_config")
        if not lora:
            raise InvalidArgument("lora_config is required: this server trains LoRA adapters only")
        opt = (body.get("optimizer_config") or {}).get("type", "adamw")
        if opt != "adamw":
            raise InvalidArgument(f"optimizer_config {opt!r} is not offered by this server (adamw only)")
        info = self._run_info(tenant, s, int(body.get("model_seq_id", 0)), lora, body.get("user_metadata"))
        run = self._start_run(s, info, first_seq=1)
        fut = self.futures.create(tenant, s.id, "CreateModel")
        self.futures.finish(fut, {"model_id": run.info.model_id, "type": "create_model"})
        return fut.id

    def _check_base(self, base_model: str) -> None:
        served = {self.served_name, self.loaded.name, str(self.config.model or "")} - {""}
        if base_model not in served:
            raise InvalidArgument(
                f"base_model {base_model!r} is not served here: this server trains LoRA on its resident "
                f"model {self.served_name!r} only"
            )

    def _run_info(self, tenant: str, s: Session, seq: int, lora: dict, user_metadata) -> RunInfo:
        rank = int(lora.get("rank", 0))
        if not 1 <= rank <= self.config.max_rank:
            raise InvalidArgument(
                f"lora_config.rank must be in [1, {self.config.max_rank}] (--max-rank); got {rank}"
            )
        mlp, attn = bool(lora.get("train_mlp", True)), bool(lora.get("train_attn", True))
        unembed = bool(lora.get("train_unembed", True))
        if unembed and self.config.tinker_unembed == "refuse":
            raise InvalidArgument(
                "train_unembed=True is refused: this server has no LoRA on the LM head (unembedding) yet; "
                "create the training client with train_unembed=False (the server's operator may instead "
                "train attention and MLP only with --tinker-unembed without)"
            )
        if not lora_targets(self.targets, mlp, attn):
            raise InvalidArgument(
                f"nothing to train: train_mlp={mlp}, train_attn={attn} name none of this server's LoRA "
                f"targets ({', '.join(self.targets)}; --target-modules)"
            )
        seed = lora.get("seed")
        return RunInfo(
            model_id=f"{s.id}:train:{seq}",
            tenant=tenant,
            session=s.id,
            base_model=self.served_name,
            rank=rank,
            train_mlp=mlp,
            train_attn=attn,
            train_unembed=unembed,
            seed=int(seed) if seed is not None else int(uuid.uuid4().int % 2**31),
            user_metadata=dict(user_metadata or {}),
        )

    def _start_run(self, s: Session, info: RunInfo, first_seq: int) -> TrainingRun:
        targets = lora_targets(self.targets, info.train_mlp, info.train_attn)
        info.bytes = state_bytes(self.base.linear_shapes, self.base.num_layers, targets, info.rank)
        cfg = self.config
        with self._lock:
            if info.model_id in s.runs:
                raise InvalidArgument(f"model_seq_id of {info.model_id} was already used in this session")
            live = [r for x in self._sessions.values() if x.tenant == info.tenant for r in x.runs.values()]
            if len(live) >= cfg.tinker_max_runs_per_tenant:
                raise PermissionDenied(
                    f"you have {len(live)} live training clients, the limit per tenant "
                    f"(--tinker-max-runs-per-tenant {cfg.tinker_max_runs_per_tenant}); end a session or let "
                    "one expire first"
                )
            used = sum(r.info.bytes for r in live)
            if used + info.bytes > cfg.tinker_max_bytes_per_tenant:
                raise PermissionDenied(
                    f"a rank-{info.rank} training client holds {info.bytes} bytes (weights, gradients, AdamW "
                    f"moments); your live ones hold {used}, the limit per tenant is "
                    f"{cfg.tinker_max_bytes_per_tenant} (--tinker-max-bytes-per-tenant)"
                )
            lora = LoopLora(
                self.loaded.model,
                self.ctx,
                num_layers=self.base.num_layers,
                shapes=self.base.linear_shapes,
                targets=targets,
                rank=info.rank,
                seed=info.seed,
                unit_seconds=cfg.max_train_unit_ms / 1000.0,
            )
            run = TrainingRun(info, lora, self.futures, self._enqueue, self.io, first_seq)
            s.runs[info.model_id] = run
        self.store.write_run(info.tenant, info.model_id, self._run_json(info))
        return run

    def _enqueue(self, run: TrainingRun) -> None:
        self.queue.add(run.info.tenant, run)

    @staticmethod
    def _run_json(info: RunInfo) -> dict:
        return {
            "training_run_id": info.model_id,
            "base_model": info.base_model,
            "rank": info.rank,
            "train_mlp": info.train_mlp,
            "train_attn": info.train_attn,
            "train_unembed": info.train_unembed,
            "created": info.created,
            "user_metadata": {k: str(v) for k, v in info.user_metadata.items()},
        }

    def run(self, tenant: str, model_id: str) -> TrainingRun:
        sid = model_id.partition(":")[0]
        with self._lock:
            s = self._sessions.get(sid)
            why = self._ended.get(sid) if self._ended_tenant.get(sid) == tenant else None
        run = s.runs.get(model_id) if s is not None and s.tenant == tenant else None
        if run is None:
            if why is not None:
                raise NotFound(f"training client {model_id} is gone: {why}")
            if self.store.run(tenant, model_id) is not None:
                raise NotFound(
                    f"training client {model_id} is not live (the server restarted since it was created); "
                    "its "
                    "saved checkpoints are kept: load one into a new training client"
                )
            raise NotFound(f"model {model_id!r} not found")
        s.last_seen = time.monotonic()
        return run

    def get_info(self, tenant: str, model_id: str) -> dict:
        info = self.run(tenant, model_id).info
        return {
            "type": "get_info",
            "model_id": info.model_id,
            "model_data": {
                "arch": self.loaded.model.config.model_type if hasattr(self.loaded.model, "config") else None,
                "model_name": self.served_name,
                "tokenizer_id": str(self.config.model),
            },
            "is_lora": True,
            "lora_rank": info.rank,
            "model_name": self.served_name,
        }

    def unload_model(self, tenant: str, model_id: str) -> str:
        run = self.run(tenant, model_id)
        fut = self.futures.create(tenant, run.info.session, "UnloadModel")
        with self._lock:
            s = self._sessions.get(run.info.session)
            if s is not None:
                s.runs.pop(model_id, None)
        run.close(f"training client {model_id} was unloaded")
        self.futures.finish(fut, {"model_id": model_id, "type": "unload_model"})
        return fut.id

    # ---- forward_backward and optim_step ---------------------------------------------------------
    def forward_backward(self, tenant: str, call: ForwardBackwardCall) -> str:
        run = self.run(tenant, call.model_id)
        kind = "Forward" if call.forward_only else "ForwardBackward"
        again = run.seen(call.seq_id, kind)
        if again:
            return again
        try:
            config = check_loss(call.loss_fn, call.loss_fn_config)
            if not call.data:
                raise InvalidArgument("forward_backward needs at least one datum")
            data = [check_datum(call.loss_fn, i, t, inp, self.vocab) for i, (t, inp) in enumerate(call.data)]
            self._check_tokens(data)
        except HotloraError:
            run.skip(call.seq_id, kind)
            raise
        fut = self.futures.create(tenant, run.info.session, kind)
        run.submit(call.seq_id, "pass", fut, **pass_args(data, call.loss_fn, config, not call.forward_only))
        return fut.id

    def _check_tokens(self, data) -> None:
        longest = max(len(d.tokens) for d in data)
        if longest > self.max_positions:
            raise InvalidArgument(
                f"a datum has {longest} tokens; the model's context is {self.max_positions} tokens"
            )
        total = sum(len(d.tokens) for d in data)
        if total > self.config.tinker_max_batch_tokens:
            raise InvalidArgument(
                f"this forward_backward has {total} tokens; one call may have at most "
                f"{self.config.tinker_max_batch_tokens} (--tinker-max-batch-tokens): split the batch"
            )

    def optim_step(self, tenant: str, body: dict) -> str:
        run = self.run(tenant, body.get("model_id", ""))
        seq = body.get("seq_id")
        again = run.seen(seq, "OptimStep")
        if again:
            return again
        try:
            adam = _adam(body.get("adam_params") or body.get("optim_params") or body.get("optimizer_params"))
        except HotloraError:
            run.skip(seq, "OptimStep")
            raise
        fut = self.futures.create(tenant, run.info.session, "OptimStep")
        run.submit(seq, "optim", fut, **optim_args(adam))
        return fut.id

    # ---- weights ---------------------------------------------------------------------------------
    def save_weights(self, tenant: str, body: dict, for_sampler: bool) -> str:
        run = self.run(tenant, body.get("model_id", ""))
        seq = body.get("seq_id")
        kind = "SaveWeightsForSampler" if for_sampler else "SaveWeights"
        again = run.seen(seq, kind)
        if again:
            return again
        info = run.info
        try:
            name = body.get("path")
            if name is None and not for_sampler:
                raise InvalidArgument("save_weights needs a path (the checkpoint's name)")
            if name is not None:
                check_name(name)
        except HotloraError:
            run.skip(seq, kind)
            raise
        meta = {k: str(v) for k, v in (body.get("user_metadata") or {}).items()}
        ttl = body.get("ttl_seconds")
        expires = time.time() + float(ttl) if ttl else None
        fut = self.futures.create(tenant, info.session, kind)
        if for_sampler:
            write = self._sampler_writer(tenant, run, name, meta, expires)
        else:
            path = TinkerPath(info.model_id, "weights", name)
            write = self._state_writer(tenant, path, meta, expires, bool(body.get("overwrite")))
        run.submit(seq, "snapshot", fut, write=write, optimizer=not for_sampler)
        return fut.id

    def _state_writer(self, tenant, path: TinkerPath, meta, expires, overwrite):
        def write(weights, optimizer) -> dict:
            files = write_peft_adapter(weights, self.served_name, base=self.base)
            files[OPTIMIZER_FILE] = tensors_bytes(optimizer or {})
            size = sum(len(d) for d in files.values())
            ckpt = Checkpoint(str(path), "training", time.time(), size, meta, expires)
            self.store.save(tenant, path, files, ckpt, overwrite)
            return {"path": str(path), "type": "save_weights"}

        return write

    def _sampler_writer(self, tenant, run: TrainingRun, name: str | None, meta, expires):
        info = run.info
        adapter = name.lower() if name else f"tinker-{info.session}-{info.model_id.rsplit(':', 1)[-1]}"

        def write(weights, optimizer) -> dict:
            validate_name(adapter)
            files = write_peft_adapter(weights, self.served_name, base=self.base)
            view = self.adapters.upload(
                tenant,
                adapter,
                files,
                description=f"saved for sampling by the Tinker training client {info.model_id}",
                source="FINETUNE",
                weights=weights,  # the cache's host tier gets these tensors: no load from disk to sample
            )
            ref = view.record.ref
            ckpt_name = name or ref.replace("@", "-")
            path = TinkerPath(info.model_id, "sampler_weights", ckpt_name)
            size = sum(len(d) for d in files.values())
            ckpt = Checkpoint(str(path), "sampler", time.time(), size, meta, expires, adapter_ref=ref)
            self.store.save(tenant, path, {}, ckpt, overwrite=True)
            out = {"path": str(path), "type": "save_weights_for_sampler"}
            if name is None:  # save_weights_and_get_sampling_client: a sampling session on it
                out["sampling_session_id"] = self._new_sampler(tenant, info.session, ref)
            return out

        return write

    def load_weights(self, tenant: str, body: dict) -> str:
        path = TinkerPath.parse(body.get("path", ""))
        if path.kind != "weights":
            raise InvalidArgument(
                f"{path} holds sampler weights: load_weights reads tinker://<run>/weights/<name>"
            )
        files = self.store.files(tenant, path)
        weights = parse_peft_adapter(
            {k: v for k, v in files.items() if k.startswith("adapter_")}, self.base, self.adapters.limits
        )
        optimizer = (
            tensors_of(files[OPTIMIZER_FILE]) if body.get("optimizer") and OPTIMIZER_FILE in files else None
        )
        if body.get("session_id"):  # create-via-load: a new training client whose first call is this load
            s = self._session(tenant, body["session_id"])
            if body.get("base_model"):
                self._check_base(body["base_model"])
            source = self.store.run(tenant, path.run) or {}
            lora = {
                "rank": weights.rank,
                "train_mlp": source.get("train_mlp", True),
                "train_attn": source.get("train_attn", True),
                "train_unembed": source.get("train_unembed", False),
            }
            info = self._run_info(
                tenant, s, int(body.get("model_seq_id", 0)), lora, body.get("user_metadata")
            )
            run = self._start_run(s, info, first_seq=0)
            seq = 0
        else:
            run = self.run(tenant, body.get("model_id", ""))
            seq = body.get("seq_id")
            again = run.seen(seq, "LoadWeights")
            if again:
                return again
        why = run.lora.compatible(weights)
        if why:
            run.skip(seq, "LoadWeights")
            raise InvalidArgument(f"{path} cannot be loaded into {run.info.model_id}: {why}")
        fut = self.futures.create(tenant, run.info.session, "LoadWeights")
        response = {"path": str(path), "model_id": run.info.model_id, "type": "load_weights"}
        run.submit(seq, "load", fut, weights=weights, optimizer=optimizer, response=response)
        return fut.id

    # ---- sampling ----------------------------------------------------------------------------------
    def create_sampling_session(self, tenant: str, body: dict) -> str:
        s = self._session(tenant, body.get("session_id", ""))
        model_path, base_model = body.get("model_path"), body.get("base_model")
        if bool(model_path) == bool(base_model):
            raise InvalidArgument("name exactly one of model_path (tinker://...) and base_model")
        if base_model:
            self._check_base(base_model)
            ref = ""
        else:
            path = TinkerPath.parse(model_path)
            if path.kind != "sampler_weights":
                raise InvalidArgument(
                    f"{path} holds training state: sample from a save_weights_for_sampler path "
                    "(tinker://<run>/sampler_weights/<name>)"
                )
            ref = self.store.meta(tenant, path).adapter_ref
            self.adapters.get(tenant, ref)  # still in the registry (NotFound otherwise)
        return self._new_sampler(tenant, s.id, ref)

    def _new_sampler(self, tenant: str, session_id: str, ref: str) -> str:
        sid = f"{session_id}:sample:{uuid.uuid4().hex[:8]}"
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None or s.tenant != tenant:
                raise NotFound(f"session {session_id!r} not found")
            s.samplers[sid] = ref
            self._samplers[sid] = s
        return sid

    def sampler(self, tenant: str, sampler_id: str) -> tuple[Session, str]:
        with self._lock:
            s = self._samplers.get(sampler_id)
        if s is None or s.tenant != tenant:
            raise NotFound(f"sampler {sampler_id!r} not found")
        s.last_seen = time.monotonic()
        return s, s.samplers[sampler_id]

    def get_sampler(self, tenant: str, sampler_id: str) -> dict:
        _, ref = self.sampler(tenant, sampler_id)
        return {"sampler_id": sampler_id, "base_model": self.served_name, "model_path": ref or None}

    def asample(self, tenant: str, body: dict) -> dict:
        sid = body.get("sampling_session_id")
        if sid:
            s, ref = self.sampler(tenant, sid)
        else:  # a one-off sample: base_model, or a sampler model_path
            s = None
            if body.get("model_path"):
                path = TinkerPath.parse(body["model_path"])
                ref = self.store.meta(tenant, path).adapter_ref
            else:
                self._check_base(body.get("base_model") or "")
                ref = ""
        tokens, n = sampling.check_sample_request(body, self.vocab, self.config)
        want_prompt = bool(body.get("prompt_logprobs"))
        params = sampling.sampling_params(body.get("sampling_params") or {}, self.config, want_prompt)
        if len(tokens) + params.max_new_tokens > self.max_positions:
            raise InvalidArgument(
                f"prompt ({len(tokens)} tokens) + max_tokens ({params.max_new_tokens}) is over the model's "
                f"context of {self.max_positions} tokens"
            )
        fut = self.futures.create(tenant, s.id if s else "", "Sample")
        collector = sampling.SampleCollector(self.futures, fut, n, want_prompt)
        fe = self.frontend
        try:
            for i in range(n):
                p = params if params.seed is None else _with_seed(params, params.seed + i)
                req, _ = fe.start_generation(
                    tenant, sampling.generate_input(ref, fut.id), None, prepared=(list(tokens), p),
                    events=collector.sink(i),
                )  # fmt: skip
                collector.requests.append(req)
        except Exception:
            collector.cancel()
            self.futures.fail(fut, "sampling was refused", "server")
            raise
        collector.all_submitted()
        return {"request_id": fut.id, "sample_sequence_ids": [f"{fut.id}:{i}" for i in range(n)]}

    # ---- listings -----------------------------------------------------------------------------------
    def capabilities(self) -> dict:
        return {
            "supported_models": [
                {
                    "model_name": self.served_name,
                    "max_context_length": self.max_positions,
                    "trainable": True,
                    "sampleable": True,
                }
            ]
        }

    def training_runs(self, tenant: str, limit: int, offset: int) -> dict:
        runs = [self.training_run(tenant, r["training_run_id"]) for r in self.store.runs(tenant)]
        page = runs[offset : offset + limit]
        return {"training_runs": page, "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}

    def training_run(self, tenant: str, run_id: str) -> dict:
        r = self.store.run(tenant, run_id)
        if r is None:
            raise NotFound(f"training run {run_id!r} not found")
        ckpts = self.store.list(tenant, run_id)
        last = {kind: None for kind in ("training", "sampler")}
        for c in ckpts:
            last[c.kind] = _checkpoint_json(c)
        live = self._live_info(tenant, run_id)
        return {
            "training_run_id": run_id,
            "base_model": r["base_model"],
            "model_owner": tenant,
            "is_lora": True,
            "corrupted": False,
            "lora_rank": r["rank"],
            "last_request_time": _iso(live.last_request if live else r["created"]),
            "last_checkpoint": last["training"],
            "last_sampler_checkpoint": last["sampler"],
            "user_metadata": r.get("user_metadata") or None,
        }

    def _live_info(self, tenant: str, run_id: str) -> RunInfo | None:
        try:
            return self.run(tenant, run_id).info
        except NotFound:
            return None

    def checkpoints(self, tenant: str, run_id: str) -> dict:
        if self.store.run(tenant, run_id) is None:
            raise NotFound(f"training run {run_id!r} not found")
        return {"checkpoints": [_checkpoint_json(c) for c in self.store.list(tenant, run_id)]}

    def delete_checkpoint(self, tenant: str, run_id: str, checkpoint_id: str) -> None:
        self.store.delete(tenant, TinkerPath.parse(f"tinker://{run_id}/{checkpoint_id}"))

    def weights_info(self, tenant: str, tinker_path: str) -> dict:
        path = TinkerPath.parse(tinker_path)
        r = self.store.run(tenant, path.run)
        self.store.meta(tenant, path)
        return {
            "base_model": r["base_model"],
            "is_lora": True,
            "lora_rank": r["rank"],
            "train_unembed": r.get("train_unembed"),
            "train_mlp": r.get("train_mlp"),
            "train_attn": r.get("train_attn"),
        }

    # ---- lifecycle ------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed.is_set():
            raise FailedPrecondition("the server is shutting down")

    def close(self) -> None:
        """The server stops: every open future fails (the SDK's caller hears it), runs are dropped."""
        self._closed.set()
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            for run in s.runs.values():
                run.close("the server stopped before this request finished; saved checkpoints are kept")
        self.futures.fail_all("the server stopped before this request finished; saved checkpoints are kept")
        self.io.shutdown(wait=True)


def _adam(p: dict | None) -> AdamStep:
    if not p:
        raise InvalidArgument("optim_step needs adam_params")
    if p.get("type") not in (None, "adam", "adamw"):
        raise InvalidArgument(f"optimizer {p.get('type')!r} is not offered by this server (adamw only)")
    fields = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
    step = AdamStep(**{k: float(p[k]) for k in fields if k in p})
    if not all(np.isfinite(getattr(step, k)) for k in fields):
        raise InvalidArgument("adam_params must be finite numbers")
    if step.learning_rate < 0 or not 0 <= step.beta1 < 1 or not 0 <= step.beta2 < 1 or step.eps <= 0:
        raise InvalidArgument(
            "adam_params: learning_rate >= 0, 0 <= beta1 < 1, 0 <= beta2 < 1 and eps > 0 are needed "
            f"(got {step})"
        )
    if step.weight_decay < 0 or step.grad_clip_norm < 0:
        raise InvalidArgument("adam_params: weight_decay and grad_clip_norm must be >= 0")
    return step


def _with_seed(params, seed: int):
    import dataclasses

    return dataclasses.replace(params, seed=seed % 2**63)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _checkpoint_json(c: Checkpoint) -> dict:
    run, kind, name = c.path[len("tinker://") :].split("/")
    return {
        "checkpoint_id": f"{kind}/{name}",
        "checkpoint_type": c.kind,
        "time": _iso(c.created),
        "tinker_path": c.path,
        "size_bytes": c.size_bytes,
        "public": False,
        "user_metadata": c.user_metadata or None,
        "expires_at": _iso(c.expires_at) if c.expires_at else None,
    }
