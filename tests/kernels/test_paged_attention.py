"""The C decode-attention kernel against the runner's torch path (gather the row's blocks, mask, SDPA) on the
same pool: grouped and ungrouped query heads, head sizes with a tail, sliding windows, rows of different
lengths in shuffled blocks, and q as the strided view the runner passes."""

from __future__ import annotations

import pytest
import torch

from hotlora.kernels import native
from hotlora.kernels import paged_attention as native_decode
from hotlora.server.engine.runner.attention import AttentionMetadata, decode_mask, paged_attention

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None, reason=f"{native.unavailable_reason()}"
)


def _torch_path(q, k_pool, v_pool, tables, lens, scale, window):
    meta = AttentionMetadata(
        num_decode=q.shape[0],
        decode_tables=tables,
        decode_lens=lens,
        prefills=(),
        slot_mapping=torch.zeros(q.shape[0], dtype=torch.int64),
        decode_mask=decode_mask(lens, tables.shape[1] * k_pool.shape[1], None),
    )
    # bf16 inputs take the torch path; here the same path is forced by running it in float64
    out = paged_attention(q.double(), None, None, k_pool.double(), v_pool.double(), meta, scale, window)
    return out.view(q.shape).float()


@pytest.mark.parametrize(
    "heads, kv_heads, d",
    [(9, 3, 64), (4, 4, 32), (8, 1, 24), (6, 2, 80), (8, 2, 128)],
    ids=["gqa3", "mha", "mqa-tail", "d80", "d128"],
)
@pytest.mark.parametrize("window", [None, 5])
def test_decode_kernel_equals_sdpa_on_the_gathered_blocks(heads, kv_heads, d, window):
    g = torch.Generator().manual_seed(heads * 100 + d)
    blocks, bs, width = 40, 4, 9
    k_pool = torch.randn(blocks, bs, kv_heads, d, generator=g)
    v_pool = torch.randn(blocks, bs, kv_heads, d, generator=g)
    tables = torch.stack([torch.randperm(blocks - 1, generator=g)[:width] + 1 for _ in range(5)])
    lens = torch.tensor([1, 4, 5, 17, width * bs])  # one key, a full block, one past it, ..., the whole table
    qkv = torch.randn(5, heads + 2 * kv_heads, d, generator=g)
    q = qkv[:, :heads]  # a view with the row stride of the fused projection, as the runner passes it
    assert native_decode.usable(q, k_pool)
    out = torch.empty(5, heads, d)
    native.ops().paged_decode_attention(q, k_pool, v_pool, tables, lens, d**-0.5, window or 0, out)
    torch.testing.assert_close(out, _torch_path(q, k_pool, v_pool, tables, lens, d**-0.5, window))


@pytest.mark.parametrize(
    "heads, kv_heads, d", [(9, 3, 64), (6, 2, 80), (8, 2, 128)], ids=["d64", "d80", "d128"]
)
@pytest.mark.parametrize("lens", [[1000], [300, 37], [70, 700, 5]], ids=["one", "two", "three"])
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("threads", [2, 4])
def test_long_rows_split_across_threads_merge_to_the_same_attention(
    heads, kv_heads, d, lens, window, threads
):
    """With fewer rows than ~2 per thread the kernel cuts each row's keys into spans and merges their
    softmaxes (a shorter row's later spans are empty): the same attention as one softmax over all keys."""
    g = torch.Generator().manual_seed(len(lens) * 1000 + d)
    blocks, bs = 200, 16
    width = max(lens) // bs + 1
    k_pool = torch.randn(blocks, bs, kv_heads, d, generator=g)
    v_pool = torch.randn(blocks, bs, kv_heads, d, generator=g)
    tables = torch.stack([torch.randperm(blocks - 1, generator=g)[:width] + 1 for _ in lens])
    q = torch.randn(len(lens), heads, d, generator=g) * 3  # peaked softmaxes: the spans' maxima differ
    out = torch.empty(len(lens), heads, d)
    lens_t = torch.tensor(lens)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native.ops().paged_decode_attention(q, k_pool, v_pool, tables, lens_t, d**-0.5, window or 0, out)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, _torch_path(q, k_pool, v_pool, tables, lens_t, d**-0.5, window))


@pytest.mark.parametrize("threads", [1, 4])
def test_a_row_of_no_keys_gets_zeros_and_leaves_the_others_alone(threads):
    g = torch.Generator().manual_seed(7)
    k_pool, v_pool = torch.randn(2, 40, 16, 3, 64, generator=g)
    tables = torch.stack([torch.randperm(39, generator=g)[:20] + 1 for _ in range(2)])
    lens = torch.tensor([0, 300])
    q = torch.randn(2, 9, 64, generator=g)
    out = torch.full((2, 9, 64), float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native.ops().paged_decode_attention(q, k_pool, v_pool, tables, lens, 0.125, 0, out)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], torch.zeros(9, 64))
    want = _torch_path(q[1:], k_pool, v_pool, tables[1:], lens[1:], 0.125, None)
    torch.testing.assert_close(out[1:], want)


def test_the_torch_path_serves_what_the_kernel_does_not_take():
    q = torch.randn(2, 4, 16)
    pool = torch.randn(8, 4, 2, 16)
    assert not native_decode.usable(q.to(torch.bfloat16), pool.to(torch.bfloat16))
    assert not native_decode.usable(q.transpose(1, 2).contiguous().transpose(1, 2), pool)  # d not contiguous


def test_a_failed_build_leaves_decode_on_the_torch_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(native, "compiler", lambda: "false")  # a compiler that always fails
    for fn in (native.ops, native.available):
        fn.cache_clear()
    try:
        assert not native_decode.usable(torch.randn(1, 4, 16), torch.randn(8, 4, 2, 16))
        assert "torch ops serve instead" in caplog.text
    finally:
        for fn in (native.ops, native.available):
            fn.cache_clear()


def test_the_binding_refuses_a_table_past_the_pool_and_writes_nothing():
    k_pool = v_pool = torch.zeros(8, 4, 2, 16)
    q = torch.randn(2, 4, 16)
    out = torch.full((2, 4, 16), 7.0)
    with pytest.raises(ValueError, match=r"tables must lie in \[0, 8\), got 8"):
        native.ops().paged_decode_attention(
            q, k_pool, v_pool, torch.tensor([[1, 8], [2, 3]]), torch.tensor([5, 5]), 0.25, 0, out
        )
    with pytest.raises(ValueError, match=r"lens must lie in \[0, 9\), got 9"):
        native.ops().paged_decode_attention(
            q, k_pool, v_pool, torch.tensor([[1, 2], [2, 3]]), torch.tensor([5, 9]), 0.25, 0, out
        )
    assert (out == 7.0).all()
