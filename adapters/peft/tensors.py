"""`adapter_model.safetensors`: decoded safely, then its tensors taken onto the planned layer sites.

The header is bounded and its dtypes checked before safetensors decodes anything; each planned module's
lora_A/lora_B pair and a SEQ_CLS head are popped by name, shape-checked against the base model and made
float32, so what is left over afterwards is a tensor the config does not account for.
"""

from __future__ import annotations

import json
import re

import torch
from safetensors.torch import load as st_load

from hotlora.adapters.base_model_info import BaseModelInfo
from hotlora.adapters.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from hotlora.adapters.peft.files import KEY_PREFIX, WEIGHTS_FILE, AdapterLimits
from hotlora.adapters.weights import LoraModule

# safetensors dtype tags we accept; all become float32.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def load_safetensors(data: bytes, limits: AdapterLimits) -> dict[str, torch.Tensor]:
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


def refuse_foreign_modules(keys: list[str], base: BaseModelInfo) -> None:
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


def take_modules(
    tensors: dict[str, torch.Tensor],
    plan: dict[tuple[int, str], tuple[int, float]],
    base: BaseModelInfo,
    dora: bool = False,
) -> dict[tuple[int, str], LoraModule]:
    """Pop the lora_A/lora_B pair of every planned module (and its DoRA magnitude vector with `dora`),
    checking shapes against r and the base."""
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
        magnitude = _take_magnitude(tensors, key, out_f) if dora else None
        modules[(layer, short)] = LoraModule(_as_float32(a_key, a), _as_float32(b_key, b), scale, magnitude)
    return modules


def _take_magnitude(tensors: dict[str, torch.Tensor], key: str, out_f: int) -> torch.Tensor:
    """DoRA's magnitude vector of one module, as PEFT saves it (`<module>.lora_magnitude_vector`)."""
    m_key = f"{key}.lora_magnitude_vector"
    m = tensors.pop(m_key, None)
    if m is None:
        m = tensors.pop(f"{m_key}.weight", None)  # PEFT before 0.12 kept the parameter's own name
    if m is None:
        raise InvalidArgument(
            f"{WEIGHTS_FILE} lacks {m_key!r}: adapter_config.json has use_dora=true, and every targeted "
            "module of a DoRA adapter needs its magnitude vector"
        )
    if list(m.shape) != [out_f]:
        raise InvalidArgument(f"{WEIGHTS_FILE}: {m_key!r} has shape {list(m.shape)}; expected [{out_f}]")
    return _as_float32(m_key, m)


def take_head(
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
