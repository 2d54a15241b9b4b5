"""The per-step LoRA plan of the Triton backend is built from the host's slot list and sent to the device:
nothing is read back. The device here is `meta`, whose tensors hold no values: any read of one fails."""

from __future__ import annotations

import pytest
import torch

from hotlora.adapters.lora_layers import LoraContext, set_batch
from hotlora.kernels.triton_plan import plan_sgmv

SLOTS = [3, -1, 0, 3, 1, 2]
RANKS = torch.tensor([4, 8, 0, 16])  # slot 2 is empty


def test_the_plan_of_host_slots_goes_to_the_device_without_a_read():
    plan = plan_sgmv(torch.tensor(SLOTS), RANKS, device="meta")
    host = plan_sgmv(torch.tensor(SLOTS), RANKS)
    for name in (
        "token_slots",
        "slot_ranks",
        "token_order",
        "sorted_slots",
        "seg_slots",
        "seg_starts",
        "seg_lens",
    ):
        assert getattr(plan, name).device.type == "meta", name
        assert getattr(plan, name).shape == getattr(host, name).shape, name
    assert (plan.num_tokens, plan.max_rank, plan.num_lora_tokens, plan.max_segment_len) == (6, 16, 4, 2)
    # the host plan's numbers: tokens of slot 0, then 1, then 3 (slot -1 and the empty slot 2 get nothing)
    assert host.token_order.tolist() == [2, 4, 0, 3]
    assert host.seg_slots.tolist() == [0, 1, 3] and host.seg_lens.tolist() == [1, 1, 2]
    with pytest.raises((NotImplementedError, RuntimeError)):  # slots on the device must be read back
        plan_sgmv(torch.tensor(SLOTS, device="meta"), RANKS)


def test_a_forwards_plan_is_made_from_the_engines_list():
    pytest.importorskip("triton")
    from hotlora.kernels import TritonBackend

    ctx = LoraContext(backend=TritonBackend())
    set_batch(ctx, SLOTS, RANKS, torch.device("meta"))
    assert ctx.batch.token_order.device.type == "meta" and ctx.batch.num_lora_tokens == 4
