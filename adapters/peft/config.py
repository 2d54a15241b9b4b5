"""`adapter_config.json`: read as hostile JSON, type-checked, then validated by PEFT's own `LoraConfig`.

Plain LoRA and DoRA (`use_dora`, served by adapters/dora.py) are accepted: other options that change the
forward pass (bias terms, init methods that rewrite the base weights, ...) are refused by name, unknown
options are refused, and every number we interpret is checked against `AdapterLimits` before PEFT sees it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import fields
from typing import Any

from peft import LoraConfig
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from hotlora.adapters.base_model_info import BaseModelInfo
from hotlora.adapters.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from hotlora.adapters.peft.files import CONFIG_FILE, AdapterLimits

# Options that only steer training or bookkeeping: read (by PEFT) and otherwise ignored.
_BENIGN_OPTIONS = frozenset(
    "task_type peft_type auto_mapping peft_version base_model_name_or_path revision inference_mode r "
    "target_modules exclude_modules lora_alpha lora_dropout use_rslora modules_to_save init_lora_weights "
    "layers_to_transform layers_pattern rank_pattern alpha_pattern megatron_core qalora_group_size "
    "loftq_config eva_config corda_config lora_ga_config ensure_weight_tying bias fan_in_fan_out".split()
) | {"use_dora"}  # DoRA changes the forward pass, and is served as PEFT computes it (adapters/dora.py)
# Options that change the forward pass: refused unless left at their default (empty) value.
_REFUSED_OPTIONS = {
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


def _empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def load_config(data: bytes, base: BaseModelInfo, limits: AdapterLimits) -> LoraConfig:
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


def check_rank(what: str, r: Any, limits: AdapterLimits) -> None:
    if not _is_int(r) or r < 1:
        raise InvalidArgument(f"{what} must be a positive integer, got {r!r}")
    if r > limits.max_rank:
        raise ResourceExhausted(f"{what}={r} is above this server's maximum rank {limits.max_rank}")


def _check_numbers(raw: dict[str, Any], base: BaseModelInfo, limits: AdapterLimits) -> None:
    """Type-check the fields we interpret, so PEFT's matcher never sees a surprising type."""
    check_rank("r", raw.get("r", 8), limits)
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
                check_rank(f"rank_pattern[{key!r}]", r, limits)
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
