"""GGUF's weight types as hotlora keeps them: one matrix = a `BlockMatrix`, its rows laid out for the C
kernel (`csrc/block_weights.c`), every weight read back as exactly the fp32 number the `gguf` package's
dequantizer gives for the file's block.

A row of K weights holds K/32 blocks of 32 (K/256 super-blocks of 256 for the K types). Its bytes are the
blocks' quants first, then their scales, each scale as fp32 (a broadcast from memory costs no shuffle) or,
for the K types, as the 6/8-bit integers the file holds; weight = the formula beside each format:

| format | row: nb = K/32 blocks, ns = K/256 super-blocks          | weight              | B/32 w | GGUF |
|--------|--------------------------------------------------------|---------------------|--------|------|
| Q4_1   | q 16 B x nb, d f32 x nb, m f32 x nb                    | d q + m             | 24     | 20   |
| Q8_0   | q 32 B x nb (int8), d f32 x nb                         | d q                 | 36     | 34   |
| Q4_0   | q 16 B x nb, d f32 x nb                                | d (q - 8)           | 20     | 18   |
| Q4_K   | q 16 B x nb, d, dmin f32 x ns, sc, m u8 x nb           | (d sc) q - (dmin m) | 19     | 18   |
| Q6_K   | lo 16 B x nb, hi 8 B x nb, d f32 x ns, sc i8 x 2 nb    | (d sc) (q - 32)     | 26.5   | 26.25|
| F16    | K halves                                               | the half            | 64     | 64   |
| BF16   | K bf16                                                 | the bf16            | 64     | 64   |

A block's 4-bit q: byte i holds weight i in its low nibble and weight 16 + i in its high one (GGUF's Q4_0
and Q4_1 order; Q4_K's 64-weight runs are reordered to it). Q6_K's 6-bit q = lo nibble (as 4-bit q) |
hi bits << 4, hi byte i holding weight 8 j + i's two high bits at bit 2 j. Q6_K's scales are per 16
weights (2 per block). Products d sc, dmin m and d q are exact in fp32 (an 11-bit fp16 d times a 6- or
8-bit integer, times a 4-bit q), so a weight is rounded at most once -- where the `gguf` package's
numpy rounds it -- and `dequantize` here and the C kernel's widening give its very bits.

`from_gguf` turns a GGUF file's blocks into this layout, `quantize` an fp32 matrix (`--quantize`): Q8_0,
Q4_0 and Q4_1 with the `gguf` package's own quantizer, Q4_K and Q6_K with llama.cpp's reference quantizer
(`quantize_row_q4_K_ref`, `quantize_row_q6_K_ref`) ported to `csrc/quantize_k.c`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

__all__ = ["BlockMatrix", "Format", "dequantize", "from_gguf", "quantize", "row_bytes"]


class Format(enum.IntEnum):
    """A block format; the value is the C kernel's id for it."""

    Q4_1 = 0
    Q8_0 = 1
    Q4_0 = 2
    Q4_K = 3
    Q6_K = 4
    F16 = 5
    BF16 = 6

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @property
    def block(self) -> int:
        """Weights a row's length must be a multiple of."""
        return 256 if self in (Format.Q4_K, Format.Q6_K) else 32

    @classmethod
    def of(cls, ggml_type: GGMLQuantizationType) -> Format | None:
        return cls.__members__.get(GGMLQuantizationType(ggml_type).name)


_BYTES_PER_256 = {  # bytes of one row per 256 weights, in the layouts above
    Format.Q4_1: 192,
    Format.Q8_0: 288,
    Format.Q4_0: 160,
    Format.Q4_K: 152,
    Format.Q6_K: 212,
    Format.F16: 512,
    Format.BF16: 512,
}


def row_bytes(fmt: Format, k: int) -> int:
    if k % fmt.block:
        raise ValueError(f"{fmt.name} rows hold a multiple of {fmt.block} weights, not {k}")
    return k * _BYTES_PER_256[fmt] // 256


@dataclass(frozen=True, eq=False)
class BlockMatrix:
    """An [out_features, in_features] weight matrix kept in `fmt`'s blocks: `data` uint8
    [out_features, row_bytes(fmt, in_features)], contiguous."""

    data: torch.Tensor
    fmt: Format
    in_features: int

    def __post_init__(self):
        d = self.data
        want = row_bytes(self.fmt, self.in_features)
        if d.dtype != torch.uint8 or d.dim() != 2 or d.shape[1] != want or not d.is_contiguous():
            raise ValueError(
                f"a {self.fmt.name} matrix of {self.in_features} columns is contiguous uint8 [rows, {want}], "
                f"got {d.dtype} {list(d.shape)}"
            )

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def with_data(self, data: torch.Tensor) -> BlockMatrix:
        """The same matrix over other storage of the same bytes (huge pages, a row permutation)."""
        return BlockMatrix(data, self.fmt, self.in_features)


# ---- from a GGUF file's blocks ---------------------------------------------------------------------------


def from_gguf(raw: np.ndarray | torch.Tensor, ggml_type: GGMLQuantizationType, shape: tuple[int, int]):
    """The [N, K] matrix a GGUF tensor's bytes hold (`raw`: uint8, N rows of GGUF blocks) as a BlockMatrix,
    or, for F32, as the fp32 tensor itself. Raises ValueError for another type."""
    n, k = shape
    t = torch.from_numpy(np.ascontiguousarray(raw)) if isinstance(raw, np.ndarray) else raw
    t = t.reshape(n, -1)
    if ggml_type == GGMLQuantizationType.F32:
        return t.contiguous().view(torch.float32).clone()
    fmt = Format.of(ggml_type)
    if fmt is None:
        raise ValueError(f"GGUF type {GGMLQuantizationType(ggml_type).name} is not kept as blocks")
    data = _REPACK[fmt](t, n, k)
    return BlockMatrix(data.contiguous(), fmt, k)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 bytes [..., 2 j] -> fp32 [..., j] (exact)."""
    return b.contiguous().view(torch.float16).float()


def _f32_bytes(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).reshape(n, -1)


def _blocks(t: torch.Tensor, n: int, k: int, size: int, per: int) -> torch.Tensor:
    return t.reshape(n, k // per, size)


def _repack_q8_0(t, n, k):
    b = _blocks(t, n, k, 34, 32)
    return torch.cat([b[..., 2:].reshape(n, -1), _f32_bytes(_f16(b[..., :2]), n)], 1)


def _repack_q4_0(t, n, k):
    b = _blocks(t, n, k, 18, 32)
    return torch.cat([b[..., 2:].reshape(n, -1), _f32_bytes(_f16(b[..., :2]), n)], 1)


def _repack_q4_1(t, n, k):
    b = _blocks(t, n, k, 20, 32)
    d, m = _f16(b[..., :2]), _f16(b[..., 2:4])
    return torch.cat([b[..., 4:].reshape(n, -1), _f32_bytes(d, n), _f32_bytes(m, n)], 1)


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes of packed 6-bit scales and mins -> (sc, m) uint8 [..., 8] (gguf's get_scale_min)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], -1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], -1)
    return sc, mn


def _repack_q4_k(t, n, k):
    b = _blocks(t, n, k, 144, 256)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k4_scales(b[..., 4:16])
    qs = b[..., 16:].reshape(n, k // 256, 4, 32)  # 4 runs of 64 weights: low nibbles 0..31, high 32..63
    q = torch.stack([qs & 0x0F, qs >> 4], 3).reshape(n, k // 32, 32)  # weights in order, 32 a block
    packed = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat(
        [packed.reshape(n, -1), _f32_bytes(d, n), _f32_bytes(dmin, n), sc.reshape(n, -1), mn.reshape(n, -1)],
        1,
    )


def _q6_k_values(b: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks [..., 210] -> q in 0..63, uint8 [..., 256] in weight order (gguf's layout)."""
    lead = b.shape[:-1]
    ql = b[..., :128].reshape(*lead, 2, 1, 64)
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32)
    lo = torch.cat([ql & 0x0F, ql >> 4], -2).reshape(*lead, 2, 4, 32)  # halves of 128: runs of 32
    hi = torch.cat([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], -2).reshape(*lead, 2, 4, 32)
    return (lo | (hi << 4)).reshape(*lead, 256)


def _repack_q6_k(t, n, k):
    b = _blocks(t, n, k, 210, 256)
    q = _q6_k_values(b).reshape(n, k // 32, 32)
    lo = (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)
    h = (q >> 4).reshape(n, k // 32, 4, 8)
    hi = h[..., 0, :] | (h[..., 1, :] << 2) | (h[..., 2, :] << 4) | (h[..., 3, :] << 6)
    d = _f16(b[..., 208:210])
    sc = b[..., 192:208]
    return torch.cat([lo.reshape(n, -1), hi.reshape(n, -1), _f32_bytes(d, n), sc.reshape(n, -1)], 1)


def _repack_2byte(t, n, k):
    return t.reshape(n, 2 * k)


_REPACK = {
    Format.Q8_0: _repack_q8_0,
    Format.Q4_0: _repack_q4_0,
    Format.Q4_1: _repack_q4_1,
    Format.Q4_K: _repack_q4_k,
    Format.Q6_K: _repack_q6_k,
    Format.F16: _repack_2byte,
    Format.BF16: _repack_2byte,
}


# ---- back to fp32 (the reference the C kernel is tested against, and the torch path) -----------------


def dequantize(m: BlockMatrix, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 [N, K] matrix (only `rows`, int64 indices, when given), bit for bit the `gguf` package's
    dequantization of the blocks it came from."""
    data = m.data if rows is None else m.data.index_select(0, rows.to(torch.int64))
    n, k = data.shape[0], m.in_features
    nb, ns = k // 32, k // 256
    regions = _regions(m.fmt, data, nb, ns)
    fmt = m.fmt
    if fmt == Format.F16:
        return data.view(torch.float16).float()
    if fmt == Format.BF16:
        return data.view(torch.bfloat16).float()
    if fmt == Format.Q8_0:
        q = regions[0].view(torch.int8).reshape(n, nb, 32).float()
        return (q * regions[1].unsqueeze(-1)).reshape(n, k)
    if fmt == Format.Q6_K:
        lo, hi, d, sc = regions
        q = _nibbles(lo.reshape(n, nb, 16)).to(torch.int32)
        h = hi.reshape(n, nb, 1, 8) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
        q = q | ((h & 0x03).reshape(n, nb, 32).to(torch.int32) << 4)
        ds = d.repeat_interleave(16, 1) * sc.view(torch.int8).float()  # [n, 2 nb]: one a 16 weights
        return (ds.unsqueeze(-1) * (q - 32).float().reshape(n, 2 * nb, 16)).reshape(n, k)
    q = _nibbles(regions[0].reshape(n, nb, 16)).float()
    if fmt == Format.Q4_0:
        return ((q - 8) * regions[1].unsqueeze(-1)).reshape(n, k)
    if fmt == Format.Q4_1:
        d, mn = regions[1], regions[2]
        return (q * d.unsqueeze(-1) + mn.unsqueeze(-1)).reshape(n, k)
    _, d, dmin, sc, mn = regions  # Q4_K
    ds = d.repeat_interleave(8, 1) * sc.float()
    dm = dmin.repeat_interleave(8, 1) * mn.float()
    return (ds.unsqueeze(-1) * q - dm.unsqueeze(-1)).reshape(n, k)


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values: low nibbles first, then high ones."""
    return torch.cat([b & 0x0F, b >> 4], -1)


def _regions(fmt: Format, data: torch.Tensor, nb: int, ns: int) -> list[torch.Tensor]:
    """A row's parts in order (see the table), each [N, count] of its type."""
    sizes = {
        Format.Q4_1: [(16 * nb, None), (4 * nb, torch.float32), (4 * nb, torch.float32)],
        Format.Q8_0: [(32 * nb, None), (4 * nb, torch.float32)],
        Format.Q4_0: [(16 * nb, None), (4 * nb, torch.float32)],
        Format.Q4_K: [
            (16 * nb, None),
            (4 * ns, torch.float32),
            (4 * ns, torch.float32),
            (nb, None),
            (nb, None),
        ],
        Format.Q6_K: [(16 * nb, None), (8 * nb, None), (4 * ns, torch.float32), (2 * nb, None)],
    }.get(fmt, [])
    out, at = [], 0
    for size, dtype in sizes:
        part = data[:, at : at + size].contiguous()
        out.append(part if dtype is None else part.view(dtype))
        at += size
    return out


# ---- from fp32 (--quantize) -------------------------------------------------------------------------------


def quantize(w: torch.Tensor, fmt: Format) -> BlockMatrix:
    """The fp32 matrix [N, K] in `fmt`'s blocks, as GGUF's reference quantizer makes them."""
    return from_gguf(quantize_gguf(w, fmt), fmt.ggml_type, tuple(w.shape))


def quantize_gguf(w: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The matrix [N, K] as GGUF's blocks of `fmt` (uint8 [N, GGUF's row bytes]): the `gguf` package's
    quantizer for Q8_0, Q4_0, Q4_1 (and F16, BF16: rounded to nearest even), llama.cpp's reference one for
    Q4_K and Q6_K (csrc/quantize_k.c)."""
    from gguf import quants

    n, k = w.shape
    if k % fmt.block:
        raise ValueError(f"{fmt.name} needs rows of a multiple of {fmt.block} weights, not {k}")
    x = w.detach().to(torch.float32).contiguous()
    if fmt == Format.F16:
        return x.half().view(torch.uint8).reshape(n, -1).contiguous()
    if fmt == Format.BF16:
        return x.bfloat16().view(torch.uint8).reshape(n, -1).contiguous()
    if fmt in (Format.Q4_K, Format.Q6_K):
        from . import quantize_k

        return quantize_k.quantize(x, fmt.name)
    return torch.from_numpy(quants.quantize(x.numpy(), fmt.ggml_type))
