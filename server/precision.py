"""The numbers the server computes and stores in, decided once: `resolve_precision` turns the three precision
flags, the machine and the checkpoint into one `Precision`, which model loading, the runner and the adapter
banks read (as vLLM's `LoRAConfig.verify_with_model_config` resolves "auto" once).

`auto` means: bf16 where the hardware computes it fast (CUDA; a CPU with avx512_bf16 or AMX), fp32 elsewhere
-- and fp32 on such a CPU for a checkpoint whose weights are exact GGUF blocks, which the block kernel reads
at 0.19-0.28 of fp32's bytes and multiplies as the checkpoint's very numbers (bf16 would read 0.5 and round
them: the default model on an avx512_bf16 CPU decodes 3.2x faster at one stream in fp32 on its blocks);
there only long prefill chunks, which fp32 arithmetic bounds, multiply in bf16. A setting that reads fp32
only (--weight-dtype float32, --adapter-dtype float32) makes `auto` fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hotlora.kernels import native

FLAG_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Machine:
    """What the device offers, as `auto` needs it."""

    device: torch.device
    kernels: bool  # hotlora's C kernels run here (a CPU with AVX-512 and a compiler, or a prebuilt module)
    fast_bf16: bool  # a CPU with avx512_bf16 or AMX: oneDNN's bf16 GEMMs beat fp32 there


def cpu_has_fast_bf16() -> bool:
    """avx512_bf16 or AMX: oneDNN's bf16 GEMMs beat fp32 there. Without them it emulates bf16 and is
    several times slower than fp32 (measured on an avx512 Xeon without avx512_bf16: 5-7x at 512 rows)."""
    flags = native.cpu_flags() or ()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_here(device: torch.device) -> Machine:
    """This process's `device`: on a CPU, whether hotlora's kernels run (built now, at start-up, with one
    warning if they cannot) and whether it computes bf16 fast."""
    if device.type != "cpu":
        return Machine(device, kernels=False, fast_bf16=False)
    return Machine(device, kernels=native.available(), fast_bf16=cpu_has_fast_bf16())


@dataclass(frozen=True)
class Checkpoint:
    """What `auto` needs to know of the model."""

    runner: bool  # hotlora's runner serves its family (else the transformers path)
    in_blocks: bool  # its fp32 matrices are exact GGUF blocks (a dequantized GGUF file; a GGUF file itself)


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype  # activations, norms, biases, the KV cache
    weights: torch.dtype  # the base matrices not kept as GGUF blocks (bf16 under fp32: widened as read)
    keep_blocks: bool  # fp32 matrices that are exact GGUF blocks stay those blocks (the block kernel)
    long_products_bf16: bool  # prefill chunks of WIDEN_ROWS rows and more multiply (and attend) in bf16
    banks: torch.dtype  # the adapters' LoRA banks (bf16 under fp32: widened as the C LoRA kernel reads)
    why: str  # one line: how `auto` was read, for the log

    def describe(self) -> str:
        """One line for the log."""
        parts = [f"compute {_name(self.compute)}", f"weights {_name(self.weights)}"]
        if self.keep_blocks:
            parts[-1] += " (exact GGUF blocks kept as blocks)"
        if self.long_products_bf16:
            parts.append("long prefill chunks in bf16")
        parts.append(f"adapter banks {_name(self.banks)}")
        return ", ".join(parts) + (f"; {self.why}" if self.why else "")


def resolve_precision(
    dtype: str, weight_dtype: str, adapter_dtype: str, machine: Machine, checkpoint: Checkpoint
) -> Precision:
    """The `Precision` of --dtype `dtype`, --weight-dtype `weight_dtype` and --adapter-dtype `adapter_dtype`
    on `machine` for `checkpoint`; ValueError naming the flags for a combination that cannot run here."""
    cpu = machine.device.type == "cpu"
    fp32_only = {"float32": "--weight-dtype float32"}.get(weight_dtype) or (
        "--adapter-dtype float32" if adapter_dtype == "float32" else None
    )
    blocks_here = cpu and machine.kernels and checkpoint.runner and checkpoint.in_blocks
    why = ""
    if dtype != "auto":
        compute = FLAG_DTYPES[dtype]
    elif fp32_only:
        compute, why = torch.float32, f"--dtype auto: float32, which {fp32_only} needs"
    elif machine.device.type == "cuda":
        compute = torch.bfloat16
    elif cpu and machine.fast_bf16 and blocks_here and weight_dtype == "auto":
        compute = torch.float32
        why = (
            "--dtype auto: float32 on this bf16-capable CPU, the checkpoint's weights being exact GGUF "
            "blocks (the block kernel reads fewer bytes than bf16 weights and rounds nothing; --dtype "
            "bfloat16 to compute in bf16)"
        )
    elif cpu and machine.fast_bf16:
        compute = torch.bfloat16
    else:
        compute = torch.float32
    weights = compute if weight_dtype == "auto" else FLAG_DTYPES[weight_dtype]
    if weights != compute:
        if not checkpoint.runner:
            raise ValueError(
                f"--weight-dtype {weight_dtype} needs hotlora's runner, which this model cannot use"
            )
        if not (weights == torch.bfloat16 and compute == torch.float32 and cpu):
            raise ValueError(
                f"weights stored as {weight_dtype} under {_name(compute)} compute on {machine.device}: only "
                "bfloat16 weights with float32 compute on a CPU are supported (--weight-dtype bfloat16 "
                "--dtype float32)"
            )
        if not machine.kernels:
            raise ValueError(
                "--weight-dtype bfloat16: hotlora's C kernels, which widen them, cannot run here"
            )
    keep_blocks = (
        checkpoint.runner and weight_dtype == "auto" and compute == weights == torch.float32 and cpu
    ) and machine.kernels
    # auto's fp32 for the blocks' sake, where a long prefill chunk's products are bound by fp32 arithmetic
    long_bf16 = dtype == "auto" and keep_blocks and machine.fast_bf16 and checkpoint.in_blocks
    banks = _banks(adapter_dtype, compute, weights, machine, checkpoint, long_bf16)
    return Precision(compute, weights, keep_blocks, long_bf16, banks, why)


def _banks(asked: str, compute, weights, machine: Machine, checkpoint: Checkpoint, long_bf16: bool):
    """--adapter-dtype: auto stores the banks as the base weights are stored (bf16 under --weight-dtype
    bfloat16, read widened), and in bf16 where --dtype auto keeps GGUF blocks in fp32 on a bf16-capable CPU
    (bf16 there but for the exact base: banks read half the bytes, the default model's 32-adapter decode
    0.71 -> 0.80 of the base's); narrower than the compute only as bf16 under fp32 on a CPU whose LoRA
    kernel widens them as it reads (elsewhere every call would convert a bank)."""
    if not checkpoint.runner:  # the transformers path: its layers' own dtype
        if asked not in ("auto", _name(compute)):
            raise ValueError(f"--adapter-dtype {asked} needs hotlora's runner, which this model cannot use")
        return compute
    if asked == "auto":
        return torch.bfloat16 if long_bf16 else weights
    want = FLAG_DTYPES[asked]
    if want == compute:
        return want
    if want == torch.bfloat16 and compute == torch.float32 and machine.device.type == "cpu":
        if not machine.kernels:
            raise ValueError("--adapter-dtype bfloat16 needs hotlora's C LoRA kernel, which cannot run here")
        return want
    raise ValueError(
        f"--adapter-dtype {asked} under {_name(compute)} compute on {machine.device}: banks narrower than "
        "the compute are bf16 under fp32 on a CPU only"
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
