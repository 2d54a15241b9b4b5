"""hotlora's C kernels as torch custom ops (`torch.ops.hotlora.*`), which a compiled decode step calls
(runner.decode_graphs): torch's own `opcheck` (schema, declared mutations, fake implementation against the
real one), and each op's result equals the function it wraps."""

from __future__ import annotations

import pytest
import torch

from hotlora.kernels import bf16_weights, block_weights, decoder_ops, lora_decode, native
from hotlora.kernels import paged_attention as native_decode

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None, reason=f"{native.unavailable_reason()}"
)
# autograd registration is not checked: the ops serve inference only (the runner never calls them under grad)
CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rms_norm_op():
    x, w = torch.randn(5, 64, generator=_gen()), torch.randn(64, generator=_gen(1))
    torch.library.opcheck(decoder_ops._rms_norm_op, (x, w, 1e-5), test_utils=CHECKS)
    assert torch.equal(torch.ops.hotlora.rms_norm(x, w, 1e-5), decoder_ops.rms_norm(x, w, 1e-5))


def test_silu_mul_op():
    gate_up = torch.randn(5, 2 * 96, generator=_gen())
    torch.library.opcheck(decoder_ops._silu_mul_op, (gate_up,), test_utils=CHECKS)
    assert torch.equal(torch.ops.hotlora.silu_mul(gate_up), decoder_ops.silu_mul(gate_up))


def test_rope_op_rotates_in_place():
    heads, d = 3, 16
    qkv = torch.randn(4, 5 * d, generator=_gen())
    cos, sin = torch.randn(32, d, generator=_gen(1)), torch.randn(32, d, generator=_gen(2))
    pos = torch.tensor([0, 7, 3, 31])
    torch.library.opcheck(decoder_ops._rope_op, (qkv.clone(), heads, d, cos, sin, pos), test_utils=CHECKS)
    got, want = qkv.clone(), qkv.clone()
    torch.ops.hotlora.rope_(got, heads, d, cos, sin, pos)
    decoder_ops.rope_(want, heads, d, cos, sin, pos)
    assert torch.equal(got, want) and not torch.equal(got, qkv)


def test_kv_write_op_writes_the_layer_of_the_pool():
    kv_heads, d = 2, 8
    qkv = torch.randn(3, 4 * kv_heads * d, generator=_gen())
    k = qkv[:, 2 * kv_heads * d : 3 * kv_heads * d].view(3, kv_heads, d)
    v = qkv[:, 3 * kv_heads * d :].view(3, kv_heads, d)
    pool = torch.zeros(2, 2, 4, 4, kv_heads, d)
    slots = torch.tensor([5, 0, 14])
    torch.library.opcheck(decoder_ops._kv_write_op, (k, v, slots, pool.clone(), 1), test_utils=CHECKS)
    torch.ops.hotlora.kv_write(k, v, slots, pool, 1)
    assert torch.equal(pool[1, 0].view(-1, kv_heads, d)[slots], k)
    assert torch.equal(pool[1, 1].view(-1, kv_heads, d)[slots], v)
    assert not pool[0].any()


def test_paged_decode_attention_op():
    heads, kv_heads, d, bs = 4, 2, 16, 4
    q = torch.randn(2, heads, d, generator=_gen())
    k_pool, v_pool = (torch.randn(6, bs, kv_heads, d, generator=_gen(i)) for i in (1, 2))
    tables, lens = torch.tensor([[1, 3], [5, 2]]), torch.tensor([6, 3])
    args = (q, k_pool, v_pool, tables, lens, 0.25, 0)
    torch.library.opcheck(native_decode._decode_op, args, test_utils=CHECKS)
    want = torch.empty_like(q)
    native_decode.decode(q, k_pool, v_pool, tables, lens, 0.25, None, want)
    assert torch.equal(torch.ops.hotlora.paged_decode_attention(*args), want)


def test_lora_packed_op_adds_in_place():
    outs, r, h_in, slots_n = (24, 8), 4, 32, 3
    g = _gen()
    a = torch.randn(slots_n, 2 * r, h_in, generator=g)
    bs = [torch.randn(slots_n, o, r, generator=g) for o in outs]
    x, y = torch.randn(5, h_in, generator=g), torch.randn(5, sum(outs), generator=g)
    slots, ranks = torch.tensor([2, -1, 0, 0, 1]), torch.tensor([4, 2, 3])
    scales = torch.rand(2, slots_n, generator=g)
    args = (y.clone(), x, slots, a, bs, ranks, scales, [0, outs[0]])
    torch.library.opcheck(lora_decode._packed_op, args, test_utils=CHECKS)
    got, want = y.clone(), y.clone()
    torch.ops.hotlora.lora_packed(got, *args[1:])
    lora_decode.packed(want, x, slots, a, tuple(bs), ranks, scales, (0, outs[0]))
    assert torch.equal(got, want) and not torch.equal(got, y)


def test_block_weight_linear_op():
    from tests.kernels.test_block_weights import gguf_values

    packed = block_weights.pack(gguf_values(torch.randn(40, 64, generator=_gen(1)) * 0.1, "Q4_1"))
    x = torch.randn(3, 64, generator=_gen())
    bias = torch.randn(40, generator=_gen(2))
    torch.library.opcheck(block_weights._linear_op, (x, packed, bias), test_utils=CHECKS)
    got = torch.ops.hotlora.linear_blocks(x, packed, bias)
    assert torch.equal(got, block_weights.linear(x, packed, bias))


def test_bf16_weight_linear_op():
    x = torch.randn(3, 64, generator=_gen())
    w = torch.randn(40, 64, generator=_gen(1)).to(torch.bfloat16)
    bias = torch.randn(40, generator=_gen(2))
    torch.library.opcheck(bf16_weights._linear_op, (x, w, bias), test_utils=CHECKS)
    assert torch.equal(torch.ops.hotlora.linear_bf16w(x, w, bias), bf16_weights.linear(x, w, bias))
