"""The C kernels of a decoder layer against the torch ops they replace in the runner: the same fp32
arithmetic in the same order, so RoPE and the KV write are bitwise equal and RMSNorm within a last-place
rounding of the sum of squares; and their bindings refuse what they cannot read, with the argument named."""

from __future__ import annotations

import pytest
import torch

from hotlora.kernels import native
from hotlora.server.engine.runner.model import _rms_norm, _rope

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None, reason=f"{native.unavailable_reason()}"
)


@pytest.mark.parametrize("h", [576, 64, 40, 7])
def test_rms_norm_equals_the_runners_torch_op(h):
    g = torch.Generator().manual_seed(h)
    wide = torch.randn(9, h + 5, generator=g) * 3
    x = wide[:, 2 : 2 + h]  # strided rows, as a residual slice can be
    w = torch.randn(h, generator=g)
    torch.testing.assert_close(
        native.ops().rms_norm(x, w, 1e-5), _rms_norm(x.contiguous(), w, 1e-5), rtol=2e-6, atol=1e-6
    )


@pytest.mark.parametrize("h", [576, 40, 7])
def test_add_rms_norm_is_the_runners_residual_add_then_its_norm(h):
    g = torch.Generator().manual_seed(h)
    x = torch.randn(5, h, generator=g) * 3
    wide = torch.randn(5, h + 4, generator=g)
    y = wide[:, 1 : 1 + h]  # strided rows, as a column slice of a wider output can be
    w = torch.randn(h, generator=g)
    want_x = x + y  # torch's add: the same one rounding per element
    want = _rms_norm(want_x, w, 1e-5)
    got = native.ops().add_rms_norm(x, y, w, 1e-5)
    assert torch.equal(x, want_x)  # added in place, bitwise
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    assert torch.equal(got, native.ops().rms_norm(want_x, w, 1e-5))  # the very norm of the sum


@pytest.mark.parametrize("d", [64, 32, 8])
def test_rope_in_place_is_bitwise_the_runners_rope(d):
    g = torch.Generator().manual_seed(d)
    heads, kv_heads, rows, positions = 6, 2, 5, torch.tensor([0, 3, 17, 100, 4])
    cos, sin = torch.randn(128, d, generator=g), torch.randn(128, d, generator=g)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g)
    signed = torch.cat((-sin[:, : d // 2], sin[:, d // 2 :]), dim=-1)
    want = _rope(
        qkv[:, : (heads + kv_heads) * d].view(rows, -1, d),
        cos[positions].unsqueeze(1),
        signed[positions].unsqueeze(1),
    )
    got = qkv.clone()
    native.ops().rope_(got, heads + kv_heads, d, cos, sin, positions)
    assert torch.equal(got[:, : (heads + kv_heads) * d].view(rows, -1, d), want)
    assert torch.equal(got[:, (heads + kv_heads) * d :], qkv[:, (heads + kv_heads) * d :])  # v untouched


def test_kv_write_puts_each_rows_k_and_v_at_its_slot():
    kv_heads, d, rows = 2, 8, 4
    qkv = torch.randn(rows, (3 + 2 * kv_heads) * d)
    k = qkv[:, 3 * d : (3 + kv_heads) * d].view(rows, kv_heads, d)
    v = qkv[:, (3 + kv_heads) * d :].view(rows, kv_heads, d)
    pool = torch.zeros(3, 2, 6, 4, kv_heads, d)  # [layers, K/V, blocks, block_size, kv_heads, d]
    k_pool, v_pool = pool[1, 0], pool[1, 1]
    slots = torch.tensor([5, 0, 23, 9])
    native.ops().kv_write(k, v, slots, pool, 1)
    assert not pool[0].any() and not pool[2].any()  # the other layers untouched
    want_k, want_v = torch.zeros(24, kv_heads, d), torch.zeros(24, kv_heads, d)
    want_k[slots], want_v[slots] = k, v
    assert torch.equal(k_pool.view(24, kv_heads, d), want_k) and torch.equal(
        v_pool.view(24, kv_heads, d), want_v
    )


def test_kv_write_takes_a_single_rows_views_whose_row_strides_differ():
    # one decode row: k and v are views of one qkv row, and the stride of their size-1 dimension is whatever
    # view() gave each (it differs): the kernel writes them, as the pool's write takes it (not index_copy_)
    from hotlora.server.engine.runner.kv_cache import _rows_alike

    kv_heads, d = 2, 8
    qkv = torch.randn(1, (3 + 2 * kv_heads) * d)
    k = qkv[:, 3 * d : (3 + kv_heads) * d].view(1, kv_heads, d)
    v = qkv[:, (3 + kv_heads) * d :].view(1, kv_heads, d)
    k, v = k.as_strided(k.shape, (7, d, 1)), v.as_strided(v.shape, (9, d, 1), v.storage_offset())
    assert k.stride(0) != v.stride(0) and _rows_alike(k, v)
    pool = torch.zeros(1, 2, 2, 4, kv_heads, d)
    native.ops().kv_write(k, v, torch.tensor([5]), pool, 0)
    assert torch.equal(pool[0, 0].view(8, kv_heads, d)[5], k[0]) and torch.equal(
        pool[0, 1].view(8, kv_heads, d)[5], v[0]
    )


@pytest.mark.parametrize("inter", [1536, 40, 7])
def test_silu_mul_equals_the_runners_torch_ops(inter):
    g = torch.Generator().manual_seed(inter)
    wide = torch.randn(9, 2 * inter + 3, generator=g) * 6  # past |x| = 10: both tails of the sigmoid
    gate_up = wide[:, 1 : 1 + 2 * inter]  # strided rows, as a slice of a wider output can be
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    # e^-x within ~2 ulp of torch's: the product within a few ulp
    torch.testing.assert_close(native.ops().silu_mul(gate_up), want, rtol=2e-6, atol=1e-7)
    huge = torch.tensor([[-200.0, 200.0, 0.0, -0.0, 88.0, -88.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(
        native.ops().silu_mul(huge), torch.nn.functional.silu(huge[:, :6]) * huge[:, 6:], rtol=2e-6, atol=0
    )


def test_the_bindings_refuse_what_the_kernels_cannot_read_and_change_nothing():
    ops = native.ops()
    with pytest.raises(ValueError, match=r"x must be a 2-D Float CPU tensor, got 2-D Double"):
        ops.rms_norm(torch.zeros(2, 8, dtype=torch.float64), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match=r"weight.shape\[0\] must be 8, got shape \[6\]"):
        ops.rms_norm(torch.zeros(2, 8), torch.ones(6), 1e-5)
    with pytest.raises(ValueError, match="contiguous rows"):
        ops.silu_mul(torch.zeros(8, 4).T)
    qkv = torch.randn(3, 4 * 8)
    cos = sin = torch.zeros(16, 8)
    before = qkv.clone()
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 16\), got 16 at 2"):
        ops.rope_(qkv, 2, 8, cos, sin, torch.tensor([0, 1, 16]))
    with pytest.raises(ValueError, match="5 heads of 8 do not fit"):
        ops.rope_(qkv, 5, 8, cos, sin, torch.tensor([0, 1, 2]))
    assert torch.equal(qkv, before)
    pool = torch.zeros(2, 2, 3, 4, 2, 8)
    k = torch.zeros(2, 2, 8)
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 12\), got 12"):
        ops.kv_write(k, k, torch.tensor([0, 12]), pool, 1)
    with pytest.raises(ValueError, match="layer 2 is not one of the pool's 2"):
        ops.kv_write(k, k, torch.tensor([0, 1]), pool, 2)
    assert not pool.any()
