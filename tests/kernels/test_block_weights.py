"""Weights kept in GGUF Q4_1/Q8_0 blocks (kernels/block_weights.py): packed only where the fp32 matrix is
exactly a GGUF file's dequantized values (quantized and dequantized here by the `gguf` package, as
transformers dequantizes a GGUF checkpoint), read back as those very numbers, and multiplied as torch
multiplies the fp32 matrix, over every path of the kernel (one row streamed, 2-4 row tiles on the widened
buffer, row tails, bias, one thread and several) and of its Python side (3-D input, torch's GEMM from
WIDEN_ROWS rows and under autograd, the embedding lookup)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants

from hotlora.kernels import block_weights
from hotlora.kernels.gguf_blocks import Format

pytestmark = pytest.mark.skipif(
    block_weights.unavailable_reason() is not None, reason=f"{block_weights.unavailable_reason()}"
)


def gguf_values(w: torch.Tensor, kind: str) -> torch.Tensor:
    """`w` quantized to GGUF `kind` (Q4_1 or Q8_0) and dequantized back to fp32, as a GGUF checkpoint's."""
    qtype = getattr(GGMLQuantizationType, kind)
    data = quants.quantize(w.double().numpy().astype(np.float32), qtype)
    return torch.from_numpy(np.ascontiguousarray(quants.dequantize(data, qtype))).view(w.shape).float()


def _matrix(n: int, k: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return gguf_values(torch.randn(n, k, generator=g) * 0.05, kind)


def _reference(x, w, b=None):
    y = x.double() @ w.double().t()
    return (y if b is None else y + b.double()).float()


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_a_gguf_matrix_packs_into_its_blocks_and_widens_back_to_the_same_numbers(kind):
    w = _matrix(200, 576, kind)
    packed = block_weights.pack(w)
    assert packed is not None and packed.fmt == Format[kind]
    assert packed.nbytes <= w.nbytes * (0.19 if kind == "Q4_1" else 0.29)
    assert torch.equal(block_weights.widen(packed), w)
    rows = torch.tensor([199, 0, 7, 7])
    assert torch.equal(block_weights.widen(packed, rows), w[rows])
    ids = torch.tensor([[3, 1], [199, 0]])
    assert torch.equal(block_weights.embedding(ids, packed), F.embedding(ids, w))
    with pytest.raises(IndexError, match="out of range"):
        block_weights.embedding(torch.tensor([200]), packed)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_blocks_widen_straight_to_bf16_as_torch_rounds_the_fp32_values(kind):
    w = _matrix(70, 576, kind, seed=2)
    packed = block_weights.pack(w)
    want = w.bfloat16()
    assert torch.equal(block_weights.widen_bf16(packed).view(torch.int16), want.view(torch.int16))
    out = torch.empty(70, 576, dtype=torch.bfloat16)
    assert block_weights.widen_bf16(packed, out=out) is out and torch.equal(out, want)


def test_widening_to_bf16_rounds_ties_to_even():
    # a block of m = 1 and d = 2^-8 holds 1 + q / 256: for odd q the fp32 value lies halfway between two bf16
    # numbers (low 16 bits 0x8000); torch rounds those to the even one, and so must the kernel
    q = torch.arange(32, dtype=torch.float32).remainder(16)
    w = (1 + q / 256).repeat(4, 2)
    assert (w.view(torch.int32) & 0xFFFF).eq(0x8000).sum() == 4 * 2 * 16  # the ties are there
    packed = block_weights.pack(w)
    assert packed is not None and packed.fmt == Format.Q4_1
    got = block_weights.widen_bf16(packed)
    assert torch.equal(got.view(torch.int16), w.bfloat16().view(torch.int16))
    assert not torch.equal(got.float(), w)  # rounded, not truncated copies of fp32 that happen to fit


def test_matrices_of_other_values_are_not_packed():
    w = _matrix(70, 64, "Q4_1")
    assert block_weights.pack(torch.randn(70, 64)) is None  # plain fp32
    assert block_weights.pack(w.to(torch.bfloat16).float()) is None  # bf16 values, not blocks
    assert block_weights.pack(w[:, :48].contiguous()) is None  # K not a multiple of 32
    assert block_weights.pack(w.double()) is None and block_weights.pack(w[0]) is None
    for row in (0, 69):  # one value an ulp off, in the rows tried first and past them
        off = w.clone()
        off[row, 5] = torch.nextafter(off[row, 5], torch.tensor(1.0))
        assert block_weights.pack(off) is None
    nan = w.clone()
    nan[3, 3] = float("nan")
    assert block_weights.pack(nan) is None


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 33])
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("k, n", [(576, 960), (1536, 24), (64, 7), (96, 13), (32, 1)])
def test_the_kernel_equals_the_fp32_product(rows, kind, k, n):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    w = _matrix(n, k, kind, seed=rows + k)
    x, b = torch.randn(rows, k, generator=g), torch.randn(n, generator=g)
    packed = block_weights.pack(w)
    for bias in (None, b):
        got = block_weights.linear(x, packed, bias)
        torch.testing.assert_close(got, _reference(x, w, bias), rtol=1e-5, atol=1e-5)
    # one thread against the default: the same sums
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = block_weights.linear(x, packed, b)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, block_weights.linear(x, packed, b), rtol=1e-6, atol=1e-6)


def test_long_chunks_three_d_input_and_autograd_take_torch_on_the_widened_matrix():
    w = _matrix(48, 64, "Q4_1")
    packed = block_weights.pack(w)
    x = torch.randn(2, block_weights.WIDEN_ROWS, 64)
    torch.testing.assert_close(block_weights.linear(x, packed), F.linear(x, w), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 64)
    torch.testing.assert_close(block_weights.linear(x3, packed), F.linear(x3, w), rtol=1e-5, atol=1e-5)
    a = torch.randn(3, 64, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    block_weights.linear(a, packed).square().sum().backward()
    F.linear(b, w).square().sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_long_chunks_on_matrices_in_turn_each_get_their_own_widened_weights():
    # the widened copy goes into a scratch buffer: a matrix widened after another, a larger one after a
    # smaller, one past the scratch's size stay exact; another thread (a training loop beside the engine)
    # writes into a scratch of its own
    import threading

    mats = [_matrix(48, 64, "Q4_1"), _matrix(300, 96, "Q8_0", seed=1), _matrix(7, 32, "Q4_1", seed=2)]
    big = _matrix(block_weights.SCRATCH_FLOATS // 64 + 1, 64, "Q8_0", seed=3)
    rows = block_weights.WIDEN_ROWS
    for w in [*mats, big, *mats]:
        x = torch.randn(rows, w.shape[1])
        got = block_weights.linear(x, block_weights.pack(w))
        torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
        in_bf16 = block_weights.linear(x, block_weights.pack(w), long_in_bf16=True)  # its own bf16 scratch
        assert torch.equal(in_bf16, F.linear(x.bfloat16(), w.bfloat16()).float())
    theirs = []

    def other():
        block_weights.linear(torch.randn(rows, 64), block_weights.pack(mats[0]))
        theirs.append(block_weights._scratch.bufs[torch.float32].data_ptr())

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert theirs and theirs[0] != block_weights._scratch.bufs[torch.float32].data_ptr()


def test_a_wrong_input_is_turned_down_with_the_shapes():
    packed = block_weights.pack(_matrix(8, 64, "Q8_0"))
    with pytest.raises(TypeError, match="64 features"):
        block_weights.linear(torch.randn(2, 32), packed)
    with pytest.raises(TypeError, match="float32"):
        block_weights.linear(torch.randn(2, 64, dtype=torch.float64), packed)
