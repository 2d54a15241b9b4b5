"""The reference is right, and the CPU path matches it on every batch shape a server produces."""

import pytest
import torch

from hotlora.kernels import CpuBackend, TorchReferenceBackend, get_backend, lora_decode
from hotlora.kernels.cpu import choose_cpu_strategy, pick_cpu_strategy

from .lora_cases import POPULARITY, assert_matches_reference, make_case, popularity_slots

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STRATEGIES = (None, "segments", "bmm", "dense", "native")


def expected_of(case, out_offset=0):
    y = case.y.clone()
    ref = TorchReferenceBackend()
    ref.add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, case.plan(ref), out_offset)
    return y


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
    assert_matches_reference(result_of(CpuBackend(strategy), case), expected_of(case))


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
    assert choose_cpu_strategy(case.plan(CpuBackend())) == "single"
    assert_matches_reference(result_of(CpuBackend(), case), expected_of(case))


def test_strategy_follows_batch_shape():
    ranks = torch.full((32,), 16)
    plan = CpuBackend().plan
    # decode, 32 adapters in a full slot range: bank views, no gather
    assert choose_cpu_strategy(plan(torch.arange(32), ranks)) == "dense"
    # decode, scattered slots or mixed ranks: gather + bmm
    assert choose_cpu_strategy(plan(torch.arange(0, 32, 4), ranks)) == "bmm"
    mixed = ranks.clone()
    mixed[1] = 4
    assert choose_cpu_strategy(plan(torch.arange(32), mixed)) == "bmm"
    prefill = torch.arange(8).repeat_interleave(128)
    assert choose_cpu_strategy(plan(prefill, ranks)) == "segments"


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
    assert lora_decode.b_layout(out) == "_t" and torch.equal(out.nan_to_num(), b.nan_to_num())
    return out


@pytest.mark.parametrize("rank_major", [False, True], ids=["B contiguous", "B rank-major"])
@pytest.mark.parametrize("layout", RUN_LAYOUTS)
def test_native_walks_runs_of_tokens_as_the_reference(layout, rank_major):
    case = make_case(RUN_LAYOUTS[layout])
    if rank_major:  # its NaN padding past each slot's rank stays where it was: reading it would show
        case.lora_b = rank_major_copy(case.lora_b)
    got = result_of(CpuBackend("native"), case)
    assert_matches_reference(got, expected_of(case))
    untouched = (case.token_slots == -1) | (case.token_slots == 4)  # slot 4 has rank 0
    assert torch.equal(got[untouched], case.y[untouched])


def test_native_takes_short_segments_and_torch_keeps_long_ones():
    ranks = torch.full((32,), 16)
    plan = CpuBackend().plan

    def picked(slots, h=576):
        y, x = torch.zeros(len(slots), h), torch.zeros(len(slots), h)
        a, b = torch.zeros(32, 16, h), torch.zeros(32, h, 16)
        return pick_cpu_strategy(plan(slots, ranks), y, x, a, b)

    assert picked(torch.arange(32)) == "native"  # decode of 32 adapters
    assert picked(torch.arange(32).repeat_interleave(14)) == "native"  # 32 short prompts
    assert picked(torch.full((32,), 5)) == "native"  # one adapter, a few tokens
    assert picked(torch.full((33,), 5)) == "single"  # one adapter's long prompt: torch's GEMM
    assert picked(torch.arange(8).repeat_interleave(128)) == "segments"  # long prompts of 8 adapters


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
    plan = case.plan(CpuBackend())
    assert plan.dense is not None and choose_cpu_strategy(plan) == "dense"
    assert_matches_reference(result_of(CpuBackend("dense"), case), expected_of(case))


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
