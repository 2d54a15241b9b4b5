"""Adapters made with peft, uploaded over gRPC, served all at once: token-for-token PEFT parity."""

from __future__ import annotations

import concurrent.futures as cf

import grpc
import pytest
import torch

from hotlora.adapters.lora_layers import LoraSite
from hotlora.kernels import bf16_weights, native
from hotlora.v1 import adapters_pb2, common_pb2, inference_pb2
from tests.server.adapter_utils import make_peft_adapter, make_seq_cls_adapter, peft_greedy, upload_chunks
from tests.server.harness import running_server
from tests.tiny import build_tiny_llama, tiny_tokenizer

ADAPTERS = {
    "all-r8": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "attn-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "mlp-r16-layer1": dict(
        r=16, lora_alpha=8, target_modules=["gate_proj", "down_proj"], layers_to_transform=[1]
    ),
    "rslora-r2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"], use_rslora=True),
}
PROMPTS = ["hello world", "a", "the quick brown fox", "LoRA adapters"]
NEW = 10


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return {
        name: make_peft_adapter(root / name, seed=i + 1, **kw)
        for i, (name, kw) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(tiny_model_dir, tmp_path_factory.mktemp("data"), adapter_slots=3, max_rank=16) as run:
        yield run


def _gen(run, prompt, adapter="", ignore_eos=False):
    return run.inference.Generate(
        inference_pb2.GenerateRequest(
            prompt=prompt,
            adapter=adapter,
            params=common_pb2.SamplingParams(max_new_tokens=NEW, ignore_eos=ignore_eos),
        ),
        timeout=60,
    )


def _all_at_once(run, jobs, ignore_eos=False) -> dict:
    """(adapter, prompt) -> the Generate response, every job in flight at once (one mixed batch)."""
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        return dict(zip(jobs, pool.map(lambda j: _gen(run, j[1], j[0], ignore_eos), jobs), strict=True))


def _upload_all(run, adapter_dirs) -> None:
    for name, d in adapter_dirs.items():
        run.adapters.UploadAdapter(upload_chunks(name, d))


def test_upload_then_every_adapter_matches_peft_in_one_mixed_batch(server, adapter_dirs):
    tok = tiny_tokenizer()
    for name, d in adapter_dirs.items():
        a = server.adapters.UploadAdapter(upload_chunks(name, d))
        assert (a.name, a.version) == (name, 1)
    expected = {}
    for name, d in adapter_dirs.items():
        for p in PROMPTS:
            expected[(name, p)] = peft_greedy(d, tok(p)["input_ids"], NEW)
    base_model = build_tiny_llama()
    for p in PROMPTS:
        ids = tok(p)["input_ids"]
        out = base_model.generate(
            torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=3
        )
        expected[("", p)] = out[0, len(ids) :].tolist()
    # every adapter (more than the 3 device slots) and the base model, all in flight at once
    results = _all_at_once(server, [(name, p) for name in [*adapter_dirs, ""] for p in PROMPTS])
    for job, resp in results.items():
        assert list(resp.token_ids) == expected[job], f"{job} differs from PEFT"
        assert resp.adapter == (f"{job[0]}@1" if job[0] else "")
    # adapters really change the output
    assert expected[("all-r8", PROMPTS[0])] != expected[("", PROMPTS[0])]


def test_seq_cls_adapter_probabilities_match_peft(server, tmp_path):
    d = make_seq_cls_adapter(tmp_path / "cls")
    labels = ["neg", "neu", "pos"]
    a = server.adapters.UploadAdapter(upload_chunks("sentiment", d, labels=labels))
    assert a.task == common_pb2.TASK_SEQ_CLS and list(a.labels) == labels
    texts = ["good movie", "bad", "it was fine I guess"]
    resp = server.inference.Classify(
        inference_pb2.ClassifyRequest(adapter="sentiment", texts=texts), timeout=60
    )

    for r, probs in zip(resp.results, _peft_cls_probs(d, texts, lora_bf16=False), strict=True):
        got = torch.tensor([s.score for s in r.scores])
        assert [s.label for s in r.scores] == labels
        torch.testing.assert_close(got, probs, atol=1e-4, rtol=1e-4)
        assert r.label == labels[int(probs.argmax())]


def test_classify_with_a_generation_adapter_is_failed_precondition(server, adapter_dirs):
    server.adapters.UploadAdapter(upload_chunks("gen-only", adapter_dirs["attn-r4"]))
    with pytest.raises(grpc.RpcError) as e:
        server.inference.Classify(inference_pb2.ClassifyRequest(adapter="gen-only", texts=["x"]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "head" in e.value.details()


def test_versions_rollback_and_delete(server, adapter_dirs):
    server.adapters.UploadAdapter(upload_chunks("roll", adapter_dirs["attn-r4"]))
    v2 = server.adapters.UploadAdapter(upload_chunks("roll", adapter_dirs["all-r8"]))
    assert v2.version == 2
    assert _gen(server, "hello world", "roll").adapter == "roll@2"
    old = _gen(server, "hello world", "roll@1")
    assert old.adapter == "roll@1"
    assert list(old.token_ids) == list(_gen(server, "hello world", "attn-r4@1").token_ids)
    server.adapters.DeleteAdapter(common_pb2.AdapterRef(name="roll@2"))
    assert _gen(server, "hello world", "roll").adapter == "roll@1"
    server.adapters.DeleteAdapter(common_pb2.AdapterRef(name="roll"))
    with pytest.raises(grpc.RpcError) as e:
        _gen(server, "hello world", "roll")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_load_pin_unload_report_state(server, adapter_dirs):
    server.adapters.UploadAdapter(upload_chunks("pinme", adapter_dirs["rslora-r2"]))
    a = server.adapters.LoadAdapter(common_pb2.AdapterRef(name="pinme", pin=True))
    assert a.state == adapters_pb2.ADAPTER_STATE_DEVICE and a.pinned
    a = server.adapters.UnloadAdapter(common_pb2.AdapterRef(name="pinme"))
    assert a.state == adapters_pb2.ADAPTER_STATE_STORED and not a.pinned


def test_export_is_byte_identical(server, adapter_dirs, tmp_path):
    d = adapter_dirs["mlp-r16-layer1"]
    server.adapters.UploadAdapter(upload_chunks("exp", d))
    files = {}
    for c in server.adapters.ExportAdapter(common_pb2.AdapterRef(name="exp")):
        files[c.filename] = files.get(c.filename, b"") + c.data
    for fname in ("adapter_config.json", "adapter_model.safetensors"):
        assert files[fname] == (d / fname).read_bytes()


def _peft_cls_probs(adapter_dir, texts, lora_bf16: bool) -> list[torch.Tensor]:
    from peft import PeftModel
    from transformers import LlamaForSequenceClassification

    from tests.server.adapter_utils import round_lora_to_bf16
    from tests.tiny import tiny_llama_config

    torch.manual_seed(0)
    base = LlamaForSequenceClassification(tiny_llama_config(num_labels=3)).eval()
    base.model.load_state_dict(build_tiny_llama().model.state_dict())
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    if lora_bf16:
        round_lora_to_bf16(model)
    tok = tiny_tokenizer()
    with torch.no_grad():
        return [model(torch.tensor([tok(t)["input_ids"]])).logits.softmax(-1)[0] for t in texts]


def _gguf_tiny_llama():
    from tests.kernels.test_block_weights import gguf_values

    model = build_tiny_llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(gguf_values(p, "Q8_0" if "embed" in name or "lm_head" in name else "Q4_1"))
    return model


@pytest.mark.skipif(not native.available(), reason="bf16 banks are read by the C LoRA kernel")
def test_auto_on_a_bf16_cpu_keeps_gguf_blocks_exact_and_serves_adapters_from_bf16_banks(
    adapter_dirs, tmp_path, monkeypatch
):
    # --dtype auto on a CPU with avx512_bf16 keeps a GGUF checkpoint's blocks in fp32 (exact) and stores the
    # adapters' banks in bf16, as under bf16 compute: short prompts (no bf16 products) give PEFT's tokens on
    # that very checkpoint with A and B rounded to bf16; --dtype float32 keeps fp32 banks
    from hotlora.server import precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    path = tmp_path / "gguf"
    _gguf_tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    with running_server(path, tmp_path / "data", adapter_slots=3, max_rank=16, dtype="auto") as run:
        runner = run.state.loaded.model
        assert run.state.loaded.dtype == torch.float32 and runner.w.packed_matrices[0] > 0
        assert {s.bank.a.dtype for s in runner.sites.values()} == {torch.bfloat16}
        tok = tiny_tokenizer()
        _upload_all(run, adapter_dirs)
        # PEFT's generate below goes past EOS: so do these
        results = _all_at_once(run, [(name, p) for name in adapter_dirs for p in PROMPTS], ignore_eos=True)
    for (name, p), resp in results.items():
        want = peft_greedy(
            adapter_dirs[name], tok(p)["input_ids"], NEW, lora_bf16=True, base=_gguf_tiny_llama
        )
        assert list(resp.token_ids) == want, f"{name} {p!r} differs from PEFT on the blocks, bf16 A and B"
    with running_server(path, tmp_path / "data2", adapter_slots=3, max_rank=16, dtype="float32") as run:
        assert {s.bank.a.dtype for s in run.state.loaded.model.sites.values()} == {torch.float32}


@pytest.mark.skipif(not native.available(), reason="bf16 banks are read by the C LoRA kernel")
def test_bf16_adapter_banks_serve_as_peft_on_the_bf16_rounded_adapters(
    tiny_model_dir, adapter_dirs, tmp_path
):
    # --adapter-dtype bfloat16 under fp32 compute: banks hold A and B rounded to bf16 (half the bytes a
    # many-adapter decode step reads); the numbers are PEFT's on those rounded weights, not on the file's
    with running_server(
        tiny_model_dir,
        tmp_path / "data",
        adapter_slots=3,
        max_rank=16,
        dtype="float32",
        adapter_dtype="bfloat16",
    ) as run:
        sites = run.state.loaded.model.sites.values()
        assert {s.bank.a.dtype for s in sites} == {torch.bfloat16}
        tok = tiny_tokenizer()
        _upload_all(run, adapter_dirs)
        # more adapters than slots, in one mixed batch
        results = _all_at_once(run, [(name, p) for name in adapter_dirs for p in PROMPTS])
        for (name, p), resp in results.items():
            want = peft_greedy(adapter_dirs[name], tok(p)["input_ids"], NEW, lora_bf16=True)
            assert list(resp.token_ids) == want, f"{name} {p!r} differs from PEFT on bf16-rounded A and B"

        d = make_seq_cls_adapter(tmp_path / "cls")
        run.adapters.UploadAdapter(upload_chunks("sentiment", d, labels=["neg", "neu", "pos"]))
        texts = ["good movie", "bad", "it was fine I guess"]
        resp = run.inference.Classify(
            inference_pb2.ClassifyRequest(adapter="sentiment", texts=texts), timeout=60
        )
    rounded, exact = _peft_cls_probs(d, texts, lora_bf16=True), _peft_cls_probs(d, texts, lora_bf16=False)
    for r, want, unrounded in zip(resp.results, rounded, exact, strict=True):
        got = torch.tensor([s.score for s in r.scores])
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        assert (got - unrounded).abs().max() > 1e-5  # the rounding shows: the banks really are bf16


@pytest.mark.skipif(
    bf16_weights.unavailable_reason() is not None or not native.available(),
    reason="hotlora's C kernels cannot run here",
)
def test_the_base_product_prefetches_the_adapters_rows_and_no_token_changes(
    tiny_model_dir, adapter_dirs, tmp_path, monkeypatch
):
    # with weights stored in bf16 the base products run hotlora's weight kernel, which asks for the rows
    # the adapters' update reads next while it computes (csrc/rows_ahead.h): in a mixed decode batch
    # it gets them, for every adapter of the batch, and the tokens are those of a run without them
    asked: list[tuple[int, int]] = []
    real = bf16_weights.linear

    def spy(x, weight, bias=None, ahead=None):
        if ahead is not None:
            banks, slots = ahead
            asked.append((x.shape[0], slots.count))
        return real(x, weight, bias, ahead)

    monkeypatch.setattr(bf16_weights, "linear", spy)  # before the runner picks its linear
    with running_server(
        tiny_model_dir,
        tmp_path / "data",
        adapter_slots=4,
        max_rank=16,
        dtype="float32",
        weight_dtype="bfloat16",
    ) as run:
        _upload_all(run, adapter_dirs)
        jobs = [(name, p) for name in adapter_dirs for p in PROMPTS]

        def tokens():
            return [list(r.token_ids) for r in _all_at_once(run, jobs).values()]

        with_rows_ahead = tokens()
        assert asked and all(rows >= 2 for rows, _ in asked)  # one row streams its own weights: none asked
        assert max(count for _, count in asked) >= 2  # a step on several adapters names each of them
        monkeypatch.setattr(LoraSite, "rows_ahead", lambda self, batch=None: None)
        asked.clear()
        without = tokens()
        assert not asked
    assert with_rows_ahead == without
