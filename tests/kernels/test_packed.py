"""Packed banks of fused projections (qkv, gate_up): one shrink over the stacked slices, one expand per slice
into its column range, checked against the per-slice reference on every backend and plan."""

from dataclasses import dataclass

import pytest
import torch

from hotlora.kernels import (
    CpuBackend,
    TorchReferenceBackend,
    TritonBackend,
    add_lora_packed_reference,
)

from .lora_cases import assert_matches_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
R = 16
OUTS = (40, 24, 24)  # a qkv-like projection: q wider than k and v


@dataclass
class PackedCase:
    x: torch.Tensor
    y: torch.Tensor
    a: torch.Tensor  # [S, 3R, H_in]
    bs: tuple[torch.Tensor, ...]
    scales: torch.Tensor  # [3, S]
    slots: torch.Tensor
    ranks: torch.Tensor
    offsets: tuple[int, ...]

    def expected(self) -> torch.Tensor:
        y = self.y.cpu().clone()
        add_lora_packed_reference(
            y,
            self.x.cpu(),
            self.a.cpu(),
            tuple(b.cpu() for b in self.bs),
            self.scales.cpu(),
            self.slots.cpu(),
            self.ranks,
            self.offsets,
        )
        return y


def make_packed(slots, ranks, dtype=torch.float32, h_in=32, seed=0, pad=(0, 0)) -> PackedCase:
    gen = torch.Generator().manual_seed(seed)
    num_slots, n = len(ranks), len(OUTS)
    a = torch.randn(num_slots, n * R, h_in, generator=gen) * 0.2
    bs = [torch.randn(num_slots, h_out, R, generator=gen) * 0.2 for h_out in OUTS]
    for s, r in enumerate(ranks):  # NaN past each slot's rank in every slice: reading it shows up
        for i in range(n):
            a[s, i * R + r : (i + 1) * R] = float("nan")
            bs[i][s, :, r:] = float("nan")
    slots = torch.as_tensor(slots)
    x = torch.randn(len(slots), h_in, generator=gen)
    y = torch.randn(len(slots), pad[0] + sum(OUTS) + pad[1], generator=gen)
    offsets = tuple(pad[0] + sum(OUTS[:i]) for i in range(n))
    to = dict(device=DEVICE, dtype=dtype)
    return PackedCase(
        x.to(**to),
        y.to(**to),
        a.to(**to),
        tuple(b.to(**to) for b in bs),
        (torch.rand(n, num_slots, generator=gen) + 0.5).to(DEVICE),
        slots.to(DEVICE, torch.int64),
        torch.tensor(ranks, dtype=torch.int64),
        offsets,
    )


def run(backend, case: PackedCase, batch=None) -> torch.Tensor:
    y = case.y.clone()
    batch = batch or backend.plan(case.slots, case.ranks)
    backend.add_lora_packed(y, case.x, case.a, case.bs, case.scales, batch, case.offsets)
    return y.cpu()


CASES = {
    # decode: one token per slot, every slot at full rank -> the CPU's one-bmm dense path
    "decode full rank": ([0, 1, 2, 3, 4, 5], [R] * 6),
    # one adapter for every token -> the CPU's one-GEMM single path
    "single full rank": ([2] * 7, [R] * 6),
    # mixed ranks, base-only rows and an empty slot -> per-slice fallback, padding never read
    "mixed ranks": ([3, -1, 0, 5, 3, 1, 4, 2], [4, 8, 16, 2, 0, 12]),
    "prefill segments": ([0] * 5 + [3] * 4 + [-1] * 2, [16, 8, 16, 4, 0, 16]),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize(
    "backend", [TorchReferenceBackend(), CpuBackend(), "triton-sgmv", "triton-bgmv"], ids=str
)
def test_packed_matches_per_slice_reference(backend, name):
    if isinstance(backend, str):
        pytest.importorskip("triton")
        backend = TritonBackend(backend.split("-")[1])
    slots, ranks = CASES[name]
    case = make_packed(slots, ranks, pad=(3, 5))
    got = run(backend, case)
    assert_matches_reference(got, case.expected())
    assert torch.equal(got[:, :3], case.y.cpu()[:, :3]) and torch.equal(got[:, -5:], case.y.cpu()[:, -5:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_rows_plan_on_triton(dtype):
    pytest.importorskip("triton")
    case = make_packed([3, -1, 0, 5, 3, 1, 4, 2], [4, 8, 16, 2, 0, 12], dtype=dtype)
    backend = TritonBackend()
    batch = backend.graph_plan(case.slots, case.ranks.to(DEVICE), R)
    assert_matches_reference(run(backend, case, batch), case.expected())


@pytest.mark.parametrize("strategy", [None, "bmm", "segments"])
def test_packed_rows_plan_on_cpu_backend(strategy):
    # the CPU graph plan is the step's plan, read as the step starts (nothing is captured on the CPU): the C
    # kernel's route or a torch strategy's, as the same slots give through `plan`
    case = make_packed([3, -1, 0, 5, 3, 1, 4, 2], [4, 8, 16, 2, 0, 12])
    backend = CpuBackend(strategy)
    batch = backend.graph_plan(case.slots, case.ranks.to(DEVICE), R)
    assert_matches_reference(run(backend, case, batch), case.expected())
    y = case.y.clone()  # and one slice alone, through add_lora
    backend.add_lora(y, case.x, case.a[:, :R], case.bs[0], case.scales[0], batch, case.offsets[0])
    want = case.y.clone()
    CpuBackend(strategy).add_lora(
        want, case.x, case.a[:, :R], case.bs[0], case.scales[0], backend.plan(case.slots, case.ranks),
        case.offsets[0],
    )  # fmt: skip
    assert torch.allclose(y, want, atol=1e-5) and not torch.equal(y, case.y)


def test_packed_shapes_are_checked():
    case = make_packed([0, 1], [R, R])
    batch = CpuBackend().plan(case.slots, case.ranks)
    with pytest.raises(ValueError, match="one output offset per B slice"):
        CpuBackend().add_lora_packed(case.y, case.x, case.a, case.bs, case.scales, batch, case.offsets[:2])
    with pytest.raises(ValueError, match=r"scales must be \[n=3"):
        CpuBackend().add_lora_packed(case.y, case.x, case.a, case.bs, case.scales[0], batch, case.offsets)


def test_wrong_packed_layout_is_caught():
    """A packed update that read slice i's rows from the wrong offset (i·r instead of i·R) must fail."""
    case = make_packed([0, 1, 2], [8, 8, 8])
    wrong = case.a.clone()
    wrong[:, R : R + 8] = case.a[:, 8:16]  # k's rows moved where q's padding was
    y = case.y.clone()
    backend = CpuBackend()
    backend.add_lora_packed(
        y, case.x, wrong, case.bs, case.scales, backend.plan(case.slots, case.ranks), case.offsets
    )
    with pytest.raises(AssertionError):
        assert_matches_reference(y.cpu(), case.expected())


BOUND_CASES = {
    **CASES,
    # one adapter, more rows than the C kernel takes for it: the bound site hands it to torch's GEMMs
    "single long": ([1] * 40, [R, R]),
}


def rank_major(b: torch.Tensor) -> torch.Tensor:
    """The same [S, H, R] bank stored [S, R, H] (the layout the CPU backend allocates)."""
    return b.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU backend's bound sites")
@pytest.mark.parametrize("name", BOUND_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "rank-major"])
@pytest.mark.parametrize("banks", [torch.float32, torch.bfloat16], ids=str)
def test_a_bound_site_gives_what_add_lora_packed_gives(name, layout, banks):
    # bind_packed works out once what depends on the banks; every call, with either plan and a plan
    # changing between calls, must give exactly the unbound call's numbers
    from hotlora.kernels import native

    slots, ranks = BOUND_CASES[name]
    case = make_packed(slots, ranks, pad=(3, 5))
    bs = tuple((rank_major(b) if layout == "rank-major" else b).to(banks) for b in case.bs)
    a = case.a.to(banks)
    backend = CpuBackend()
    bound = backend.bind_packed(a, bs, case.scales, case.offsets)
    assert (bound.kernel_banks is not None) == native.available()
    used = [s for s in dict.fromkeys(slots) if s >= 0 and ranks[s] > 0][:2]
    other = make_packed([used[0], -1, used[-1], used[0]], ranks, pad=(3, 5), seed=1)  # x and y only
    other_plan = backend.plan(other.slots, case.ranks)
    for plan in (backend.plan(case.slots, case.ranks), backend.graph_plan(case.slots, case.ranks, R)):
        want = case.y.clone()
        backend.add_lora_packed(want, case.x, a, bs, case.scales, plan, case.offsets)
        for _ in range(2):  # the plan's route, applied again
            got = case.y.clone()
            bound(got, case.x, plan)
            assert torch.equal(got, want)
        # another plan (fewer slots in use) in between: its own route, not the last one's
        got_other = other.y.clone()
        bound(got_other, other.x, other_plan)
        want_other = other.y.clone()
        backend.add_lora_packed(want_other, other.x, a, bs, case.scales, other_plan, case.offsets)
        assert torch.equal(got_other, want_other) and not torch.equal(got_other, other.y)
    expected = case.y.clone()  # and the numbers are right: the reference on the banks as stored
    add_lora_packed_reference(
        expected, case.x, a.float(), tuple(b.float() for b in bs), case.scales, case.slots, case.ranks,
        case.offsets,
    )  # fmt: skip
    assert_matches_reference(got, expected)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU backend's bound sites")
def test_a_bound_site_refuses_what_add_lora_packed_refuses():
    case = make_packed([0, 1, -1], [R, R], pad=(3, 5))
    backend = CpuBackend()
    bound = backend.bind_packed(case.a, case.bs, case.scales, case.offsets)
    plan = backend.plan(case.slots, case.ranks)
    bound(case.y.clone(), case.x, plan)
    y = case.y.clone()
    with pytest.raises(ValueError, match="x"):  # a row of the wrong width: the general path's error
        bound(y, torch.randn(3, 31), plan)
    with pytest.raises(ValueError):
        bound(y.double(), case.x, plan)  # y of another dtype
    with pytest.raises(ValueError, match="slots"):  # a plan built for another number of slots
        bound(y, case.x, backend.plan(case.slots, torch.tensor([R, R, R])))
    assert torch.equal(y, case.y)  # nothing written by any of them
    with pytest.raises(ValueError, match="one output offset per B slice"):  # the banks, checked at binding
        backend.bind_packed(case.a, case.bs, case.scales, case.offsets[:2])


# The C kernel's two ways of sharing a call between threads, at sizes where it runs on more than one: whole
# runs of tokens a thread, in slot order (decode; many short prompts), or each run's rows and outputs split
# over the threads (a prefill on few adapters). Slices of 600, 128 and 17 outputs: the rank-major expand's
# chunks of 512 outputs and blocks of 128 whole and cut (a chunk of 88: 5 whole vectors and 8 lanes).
SPLIT_OUTS = (600, 128, 17)
SPLIT_CASES = {
    "decode, slots out of order": [7, -1, 3, 0, 5, 2, 6, 1, 4, 3, 6, 0],
    "many short prompts": [5] * 3 + [1] * 4 + [-1] * 2 + [0] * 5 + [6] * 2 + [3] * 3,
    "one long prompt and a short one": [2] * 20 + [6] * 5,  # 3 runs (at most 16 tokens a run): split
}


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU kernel")
@pytest.mark.parametrize("name", SPLIT_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "rank-major"])
@pytest.mark.parametrize("banks", [torch.float32, torch.bfloat16], ids=str)
def test_the_c_kernel_splits_work_either_way_and_matches_the_reference(name, layout, banks):
    from hotlora.kernels import native

    if not native.available():
        pytest.skip("no C kernel here")
    slots = torch.tensor(SPLIT_CASES[name])
    ranks = torch.tensor([16, 4, 16, 8, 0, 16, 12, 16])  # slot 4 empty: its tokens get nothing
    gen = torch.Generator().manual_seed(3)
    h_in, n = 256, len(SPLIT_OUTS)  # enough work for the kernel to take both threads
    a = torch.randn(len(ranks), n * R, h_in, generator=gen) * 0.2
    bs = [torch.randn(len(ranks), h, R, generator=gen) * 0.2 for h in SPLIT_OUTS]
    for s, r in enumerate(ranks.tolist()):  # NaN past each slot's rank: reading it shows up
        a[s].view(n, R, h_in)[:, r:] = float("nan")
        for b in bs:
            b[s, :, r:] = float("nan")
    a = a.to(banks)
    bs = tuple((rank_major(b) if layout == "rank-major" else b).to(banks) for b in bs)
    scales = torch.rand(n, len(ranks), generator=gen) + 0.5
    x = torch.randn(len(slots), h_in, generator=gen)
    y0 = torch.randn(len(slots), 4 + sum(SPLIT_OUTS) + 3, generator=gen)  # padded: columns 4.. are the slices
    offsets = tuple(4 + sum(SPLIT_OUTS[:i]) for i in range(n))
    expected = y0.clone()
    add_lora_packed_reference(
        expected, x, a.float(), tuple(b.float() for b in bs), scales, slots, ranks, offsets
    )
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = y0.clone()
            banks = native.ops().LoraBanks(a, list(bs), scales, list(offsets))
            native.ops().lora_packed(got, x, slots, ranks, banks)
        finally:
            torch.set_num_threads(before)
        assert_matches_reference(got, expected)
        assert torch.equal(got[slots == -1], y0[slots == -1]) and torch.equal(got[slots == 4], y0[slots == 4])
        assert torch.equal(got[:, :4], y0[:, :4]) and torch.equal(got[:, -3:], y0[:, -3:])


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU kernel")
def test_the_c_kernel_takes_a_call_with_no_tokens():
    from hotlora.kernels import native

    if not native.available():
        pytest.skip("no C kernel here")
    case = make_packed([0, 1], [R, R])
    y = torch.empty(0, case.y.shape[1])
    banks = native.ops().LoraBanks(case.a, list(case.bs), case.scales, list(case.offsets))
    native.ops().lora_packed(y, case.x[:0], case.slots[:0], case.ranks, banks)
    assert y.shape == (0, case.y.shape[1])
