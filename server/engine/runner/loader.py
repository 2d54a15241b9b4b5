"""Building a runner: from a model directory's safetensors (serving) or an in-memory model (tests)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from hotlora.kernels import bf16_weights, block_weights
from hotlora.kernels.narrow_linear import WIDEN_ROWS
from hotlora.kernels.native import available

from .kv_cache import KVCacheConfig, KVPool
from .model import Runner
from .spec import ModelSpec
from .weights import Getter, build_weights, module_getter, safetensors_getter

log = logging.getLogger("hotlora.runner")


def in_blocks(model_dir: str | Path) -> bool:
    """Whether the checkpoint's first projection (layer 0's q_proj, fp32) holds exactly GGUF block values
    -- a checkpoint dequantized from a GGUF file -- and the block kernel runs here (what --dtype auto reads,
    server/precision.py)."""
    try:
        w = safetensors_getter(model_dir)("model.layers.0.self_attn.q_proj.weight")
    except (OSError, ValueError, KeyError):
        return False  # the loader says what is wrong with the directory
    if w is None or w.dtype != torch.float32 or block_weights.unavailable_reason() is not None:
        return False
    return block_weights.pack(w) is not None


def load_runner(
    model_dir: str | Path,
    config,
    dtype: torch.dtype,
    device: torch.device,
    kv_bytes: int,
    block_size: int = 16,
    weight_dtype: torch.dtype | None = None,
    pack_exact_blocks: bool = False,
    long_products_bf16: bool = False,
    getter: Getter | None = None,
    rope_factors: torch.Tensor | None = None,
) -> Runner:
    """`config`: the directory's transformers config (raises runner.spec.Unsupported for other families).
    The rest is the server's `Precision` (server/precision.py, which checked it): `dtype` the compute,
    `weight_dtype` how the projection and embedding weights are stored when not in `dtype` (bf16 under
    fp32), `pack_exact_blocks` keep the fp32 matrices that hold exactly GGUF block values as those blocks
    (`build_weights`) -- and a getter's block matrices as they are --, `long_products_bf16` multiply long
    prefill chunks in bf16 (Runner.long_products_in_bf16).
    `getter`: the tensors, when not the directory's safetensors (a GGUF file's, --quantize's: its block
    matrices dequantized to the stored dtype where blocks are not kept).
    `rope_factors`: llama.cpp's per-frequency RoPE divisors (a GGUF file's `rope_freqs`)."""
    spec = ModelSpec.from_config(config)
    if rope_factors is not None:
        if rope_factors.shape != spec.inv_freq.shape:
            raise ValueError(
                f"rope_freqs has {rope_factors.numel()} factors, the heads {spec.inv_freq.numel()}"
            )
        spec = dataclasses.replace(spec, inv_freq=spec.inv_freq / rope_factors)
    stored = weight_dtype or dtype
    get = getter or safetensors_getter(model_dir)
    keep = getter is not None and pack_exact_blocks
    weights = build_weights(spec, get, dtype, device, stored, pack_exact_blocks, keep_blocks=keep)
    if weights.into_huge_pages():
        log.info("weights: %.0f MiB in memory advised for 2 MiB pages", weights.nbytes / 2**20)
    runner = _assemble(spec, weights, config, dtype, device, kv_bytes, block_size)
    runner.generation_config = _generation_config(model_dir)
    if long_products_bf16 and runner.long_products_in_bf16():
        log.info("prefill chunks of %d rows and more multiply in bf16", WIDEN_ROWS)
    return runner


def runner_from_model(
    model,
    dtype: torch.dtype | None = None,
    kv_bytes: int = 64 << 20,
    block_size: int = 16,
    device=None,
    weight_dtype: torch.dtype | None = None,
    pack_exact_blocks: bool = False,
) -> Runner:
    """A runner on a transformers model's weights (fused copies; the model itself is left as it is), in the
    dtypes given (tests: the storage checked here, as server/precision.py checks the server's)."""
    spec = ModelSpec.from_config(model.config)
    param = next(model.parameters())
    dtype = dtype or param.dtype
    device = torch.device(device) if device is not None else param.device
    stored = _checked_storage(dtype, weight_dtype or dtype, device)
    pack = _packs(pack_exact_blocks, dtype, stored, device)
    weights = build_weights(spec, module_getter(model), dtype, device, stored, pack)
    runner = _assemble(spec, weights, model.config, dtype, device, kv_bytes, block_size)
    runner.generation_config = getattr(model, "generation_config", None)
    return runner


def _checked_storage(dtype: torch.dtype, stored: torch.dtype, device: torch.device) -> torch.dtype:
    """Weights stored narrower than the compute dtype: only bf16 under fp32 on a CPU that runs the kernel."""
    if stored == dtype:
        return stored
    if not (stored == torch.bfloat16 and dtype == torch.float32 and torch.device(device).type == "cpu"):
        raise ValueError(
            f"weights stored as {stored} under {dtype} compute on {device}: only bfloat16 weights with "
            "float32 compute on a CPU are supported (--weight-dtype bfloat16 --dtype float32)"
        )
    try:
        bf16_weights.ensure_built()  # at start-up, not in the first step
    except bf16_weights.Unavailable as exc:
        raise ValueError(f"--weight-dtype bfloat16: {exc}") from exc
    return stored


def _packs(asked: bool, dtype: torch.dtype, stored: torch.dtype, device) -> bool:
    """Blocks are for fp32 weights under fp32 compute on a CPU that runs their kernel (built now, at
    start-up, not in the first step); elsewhere the matrices stay as they are."""
    if not (asked and dtype == stored == torch.float32 and torch.device(device).type == "cpu"):
        return False
    return available()  # else one warning: fp32 weights stay unpacked, served by torch


def _assemble(spec, weights, config, dtype, device, kv_bytes, block_size) -> Runner:
    bytes_per_token = spec.kv_bytes_per_token * torch.empty(0, dtype=dtype).element_size()
    kv = KVCacheConfig.for_bytes(kv_bytes, bytes_per_token, block_size=block_size)
    pool = KVPool(spec.num_layers, kv, spec.num_kv_heads, spec.head_dim, dtype, device)
    runner = Runner(spec, weights, config, pool)
    runner.kv_config = kv
    stored = weights.stored_dtype
    packed, matrices = weights.packed_matrices
    if packed:
        log.info(
            "weights: %d of %d matrices kept in GGUF blocks (%s; %.0f MiB), read back as the fp32 numbers "
            "the gguf package dequantizes them to",
            packed,
            matrices,
            ", ".join(f"{n} {f}" for f, n in sorted(weights.block_formats.items())),
            weights.nbytes / 2**20,
        )
    log.info(
        "runner: %s, %d layers, %s on %s, weights %.0f MiB, KV cache %d blocks x %d tokens (%d B/token)",
        spec.family,
        spec.num_layers,
        str(dtype).removeprefix("torch.")
        + ("" if stored == dtype else f" (weights stored as {str(stored).removeprefix('torch.')})"),
        device,
        weights.nbytes / 2**20,
        kv.num_blocks,
        kv.block_size,
        bytes_per_token,
    )
    return runner


def _generation_config(model_dir):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(model_dir), local_files_only=True)
    except OSError:  # no generation_config.json: the model config's ids are used
        return None
