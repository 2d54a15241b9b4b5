"""The C prefill-attention kernel against the runner's SDPA path (run in float64, which the kernel does not
take) on the same inputs: grouped and ungrouped heads, head sizes 64 and 128, chunk lengths that fill no
whole task or key block, a chunk after cached context (a prefix-cache hit), sliding windows, q/k/v as the
strided views of the fused projection the runner passes; and through `paged_attention` with decode rows and
two chunks in one step."""

from __future__ import annotations

import pytest
import torch

from hotlora.kernels import native
from hotlora.kernels import prefill_attention as native_prefill
from hotlora.server.engine.runner.attention import AttentionMetadata, PrefillSpan, _prefill, paged_attention

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None, reason=f"{native.unavailable_reason()}"
)


def _views(length, context, heads, kv_heads, d, seed):
    """q [L, heads, d], k, v [context + L, kv_heads, d]: views of one fused qkv, as the runner passes."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(context + length, (heads + 2 * kv_heads) * d, generator=g) * 2
    q = qkv[context:, : heads * d].view(length, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(-1, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].view(-1, kv_heads, d)
    return q, k, v


@pytest.mark.parametrize(
    "heads, kv_heads, d",
    [(9, 3, 64), (4, 4, 64), (8, 1, 64), (8, 2, 128)],
    ids=["gqa3", "mha", "mqa", "d128"],
)
@pytest.mark.parametrize(
    "length, context", [(512, 0), (37, 0), (1, 0), (65, 0), (100, 300), (5, 64)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("window", [None, 50])
def test_prefill_kernel_equals_sdpa(heads, kv_heads, d, length, context, window):
    q, k, v = _views(length, context, heads, kv_heads, d, seed=heads * 1000 + length + context)
    with torch.no_grad():
        assert native_prefill.usable(q, k, v)
        got = native.ops().prefill_attention(q, k, v, context, d**-0.5, window or 0)
        want = _prefill(q.double(), k.double(), v.double(), context, d**-0.5, window).float()
    # fp32 sums of up to 512 terms: torch's fp32 SDPA is itself ~1e-5 off the float64 answer here
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def _bf16_reference(q, k, v, context, scale, window):
    """The float64 path on q, k, v rounded to bf16 (the kernel's operands), the probabilities unrounded."""
    q, k, v = (t.bfloat16().double() for t in (q, k, v))
    return _prefill(q, k, v, context, scale, window).float()


@pytest.mark.skipif(not native_prefill.bf16_available(), reason="no avx512_bf16 here")
@pytest.mark.parametrize(
    "heads, kv_heads, d", [(9, 3, 64), (8, 1, 64), (8, 2, 128)], ids=["gqa3", "mqa", "d128"]
)
@pytest.mark.parametrize("length, context", [(512, 0), (37, 0), (65, 0), (100, 300)], ids=lambda v: str(v))
@pytest.mark.parametrize("window", [None, 50])
def test_prefill_kernel_in_bf16_equals_the_float64_path_on_bf16_operands(
    heads, kv_heads, d, length, context, window
):
    q, k, v = _views(length, context, heads, kv_heads, d, seed=heads * 1000 + length + context)
    with torch.no_grad():
        got = native.ops().prefill_attention(q, k, v, context, d**-0.5, window or 0, bf16=True)
        fp32 = native.ops().prefill_attention(q, k, v, context, d**-0.5, window or 0)
    want = _bf16_reference(q, k, v, context, d**-0.5, window)
    # what is left is the probabilities' rounding to bf16 (8 bits) before they weigh the values (|v| ~ 2)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert (got - want).abs().mean() < 1e-3
    assert not torch.equal(got, fp32)  # bf16 arithmetic did run
    # against fp32 the difference is mostly q's and k's rounding (scores of a sharp softmax, |s| up to ~15)
    assert (got - fp32).abs().mean() < 1e-2


@pytest.mark.skipif(native_prefill.bf16_available(), reason="this CPU has avx512_bf16")
def test_bf16_attention_is_refused_without_avx512_bf16():
    q, k, v = _views(20, 0, 4, 2, 64, seed=5)
    with torch.no_grad(), pytest.raises(ValueError, match="avx512_bf16"):
        native.ops().prefill_attention(q, k, v, 0, 0.125, 0, bf16=True)


def test_the_runner_asks_for_bf16_attention_only_where_the_cpu_has_it(monkeypatch):
    q, k, v = _views(300, 0, 4, 2, 64, seed=5)
    monkeypatch.setattr(native_prefill, "bf16_available", lambda: False)
    with torch.no_grad():
        got = _prefill(q, k, v, 0, 0.125, None, long_in_bf16=True)
        assert torch.equal(got, native.ops().prefill_attention(q, k, v, 0, 0.125, 0))


def test_a_window_of_one_sees_only_its_own_key():
    q, k, v = _views(70, 10, 4, 2, 64, seed=3)
    with torch.no_grad():
        got = native.ops().prefill_attention(q, k, v, 10, 0.125, 1)
    torch.testing.assert_close(got, v[10:].repeat_interleave(2, dim=1))


def test_the_kernel_is_not_taken_where_it_does_not_apply():
    q, k, v = _views(20, 0, 4, 2, 64, seed=4)
    with torch.no_grad():
        assert native_prefill.usable(q, k, v)
        assert not native_prefill.usable(*_views(20, 0, 4, 2, 80, seed=4))  # head size not a multiple of 64
        assert not native_prefill.usable(q.double(), k.double(), v.double())
    assert not native_prefill.usable(q, k, v)  # autograd on: training takes SDPA
    with pytest.raises(ValueError, match="keys for"):
        native.ops().prefill_attention(q, k[:10], v[:10], 0, 0.125, 0)


def test_a_step_of_decode_rows_and_two_chunks_equals_the_float64_path():
    heads, kv_heads, d, bs = 9, 3, 64, 16
    g = torch.Generator().manual_seed(7)
    blocks = 64
    k_pool = torch.randn(blocks, bs, kv_heads, d, generator=g)
    v_pool = torch.randn(blocks, bs, kv_heads, d, generator=g)
    # a step: 2 decode rows, a fresh 40-token chunk, a 30-token chunk after 50 cached tokens
    spans_len, context = (40, 30), (0, 50)
    total = 2 + sum(spans_len)
    qkv = torch.randn(total, (heads + 2 * kv_heads) * d, generator=g)
    q = qkv[:, : heads * d].view(total, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(total, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].view(total, kv_heads, d)
    tables = [torch.randperm(blocks - 1, generator=g)[:6] + 1 for _ in range(4)]
    # the second chunk's own K/V sit in its blocks after its context, as the pool write leaves them
    second = torch.arange(50, 80)
    slots = tables[3][second // bs] * bs + second % bs
    k_pool.view(-1, kv_heads, d)[slots] = k[42:]
    v_pool.view(-1, kv_heads, d)[slots] = v[42:]
    meta = AttentionMetadata(
        num_decode=2,
        decode_tables=torch.stack(tables[:2]),
        decode_lens=torch.tensor([5, 90]),
        prefills=(
            PrefillSpan(start=2, length=spans_len[0], context=context[0], block_table=tables[2]),
            PrefillSpan(start=42, length=spans_len[1], context=context[1], block_table=tables[3]),
        ),
        slot_mapping=torch.zeros(total, dtype=torch.int64),
    )
    with torch.no_grad():
        got = paged_attention(q, k, v, k_pool, v_pool, meta, d**-0.5, None)
        want = paged_attention(
            q.double(), k.double(), v.double(), k_pool.double(), v_pool.double(), meta, d**-0.5, None
        )
    torch.testing.assert_close(got, want.float(), atol=5e-5, rtol=1e-4)
