"""Each backend plans a forward pass once, and only what it reads: the CPU path's segments, the Triton
kernels' sorted index tensors, or a graph-safe rows plan that reads nothing back to the host."""

from dataclasses import fields

import pytest
import torch

from hotlora.kernels import CpuBackend, LoraPlan, RowsPlan, SegmentPlan, SgmvPlan, TritonBackend
from hotlora.kernels.cpu_plan import plan_segments
from hotlora.kernels.triton_plan import plan_rows, plan_sgmv

from .lora_cases import make_case

SLOTS, RANKS = torch.tensor([2, -1, 0, 2, 3, 0, 1]), torch.tensor([8, 0, 16, 4])


def test_segments_group_tokens_by_slot_and_skip_base_and_empty_slots():
    # slot 1 is empty (rank 0): token 6 gets nothing, like the base-only token 1
    sgmv = plan_sgmv(SLOTS, RANKS)
    assert sgmv.token_order.tolist() == [2, 5, 0, 3, 4]
    assert sgmv.sorted_slots.tolist() == [0, 0, 2, 2, 3]
    assert sgmv.seg_slots.tolist() == [0, 2, 3]
    assert sgmv.seg_starts.tolist() == [0, 2, 4] and sgmv.seg_lens.tolist() == [2, 2, 1]
    assert (sgmv.num_tokens, sgmv.num_lora_tokens, sgmv.max_segment_len, sgmv.max_rank) == (7, 5, 2, 16)
    cpu = plan_segments(SLOTS, RANKS)
    assert cpu.token_order.tolist() == [2, 5, 0, 3, 4]
    assert [(s.slot, s.rank, s.token_start) for s in cpu.segments] == [(0, 8, -1), (2, 16, -1), (3, 4, 4)]
    assert [(s.start, s.length) for s in cpu.segments] == [(0, 2), (2, 2), (4, 1)]
    assert not cpu.segments_are_slices
    assert (cpu.num_tokens, cpu.num_lora_tokens, cpu.max_segment_len, cpu.max_rank) == (7, 5, 2, 16)
    assert [(g.rank, g.tokens.tolist(), g.slots.tolist()) for g in cpu.rank_groups] == [
        (4, [4], [3]),
        (8, [2, 5], [0, 0]),
        (16, [0, 3], [2, 2]),
    ]


def test_prefill_requests_are_slices_and_one_slot_is_flagged():
    batch = plan_segments(torch.tensor([1, 1, 1, -1, -1, 0, 0]), torch.tensor([4, 4]))
    assert batch.segments_are_slices and batch.single_slot == -1
    assert [(s.slot, s.token_start, s.length) for s in batch.segments] == [(0, 5, 2), (1, 0, 3)]
    assert plan_segments(torch.full((5,), 1), torch.tensor([4, 4])).single_slot == 1


def test_no_lora_tokens():
    for plan in (plan_segments, plan_sgmv):
        batch = plan(torch.full((4,), -1), torch.tensor([4, 4]))
        assert not batch.has_lora and batch.num_segments == 0 and batch.max_segment_len == 0
        assert not plan(torch.tensor([], dtype=torch.int64), torch.tensor([4])).has_lora


def own_fields(plan_type) -> set[str]:
    return {f.name for f in fields(plan_type)} - {f.name for f in fields(LoraPlan)}


def test_each_backend_plans_only_what_it_reads():
    """The CPU plan holds no device index tensors of the Triton kernels, the Triton plans none of the CPU
    path's host segments, rank groups or dense layout (the CPU plan is not built for a GPU forward)."""
    triton_only = {"sorted_slots", "seg_slots", "seg_starts", "seg_lens"}
    cpu_only = {"segments", "segments_are_slices", "single_slot", "rank_groups", "dense", "token_rank"}
    assert triton_only <= own_fields(SgmvPlan) and cpu_only <= own_fields(SegmentPlan)
    assert not triton_only & own_fields(SegmentPlan)
    assert not cpu_only & (own_fields(SgmvPlan) | own_fields(RowsPlan))
    assert own_fields(RowsPlan) <= own_fields(SgmvPlan)  # the rows plan is the sorted rows, without sorting


def test_a_backend_refuses_another_backends_plan():
    case = make_case(torch.tensor([0, 1, 1, 3]))
    args = (case.y.clone(), case.x, case.lora_a, case.lora_b, case.scales)
    with pytest.raises(TypeError, match="CpuBackend needs a CpuPlan"):
        CpuBackend().add_lora(*args, plan_sgmv(case.token_slots, case.slot_ranks))
    with pytest.raises(TypeError, match="CpuBackend needs a CpuPlan"):
        CpuBackend().add_lora(*args, plan_rows(case.token_slots, case.slot_ranks, 64))
    pytest.importorskip("triton")
    with pytest.raises(TypeError, match="TritonBackend needs a SgmvPlan or RowsPlan"):
        TritonBackend().add_lora(*args, case.plan(CpuBackend()))


def test_rows_plan_reads_nothing_back_to_the_host():
    """Built from tensors on the meta device, which hold no values: any read (.item(), .tolist(), .cpu(),
    a comparison turned into a Python bool) would raise. So a captured decode graph stays valid."""
    slots = torch.empty(12, dtype=torch.int64, device="meta")
    ranks = torch.empty(6, dtype=torch.int64, device="meta")
    plan = plan_rows(slots, ranks, 64)
    assert (plan.num_tokens, plan.num_lora_tokens, plan.max_rank, plan.has_lora) == (12, 12, 64, True)
    assert plan.sorted_slots is slots and plan.slot_ranks is ranks
    assert plan.token_order.device.type == "meta" and plan.token_order.shape == (12,)
    assert plan_rows(slots, ranks, 64).token_order is plan.token_order  # one tensor a graph can keep
    with pytest.raises(NotImplementedError):  # the check is real: the sorted plan must read the slots
        plan_sgmv(slots, ranks)
