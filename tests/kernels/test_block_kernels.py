"""The block kernel (csrc/block_weights.c) on every GGUF type hotlora keeps -- Q4_0, Q4_1, Q8_0, Q4_K, Q6_K,
F16, BF16 -- against the `gguf` package's dequantization of random valid blocks: widening gives its very
bits; the decode GEMV (one row of x), the several-row tiles and the long-chunk bands give the fp32 product
on those weights, on the projection shapes of the families (Llama-3.2-1B, Qwen2-0.5B, SmolLM2) and odd ones
(row tails); the input gradient of the product (QLoRA's backward) is dy . W. A kernel built with its scale
or min decoding mutated fails the same comparison."""

from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch
from gguf import GGMLQuantizationType, quants

from hotlora.kernels import block_weights, gguf_blocks, native
from hotlora.kernels.gguf_blocks import Format
from tests.kernels.test_gguf_blocks import random_gguf_blocks

pytestmark = pytest.mark.skipif(
    block_weights.unavailable_reason() is not None, reason=f"{block_weights.unavailable_reason()}"
)

FORMATS = list(Format)
K_TYPES = (Format.Q4_K, Format.Q6_K)
# (N, K) of the families' fused projections: qkv, o, gate_up, down
SHAPES = {
    "llama-3.2-1b": [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)],
    "qwen2-0.5b": [(1152, 896), (896, 896), (9728, 896), (896, 4864)],
    "smollm2-135m": [(960, 576), (576, 576), (3072, 576), (576, 1536)],
}


def _matrix(fmt: Format, n: int, k: int, seed: int = 0, by_gguf: bool = True):
    """(BlockMatrix, its fp32 values as the gguf package dequantizes them -- or, for big matrices, as
    gguf_blocks.dequantize does, which tests/kernels/test_gguf_blocks.py holds to the gguf package's bits)."""
    kind = GGMLQuantizationType[fmt.name]
    raw = random_gguf_blocks(kind, n, k, seed)
    m = gguf_blocks.from_gguf(raw, kind, (n, k))
    return m, torch.from_numpy(quants.dequantize(raw, kind).copy()) if by_gguf else gguf_blocks.dequantize(m)


def _reference(x, w, b=None):
    y = x.double() @ w.double().t()
    return (y if b is None else y + b.double()).float()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_widening_gives_the_gguf_packages_bits(fmt):
    m, w = _matrix(fmt, 37, 512, seed=3)
    assert torch.equal(block_weights.widen(m).view(torch.int32), w.view(torch.int32))
    rows = torch.tensor([36, 0, 5, 5])
    assert torch.equal(block_weights.widen(m, rows), w[rows])
    assert torch.equal(block_weights.widen_bf16(m).view(torch.int16), w.bfloat16().view(torch.int16))
    ids = torch.tensor([[3, 1], [36, 0]])
    assert torch.equal(block_weights.embedding(ids, m), w[ids])


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 33])
@pytest.mark.parametrize("n", [7, 8, 13])
def test_the_kernel_is_the_fp32_product_on_the_dequantized_weights(fmt, rows, n):
    """The binding's decode GEMV (rows = 1) and several-row tiles, with and without a bias."""
    k = 512 if fmt in K_TYPES else 96
    m, w = _matrix(fmt, n, k, seed=rows * 100 + n)
    g = torch.Generator().manual_seed(rows + n)
    x, b = torch.randn(rows, k, generator=g), torch.randn(n, generator=g)
    for bias in (None, b):
        torch.testing.assert_close(
            block_weights.linear(x, m, bias), _reference(x, w, bias), rtol=1e-5, atol=1e-4
        )


@pytest.mark.parametrize("family", list(SHAPES))
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_the_families_projection_shapes(family, fmt):
    for i, (n, k) in enumerate(SHAPES[family]):
        if k % fmt.block:
            continue  # llama.cpp keeps such a matrix in another type (K not a multiple of 256)
        m, w = _matrix(fmt, n, k, seed=i, by_gguf=False)
        g = torch.Generator().manual_seed(i)
        for rows in (1, 6):
            x = torch.randn(rows, k, generator=g)
            torch.testing.assert_close(block_weights.linear(x, m), _reference(x, w), rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("fmt", [Format.Q4_0, Format.Q4_K, Format.Q6_K], ids=lambda f: f.name)
def test_long_chunks_run_on_widened_bands(fmt, monkeypatch):
    m, w = _matrix(fmt, 300, 256, seed=5)
    monkeypatch.setattr(block_weights, "SCRATCH_FLOATS", 256 * 64)  # bands of 64 rows, the last one short
    block_weights._scratch.__dict__.pop("bufs", None)
    x = torch.randn(block_weights.WIDEN_ROWS + 3, 256, generator=torch.Generator().manual_seed(0))
    b = torch.randn(300)
    torch.testing.assert_close(block_weights.linear(x, m, b), _reference(x, w, b), rtol=1e-4, atol=1e-3)
    got = block_weights.linear(x, m, b, long_in_bf16=True)
    want = (x.bfloat16().double() @ w.bfloat16().double().t()).bfloat16().float() + b
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fmt", [Format.Q4_0, Format.Q8_0, Format.Q4_K, Format.Q6_K], ids=lambda f: f.name)
@pytest.mark.parametrize("rows", [3, block_weights.WIDEN_ROWS + 1])
def test_the_input_gradient_is_dy_times_w_band_by_band(fmt, rows, monkeypatch):
    """QLoRA's backward through a frozen quantized projection: dx = dy . W, W never widened whole."""
    m, w = _matrix(fmt, 200, 256, seed=7)
    widened = []
    real_band = block_weights._band
    monkeypatch.setattr(block_weights, "SCRATCH_FLOATS", 256 * 48)
    block_weights._scratch.__dict__.pop("bufs", None)
    monkeypatch.setattr(
        block_weights,
        "_band",
        lambda m, s, e, *a, **kw: widened.append(e - s) or real_band(m, s, e, *a, **kw),
    )
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 256, generator=g)
    a = x.clone().requires_grad_(True)
    y = block_weights.linear(a, m)
    torch.testing.assert_close(y.detach(), _reference(x, w), rtol=1e-4, atol=1e-3)
    dy = torch.randn(2, rows, 200, generator=g)
    y.backward(dy)
    torch.testing.assert_close(a.grad, (dy.double() @ w.double()).float(), rtol=1e-4, atol=1e-3)
    assert widened and max(widened) <= 48  # in bands, never the 200 rows at once


def test_the_binding_refuses_a_format_or_rows_that_do_not_fit():
    m, _ = _matrix(Format.Q4_K, 4, 512)
    x = torch.randn(2, 512)
    with pytest.raises(ValueError, match="fmt 9 is not a block format"):
        native.ops().linear_blocks(x, m.data, 9, None)
    with pytest.raises(ValueError, match="not whole Q6_K rows"):
        native.ops().linear_blocks(x, m.data, int(Format.Q6_K), None)  # Q4_K's 304-byte rows
    with pytest.raises(ValueError, match="x must have 512 features"):
        native.ops().linear_blocks(torch.randn(2, 256), m.data, int(m.fmt), None)
    with pytest.raises(ValueError, match="fmt must be Q4_K"):
        native.ops().quantize_k(torch.randn(2, 256), int(Format.Q8_0))


# ---- mutants: the comparison above must catch a kernel that decodes a scale or a min wrongly ------------

MUTANTS = {
    "Q4_K scale of the next block": (Format.Q4_K, "(float)r.sc[b])", "(float)r.sc[b ^ 1])"),
    "Q4_K min read as the scale": (Format.Q4_K, "(float)r.mn[b]", "(float)r.sc[b]"),
    "Q4_K min of the first super-block": (Format.Q4_K, "-(r.m[b >> 3]", "-(r.m[0]"),
    "Q6_K scales read unsigned": (
        Format.Q6_K,
        "const int8_t* sc = (const int8_t*)r.sc",
        "const uint8_t* sc = r.sc",
    ),
    "Q6_K one scale for both halves": (Format.Q6_K, "(float)sc[2 * b + 1]", "(float)sc[2 * b]"),
    "Q6_K high bits of the wrong half": (Format.Q6_K, "srlv_epi32(h, shift_hi)", "srlv_epi32(h, shift_lo)"),
    "Q4_0 offset by one": (
        Format.Q4_0,
        "_mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7)",
        "_mm512_setr_ps(-7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8)",
    ),
    "Q4_0/Q8_0 decode: the next block's scale": (
        Format.Q8_0,
        "_mm512_set1_ps(rows[j].d[b]), acc[j]",
        "_mm512_set1_ps(rows[j].d[b ^ 1]), acc[j]",
    ),
}


def _mutant_library(tmp_path, old: str, new: str) -> ctypes.CDLL:
    src = (native.CSRC / "block_weights.c").read_text()
    assert src.count(old) == 1, old
    path = tmp_path / "block_weights.c"
    path.write_text(src.replace(old, new))
    so = tmp_path / "mutant.so"
    flags = [f if f != "-O3" else "-O1" for f in native.C_FLAGS]  # -O1: quicker to build
    cmd = [native.compiler(), *flags, "-shared", f"-I{native.CSRC}", "-o", str(so), str(path), "-lm"]
    subprocess.run(cmd, check=True)
    # the mutant is this test's own build, called straight (the served kernel goes through its binding)
    lib = ctypes.CDLL(str(so))
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.hotlora_widen_blocks.argtypes = [p, c_int, i64, p, i64, p, c_int]
    lib.hotlora_linear_blocks.argtypes = [p, i64, i64, p, c_int, i64, p, p, c_int, p, p]
    return lib


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_a_kernel_with_its_scale_or_min_decoding_mutated_fails(mutant, tmp_path):
    fmt, old, new = MUTANTS[mutant]
    lib = _mutant_library(tmp_path, old, new)
    m, w = _matrix(fmt, 16, 512, seed=11)
    out = torch.empty(16, 512)
    lib.hotlora_widen_blocks(m.data.data_ptr(), int(fmt), 512, None, 16, out.data_ptr(), 1)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(0))
    y = torch.empty(1, 16)
    lib.hotlora_linear_blocks(
        x.data_ptr(), 1, 512, m.data.data_ptr(), int(fmt), 16, y.data_ptr(), None, 1, None, None
    )
    widened_right = torch.equal(out, w)
    product_right = torch.allclose(y, _reference(x, w), rtol=1e-5, atol=1e-4)
    assert not (widened_right and product_right), "neither check tells this mutant apart"
