"""The CPU path's decode-batch LoRA update in two C calls (`csrc/lora_decode.c`): every token's adapter read
from the banks in place, per-slot ranks honoured, for fp32 on CPUs that run hotlora's C kernels.

Used by kernels.cpu for the batches its torch strategies would run as gather + bmm or bmm on bank views
(short segments of many slots: decode), where the adapters' bytes are the whole cost."""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from . import native

log = logging.getLogger("hotlora.kernels")


def usable(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == y.dtype == lora_a.dtype == lora_b.dtype == torch.float32
        and x.stride(-1) == 1
        and y.stride(-1) == 1
        and lora_a.is_contiguous()
        and lora_b.is_contiguous()
        and _available()
    )


def shrink(x: torch.Tensor, slots: torch.Tensor, lora_a: torch.Tensor, slices: int, ranks: torch.Tensor):
    """u [T, slices * R]: u[t, i*R + j] = A[s_t, i*R + j] . x[t] for j < rank(s_t), zero elsewhere.
    lora_a: [S, slices * R, H_in]."""
    tokens, k = x.shape
    rows = lora_a.shape[1]
    u = torch.empty(tokens, rows, dtype=torch.float32)
    slots, ranks = _i64(slots), _i64(ranks)
    _library().hotlora_lora_shrink(
        x.data_ptr(), tokens, x.stride(0), slots.data_ptr(), lora_a.data_ptr(), rows, k, slices,
        rows // slices, ranks.data_ptr(), u.data_ptr(), _threads(tokens * rows * k),
    )  # fmt: skip
    return u


def expand(
    ys: torch.Tensor,
    u: torch.Tensor,
    u_offset: int,
    slots: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """ys[t] += scales[s_t] · B[s_t, :, :rank] · u[t, u_offset : u_offset + rank], in place.
    ys: [T, H_out] (a column slice of y is fine); lora_b: [S, H_out, R]; scales: [S]."""
    tokens, n = ys.shape
    r_max = lora_b.shape[2]
    slots, ranks = _i64(slots), _i64(ranks)
    scales = scales.to(torch.float32).contiguous()
    _library().hotlora_lora_expand(
        u.data_ptr(), tokens, u.stride(0), u_offset, slots.data_ptr(), lora_b.data_ptr(), n, r_max,
        ranks.data_ptr(), scales.data_ptr(), ys.data_ptr(), ys.stride(0), _threads(tokens * n * r_max),
    )  # fmt: skip


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def _threads(work: int) -> int:
    return torch.get_num_threads() if work >= 1 << 16 else 1


@functools.cache
def _available() -> bool:
    try:
        _library()
    except native.Unavailable as exc:  # the torch strategies are correct too, only slower
        log.warning("decode LoRA runs through torch: %s", exc)
        return False
    return True


@functools.cache
def _library() -> ctypes.CDLL:
    lib = native.library("lora_decode")
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.hotlora_lora_shrink.argtypes = [p, i64, i64, p, p, i64, i64, i64, i64, p, p, c_int]
    lib.hotlora_lora_expand.argtypes = [p, i64, i64, i64, p, p, i64, i64, p, p, p, i64, c_int]
    lib.hotlora_lora_shrink.restype = lib.hotlora_lora_expand.restype = c_int
    return lib
