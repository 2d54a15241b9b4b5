"""The rows a LoRA update reads next, asked for by the base product before it (csrc/rows_ahead.h, from a
site's LoraBanks and the step's StepSlots): the list names exactly the rows the packed update reads (a NaN
anywhere else leaves its output finite, a NaN in any named row shows), its tiles walk every line of it in the
update's order, a tile asks for no more than its share of the GEMM's inner steps can carry, and a prefetch
changes no number of the weight kernels that carry it."""

from __future__ import annotations

import pytest
import torch

from hotlora.kernels import bf16_weights, block_weights, native

from .test_block_weights import _matrix

pytestmark = pytest.mark.skipif(not native.available(), reason="hotlora's C kernels cannot run here")

S, R, K = 6, 16, 80  # slots, rank rows a slice, in-features (80: a row of 320 B ends inside a cache line)
OUTS = (48, 24, 24)  # q, k, v: rank-major B rows of 192 and 96 B
RANKS = torch.tensor([4, 16, 0, 3, 8, 1])
TOKEN_SLOTS = torch.tensor([4, -1, 1, 4, 2, 3, 0, 1])  # slot 2 has rank 0; slot 5 no token; a base row


OFFSETS = (0, 48, 72)


def _banks(dtype=torch.float32):
    a = torch.zeros(S, len(OUTS) * R, K, dtype=dtype)
    bs = tuple(torch.zeros(S, R, o, dtype=dtype).transpose(1, 2) for o in OUTS)  # the CPU banks' layout
    return a, bs


def SiteBanks(a, bs, scales=None):  # noqa: N802 -- a site's banks as the kernels take them
    scales = torch.full((len(OUTS), S), 0.5) if scales is None else scales
    return native.ops().LoraBanks(a, list(bs), scales, list(OFFSETS))


def StepSlots(token_slots, ranks):  # noqa: N802
    return native.ops().StepSlots(token_slots, ranks)


def _named_rows(a, bs, slots: list[int]):
    """(tensor, slot, first row, rows) of every region the list names, in its order."""
    out = []
    for s in slots:
        r = int(RANKS[s])
        out += [(a, s, i * R, r) for i in range(len(OUTS))]
        out += [(b.transpose(1, 2), s, 0, r) for b in bs]  # storage [S, R, out]: rank rows
    return out


def _lines(tensor, s, first, rows) -> list[int]:
    row_bytes = tensor.shape[2] * tensor.element_size()
    start = tensor.data_ptr() + (s * tensor.stride(0) + first * tensor.stride(1)) * tensor.element_size()
    return list(range(start & ~63, start + rows * row_bytes, 64))


def _walk(banks, slots, tiles, steps) -> list[int]:
    lines, n = native.ops().ahead_lines(banks, slots, tiles, steps, 1 << 16)
    assert n == len(lines)
    return lines.tolist()


def test_the_slots_listed_are_those_the_update_reads_in_its_order():
    slots = StepSlots(TOKEN_SLOTS, RANKS)
    assert slots.count == 4  # 0, 1, 3, 4: not rank-0 slot 2, not slot 5 without tokens, not the base row
    assert slots.slots == [0, 1, 3, 4] and slots.ranks == [4, 16, 3, 8]
    assert StepSlots(torch.tensor([-1, -1]), RANKS).count == 0


@pytest.mark.parametrize("tiles", [1, 3, 7, 40])
def test_the_tiles_walk_every_line_of_the_named_rows_in_order(tiles):
    a, bs = _banks()
    banks, slots = SiteBanks(a, bs), StepSlots(TOKEN_SLOTS, RANKS)
    want = [line for region in _named_rows(a, bs, [0, 1, 3, 4]) for line in _lines(*region)]
    got = _walk(banks, slots, tiles, steps=10_000)
    dedup = [line for i, line in enumerate(got) if i == 0 or line != got[i - 1]]  # a line two tiles share
    assert dedup == [line for i, line in enumerate(want) if i == 0 or line != want[i - 1]]
    assert len(got) <= len(want) + tiles


def test_a_tile_asks_for_at_most_four_lines_a_step():
    a, bs = _banks()
    banks, slots = SiteBanks(a, bs), StepSlots(TOKEN_SLOTS, RANKS)
    every = _walk(banks, slots, 2, steps=10_000)
    few = _walk(banks, slots, 2, steps=3)
    assert len(every) > 2 * 3 * 4 and len(few) == 2 * 3 * 4  # the GEMM is not held up: the rest is left
    assert few[:12] == every[:12]  # each tile starts where its share of the list does
    assert any(every[i : i + 12] == few[12:] for i in range(len(every) // 3, len(every) - 11))


def test_nothing_to_ask_for_walks_no_line():
    a, bs = _banks()
    banks = SiteBanks(a, bs)
    assert _walk(banks, StepSlots(torch.tensor([2, -1]), RANKS), 4, 100) == []  # rank 0 and base rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_named_rows_are_exactly_the_rows_the_packed_update_reads(dtype):
    g = torch.Generator().manual_seed(3)
    a, bs = _banks(dtype)
    named = _named_rows(a, bs, [0, 1, 3, 4])
    storages = [a] + [b.transpose(1, 2) for b in bs]
    for t in storages:
        t.fill_(float("nan"))
    for t, s, first, rows in named:
        t[s, first : first + rows] = torch.randn(rows, t.shape[2], generator=g).to(dtype)
    x = torch.randn(TOKEN_SLOTS.shape[0], K, generator=g)
    banks = SiteBanks(a, bs)

    def update():
        y = torch.zeros(x.shape[0], sum(OUTS))
        native.ops().lora_packed(y, x, TOKEN_SLOTS, RANKS, banks)
        return y

    assert torch.isfinite(update()).all()  # NaN everywhere the list does not name: none of it is read
    for t, s, first, rows in named:  # and each named region is read, its first and last values
        for row, col in ((first, 0), (first + rows - 1, t.shape[2] - 1)):
            kept = t[s, row, col].clone()
            t[s, row, col] = float("nan")
            assert update().isnan().any(), f"region of slot {s} row {row} not read"
            t[s, row, col] = kept


@pytest.mark.parametrize("rows", [1, 2, 5, 32])
@pytest.mark.parametrize("kernel", ["blocks", "bf16"])
def test_asking_for_rows_ahead_changes_no_number_of_the_product(rows, kernel):
    if kernel == "bf16" and bf16_weights.unavailable_reason() is not None:
        pytest.skip(bf16_weights.unavailable_reason())
    g = torch.Generator().manual_seed(rows)
    w = _matrix(200, 576, "Q4_1")
    weight = block_weights.pack(w) if kernel == "blocks" else w.to(torch.bfloat16)
    linear = block_weights.linear if kernel == "blocks" else bf16_weights.linear
    x, bias = torch.randn(rows, 576, generator=g), torch.randn(200, generator=g)
    a = torch.randn(S, len(OUTS) * R, 576, generator=g)
    bs = tuple(torch.randn(S, R, o, generator=g).transpose(1, 2) for o in OUTS)
    many = StepSlots(torch.arange(S).repeat(4), torch.full((S,), R))  # more lines than the tiles can carry
    for ahead in ((SiteBanks(a, bs), StepSlots(TOKEN_SLOTS, RANKS)), (SiteBanks(a, bs), many)):
        assert torch.equal(linear(x, weight, bias, ahead), linear(x, weight, bias))
