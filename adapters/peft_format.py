"""PEFT adapter directories in and out: `adapter_config.json` + `adapter_model.safetensors`.

Parsing treats every byte as hostile: sizes are checked before anything is decoded, user regexes run
under a time budget, and only safetensors is ever deserialised. PEFT's own LoraConfig validates the
config; target resolution repeats PEFT's matching rules on the module names of the resident base model,
so an adapter covers exactly the modules PEFT would wrap (the tests check this against peft itself).
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import regex
import torch
from hotlora.adapters.base_model_info import BaseModelInfo
from hotlora.adapters.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from hotlora.adapters.weights import LoraModule, LoraWeights
from peft import LoraConfig
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# `save_pretrained` writes a model card; accepted and kept, never interpreted.
RECORD_FILE = "hotlora_training.json"
"""A fine-tuned version's examples and validation (adapters/training_record.py): stored with the version,
never part of its PEFT directory; an upload that carries one has it dropped."""
IGNORED_FILES = frozenset({"README.md", RECORD_FILE})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
KEY_PREFIX = "base_model.model."
# safetensors dtype tags we accept; all become float32.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
MIB = 1 << 20


@dataclass(frozen=True)
class AdapterLimits:
    """What the server accepts in one adapter upload."""

    max_rank: int = 64
    """Largest LoRA rank of any module (r and every rank_pattern value)."""
    max_file_bytes: int = 512 * MIB
    """Largest single file."""
    max_upload_bytes: int = 1024 * MIB
    """All files of one upload together."""
    max_config_bytes: int = 64 * 1024
    """adapter_config.json."""
    max_header_bytes: int = 4 * MIB
    """The JSON header of adapter_model.safetensors."""
    max_labels: int = 4096
    """Classes of a SEQ_CLS head."""
    max_label_chars: int = 256

    def __post_init__(self) -> None:
        for name in (
            "max_rank",
            "max_file_bytes",
            "max_upload_bytes",
            "max_config_bytes",
            "max_header_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgument(f"AdapterLimits.{name} must be a positive integer, got {value!r}")
        if self.max_file_bytes > self.max_upload_bytes:
            raise InvalidArgument(
                f"AdapterLimits.max_file_bytes ({self.max_file_bytes}) must not exceed "
                f"max_upload_bytes ({self.max_upload_bytes})"
            )
        if self.max_labels < 1 or self.max_label_chars < 1:
            raise InvalidArgument("AdapterLimits.max_labels and max_label_chars must be at least 1")


def parse_peft_adapter(
    files: dict[str, bytes], base: BaseModelInfo, limits: AdapterLimits, labels: Sequence[str] = ()
) -> LoraWeights:
    """Validate a PEFT adapter directory (file name -> bytes) against the base model."""
    _check_files(files, limits)
    config = _load_config(files[CONFIG_FILE], base, limits)
    plan = _resolve_targets(config, base, limits)
    tensors = _load_safetensors(files[WEIGHTS_FILE], limits)
    task = str(config.task_type)
    modules = _take_modules(tensors, plan, base)
    head_weight = head_bias = None
    if task == "SEQ_CLS":
        head_weight, head_bias = _take_head(tensors, base)
    if tensors:
        extra = sorted(tensors)
        _refuse_foreign_modules(extra, base)
        raise InvalidArgument(
            f"{WEIGHTS_FILE} has {len(extra)} tensor(s) that adapter_config.json does not account for, "
            f"e.g. {extra[0]!r}; allowed: lora_A/lora_B of the targeted modules"
            + (f" and the '{base.head_name}' head" if task == "SEQ_CLS" else "")
        )
    names = _check_labels(labels, task, head_weight, limits)
    return LoraWeights(
        task=task,
        rank=max(m.rank for m in modules.values()),
        alpha=float(config.lora_alpha),
        target_modules=tuple(sorted({short for _, short in modules})),
        modules=modules,
        head_weight=head_weight,
        head_bias=head_bias,
        labels=names,
    )


def write_peft_adapter(
    weights: LoraWeights, base_model_name: str, *, base: BaseModelInfo | None = None
) -> dict[str, bytes]:
    """The PEFT directory for `weights` that `PeftModel.from_pretrained` loads with identical outputs.

    `base` supplies the module paths inside a layer; without it the Llama/Mistral/Qwen2 layout is used.
    """
    config = _config_for(weights, base_model_name, base)
    tensors: dict[str, torch.Tensor] = {}
    for (layer, short), module in sorted(weights.modules.items()):
        key = KEY_PREFIX + _module_key(base, layer, short)
        tensors[f"{key}.lora_A.weight"] = module.a.contiguous()
        tensors[f"{key}.lora_B.weight"] = module.b.contiguous()
    if weights.head_weight is not None:
        head = base.head_name if base is not None else "score"
        tensors[f"{KEY_PREFIX}{head}.weight"] = weights.head_weight.contiguous()
        if weights.head_bias is not None:
            tensors[f"{KEY_PREFIX}{head}.bias"] = weights.head_bias.contiguous()
    return {
        CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
        WEIGHTS_FILE: st_save(tensors, metadata={"format": "pt"}),
    }


def _check_files(files: dict[str, bytes], limits: AdapterLimits) -> None:
    allowed = f"{CONFIG_FILE} and {WEIGHTS_FILE}"
    for name, data in files.items():
        if name.endswith(PICKLE_SUFFIXES):
            raise InvalidArgument(
                f"{name!r} is a pickle file, which can run code when loaded and is never accepted; "
                "save the adapter with safetensors (save_pretrained(..., safe_serialization=True)): "
                f"{allowed}"
            )
        if name not in (CONFIG_FILE, WEIGHTS_FILE) and name not in IGNORED_FILES:
            raise InvalidArgument(f"unexpected file {name!r} in the adapter; a PEFT adapter is {allowed}")
        if len(data) > limits.max_file_bytes:
            raise ResourceExhausted(
                f"{name} is {len(data)} bytes; the limit per file is {limits.max_file_bytes} bytes"
            )
    total = sum(len(d) for d in files.values())
    if total > limits.max_upload_bytes:
        raise ResourceExhausted(
            f"the adapter files total {total} bytes; the limit is {limits.max_upload_bytes} bytes"
        )
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if n not in files]
    if missing:
        raise InvalidArgument(f"the adapter lacks {' and '.join(missing)}; a PEFT adapter is {allowed}")


def _load_safetensors(data: bytes, limits: AdapterLimits) -> dict[str, torch.Tensor]:
    """Decode safetensors bytes after checking the header length against the file and the limit."""
    if len(data) < 8:
        raise InvalidArgument(
            f"{WEIGHTS_FILE} is {len(data)} bytes: too short to be safetensors (truncated?)"
        )
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise InvalidArgument(
            f"{WEIGHTS_FILE} declares a {header_len}-byte header but the file has only {len(data)} bytes "
            "(truncated or not safetensors)"
        )
    if header_len > limits.max_header_bytes:
        raise ResourceExhausted(
            f"{WEIGHTS_FILE} header is {header_len} bytes; the limit is {limits.max_header_bytes} bytes"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{WEIGHTS_FILE} header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{WEIGHTS_FILE} header must be a JSON object")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in FLOAT_DTYPES:
            raise InvalidArgument(
                f"{WEIGHTS_FILE}: tensor {key!r} has dtype {dtype!r}; "
                f"allowed: {', '.join(sorted(FLOAT_DTYPES))}"
            )
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError for every kind of bad input
        raise InvalidArgument(f"{WEIGHTS_FILE} is not valid safetensors: {exc}") from None
    return dict(tensors)


_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_[AB]\.weight")


def _refuse_foreign_modules(keys: list[str], base: BaseModelInfo) -> None:
    """LoRA tensors for modules this base model lacks mean the adapter was made for another model."""
    known = {base.module_key(i, s) for i in range(base.num_layers) for s in base.linear_shapes}
    for key in keys:
        match = _LORA_KEY.fullmatch(key)
        if match and match["module"] not in known:
            raise FailedPrecondition(
                f"{WEIGHTS_FILE} has weights for {match['module']!r}, which this base model does not have "
                f"(layers 0..{base.num_layers - 1} of {base.layer_prefix}, linear layers "
                f"{', '.join(base.linear_shapes)}); was it trained for a different base model?"
            )


def _as_float32(key: str, tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.to(torch.float32).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise InvalidArgument(f"{WEIGHTS_FILE}: tensor {key!r} contains NaN or infinite values")
    return out


def _take_modules(
    tensors: dict[str, torch.Tensor], plan: dict[tuple[int, str], tuple[int, float]], base: BaseModelInfo
) -> dict[tuple[int, str], LoraModule]:
    """Pop the lora_A/lora_B pair of every planned module, checking shapes against r and the base."""
    modules: dict[tuple[int, str], LoraModule] = {}
    for (layer, short), (r, scale) in sorted(plan.items()):
        key = KEY_PREFIX + base.module_key(layer, short)
        in_f, out_f = base.linear_shapes[short]
        a_key, b_key = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
        a, b = tensors.pop(a_key, None), tensors.pop(b_key, None)
        if a is None or b is None:
            absent = a_key if a is None else b_key
            raise InvalidArgument(
                f"{WEIGHTS_FILE} lacks {absent!r}: adapter_config.json targets "
                f"{base.module_key(layer, short)} and every targeted module needs both lora_A and lora_B"
            )
        for tkey, t in ((a_key, a), (b_key, b)):
            if t.dim() != 2:
                raise InvalidArgument(f"{WEIGHTS_FILE}: {tkey!r} has shape {list(t.shape)}; expected 2 dims")
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise FailedPrecondition(
                f"{base.module_key(layer, short)} is {in_f}->{out_f} in the base model, but the adapter has "
                f"lora_A {list(a.shape)} and lora_B {list(b.shape)} (expected [r, {in_f}] and [{out_f}, r]); "
                "was it trained for a different base model?"
            )
        if a.shape[0] != r or b.shape[1] != r:
            raise InvalidArgument(
                f"{base.module_key(layer, short)} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, but "
                f"adapter_config.json gives it rank {r} (r / rank_pattern): expected [{r}, {in_f}] and "
                f"[{out_f}, {r}]"
            )
        modules[(layer, short)] = LoraModule(_as_float32(a_key, a), _as_float32(b_key, b), scale)
    return modules


def _take_head(
    tensors: dict[str, torch.Tensor], base: BaseModelInfo
) -> tuple[torch.Tensor, torch.Tensor | None]:
    w_key, b_key = f"{KEY_PREFIX}{base.head_name}.weight", f"{KEY_PREFIX}{base.head_name}.bias"
    weight, bias = tensors.pop(w_key, None), tensors.pop(b_key, None)
    if weight is None:
        raise InvalidArgument(
            f"a SEQ_CLS adapter needs its classification head: {WEIGHTS_FILE} lacks {w_key!r} "
            f"(train with modules_to_save=['{base.head_name}'])"
        )
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise InvalidArgument(f"head {w_key!r} has shape {list(weight.shape)}; expected [num_labels, hidden]")
    if weight.shape[1] != base.hidden_size:
        raise FailedPrecondition(
            f"head {w_key!r} has shape {list(weight.shape)}, but the base model's hidden size is "
            f"{base.hidden_size}: expected [num_labels, {base.hidden_size}]"
        )
    if bias is not None and list(bias.shape) != [weight.shape[0]]:
        raise InvalidArgument(
            f"head bias {b_key!r} has shape {list(bias.shape)}; expected [{weight.shape[0]}]"
        )
    return _as_float32(w_key, weight), None if bias is None else _as_float32(b_key, bias)


def _check_labels(
    labels: Sequence[str], task: str, head: torch.Tensor | None, limits: AdapterLimits
) -> tuple[str, ...]:
    labels = tuple(labels)
    if head is None:
        if labels:
            raise InvalidArgument("labels apply only to SEQ_CLS adapters; this adapter is CAUSAL_LM")
        return ()
    n = int(head.shape[0])
    if n > limits.max_labels:
        raise ResourceExhausted(f"the head has {n} labels; the limit is {limits.max_labels}")
    if not labels:
        return tuple(f"LABEL_{i}" for i in range(n))
    if len(labels) != n:
        raise InvalidArgument(f"{len(labels)} labels were given but the classification head has {n} outputs")
    for label in labels:
        if not isinstance(label, str) or not label or len(label) > limits.max_label_chars:
            raise InvalidArgument(
                f"label {label!r} must be a non-empty string of at most {limits.max_label_chars} characters"
            )
    dupes = [label for label, c in Counter(labels).items() if c > 1]
    if dupes:
        raise InvalidArgument(f"labels must be unique; repeated: {dupes[:5]}")
    return labels


# ---- adapter_config.json -------------------------------------------------------------------------------

# Options that only steer training or bookkeeping: read (by PEFT) and otherwise ignored.
_BENIGN_OPTIONS = frozenset(
    "task_type peft_type auto_mapping peft_version base_model_name_or_path revision inference_mode r "
    "target_modules exclude_modules lora_alpha lora_dropout use_rslora modules_to_save init_lora_weights "
    "layers_to_transform layers_pattern rank_pattern alpha_pattern megatron_core qalora_group_size "
    "loftq_config eva_config corda_config lora_ga_config ensure_weight_tying bias fan_in_fan_out".split()
)
# Options that change the forward pass: refused unless left at their default (empty) value.
_REFUSED_OPTIONS = {
    "use_dora": "DoRA",
    "lora_bias": "trained LoRA bias terms",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters",
    "trainable_token_indices": "trainable token embeddings",
    "megatron_config": "Megatron parallel layers",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}
# PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ rewrite the base weights and MiCA changes the forward pass.
_ALLOWED_INIT = (True, False, "gaussian", "eva", "orthogonal")
# Llama/Mistral/Qwen2 layout, for writing without a BaseModelInfo.
_DEFAULT_PATHS = {
    **{p: f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{p: f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")},
}
_REGEX_BUDGET_S = 2.0
_MAX_PATTERN_CHARS = 1024


def _empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _load_config(data: bytes, base: BaseModelInfo, limits: AdapterLimits) -> LoraConfig:
    if len(data) > limits.max_config_bytes:
        raise ResourceExhausted(
            f"{CONFIG_FILE} is {len(data)} bytes; the limit is {limits.max_config_bytes} bytes"
        )
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{CONFIG_FILE} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{CONFIG_FILE} must be a JSON object")
    if raw.get("peft_type") != "LORA":
        raise InvalidArgument(f"peft_type {raw.get('peft_type')!r} is not supported; only LORA adapters are")
    # Older PEFT configs may lack task_type; PEFT then applies the LoRA exactly as for CAUSAL_LM.
    task = raw["task_type"] = raw.get("task_type") or "CAUSAL_LM"
    if task not in ("CAUSAL_LM", "SEQ_CLS"):
        raise InvalidArgument(f"task_type {task!r} is not supported; allowed: CAUSAL_LM, SEQ_CLS")
    if raw.get("bias", "none") != "none":
        raise InvalidArgument(f"bias={raw['bias']!r} (bias training) is not supported; allowed: bias='none'")
    if raw.get("fan_in_fan_out", False) is not False:
        raise InvalidArgument("fan_in_fan_out=true (Conv1D-style weights) is not supported; allowed: false")
    for key, value in raw.items():
        if key in _REFUSED_OPTIONS and not _empty(value):
            raise InvalidArgument(f"{key}={value!r}: {_REFUSED_OPTIONS[key]} is not supported; remove {key}")
        if key not in _BENIGN_OPTIONS and key not in _REFUSED_OPTIONS and not _empty(value):
            raise InvalidArgument(f"adapter_config.json option {key!r}={value!r} is not supported")
    if raw.get("init_lora_weights", True) not in _ALLOWED_INIT:
        raise InvalidArgument(
            f"init_lora_weights={raw['init_lora_weights']!r} is not supported (it rewrites the base "
            f"weights or the forward pass); allowed: {', '.join(map(str, _ALLOWED_INIT))}"
        )
    _check_numbers(raw, base, limits)
    targets = raw.get("target_modules")
    if targets is None:
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(base.model_type)
        if targets is None:
            raise InvalidArgument(f"target_modules is required for model type {base.model_type!r}")
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        targets = sorted(base.linear_shapes)
    to_save = raw.get("modules_to_save") or []
    allowed_save = {base.head_name, "classifier"} if task == "SEQ_CLS" else set()
    if not _str_list(to_save) or not set(to_save) <= allowed_save:  # [[...]] is unhashable: check types first
        raise InvalidArgument(
            f"modules_to_save={to_save!r} is not supported for {task}; allowed: "
            + (f"the classification head ['{base.head_name}']" if allowed_save else "none")
        )
    kwargs = {k: v for k, v in raw.items() if k in {f.name for f in fields(LoraConfig)}}
    kwargs.update(
        target_modules=targets, modules_to_save=to_save or ([base.head_name] if allowed_save else None)
    )
    kwargs.pop("runtime_config", None)
    for name in ("rank_pattern", "alpha_pattern"):  # null/0/[] mean "none" (as _check_numbers reads them)
        kwargs[name] = raw.get(name) or {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoraConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"{CONFIG_FILE} is not a valid LoRA config: {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MAX_ALPHA = 1e6  # alpha / r becomes a float32 scale: 1e308 overflowed it and failed whole engine steps


def _is_real(value: Any) -> bool:
    """A finite alpha of sane size (ints too: JSON allows 4000-digit integers, which math.isfinite rejects
    with OverflowError)."""
    return (_is_int(value) or isinstance(value, float)) and abs(value) <= MAX_ALPHA


def _check_rank(what: str, r: Any, limits: AdapterLimits) -> None:
    if not _is_int(r) or r < 1:
        raise InvalidArgument(f"{what} must be a positive integer, got {r!r}")
    if r > limits.max_rank:
        raise ResourceExhausted(f"{what}={r} is above this server's maximum rank {limits.max_rank}")


def _check_numbers(raw: dict[str, Any], base: BaseModelInfo, limits: AdapterLimits) -> None:
    """Type-check the fields we interpret, so PEFT's matcher never sees a surprising type."""
    _check_rank("r", raw.get("r", 8), limits)
    if not _is_real(raw.get("lora_alpha", 8)):
        raise InvalidArgument(
            f"lora_alpha must be a number of magnitude at most {MAX_ALPHA:g}, "
            f"got {str(raw.get('lora_alpha'))[:40]}"
        )
    for name, check in (("rank_pattern", _is_int), ("alpha_pattern", _is_real)):
        pattern = raw.get(name) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and check(v) for k, v in pattern.items()
        ):
            raise InvalidArgument(
                f"{name} must map module-name patterns to numbers (alphas of magnitude at most "
                f"{MAX_ALPHA:g}), got {str(pattern)[:200]}"
            )
        if name == "rank_pattern":
            for key, r in pattern.items():
                _check_rank(f"rank_pattern[{key!r}]", r, limits)
    if not isinstance(raw.get("use_rslora", False), bool):
        raise InvalidArgument("use_rslora must be true or false")
    for name in ("target_modules", "exclude_modules", "layers_pattern"):
        value = raw.get(name)
        if not (value is None or isinstance(value, str) or _str_list(value)):
            raise InvalidArgument(f"{name} must be a string (regex) or a list of strings, got {value!r}")
    layers = raw.get("layers_to_transform")
    if layers is not None:
        indices = [layers] if _is_int(layers) else layers
        if not isinstance(indices, list) or not all(_is_int(i) and i >= 0 for i in indices):
            raise InvalidArgument(
                f"layers_to_transform must be a layer index or a list of them, got {layers!r}"
            )
        beyond = [i for i in indices if i >= base.num_layers]
        if beyond:
            raise FailedPrecondition(
                f"layers_to_transform names layer(s) {beyond}, but the base model has layers "
                f"0..{base.num_layers - 1}"
            )


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


class _Matcher:
    """PEFT 0.21's module matching (`check_target_module_exists`, `get_pattern_key`), rule for rule, but on
    the `regex` engine under a time budget: user regexes are hostile and `re` cannot be interrupted."""

    def __init__(self, config: LoraConfig):
        self.config = config
        self.deadline = time.monotonic() + _REGEX_BUDGET_S

    def _run(self, option: str, pattern: str, key: str, full: bool = False) -> regex.Match[str] | None:
        if len(pattern) > _MAX_PATTERN_CHARS:
            raise InvalidArgument(f"{option} pattern is longer than {_MAX_PATTERN_CHARS} characters")
        timeout = max(self.deadline - time.monotonic(), 1e-3)
        try:
            if full:
                return regex.fullmatch(pattern, key, timeout=timeout)
            return regex.match(pattern, key, timeout=timeout)
        except regex.error as exc:
            raise InvalidArgument(f"{option} has an invalid regular expression {pattern!r}: {exc}") from None
        except TimeoutError:
            raise InvalidArgument(f"{option} regular expression {pattern!r} is too slow to match") from None

    def targets(self, key: str) -> bool:
        c = self.config
        if c.exclude_modules:
            if isinstance(c.exclude_modules, str):
                if self._run("exclude_modules", c.exclude_modules, key, full=True):
                    return False
            elif key in c.exclude_modules or any(key.endswith(f".{e}") for e in c.exclude_modules):
                return False
        for m in c.modules_to_save or ():
            if self._run("modules_to_save", rf"(^|.*\.){m}($|\..*)", key):
                return False
        if isinstance(c.target_modules, str):
            return self._run("target_modules", c.target_modules, key, full=True) is not None
        if key in c.target_modules:
            return True
        found = any(key.endswith(f".{t}") for t in c.target_modules)
        layers = c.layers_to_transform
        if not found or layers is None or layers == []:
            return found
        if not c.layers_pattern:
            match = self._run("layers_to_transform", r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            patterns = [c.layers_pattern] if isinstance(c.layers_pattern, str) else c.layers_pattern
            for p in patterns:
                match = self._run("layers_pattern", rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers

    def pattern_value(self, option: str, patterns: dict[str, Any], key: str, default: Any) -> Any:
        for pattern in patterns:
            if self._run(option, rf"(.*\.)?({pattern})$", key):
                return patterns[pattern]
        return default


def _resolve_targets(
    config: LoraConfig, base: BaseModelInfo, limits: AdapterLimits
) -> dict[tuple[int, str], tuple[int, float]]:
    """(layer, short name) -> (r, scale) for every module PEFT would wrap on this base model."""
    by_path = {path: short for short, path in base.linear_paths.items()}
    plan: dict[tuple[int, str], tuple[int, float]] = {}
    matcher = _Matcher(config)
    prefix = base.layer_prefix + "."
    for key in base.module_names(str(config.task_type)):
        if not matcher.targets(key):
            continue
        index, _, path = key.removeprefix(prefix).partition(".")
        if not key.startswith(prefix) or path not in by_path:
            kind = "an embedding or output layer" if not key.startswith(prefix) else "not a linear layer"
            raise InvalidArgument(
                f"target_modules selects {key!r}, which is {kind}; LoRA is supported only on the linear "
                f"layers inside decoder layers: {', '.join(base.linear_shapes)}"
            )
        r = matcher.pattern_value("rank_pattern", config.rank_pattern, key, config.r)
        alpha = matcher.pattern_value("alpha_pattern", config.alpha_pattern, key, config.lora_alpha)
        _check_rank(f"rank of {key}", r, limits)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        plan[(int(index), by_path[path])] = (r, float(scale))
    if not plan:
        raise FailedPrecondition(
            f"adapter_config.json targets no linear layer of this base model (target_modules="
            f"{config.target_modules!r}, layers_to_transform={config.layers_to_transform!r}); its decoder "
            f"layers have: {', '.join(base.linear_shapes)}"
        )
    return plan


# ---- writing -------------------------------------------------------------------------------------------


def _module_key(base: BaseModelInfo | None, layer: int, short: str) -> str:
    if base is not None:
        return base.module_key(layer, short)
    if short not in _DEFAULT_PATHS:
        raise InvalidArgument(f"module {short!r} has no known path; pass base= to write_peft_adapter")
    return f"model.layers.{layer}.{_DEFAULT_PATHS[short]}"


def _config_for(weights: LoraWeights, base_model_name: str, base: BaseModelInfo | None) -> dict[str, Any]:
    """A LoraConfig that reproduces every module's rank and scale exactly."""
    ranks = Counter(m.rank for m in weights.modules.values())
    r = ranks.most_common(1)[0][0]
    keys = {lk: _module_key(base, *lk) for lk in weights.modules}
    rank_pattern = {keys[lk]: m.rank for lk, m in weights.modules.items() if m.rank != r}
    alpha, use_rslora = weights.alpha, False
    alpha_pattern: dict[str, float] = {}
    if any(m.scale != alpha / m.rank for m in weights.modules.values()):
        if all(m.scale == alpha / math.sqrt(m.rank) for m in weights.modules.values()):
            use_rslora = True
        else:
            alpha_pattern = {keys[lk]: m.scale * m.rank for lk, m in weights.modules.items()}
    layers = sorted({layer for layer, _ in weights.modules})
    shorts = sorted({short for _, short in weights.modules})
    layers_to_transform: list[int] | None = layers
    targets: list[str] | str = shorts
    if len(weights.modules) != len(layers) * len(shorts):
        # Not a layers x names product: name every module in one fullmatch regex instead.
        targets = "|".join(re.escape(keys[lk]) for lk in sorted(weights.modules))
        layers_to_transform = None
    elif base is not None and len(layers) == base.num_layers:
        layers_to_transform = None
    head = base.head_name if base is not None else "score"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(
            task_type=weights.task,
            r=r,
            lora_alpha=alpha,
            target_modules=targets,
            layers_to_transform=layers_to_transform,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            use_rslora=use_rslora,
            modules_to_save=[head] if weights.task == "SEQ_CLS" else None,
            base_model_name_or_path=base_model_name,
            inference_mode=True,
        )
    out = config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in out.items()}
