"""The reference is right, and the CPU path matches it on every batch shape a server produces."""

import pytest
import torch

from hotlora.kernels import CpuBackend, CpuRoute, TorchReferenceBackend, get_backend
from hotlora.kernels.cpu_plan import choose_route, plan_cpu
from hotlora.kernels.plan import sort_by_slot

from .lora_cases import POPULARITY, assert_matches_reference, make_case, popularity_slots

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STRATEGIES = (None, "segments", "bmm", "dense", "kernel")


def expected_of(case, out_offset=0):
    y = case.y.clone()
    ref = TorchReferenceBackend()
    ref.add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, case.plan(ref), out_offset)
    return y


def route_of(slots, ranks, kernel: bool) -> CpuRoute:
    """The route CpuBackend.plan takes for these slots, with or without the C kernel."""
    return plan_cpu(torch.as_tensor(slots), torch.as_tensor(ranks), kernel).route


def result_of(backend, case, out_offset=0):
    y = case.y.clone()
    backend.add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, case.plan(backend), out_offset)
    return y


def test_reference_equals_per_token_formula_in_float64():
    slots = torch.tensor([2, -1, 0, 2, 3, 1, 4])
    case = make_case(slots)
    got = expected_of(case)
    want = case.y.double().clone()
    for t, s in enumerate(slots.tolist()):
        r = case.slot_ranks[s].item() if s >= 0 else 0
        if r:
            a, b = case.lora_a[s, :r].double(), case.lora_b[s, :, :r].double()
            want[t] += case.scales[s].double() * (b @ (a @ case.x[t].double()))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], case.y[1]) and torch.equal(got[6], case.y[6])  # base-only and empty slot


def test_reference_equals_merged_weights_for_one_adapter():
    case = make_case(torch.full((5,), 2), ranks=(16, 16, 16))
    delta_w = case.scales[2] * case.lora_b[2, :, :16] @ case.lora_a[2, :16]  # [H_out, H_in]
    torch.testing.assert_close(expected_of(case), case.y + case.x @ delta_w.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("popularity", POPULARITY)
def test_cpu_matches_reference_across_popularity(popularity, dtype, strategy):
    slots = popularity_slots(popularity, 24, 6, torch.Generator().manual_seed(1))
    case = make_case(slots, dtype=dtype)
    assert_matches_reference(result_of(CpuBackend(strategy, dtype=dtype), case), expected_of(case))


@pytest.mark.parametrize("rank_major", [False, True], ids=["B contiguous", "B rank-major"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cpu_decode_rows_in_any_order_with_base_only_rows(strategy, rank_major):
    slots = torch.tensor([3, -1, 0, 5, 3, -1, 1, 0, 2, 4, 3, -1])
    case = make_case(slots)
    if rank_major:
        case.lora_b = rank_major_copy(case.lora_b)
    got = result_of(CpuBackend(strategy), case)
    assert_matches_reference(got, expected_of(case))
    base_only = (slots == -1) | (slots == 4)  # slot 4 has rank 0
    assert torch.equal(got[base_only], case.y[base_only])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cpu_writes_only_its_output_column_slice(strategy):
    case = make_case(popularity_slots("uniform", 16, 6, torch.Generator().manual_seed(2)), out_pad=(5, 7))
    got = result_of(CpuBackend(strategy), case, out_offset=5)
    assert_matches_reference(got, expected_of(case, out_offset=5))
    assert torch.equal(got[:, :5], case.y[:, :5]) and torch.equal(got[:, -7:], case.y[:, -7:])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cpu_updates_non_contiguous_y_views_in_place(strategy):
    case = make_case(torch.tensor([0, 1, 1, -1, 3, 3, 3, 2]))
    want = expected_of(case)
    wide = torch.zeros(8, 100)
    wide[:, 10:82] = case.y
    backend = CpuBackend(strategy)
    backend.add_lora(wide[:, 10:82], case.x, case.lora_a, case.lora_b, case.scales, case.plan(backend))
    assert_matches_reference(wide[:, 10:82], want)
    column_major = case.y.T.contiguous().T  # stride (1, T)
    backend.add_lora(column_major, case.x, case.lora_a, case.lora_b, case.scales, case.plan(backend))
    assert_matches_reference(column_major, want)


@pytest.mark.parametrize(("h_in", "h_out"), [(576, 1536), (1536, 576)])
def test_cpu_at_model_hidden_sizes(h_in, h_out):
    case = make_case(
        popularity_slots("zipf", 20, 6, torch.Generator().manual_seed(3)), h_in=h_in, h_out=h_out
    )
    assert_matches_reference(result_of(CpuBackend(), case), expected_of(case))


def test_all_base_only_leaves_y_untouched():
    case = make_case(torch.full((6,), -1))
    for backend in (CpuBackend(), TorchReferenceBackend()):
        assert not case.plan(backend).has_lora
        assert torch.equal(result_of(backend, case), case.y)


def test_one_adapter_for_every_token_takes_the_single_slot_path():
    case = make_case(torch.full((9,), 3))
    assert route_of(case.token_slots, case.slot_ranks, kernel=False) is CpuRoute.SINGLE
    assert route_of(case.token_slots, case.slot_ranks, kernel=True) is CpuRoute.KERNEL  # 9 rows: the kernel's
    assert_matches_reference(result_of(CpuBackend("single"), case), expected_of(case))


def test_strategy_follows_batch_shape():
    # the torch routes, where the C kernel cannot run
    ranks = torch.full((32,), 16)
    # decode, 32 adapters in a full slot range: bank views, no gather
    assert route_of(torch.arange(32), ranks, kernel=False) is CpuRoute.DENSE
    # decode, scattered slots or mixed ranks: gather + bmm
    assert route_of(torch.arange(0, 32, 4), ranks, kernel=False) is CpuRoute.BMM
    mixed = ranks.clone()
    mixed[1] = 4
    assert route_of(torch.arange(32), mixed, kernel=False) is CpuRoute.BMM
    prefill = torch.arange(8).repeat_interleave(128)
    assert route_of(prefill, ranks, kernel=False) is CpuRoute.SEGMENTS


def runs(*spec: tuple[int, int]) -> torch.Tensor:
    """Token slots as consecutive runs (slot, length): a prefill batch of several requests."""
    return torch.cat([torch.full((n,), s) for s, n in spec])


# Runs the C kernel walks in pieces: 1-3 tokens (one at a time), 4-7 (four at a time, then the rest), past
# its 16-token piece, base-only and empty-slot runs between them, one slot in two separate runs, and a batch
# past the 256 tokens its stack table holds.
RUN_LAYOUTS = {
    "short and long runs": runs((0, 1), (1, 3), (2, 4), (3, 7), (5, 17), (1, 33)),
    "base-only and empty-slot runs": runs((-1, 5), (2, 6), (4, 9), (0, 2), (-1, 1), (3, 16)),
    "one slot in two runs": runs((3, 5), (1, 4), (3, 6)),
    "past the stack table": runs((0, 100), (2, 90), (3, 70), (1, 40)),
}


def rank_major_copy(b: torch.Tensor) -> torch.Tensor:
    """The same B bank stored [S, R, H_out] and seen as [S, H_out, R] (CpuBackend.rank_major_b)."""
    out = b.transpose(1, 2).contiguous().transpose(1, 2)
    assert out.stride() == (b.shape[1] * b.shape[2], 1, b.shape[1])
    assert torch.equal(out.nan_to_num(), b.nan_to_num())
    return out


@pytest.mark.parametrize("rank_major", [False, True], ids=["B contiguous", "B rank-major"])
@pytest.mark.parametrize("layout", RUN_LAYOUTS)
def test_native_walks_runs_of_tokens_as_the_reference(layout, rank_major):
    case = make_case(RUN_LAYOUTS[layout])
    if rank_major:  # its NaN padding past each slot's rank stays where it was: reading it would show
        case.lora_b = rank_major_copy(case.lora_b)
    got = result_of(CpuBackend("kernel"), case)
    assert_matches_reference(got, expected_of(case))
    untouched = (case.token_slots == -1) | (case.token_slots == 4)  # slot 4 has rank 0
    assert torch.equal(got[untouched], case.y[untouched])


def test_the_kernel_takes_short_segments_and_torch_keeps_long_ones():
    ranks = torch.full((32,), 16)

    def picked(slots):
        return route_of(slots, ranks, kernel=True)

    assert picked(torch.arange(32)) is CpuRoute.KERNEL  # decode of 32 adapters
    assert picked(torch.arange(32).repeat_interleave(14)) is CpuRoute.KERNEL  # 32 short prompts
    assert picked(torch.full((32,), 5)) is CpuRoute.KERNEL  # one adapter, a few tokens
    assert picked(torch.full((33,), 5)) is CpuRoute.SINGLE  # one adapter's long prompt: torch's GEMM
    assert picked(torch.arange(8).repeat_interleave(128)) is CpuRoute.SEGMENTS  # long prompts of 8 adapters


def test_a_forced_route_applies_only_where_it_can():
    grouped = sort_by_slot(torch.tensor([0, 1, 1, 2]), torch.tensor([4, 4, 4]))
    assert (
        choose_route(grouped, kernel=False, forced=CpuRoute.KERNEL) is CpuRoute.DENSE
    )  # no kernel: by shape
    assert choose_route(grouped, kernel=True, forced=CpuRoute.SINGLE) is CpuRoute.SEGMENTS  # not one adapter
    plan = plan_cpu(torch.tensor([0, 9]), torch.full((10,), 4), True, CpuRoute.DENSE)  # slots far apart
    assert plan.route is CpuRoute.BMM and plan.segments.dense is None  # no dense layout for these
    kernel = plan_cpu(torch.tensor([0, 2, 5]), torch.tensor([4, 4, 4, 8, 4, 4]), True)
    assert kernel.route is CpuRoute.KERNEL and kernel.segments is None  # no torch grouping built for it


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_cpu_under_inference_mode_and_no_grad(context):
    case = make_case(torch.tensor([0, 1, 2, 3, 5, -1]))
    want = expected_of(case)
    with context():
        got = result_of(get_backend("cpu"), case)
    assert_matches_reference(got, want)


def test_comparison_catches_a_wrong_update():
    """A backend that applied the wrong adapter to one token must fail the comparison."""
    case = make_case(torch.tensor([0, 0, 1, 3]))
    wrong = make_case(torch.tensor([0, 0, 3, 3]))
    with pytest.raises(AssertionError, match="exceeds tolerance"):
        assert_matches_reference(result_of(CpuBackend(), wrong), expected_of(case))


@pytest.mark.parametrize(
    "slots",
    [
        [3, 0, 1, 2, 5, 4, 6, 7],  # decode: distinct adapters, rows in any order
        [0, 1, 1, 2, 3, 3, -1, 6, 5],  # short segments, a base-only row, slot 4 unused in the range
        [0, 1, 2, 3, 4, 5, 6, 7],  # decode, rows already in slot order: no gather, no scatter
        [2, 3, 4, -1, 5],  # one token per slot with a base-only row between
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_strategy_is_taken_and_matches_reference(slots, dtype):
    case = make_case(torch.tensor(slots), dtype=dtype, ranks=(8,) * 8)
    plan = plan_cpu(case.token_slots, case.slot_ranks, kernel=False)
    assert plan.segments.dense is not None and plan.route is CpuRoute.DENSE
    assert_matches_reference(result_of(CpuBackend("dense", dtype=dtype), case), expected_of(case))


@pytest.mark.parametrize("strategy", STRATEGIES + ("single",))
@pytest.mark.parametrize(
    "slots", [[0, 1, 1, -1, 3, 3, 3, 2], [2] * 6, list(range(5))], ids=["mixed", "one", "decode"]
)
@pytest.mark.parametrize("rank_major", [False, True], ids=["B contiguous", "B rank-major"])
def test_bf16_banks_under_fp32_activations_equal_the_widened_banks(strategy, slots, rank_major):
    # --weight-dtype bfloat16 stores the banks as the weights: every strategy reads them widened to fp32
    case = make_case(torch.tensor(slots))
    a16, b16 = case.lora_a.to(torch.bfloat16), case.lora_b.to(torch.bfloat16)
    if rank_major:
        b16 = rank_major_copy(b16)
    want = case.y.clone()
    ref = TorchReferenceBackend()
    ref.add_lora(want, case.x, a16.float(), b16.float(), case.scales, case.plan(ref))
    got = case.y.clone()
    backend = CpuBackend(strategy)
    backend.add_lora(got, case.x, a16, b16, case.scales, case.plan(backend))
    assert_matches_reference(got, want)
    with pytest.raises(ValueError, match="share one dtype"):  # the reference backend takes one dtype only
        ref.add_lora(case.y.clone(), case.x, a16, b16, case.scales, case.plan(ref))
