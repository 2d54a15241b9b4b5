"""The Triton SGMV/BGMV kernels match the reference (under TRITON_INTERPRET=1 on machines without a GPU)."""

import pytest
import torch

from hotlora.kernels import TorchReferenceBackend, TritonBackend

from .lora_cases import POPULARITY, assert_matches_reference, make_case, popularity_slots

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNELS = ("sgmv", "bgmv")


def expected_of(case, out_offset=0):
    y = case.y.cpu().clone()
    cpu = [t.cpu() for t in (case.x, case.lora_a, case.lora_b, case.scales)]
    ref = TorchReferenceBackend()
    ref.add_lora(y, *cpu, ref.plan(case.token_slots.cpu(), case.slot_ranks), out_offset)
    return y


def result_of(kernel, case, out_offset=0):
    y = case.y.clone()
    backend = TritonBackend(kernel)
    backend.add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, case.plan(backend), out_offset)
    return y.cpu()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matches_reference_across_popularity(kernel, popularity, dtype):
    slots = popularity_slots(popularity, 20, 6, torch.Generator().manual_seed(1))
    case = make_case(slots, dtype=dtype, device=DEVICE)
    assert_matches_reference(result_of(kernel, case), expected_of(case))


@pytest.mark.parametrize("kernel", KERNELS)
def test_decode_rows_in_any_order_with_base_only_rows(kernel):
    slots = torch.tensor([3, -1, 0, 5, 3, -1, 1, 0, 2, 4, 3, -1])
    case = make_case(slots, device=DEVICE)
    got = result_of(kernel, case)
    assert_matches_reference(got, expected_of(case))
    base_only = (slots == -1) | (slots == 4)  # slot 4 has rank 0
    assert torch.equal(got[base_only], case.y.cpu()[base_only])


@pytest.mark.parametrize("kernel", KERNELS)
def test_long_segments_span_several_row_blocks(kernel):
    slots = torch.tensor([0] * 70 + [3] * 33 + [1])  # 70 rows: 2 blocks of 64; mixed ranks 4/64/8
    case = make_case(slots, h_in=24, h_out=40, device=DEVICE)
    assert_matches_reference(result_of(kernel, case), expected_of(case))


@pytest.mark.parametrize("kernel", KERNELS)
def test_writes_only_its_output_column_slice_of_a_strided_view(kernel):
    case = make_case(popularity_slots("uniform", 16, 6, torch.Generator().manual_seed(2)), device=DEVICE)
    want = expected_of(case)
    wide = torch.full((16, 100), 7.0, device=DEVICE)
    wide[:, 10:82] = case.y
    backend = TritonBackend(kernel)
    backend.add_lora(wide[:, 3:90], case.x, case.lora_a, case.lora_b, case.scales, case.plan(backend), 7)
    assert_matches_reference(wide[:, 10:82].cpu(), want)
    assert (wide[:, :10] == 7).all() and (wide[:, 82:] == 7).all()


@pytest.mark.parametrize(("h_in", "h_out"), [(576, 1536), (1536, 576)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_model_hidden_sizes(kernel, h_in, h_out):
    slots = torch.tensor([0, 0, 3, -1, 5, 1])
    case = make_case(slots, h_in=h_in, h_out=h_out, device=DEVICE)
    assert_matches_reference(result_of(kernel, case), expected_of(case))


def test_sgmv_skips_empty_segments():
    from hotlora.kernels.triton_sgmv import sgmv_expand, sgmv_shrink

    case = make_case(torch.tensor([0, 0, 3, 3, 3, 1]), device=DEVICE)
    as_device = lambda *v: torch.tensor(v, dtype=torch.int64, device=DEVICE)
    order, seg_slots, seg_starts, seg_lens = (
        as_device(0, 1, 2, 3, 4, 5),
        as_device(0, 2, 3, 5, 1),
        as_device(0, 2, 2, 5, 5),
        as_device(2, 0, 3, 0, 1),  # slots 2 and 5 have segments of no tokens
    )
    ranks = case.slot_ranks.to(DEVICE)
    v = torch.empty(6, 64, device=DEVICE)
    y = case.y.clone()
    sgmv_shrink(v, case.x, case.lora_a, order, seg_slots, seg_starts, seg_lens, ranks, 3, 64)
    sgmv_expand(y, v, case.lora_b, case.scales, order, seg_slots, seg_starts, seg_lens, ranks, 3)
    assert_matches_reference(y.cpu(), expected_of(case))


def test_default_kernel_follows_segment_length():
    ranks = torch.full((32,), 16)
    backend = TritonBackend()
    assert backend.choose_kernel(backend.plan(torch.arange(32), ranks)) == "bgmv"
    assert backend.choose_kernel(backend.plan(torch.arange(8).repeat_interleave(128), ranks)) == "sgmv"


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_kernels_under_inference_mode_and_no_grad(context):
    case = make_case(torch.tensor([0, 1, 2, 3, 5, -1]), device=DEVICE)
    want = expected_of(case)
    with context():
        got = result_of(None, case)
    assert_matches_reference(got, want)


def test_comparison_catches_a_wrong_kernel():
    """A kernel that ignored the per-slot rank (used r = 4 for every slot) must be caught."""
    case = make_case(torch.tensor([0, 1, 2, 3, 3, 5]), device=DEVICE)
    want = expected_of(case)
    backend = TritonBackend("sgmv")
    truncated = backend.plan(case.token_slots, torch.tensor([4, 4, 4, 4, 0, 4]))
    y = case.y.clone()
    backend.add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, truncated)
    with pytest.raises(AssertionError, match="exceeds tolerance"):
        assert_matches_reference(y.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_graph_safe_rows_plan_matches_reference(dtype):
    """The graph plan (RowsPlan): unsorted rows, base-only rows (-1), an empty slot and mixed ranks, planned
    with no host sync and a grid sized by the bank's R_max; padding beyond each rank is NaN and must not be
    read."""
    slots = torch.tensor([3, -1, 0, 5, 3, -1, 1, 0, 2, 4, 3, 5])
    case = make_case(slots, dtype=dtype, device=DEVICE)
    batch = TritonBackend().graph_plan(case.token_slots, case.slot_ranks.to(DEVICE), case.lora_a.shape[1])
    assert TritonBackend().choose_kernel(batch) == "bgmv"
    y = case.y.clone()
    TritonBackend().add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, batch)
    got = y.cpu()
    assert_matches_reference(got, expected_of(case))
    base_only = (slots == -1) | (slots == 4)
    assert torch.equal(got[base_only], case.y.cpu()[base_only])


def test_rows_plan_refuses_host_ranks_for_the_kernels():
    case = make_case(torch.tensor([0, 1]), device=DEVICE)
    if DEVICE == "cpu":
        pytest.skip("on CPU both live on the host")
    with pytest.raises(ValueError, match="share a device"):
        TritonBackend().graph_plan(case.token_slots, case.slot_ranks.cpu(), 64)
