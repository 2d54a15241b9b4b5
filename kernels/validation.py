"""Argument checks shared by the launchers and backends: every mistake becomes a ValueError that says what
was wrong and what is allowed, before anything is launched."""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)


def triton_interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1): tests on machines without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_add_lora_args(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    num_tokens: int,
    out_offset: int,
    bf16_banks: bool = False,
) -> None:
    """Shapes and dtypes of one add_lora call (see LoraBackend.add_lora). `bf16_banks`: the backend also
    takes bf16 banks with fp32 x and y (the CPU path, for --adapter-dtype bfloat16)."""
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be 2-D [T, H], got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(
            f"lora_a must be [S, R_max, H_in] and lora_b [S, H_out, R_max], "
            f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )
    if x.shape[0] != num_tokens or y.shape[0] != num_tokens:
        raise ValueError(
            f"x and y must have T={num_tokens} rows (the batch's tokens), got {x.shape[0]} and {y.shape[0]}"
        )
    num_slots, r_max, h_in = lora_a.shape
    _, h_out, r_max_b = lora_b.shape
    if x.shape[1] != h_in:
        raise ValueError(f"x has H_in={x.shape[1]} but lora_a is [S, R_max, {h_in}]")
    if lora_b.shape[0] != num_slots or r_max_b != r_max:
        raise ValueError(
            f"lora_b {tuple(lora_b.shape)} does not match lora_a {tuple(lora_a.shape)}: "
            f"expected [{num_slots}, H_out, {r_max}]"
        )
    if scales.shape != (num_slots,) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be [S={num_slots}] float32, got {tuple(scales.shape)} {scales.dtype}")
    if not 0 <= out_offset <= y.shape[1] - h_out:
        raise ValueError(
            f"output slice [{out_offset}, {out_offset + h_out}) does not fit in y with {y.shape[1]} columns"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x dtype must be one of float32, float16, bfloat16, got {x.dtype}")
    narrow_banks = (
        bf16_banks and x.dtype == y.dtype == torch.float32 and lora_a.dtype == lora_b.dtype == torch.bfloat16
    )
    if not (x.dtype == y.dtype == lora_a.dtype == lora_b.dtype or narrow_banks):
        raise ValueError(
            f"x, y, lora_a, lora_b must share one dtype, "
            f"got {x.dtype}, {y.dtype}, {lora_a.dtype}, {lora_b.dtype}"
        )


def check_same_device(device: torch.device, **tensors: torch.Tensor) -> None:
    """Every tensor on ``device``."""
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the computation runs on {device}")


def check_triton_device(device: torch.device) -> None:
    """Triton kernels run on CUDA (or on CPU under the Triton interpreter)."""
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        raise ValueError(f"Triton LoRA kernels need CUDA tensors, got device {device}")


def check_row_major(**tensors: torch.Tensor) -> None:
    """Unit stride along the last dimension (rows may be strided, e.g. a column slice of y)."""
    for name, t in tensors.items():
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")


def check_index(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dim() != 1 or t.dtype not in INDEX_DTYPES:
            raise ValueError(f"{name} must be a 1-D int64/int32 tensor, got {tuple(t.shape)} {t.dtype}")


def check_shrink_args(v: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor) -> None:
    """Shared by the SGMV and BGMV shrink launchers (v's rows are checked with the indices)."""
    if x.dim() != 2 or lora_a.dim() != 3 or x.shape[1] != lora_a.shape[2]:
        raise ValueError(
            f"x must be [T, H_in] and lora_a [S, R_max, H_in], got {tuple(x.shape)}, {tuple(lora_a.shape)}"
        )
    if x.dtype != lora_a.dtype:
        raise ValueError(f"x and lora_a must share one dtype, got {x.dtype} and {lora_a.dtype}")
    if v.dim() == 2 and v.shape[1] != lora_a.shape[1]:
        raise ValueError(f"v must have one column per row of lora_a ({lora_a.shape[1]}), got {v.shape[1]}")
    check_triton_device(x.device)
    check_same_device(x.device, lora_a=lora_a)
    check_row_major(x=x, lora_a=lora_a)


def check_expand_args(
    y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor, out_offset: int
) -> None:
    """Shared by the SGMV and BGMV expand launchers."""
    if y.dim() != 2 or lora_b.dim() != 3:
        raise ValueError(
            f"y must be [T, H_total] and lora_b [S, H_out, R_max], "
            f"got {tuple(y.shape)}, {tuple(lora_b.shape)}"
        )
    if v.dim() == 2 and v.shape[1] != lora_b.shape[2]:
        raise ValueError(f"v must have R_max={lora_b.shape[2]} columns, got {v.shape[1]}")
    if y.dtype != lora_b.dtype:
        raise ValueError(f"y and lora_b must share one dtype, got {y.dtype} and {lora_b.dtype}")
    if scales.shape != (lora_b.shape[0],) or scales.dtype != torch.float32:
        raise ValueError(
            f"scales must be [S={lora_b.shape[0]}] float32, got {tuple(scales.shape)} {scales.dtype}"
        )
    if not 0 <= out_offset <= y.shape[1] - lora_b.shape[1]:
        raise ValueError(
            f"output slice [{out_offset}, {out_offset + lora_b.shape[1]}) "
            f"does not fit in y with {y.shape[1]} columns"
        )
    check_triton_device(y.device)
    check_same_device(y.device, lora_b=lora_b, scales=scales)
    check_row_major(y=y, lora_b=lora_b)


def check_slices(lora_a: torch.Tensor, num_slices: int, max_rank: int) -> int:
    """A packed bank holds ``num_slices`` slices of R rows each; returns R (the rows per slice)."""
    if num_slices < 1 or lora_a.shape[1] % num_slices:
        raise ValueError(
            f"lora_a has {lora_a.shape[1]} rank rows, which do not split into {num_slices} equal slices"
        )
    slice_r = lora_a.shape[1] // num_slices
    if max_rank > slice_r:
        raise ValueError(f"max_rank {max_rank} is over the {slice_r} rank rows of each slice")
    return slice_r
