"""DoRA adapters (PEFT use_dora=True) served as PEFT computes them: greedy tokens equal PEFT's in fp32 on a
tiny model of each family the runner covers (and one served through the transformers path), DoRA rows in the
same steps as plain LoRA rows and base rows."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch

from hotlora.adapters import dora
from hotlora.v1 import common_pb2, inference_pb2
from tests.server.adapter_utils import peft_greedy, upload_chunks
from tests.server.harness import running_server
from tests.server.test_runner_families import (
    _llama3_rope,
    _mistral_sliding,
    _model_dir,
    _qwen2_biases_and_window,
    _qwen3_not_covered,
)
from tests.tiny import tiny_tokenizer

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["hello world", "the quick brown fox", "a"]
NEW = 10


def _adapter(path, model_dir, seed: int, use_dora: bool, targets, r: int = 4):
    """A PEFT adapter on the model in `model_dir` with random A, B and (DoRA) a magnitude away from ||W||,
    saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=use_dora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    return path


def _gen(run, adapter, prompt):
    req = inference_pb2.GenerateRequest(
        prompt=prompt, adapter=adapter, params=common_pb2.SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    )
    return list(run.inference.Generate(req, timeout=60).token_ids)


@pytest.mark.parametrize(
    "make_config",
    [_llama3_rope, _mistral_sliding, _qwen2_biases_and_window, _qwen3_not_covered],
    ids=["llama-bias-tied", "mistral", "qwen2-qkv-bias", "qwen3-transformers-path"],
)
def test_dora_greedy_tokens_equal_peft_mixed_with_lora_and_base_rows(tmp_path, make_config):
    from transformers import AutoModelForCausalLM

    _, model_dir = _model_dir(tmp_path, make_config())
    dirs = {
        "dora-all": _adapter(tmp_path / "dora-all", model_dir, 1, True, ALL),
        "dora-attn": _adapter(tmp_path / "dora-attn", model_dir, 2, True, ["q_proj", "v_proj"], r=2),
        # square modules only: a norm over the wrong axis has the right shape there, and wrong tokens
        "dora-square": _adapter(tmp_path / "dora-square", model_dir, 4, True, ["q_proj", "o_proj"]),
        "lora-mlp": _adapter(
            tmp_path / "lora-mlp", model_dir, 3, False, ["gate_proj", "down_proj", "k_proj"]
        ),
    }
    tok = tiny_tokenizer()

    def base():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    want = {
        (n, p): peft_greedy(d, tok(p)["input_ids"], NEW, base=base) for n, d in dirs.items() for p in PROMPTS
    }
    for p in PROMPTS:
        ids = tok(p)["input_ids"]
        out = base().generate(
            torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=3
        )
        want[("", p)] = out[0, len(ids) :].tolist()
    # the magnitude really matters: DoRA's tokens are not those of its A and B served as plain LoRA
    assert want[("dora-all", PROMPTS[1])] != want[("", PROMPTS[1])]

    with running_server(model_dir, tmp_path / "data", adapter_slots=5, max_rank=8) as run:
        for name, d in dirs.items():
            run.adapters.UploadAdapter(upload_chunks(name, d), timeout=60)
        jobs = [(n, p) for n in [*dirs, ""] for p in PROMPTS]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:  # every row in flight at once: mixed steps
            got = dict(zip(jobs, pool.map(lambda j: _gen(run, *j), jobs), strict=True))
    for job in jobs:
        assert got[job] == want[job], f"{job} differs from PEFT"


def test_magnitude_scale_is_peft_dora_layers_own():
    """g = m / ||W + s·BA|| over each output row, as peft.tuners.lora.dora.DoraLinearLayer reads it."""
    from peft.tuners.lora.dora import DoraLinearLayer

    gen = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(s, generator=gen) for s in ((24, 16), (4, 16), (24, 4)))
    m = torch.rand(24, generator=gen) + 0.5
    layer = DoraLinearLayer(fan_in_fan_out=False)
    norm = layer.get_weight_norm(w, (b @ a).detach(), scaling=1.5)
    torch.testing.assert_close(dora.magnitude_scale(w, a, b, 1.5, m), m / norm, rtol=1e-6, atol=0)


def test_all_rows_scaling_equals_the_rows_one():
    """The captured-graph form (every row, g = 1 where no DoRA) equals the per-row one."""
    gen = torch.Generator().manual_seed(1)
    y, bias = torch.randn(6, 8, generator=gen), torch.randn(8, generator=gen)
    scales = torch.ones(3, 8)
    scales[2] = torch.rand(8, generator=gen) + 0.5
    slots = torch.tensor([2, -1, 0, 2, 1, -1])
    one, every = y.clone(), y.clone()
    rows = torch.tensor([0, 3])
    dora.scale_rows(one, rows, scales.index_select(0, slots[rows]), bias)
    dora.scale_all_rows(every, slots, scales, bias)
    torch.testing.assert_close(every, one)
    assert not torch.equal(one, y)
