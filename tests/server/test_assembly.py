"""`assemble(config)` without a server: the typed components it returns work together, the observer it is
given hears the engine and the cache, and a failure part-way leaves no engine thread running."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from hotlora.adapters.observer import NoObserver
from hotlora.server import assembly
from hotlora.server.assembly import Components, assemble
from hotlora.server.config import ServerConfig
from hotlora.server.frontend.events import request_events
from hotlora.server.frontend.inference import GenerateInput


class Recorder(NoObserver):
    def __init__(self):
        self.forwards: list[str] = []
        self.finished = 0

    def forward_finished(self, kind, rows, tokens, seconds):
        self.forwards.append(kind)

    def request_finished(self, req):
        self.finished += 1


def _config(tiny_model_dir, tmp_path) -> ServerConfig:
    # fp32: the tests compare with transformers' fp32 numbers (auto is bf16 on an avx512_bf16 CPU)
    return ServerConfig(
        model=str(tiny_model_dir), data_dir=str(tmp_path), device="cpu", dtype="float32", http_port=-1
    )


def _engine_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "engine" in t.name.lower()}


def test_assembled_components_generate_what_transformers_generates(tiny_model_dir, tmp_path):
    observer = Recorder()
    c = assemble(_config(tiny_model_dir, tmp_path), observer)
    try:
        assert isinstance(c, Components)
        assert c.frontend.engine is c.engine and c.training.adapters is c.adapters
        g = GenerateInput(prompt="hello there", max_new_tokens=6)
        req, _ = c.frontend.start_generation("acme", g, None)
        events = list(request_events(req))
        assert events[-1].finish_reason is not None
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        ids = torch.tensor([req.prompt_ids])
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, ids.shape[1] :]
        assert req.output_ids == ref.tolist()
        assert "prefill" in observer.forwards and "decode" in observer.forwards
        assert observer.finished == 1
    finally:
        c.training.close()
        c.engine.stop()
        c.adapters.close()


def test_a_failure_after_the_engine_started_stops_it(tiny_model_dir, tmp_path, monkeypatch):
    before = _engine_threads()

    def broken(*args, **kwargs):
        raise RuntimeError("training setup failed")

    monkeypatch.setattr(assembly, "setup_training", broken)
    with pytest.raises(RuntimeError, match="training setup failed"):
        assemble(_config(tiny_model_dir, tmp_path))
    assert _engine_threads() - before == set()


def test_a_bad_target_module_list_fails_before_an_engine_exists(tiny_model_dir, tmp_path):
    before = _engine_threads()
    cfg = ServerConfig(
        model=str(tiny_model_dir), data_dir=str(tmp_path), device="cpu", http_port=-1, target_modules="nope"
    )
    with pytest.raises(ValueError, match="names no linear layer of this model"):
        assemble(cfg)
    assert _engine_threads() - before == set()


def test_auto_computes_in_fp32_where_a_setting_reads_fp32_only(tiny_model_dir, tmp_path, monkeypatch):
    # on a CPU with avx512_bf16 auto is bf16 for the tiny (plain fp32) model; --adapter-dtype float32 asks
    # for exact fp32 banks, which bf16 compute cannot take: auto is fp32 then, and the server starts
    from hotlora.server import precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    cfg = dataclasses.replace(_config(tiny_model_dir, tmp_path), dtype="auto", adapter_dtype="float32")
    c = assemble(cfg)
    try:
        assert c.engine.runner.dtype == torch.float32
        assert {s.bank.a.dtype for s in c.engine.runner.sites.values()} == {torch.float32}
    finally:
        c.training.close()
        c.engine.stop()
        c.adapters.close()


def test_adapter_dtype_on_a_model_served_through_transformers_fails_at_start(tmp_path):
    from tests.server.test_runner_families import _model_dir, _qwen3_not_covered

    _, path = _model_dir(tmp_path, _qwen3_not_covered())
    before = _engine_threads()
    cfg = ServerConfig(
        model=str(path),
        data_dir=str(tmp_path / "data"),
        device="cpu",
        dtype="float32",
        http_port=-1,
        adapter_dtype="bfloat16",
    )
    with pytest.raises(ValueError, match="--adapter-dtype bfloat16 needs hotlora's runner"):
        assemble(cfg)
    assert _engine_threads() - before == set()
