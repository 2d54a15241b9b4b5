"""The Triton paged-attention kernels against the torch reference (gather, mask, SDPA in float64), under
TRITON_INTERPRET=1 on machines without a GPU: the C kernels' cases (grouped, ungrouped and single kv
heads, head sizes with a tail, 64 and 128, context lengths that fill no block, sliding windows, q as the
strided view of the fused projection), decode rows whose keys are cut into splits, every prefill chunk of
a step in one launch after its cached context, fp16/bf16 with fp32 sums, and a null block poisoned with NaN
that no kernel may read. Shapes stay tiny: the interpreter runs every program in numpy."""

from __future__ import annotations

import pytest
import torch

from hotlora.kernels import attention_reference as reference
from hotlora.server.engine.runner.attention import (
    AttentionMetadata,
    AttentionPath,
    PrefillSpan,
    paged_attention,
)

pytest.importorskip("triton")
from hotlora.kernels import triton_attention  # noqa: E402 -- after the skip: triton is optional

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS = [(9, 3, 64), (4, 4, 32), (8, 1, 24), (6, 2, 80), (8, 2, 128)]
HEAD_IDS = ["gqa3", "mha", "mqa-tail", "d80", "d128"]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def _pools(blocks, bs, kv_heads, d, g, dtype=torch.float32):
    k_pool = torch.randn(blocks, bs, kv_heads, d, generator=g).to(DEVICE, dtype)
    v_pool = torch.randn(blocks, bs, kv_heads, d, generator=g).to(DEVICE, dtype)
    return k_pool, v_pool


def _tables(rows, blocks, width, g):
    """Each row's blocks drawn from 1 .. blocks-1 (block 0 is the null block, never handed out)."""
    return torch.stack([torch.randperm(blocks - 1, generator=g)[:width] + 1 for _ in range(rows)]).to(DEVICE)


def _decode_reference(q, k_pool, v_pool, tables, lens, scale, window):
    return reference.paged_decode(q.double(), k_pool.double(), v_pool.double(), tables, lens, scale, window)


def _decode(q, k_pool, v_pool, tables, lens, scale, window, splits=None):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)  # every element must be written
    triton_attention.paged_decode(q, k_pool, v_pool, tables, lens, scale, window, out, splits)
    return out


@pytest.mark.parametrize("heads, kv_heads, d", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("window", [None, 5])
def test_decode_equals_the_reference(heads, kv_heads, d, window):
    g = torch.Generator().manual_seed(heads * 100 + d)
    blocks, bs, width = 40, 4, 9
    k_pool, v_pool = _pools(blocks, bs, kv_heads, d, g)
    tables = _tables(5, blocks, width, g)
    lens = torch.tensor([1, 4, 5, 17, width * bs], device=DEVICE)  # one key, a full block, one past, ...
    qkv = torch.randn(5, heads + 2 * kv_heads, d, generator=g).to(DEVICE)
    q = qkv[:, :heads]  # the strided view of the fused projection the runner passes
    got = _decode(q, k_pool, v_pool, tables, lens, d**-0.5, window)
    want = _decode_reference(q, k_pool, v_pool, tables, lens, d**-0.5, window)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_in_16_bits_sums_in_fp32(dtype):
    g = torch.Generator().manual_seed(3)
    k_pool, v_pool = _pools(30, 16, 2, 64, g, dtype)
    tables = _tables(3, 30, 6, g)
    lens = torch.tensor([90, 7, 33], device=DEVICE)
    q = torch.randn(3, 8, 64, generator=g).to(DEVICE, dtype)
    got = _decode(q, k_pool, v_pool, tables, lens, 0.125, None)
    assert got.dtype == dtype
    # the reference in float64 on the same 16-bit numbers: what is left is the rounding of the
    # probabilities and of the output to 16 bits, not a 16-bit sum over 90 keys
    assert rel_err(got, _decode_reference(q, k_pool, v_pool, tables, lens, 0.125, None)) < 1e-2


@pytest.mark.parametrize("window", [None, 100])
def test_keys_cut_into_splits_merge_to_the_same_attention(window):
    """Few rows with long contexts: each row's keys in pieces whose softmaxes a second kernel merges (a
    shorter row's later pieces hold no key); the same attention as one softmax over all keys."""
    g = torch.Generator().manual_seed(11)
    blocks, bs = 48, 16
    lens = torch.tensor([300, 37, 1], device=DEVICE)
    k_pool, v_pool = _pools(blocks, bs, 2, 64, g)
    tables = _tables(3, blocks, 300 // bs + 1, g)
    q = torch.randn(3, 6, 64, generator=g).to(DEVICE) * 3  # peaked softmaxes: the pieces' maxima differ
    want = _decode_reference(q, k_pool, v_pool, tables, lens, 0.125, window)
    for splits in (1, 4):
        got = _decode(q, k_pool, v_pool, tables, lens, 0.125, window, splits)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def test_split_count_fills_the_multiprocessors(monkeypatch):
    monkeypatch.setattr(triton_attention, "_multiprocessors", lambda device: 132)  # an H100
    cuda = torch.device("cuda")
    # one row of 8 kv heads with 4096 keys: 264 programs wanted, 16 pieces of 256 keys at most
    assert triton_attention.decode_splits(8, 4096, cuda) == 16
    assert triton_attention.decode_splits(8, 1024, cuda) == 4  # at least 256 keys a piece
    assert triton_attention.decode_splits(64 * 8, 4096, cuda) == 1  # 512 programs fill it already


def test_a_row_of_no_keys_gets_zeros_and_leaves_the_others_alone():
    g = torch.Generator().manual_seed(7)
    k_pool, v_pool = _pools(20, 16, 3, 64, g)
    tables = _tables(2, 20, 10, g)
    lens = torch.tensor([0, 150], device=DEVICE)
    q = torch.randn(2, 9, 64, generator=g).to(DEVICE)
    for splits in (1, 2):
        got = _decode(q, k_pool, v_pool, tables, lens, 0.125, None, splits)
        assert torch.equal(got[0].cpu(), torch.zeros(9, 64))
        want = _decode_reference(q[1:], k_pool, v_pool, tables[1:], lens[1:], 0.125, None)
        torch.testing.assert_close(got[1:].double(), want, atol=2e-5, rtol=1e-4)


# ---- prefill: every chunk of a step in one launch ----------------------------------------------------------
# (length, context): a chunk that fills no block, one token, one past a tile, chunks after cached context
CHUNKS = [(37, 0), (1, 0), (17, 0), (20, 30), (5, 64)]


def _step(chunks, heads, kv_heads, d, g, dtype=torch.float32, bs=16, decode_rows=0):
    """A step's flat q, the pools holding each chunk's context and own K/V, tables and the [P, 3] layout."""
    blocks = 1 + sum(-(-(c + n) // bs) for n, c in chunks)
    k_pool, v_pool = _pools(blocks, bs, kv_heads, d, g, dtype)
    width = max(-(-(c + n) // bs) for n, c in chunks)
    order = (torch.randperm(blocks - 1, generator=g) + 1).tolist()  # shuffled blocks, 0 never used
    tables = torch.zeros(len(chunks), width, dtype=torch.int64)  # padded with the null block
    layout, start = [], decode_rows
    for i, (n, c) in enumerate(chunks):
        need = -(-(c + n) // bs)
        tables[i, :need] = torch.tensor(order[:need])
        order = order[need:]
        layout.append((start, n, c))
        start += n
    total = start
    qkv = torch.randn(total, heads + 2 * kv_heads, d, generator=g).to(DEVICE, dtype)
    return qkv[:, :heads], k_pool, v_pool, tables.to(DEVICE), torch.tensor(layout, device=DEVICE)


def _prefill_reference(q, k_pool, v_pool, tables, chunks, scale, window):
    want = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    reference.varlen_prefill(
        q.double(), k_pool.double(), v_pool.double(), tables, chunks, scale, window, want
    )
    return want


def _prefill(q, k_pool, v_pool, tables, chunks, scale, window):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    longest = int(chunks[:, 1].max())
    triton_attention.varlen_prefill(q, k_pool, v_pool, tables, chunks, longest, scale, window, out)
    return out


@pytest.mark.parametrize(
    "heads, kv_heads, d",
    [(9, 3, 64), (4, 4, 64), (8, 1, 64), (8, 2, 128)],
    ids=["gqa3", "mha", "mqa", "d128"],
)
@pytest.mark.parametrize("window", [None, 7])
def test_every_chunk_of_a_step_in_one_launch_equals_the_reference(heads, kv_heads, d, window):
    g = torch.Generator().manual_seed(heads * 10 + d)
    q, k_pool, v_pool, tables, chunks = _step(CHUNKS, heads, kv_heads, d, g)
    got = _prefill(q, k_pool, v_pool, tables, chunks, d**-0.5, window)
    want = _prefill_reference(q, k_pool, v_pool, tables, chunks, d**-0.5, window)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_prefill_in_16_bits_sums_in_fp32(dtype):
    g = torch.Generator().manual_seed(5)
    q, k_pool, v_pool, tables, chunks = _step([(40, 0), (9, 25)], 8, 2, 64, g, dtype)
    got = _prefill(q, k_pool, v_pool, tables, chunks, 0.125, None)
    assert rel_err(got, _prefill_reference(q, k_pool, v_pool, tables, chunks, 0.125, None)) < 1e-2


def test_prefill_writes_only_its_chunks_rows():
    g = torch.Generator().manual_seed(6)
    q, k_pool, v_pool, tables, chunks = _step([(9, 0), (4, 20)], 4, 2, 32, g, decode_rows=3)
    out = torch.full(q.shape, 7.0, device=DEVICE)
    triton_attention.varlen_prefill(q, k_pool, v_pool, tables, chunks, 9, 0.2, None, out)
    assert torch.equal(out[:3].cpu(), torch.full((3, 4, 32), 7.0))  # the decode rows' outputs stay
    assert torch.isfinite(out).all()


def test_a_window_of_one_sees_only_its_own_key():
    g = torch.Generator().manual_seed(8)
    q, k_pool, v_pool, tables, chunks = _step([(20, 10)], 4, 2, 64, g)
    got = _prefill(q, k_pool, v_pool, tables, chunks, 0.125, 1)
    own = reference.gather(v_pool, tables[0], 30)[10:]  # [20, kv_heads, d]
    torch.testing.assert_close(got, own.repeat_interleave(2, dim=1))


# ---- the null block --------------------------------------------------------------------------------------
def test_no_kernel_reads_the_null_block():
    """Tables are padded with block 0 past each row's length; with block 0 full of NaN the reference's
    gather is poisoned (shown below), and the kernels, which read only within the lengths, are not."""
    g = torch.Generator().manual_seed(9)
    blocks, bs = 24, 8
    k_pool, v_pool = _pools(blocks, bs, 2, 64, g)
    lens = torch.tensor([3, 8, 13], device=DEVICE)  # none fills its last block; the rest is padding
    tables = torch.zeros(3, 4, dtype=torch.int64)
    tables[0, 0], tables[1, 0], tables[2, :2] = 5, 9, torch.tensor([12, 3])
    tables = tables.to(DEVICE)
    q = torch.randn(3, 8, 64, generator=g).to(DEVICE)
    want = _decode_reference(q, k_pool, v_pool, tables, lens, 0.125, None)  # block 0 still finite
    poisoned_k, poisoned_v = k_pool.clone(), v_pool.clone()
    poisoned_k[0], poisoned_v[0] = float("nan"), float("nan")
    poisoned = _decode_reference(q, poisoned_k, poisoned_v, tables, lens, 0.125, None)
    assert torch.isnan(poisoned).any(), "the poison must reach a path that reads the null block"
    for splits in (1, 2):
        got = _decode(q, poisoned_k, poisoned_v, tables, lens, 0.125, None, splits)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)

    q, k_pool, v_pool, ptables, chunks = _step([(5, 0), (3, 9)], 8, 2, 64, g, bs=bs)
    ptables = torch.cat([ptables, torch.zeros_like(ptables)], dim=1)  # wider than any chunk needs
    want = _prefill_reference(q, k_pool, v_pool, ptables, chunks, 0.125, None)
    k_pool[0], v_pool[0] = float("nan"), float("nan")
    got = _prefill(q, k_pool, v_pool, ptables, chunks, 0.125, None)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


# ---- the runner's attention on the Triton path ---------------------------------------------------------
def test_a_step_of_decode_rows_and_two_chunks_through_the_runners_attention():
    """paged_attention on the Triton path (as the runner calls it on CUDA) equals the float64 torch path,
    with the chunks' layout built from the spans themselves (metadata made by hand, as here)."""
    heads, kv_heads, d, bs = 9, 3, 64, 16
    g = torch.Generator().manual_seed(7)
    blocks = 32
    k_pool, v_pool = _pools(blocks, bs, kv_heads, d, g)
    total = 2 + 20 + 12
    qkv = torch.randn(total, heads + 2 * kv_heads, d, generator=g).to(DEVICE)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    tables = [torch.randperm(blocks - 1, generator=g)[:5].to(DEVICE) + 1 for _ in range(4)]
    second = torch.arange(30, 42, device=DEVICE)  # the second chunk's own K/V sit after its context
    slots = tables[3][second // bs] * bs + second % bs
    k_pool.view(-1, kv_heads, d)[slots] = k[22:]
    v_pool.view(-1, kv_heads, d)[slots] = v[22:]
    first = torch.arange(20, device=DEVICE)
    slots = tables[2][first // bs] * bs + first % bs
    k_pool.view(-1, kv_heads, d)[slots] = k[2:22]
    v_pool.view(-1, kv_heads, d)[slots] = v[2:22]
    meta = AttentionMetadata(
        num_decode=2,
        decode_tables=torch.stack(tables[:2]),
        decode_lens=torch.tensor([5, 70], device=DEVICE),
        prefills=(
            PrefillSpan(start=2, length=20, context=0, block_table=tables[2]),
            PrefillSpan(start=22, length=12, context=30, block_table=tables[3]),
        ),
        slot_mapping=torch.zeros(total, dtype=torch.int64, device=DEVICE),
    )
    got = paged_attention(q, k, v, k_pool, v_pool, meta, d**-0.5, None, path=AttentionPath.TRITON)
    want = paged_attention(
        q.double(), k.double(), v.double(), k_pool.double(), v_pool.double(), meta, d**-0.5, None
    )
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


# ---- the launchers' checks ---------------------------------------------------------------------------------
def test_the_launchers_refuse_what_they_cannot_run():
    q = torch.randn(2, 4, 16, device=DEVICE)
    pool = torch.randn(8, 4, 2, 16, device=DEVICE)
    tables = torch.ones(2, 3, dtype=torch.int64, device=DEVICE)
    lens = torch.tensor([3, 5], device=DEVICE)
    out = torch.empty_like(q)
    run = triton_attention.paged_decode
    with pytest.raises(ValueError, match="share one of"):
        run(q, pool.half(), pool.half(), tables, lens, 0.25, None, out)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        three = pool[:, :, :1].expand(8, 4, 3, 16)
        run(q, three, three, tables, lens, 0.25, None, out)
    with pytest.raises(ValueError, match="power of two"):
        run(q, pool[:, :3], pool[:, :3], tables, lens, 0.25, None, out)
    with pytest.raises(ValueError, match="tables must be"):
        run(q, pool, pool, tables[:1], lens, 0.25, None, out)
    with pytest.raises(ValueError, match="lens must be"):
        run(q, pool, pool, tables, lens.float(), 0.25, None, out)
    with pytest.raises(ValueError, match="unit stride"):
        run(q.transpose(1, 2).contiguous().transpose(1, 2), pool, pool, tables, lens, 0.25, None, out)
    with pytest.raises(ValueError, match="splits"):
        run(q, pool, pool, tables, lens, 0.25, None, out, splits=3)
    with pytest.raises(ValueError, match="chunks must be"):
        triton_attention.varlen_prefill(q, pool, pool, tables, lens, 2, 0.25, None, out)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="but q is on"):
            run(q, pool, pool, tables.to("meta"), lens, 0.25, None, out)
