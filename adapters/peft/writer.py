"""Writing an adapter out as a PEFT directory, which `PeftModel.from_pretrained` loads with identical
outputs (for a head on other features than the last token's, `head_config.json` says which: PEFT's
`score` reads the last token of the last layer, so such a head's features are computed by the caller)."""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save as st_save

from hotlora.adapters.base_model_info import BaseModelInfo
from hotlora.adapters.errors import InvalidArgument
from hotlora.adapters.head_features import HEAD_FILE
from hotlora.adapters.peft.files import CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE
from hotlora.adapters.weights import LoraWeights

# Llama/Mistral/Qwen2 layout, for writing without a BaseModelInfo.
_DEFAULT_PATHS = {
    **{p: f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{p: f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")},
}


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
    files = {
        CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
        WEIGHTS_FILE: st_save(tensors, metadata={"format": "pt"}),
    }
    if weights.head_weight is not None and not weights.head_features.is_default:
        files[HEAD_FILE] = weights.head_features.to_bytes()  # PEFT ignores it; the default needs none
    return files


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
