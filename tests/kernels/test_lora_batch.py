"""make_lora_batch groups tokens by slot once per forward pass."""

import torch
from hotlora.kernels import make_lora_batch


def test_segments_group_tokens_by_slot_and_skip_base_and_empty_slots():
    batch = make_lora_batch(torch.tensor([2, -1, 0, 2, 3, 0, 1]), torch.tensor([8, 0, 16, 4]))
    # slot 1 is empty (rank 0): token 6 gets nothing, like the base-only token 1
    assert batch.token_order.tolist() == [2, 5, 0, 3, 4]
    assert batch.sorted_slots.tolist() == [0, 0, 2, 2, 3]
    assert batch.seg_slots.tolist() == [0, 2, 3]
    assert batch.seg_starts.tolist() == [0, 2, 4] and batch.seg_lens.tolist() == [2, 2, 1]
    assert [(s.slot, s.rank, s.token_start) for s in batch.segments] == [(0, 8, -1), (2, 16, -1), (3, 4, 4)]
    assert not batch.segments_are_slices
    assert (batch.num_tokens, batch.num_lora_tokens, batch.max_segment_len, batch.max_rank) == (7, 5, 2, 16)
    assert [(g.rank, g.tokens.tolist(), g.slots.tolist()) for g in batch.rank_groups] == [
        (4, [4], [3]),
        (8, [2, 5], [0, 0]),
        (16, [0, 3], [2, 2]),
    ]


def test_prefill_requests_are_slices_and_one_slot_is_flagged():
    batch = make_lora_batch(torch.tensor([1, 1, 1, -1, -1, 0, 0]), torch.tensor([4, 4]))
    assert batch.segments_are_slices and batch.single_slot == -1
    assert [(s.slot, s.token_start, s.length) for s in batch.segments] == [(0, 5, 2), (1, 0, 3)]
    assert make_lora_batch(torch.full((5,), 1), torch.tensor([4, 4])).single_slot == 1


def test_no_lora_tokens():
    batch = make_lora_batch(torch.full((4,), -1), torch.tensor([4, 4]))
    assert not batch.has_lora and batch.num_segments == 0 and batch.max_segment_len == 0
    assert not make_lora_batch(torch.tensor([], dtype=torch.int64), torch.tensor([4])).has_lora
