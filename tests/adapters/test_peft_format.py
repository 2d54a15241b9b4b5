"""Adapters written by the peft library parse to the deltas PEFT applies; bad ones are refused."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hotlora.adapters.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from hotlora.adapters.peft.files import model_files
from hotlora.adapters.peft.format import AdapterLimits, parse_peft_adapter, write_peft_adapter
from tests.adapters.conftest import NUM_LABELS, build_tiny_classifier, read_dir
from tests.tiny import build_tiny_llama

LIMITS = AdapterLimits()
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CAUSAL_CONFIGS = {
    "r4-qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r16-all": dict(r=16, lora_alpha=32, target_modules=ALL),
    "r1-mlp-layer1": dict(
        r=1, lora_alpha=2, target_modules=["gate_proj", "up_proj", "down_proj"], layers_to_transform=[1]
    ),
    "layers-pattern": dict(
        r=2, lora_alpha=4, target_modules=["o_proj"], layers_to_transform=0, layers_pattern="layers"
    ),
    "rslora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"], use_rslora=True),
    "rank-alpha-pattern": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3.0},
    ),
    "regex": dict(r=4, lora_alpha=4, target_modules=r".*layers\.1\.self_attn\.(q|o)_proj"),
    "all-linear": dict(r=2, lora_alpha=2, target_modules="all-linear"),
    "exclude": dict(
        r=2,
        lora_alpha=2,
        target_modules=["k_proj", "up_proj"],
        exclude_modules=["model.layers.0.mlp.up_proj"],
    ),
    "default-targets": dict(r=4, lora_alpha=8),
}


def peft_deltas(model) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, short name) -> the delta PEFT itself adds to the base weight."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            layer = int(name.split(".layers.")[1].split(".")[0])
            out[(layer, name.rsplit(".", 1)[-1])] = module.get_delta_weight("default")
    return out


@pytest.mark.parametrize("name", list(CAUSAL_CONFIGS))
def test_parsed_deltas_equal_peft(name, base_info, peft_adapter):
    files, model = peft_adapter(LoraConfig(task_type="CAUSAL_LM", **CAUSAL_CONFIGS[name]), seed=1)
    weights = parse_peft_adapter(files, base_info, LIMITS)
    expected = peft_deltas(model)
    assert set(weights.modules) == set(expected)
    for key, delta in expected.items():
        module = weights.modules[key]
        assert module.a.dtype == torch.float32 and module.a.is_contiguous()
        torch.testing.assert_close(module.delta_weight(), delta, rtol=1e-5, atol=1e-6)
    assert weights.task == "CAUSAL_LM" and weights.head_weight is None and weights.labels == ()
    assert weights.rank == max(m.rank for m in weights.modules.values())
    assert weights.target_modules == tuple(sorted({s for _, s in expected}))


def test_layers_and_patterns_select_what_peft_selects(base_info, peft_adapter):
    files, _ = peft_adapter(LoraConfig(task_type="CAUSAL_LM", **CAUSAL_CONFIGS["rank-alpha-pattern"]))
    weights = parse_peft_adapter(files, base_info, LIMITS)
    assert weights.modules[(0, "q_proj")].rank == 2
    assert weights.modules[(1, "down_proj")].rank == 6 and weights.modules[(0, "down_proj")].rank == 4
    assert weights.modules[(0, "v_proj")].scale == pytest.approx(3.0 / 4)
    assert weights.rank == 6
    files, _ = peft_adapter(LoraConfig(task_type="CAUSAL_LM", **CAUSAL_CONFIGS["regex"]))
    assert sorted(parse_peft_adapter(files, base_info, LIMITS).modules) == [(1, "o_proj"), (1, "q_proj")]


def test_seq_cls_head_and_labels(base_info, peft_adapter):
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    files, model = peft_adapter(config, seed=2)
    weights = parse_peft_adapter(files, base_info, LIMITS, labels=["neg", "neu", "pos"])
    assert weights.task == "SEQ_CLS" and weights.labels == ("neg", "neu", "pos")
    head = model.base_model.model.score.modules_to_save["default"].weight
    torch.testing.assert_close(weights.head_weight, head.detach())
    assert weights.head_bias is None
    for key, delta in peft_deltas(model).items():
        torch.testing.assert_close(weights.modules[key].delta_weight(), delta, rtol=1e-5, atol=1e-6)
    assert parse_peft_adapter(files, base_info, LIMITS).labels == ("LABEL_0", "LABEL_1", "LABEL_2")
    assert weights.nbytes == sum(m.a.nbytes + m.b.nbytes for m in weights.modules.values()) + head.nbytes


def test_half_precision_tensors_become_float32(base_info, causal_files):
    tensors = {k: v.to(torch.bfloat16) for k, v in st_load(causal_files["adapter_model.safetensors"]).items()}
    files = dict(causal_files, **{"adapter_model.safetensors": st_save(tensors)})
    weights = parse_peft_adapter(files, base_info, LIMITS)
    assert all(m.a.dtype == torch.float32 and m.b.dtype == torch.float32 for m in weights.modules.values())


def _logits(model, seq_cls: bool = False) -> torch.Tensor:
    ids = torch.tensor([[5, 77, 123, 9, 200, 31], [8, 8, 60, 3, 250, 17]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["r16-all", "rslora", "rank-alpha-pattern", "regex", "r1-mlp-layer1"])
def test_written_adapter_loads_in_peft_with_identical_logits(name, base_info, peft_adapter, tmp_path):
    files, original = peft_adapter(LoraConfig(task_type="CAUSAL_LM", **CAUSAL_CONFIGS[name]), seed=3)
    weights = parse_peft_adapter(files, base_info, LIMITS)
    written = write_peft_adapter(weights, "tiny-llama", base=base_info)
    assert set(written) == {"adapter_config.json", "adapter_model.safetensors"}
    for fname, data in written.items():
        (tmp_path / fname).write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(build_tiny_llama(0), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), _logits(original), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(loaded), _logits(build_tiny_llama(0)), atol=1e-3)
    again = parse_peft_adapter(written, base_info, LIMITS)
    assert set(again.modules) == set(weights.modules)
    for key, module in weights.modules.items():
        torch.testing.assert_close(again.modules[key].delta_weight(), module.delta_weight())
    assert json.loads(written["adapter_config.json"])["base_model_name_or_path"] == "tiny-llama"


def test_written_seq_cls_adapter_round_trips(base_info, peft_adapter, tmp_path):
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"])
    files, original = peft_adapter(config, seed=4)
    weights = parse_peft_adapter(files, base_info, LIMITS, labels=["a", "b", "c"])
    for fname, data in write_peft_adapter(weights, "tiny-llama").items():  # default Llama layout
        (tmp_path / fname).write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(build_tiny_classifier(0), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), _logits(original), rtol=1e-5, atol=1e-5)


def test_written_non_product_module_set_round_trips(base_info, causal_files, tmp_path):
    weights = parse_peft_adapter(causal_files, base_info, LIMITS)
    partial = dict(weights.modules)
    del partial[(1, "v_proj")]
    from dataclasses import replace

    weights = replace(weights, modules=partial)
    again = parse_peft_adapter(write_peft_adapter(weights, "x", base=base_info), base_info, LIMITS)
    assert set(again.modules) == set(partial)


# ---- refusals -----------------------------------------------------------------------------------------


def _config(files, **changes) -> dict[str, bytes]:
    cfg = json.loads(files["adapter_config.json"])
    cfg.update(changes)
    return dict(files, **{"adapter_config.json": json.dumps(cfg).encode()})


def _tensors(files, edit) -> dict[str, bytes]:
    tensors = dict(st_load(files["adapter_model.safetensors"]))
    edit(tensors)
    return dict(files, **{"adapter_model.safetensors": st_save(tensors)})


A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _header_beyond(files):
    data = files["adapter_model.safetensors"]
    return dict(files, **{"adapter_model.safetensors": struct.pack("<Q", len(data) * 2) + data[8:]})


BAD = {
    "wrong-rank-shape": (lambda f: _tensors(f, _set(A0, torch.ones(3, 64))), InvalidArgument, "rank 4"),
    "wrong-in-features": (lambda f: _tensors(f, _set(A0, torch.ones(4, 65))), FailedPrecondition, "64->64"),
    "wrong-out-features": (lambda f: _tensors(f, _set(B0, torch.ones(65, 4))), FailedPrecondition, "64->64"),
    "missing-tensor": (lambda f: _tensors(f, lambda t: t.pop(B0)), InvalidArgument, "lora_B"),
    "nan": (lambda f: _tensors(f, _set(A0, torch.full((4, 64), float("nan")))), InvalidArgument, "NaN"),
    "int-dtype": (
        lambda f: _tensors(f, _set(A0, torch.ones(4, 64, dtype=torch.int32))),
        InvalidArgument,
        "I32",
    ),
    "extra-tensor": (
        lambda f: _tensors(f, _set("base_model.model.lm_head.weight", torch.ones(2, 2))),
        InvalidArgument,
        "lm_head",
    ),
    "unknown-layer": (
        lambda f: _tensors(
            f, _set("base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", torch.ones(4, 64))
        ),
        FailedPrecondition,
        "layers.7",
    ),
    "untargeted-module": (
        lambda f: _tensors(
            f, _set("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", torch.ones(4, 64))
        ),
        InvalidArgument,
        "does not account for",
    ),
    "rank-too-large": (lambda f: _config(f, r=128), ResourceExhausted, "maximum rank 64"),
    "rank-pattern-too-large": (
        lambda f: _config(f, rank_pattern={"q_proj": 65}),
        ResourceExhausted,
        "rank_pattern",
    ),
    "unknown-module": (lambda f: _config(f, target_modules=["c_attn"]), FailedPrecondition, "c_attn"),
    "layer-beyond-model": (lambda f: _config(f, layers_to_transform=[5]), FailedPrecondition, "0..1"),
    "embedding": (lambda f: _config(f, target_modules=["embed_tokens"]), InvalidArgument, "embed_tokens"),
    "lm-head": (lambda f: _config(f, target_modules=["lm_head"]), InvalidArgument, "lm_head"),
    "dora-without-magnitudes": (lambda f: _config(f, use_dora=True), InvalidArgument, "DoRA"),
    "bias-all": (lambda f: _config(f, bias="all"), InvalidArgument, "bias"),
    "fan-in-fan-out": (lambda f: _config(f, fan_in_fan_out=True), InvalidArgument, "fan_in_fan_out"),
    "pissa": (lambda f: _config(f, init_lora_weights="pissa"), InvalidArgument, "init_lora_weights"),
    "unknown-option": (lambda f: _config(f, use_magic=True), InvalidArgument, "use_magic"),
    "not-lora": (lambda f: _config(f, peft_type="IA3"), InvalidArgument, "IA3"),
    "task": (lambda f: _config(f, task_type="SEQ_2_SEQ_LM"), InvalidArgument, "SEQ_2_SEQ_LM"),
    "modules-to-save-causal": (
        lambda f: _config(f, modules_to_save=["lm_head"]),
        InvalidArgument,
        "modules_to_save",
    ),
    "bad-regex": (lambda f: _config(f, target_modules="(unclosed"), InvalidArgument, "regular expression"),
    "slow-regex": (
        lambda f: _config(f, target_modules="(.|..)*(.|..)*(.|..)*(?!)"),
        InvalidArgument,
        "too slow",
    ),
    "config-not-json": (lambda f: dict(f, **{"adapter_config.json": b"{nope"}), InvalidArgument, "JSON"),
    "config-too-big": (
        lambda f: _config(f, description="x" * 70_000),
        ResourceExhausted,
        "adapter_config.json is",
    ),
    "pickle": (lambda f: dict(f, **{"adapter_model.bin": b"\x80\x04"}), InvalidArgument, "pickle"),
    "pickle-only": (
        lambda f: {"adapter_config.json": f["adapter_config.json"], "adapter_model.bin": b"\x80\x04"},
        InvalidArgument,
        "pickle",
    ),
    "unknown-file": (lambda f: dict(f, **{"run.sh": b"rm -rf /"}), InvalidArgument, "run.sh"),
    "no-weights": (lambda f: {"adapter_config.json": f["adapter_config.json"]}, InvalidArgument, "lacks"),
    "truncated": (
        lambda f: dict(f, **{"adapter_model.safetensors": f["adapter_model.safetensors"][:-10]}),
        InvalidArgument,
        "safetensors",
    ),
    "too-short": (
        lambda f: dict(f, **{"adapter_model.safetensors": b"\x01\x02"}),
        InvalidArgument,
        "too short",
    ),
    "header-beyond-file": (_header_beyond, InvalidArgument, "header"),
    "labels-for-causal": (None, InvalidArgument, "SEQ_CLS"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_refused(case, causal_files, base_info):
    mutate, error, words = BAD[case]
    files = causal_files if mutate is None else mutate(causal_files)
    labels = ["a", "b"] if case == "labels-for-causal" else ()
    with pytest.raises(error) as info:
        parse_peft_adapter(files, base_info, LIMITS, labels=labels)
    assert words in info.value.message


def test_oversized_upload_is_refused(causal_files, base_info):
    small = AdapterLimits(max_file_bytes=1000, max_upload_bytes=2000)
    with pytest.raises(ResourceExhausted, match="adapter_model.safetensors is .* limit per file is 1000"):
        parse_peft_adapter(causal_files, base_info, small)
    header = AdapterLimits(max_header_bytes=100)
    with pytest.raises(ResourceExhausted, match="header"):
        parse_peft_adapter(causal_files, base_info, header)


def test_seq_cls_head_mismatches_are_refused(base_info, peft_adapter):
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj"])
    files, _ = peft_adapter(config)
    with pytest.raises(
        InvalidArgument, match=f"2 labels were given but the classification head has {NUM_LABELS}"
    ):
        parse_peft_adapter(files, base_info, LIMITS, labels=["a", "b"])
    with pytest.raises(InvalidArgument, match="unique"):
        parse_peft_adapter(files, base_info, LIMITS, labels=["a", "a", "b"])
    wide = _tensors(files, _set("base_model.model.score.weight", torch.ones(3, 65)))
    with pytest.raises(FailedPrecondition, match="hidden size is 64"):
        parse_peft_adapter(wide, base_info, LIMITS)
    headless = _tensors(files, lambda t: t.pop("base_model.model.score.weight"))
    with pytest.raises(InvalidArgument, match="classification head"):
        parse_peft_adapter(headless, base_info, LIMITS)


def test_config_without_task_type_is_causal_lm(causal_files, base_info):
    assert parse_peft_adapter(_config(causal_files, task_type=None), base_info, LIMITS).task == "CAUSAL_LM"


def test_readme_from_save_pretrained_is_accepted(causal_files, base_info):
    assert "README.md" in causal_files
    parse_peft_adapter(causal_files, base_info, LIMITS)


def test_limits_are_validated():
    with pytest.raises(InvalidArgument, match="max_rank"):
        AdapterLimits(max_rank=0)
    with pytest.raises(InvalidArgument, match="max_file_bytes"):
        AdapterLimits(max_file_bytes=10, max_upload_bytes=5)


def test_read_dir_helper_sees_peft_files(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert read_dir(tmp_path) == {"adapter_config.json": b"{}"}


def test_head_features_ride_in_head_config_json_and_round_trip(base_info, peft_adapter, causal_files):
    from dataclasses import replace

    from hotlora.adapters.head_features import HEAD_FILE, HeadFeatures

    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["v_proj"])
    files, _ = peft_adapter(config, seed=5)
    plain = parse_peft_adapter(files, base_info, LIMITS)
    assert plain.head_features == HeadFeatures()  # no file: the last token's final state, as before
    assert HEAD_FILE not in write_peft_adapter(plain, "tiny-llama")  # and none written for it
    mid = replace(plain, head_features=HeadFeatures("mean", 1))
    written = write_peft_adapter(mid, "tiny-llama")
    assert json.loads(written[HEAD_FILE]) == {"pooling": "mean", "layer": 1}
    assert parse_peft_adapter(written, base_info, LIMITS).head_features == HeadFeatures("mean", 1)
    last_by_number = {
        **files,
        HEAD_FILE: json.dumps({"pooling": "mean", "layer": base_info.num_layers}).encode(),
    }
    assert parse_peft_adapter(last_by_number, base_info, LIMITS).head_features == HeadFeatures("mean", -1)
    with pytest.raises(InvalidArgument, match="only to SEQ_CLS"):
        parse_peft_adapter({**causal_files, HEAD_FILE: b'{"pooling": "mean"}'}, base_info, LIMITS)
    with pytest.raises(InvalidArgument, match="layer 0"):
        parse_peft_adapter({**files, HEAD_FILE: b'{"layer": 0}'}, base_info, LIMITS)


def test_a_model_directory_uploaded_as_an_adapter_is_named_a_model(base_info, tmp_path):
    from tests.tiny import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / "model")
    files = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    with pytest.raises(InvalidArgument) as err:
        parse_peft_adapter(files, base_info, LIMITS)
    assert "a model's files (config.json" in err.value.message and "not a PEFT adapter's" in err.value.message


@pytest.mark.parametrize(
    ("names", "named"),
    [
        (["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], "model-00001-of-00002"),
        (["SmolLM2-135M-Instruct-Q4_0.gguf"], "SmolLM2-135M-Instruct-Q4_0.gguf"),
        (["adapter_config.json", "adapter_model.safetensors", "generation_config.json"], "generation_config"),
    ],
)
def test_a_sharded_or_gguf_model_is_named_a_model_before_any_other_check(base_info, names, named):
    # the names alone decide: a model's weights are refused as a model's before their sizes or contents
    with pytest.raises(InvalidArgument, match="a model's files .* not a PEFT adapter's") as err:
        parse_peft_adapter(dict.fromkeys(names, b"x"), base_info, LIMITS)
    assert named in err.value.message
    export = ["adapter_config.json", "adapter_model.safetensors", "head_config.json", "README.md"]
    assert model_files(export) == []
