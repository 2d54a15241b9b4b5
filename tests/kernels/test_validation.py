"""Launchers, backends and their plans reject bad arguments with a message saying what was wrong."""

import pytest
import torch

from hotlora.kernels import CpuBackend, TorchReferenceBackend, TritonBackend

from .lora_cases import make_case

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def case():
    return make_case(torch.tensor([0, 0, 3, -1, 1]), device=DEVICE)


def call(backend, case, **override):
    slots, ranks = override.pop("slots", (case.token_slots, case.slot_ranks))
    batch = backend.plan(slots, ranks)
    args = dict(y=case.y, x=case.x, lora_a=case.lora_a, lora_b=case.lora_b, scales=case.scales)
    args.update(override)
    backend.add_lora(args["y"], args["x"], args["lora_a"], args["lora_b"], args["scales"], batch, 0)


@pytest.mark.parametrize("backend", [CpuBackend(), TritonBackend("sgmv"), TritonBackend("bgmv")], ids=str)
@pytest.mark.parametrize(
    ("override", "match"),
    [
        (lambda c: {"x": c.x[:, :-1]}, "x has H_in=39 but lora_a"),
        (lambda c: {"x": c.x[:-1]}, "must have T=5 rows"),
        (lambda c: {"y": c.y[0]}, "must be 2-D"),
        (lambda c: {"lora_b": c.lora_b[:, :, :8]}, "does not match lora_a"),
        (lambda c: {"lora_a": c.lora_a[:3]}, "does not match lora_a|built for 6 slots"),
        (lambda c: {"scales": c.scales.half()}, r"scales must be \[S=6\] float32"),
        (lambda c: {"x": c.x.half()}, "must share one dtype"),
        (lambda c: {"x": c.x.int(), "y": c.y.int()}, "x dtype must be one of"),
        (lambda c: {"slots": (torch.tensor([0, 1, 2, 3, 5]), torch.full((4,), 4))}, "4 slots"),
        (lambda c: {"y": c.y[:, :10]}, r"output slice \[0, 72\) does not fit"),
    ],
)
def test_backend_rejects_bad_arguments(backend, case, override, match):
    with pytest.raises(ValueError, match=match):
        call(backend, case, **override(case))


def test_cpu_backend_rejects_a_bank_on_another_device(case):
    meta = case.lora_a.to("meta")
    with pytest.raises(ValueError, match="lora_a is on meta"):
        call(CpuBackend(), case, lora_a=meta)


def test_triton_rejects_column_major_banks_and_outputs(case):
    # banks may be row-major views (a packed bank's slices), but their last dimension must be unit-stride
    with pytest.raises(ValueError, match="lora_a must have unit stride"):
        call(TritonBackend(), case, lora_a=case.lora_a.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="y must have unit stride"):
        call(TritonBackend(), case, y=case.y.T.contiguous().T)


def test_triton_needs_cuda_outside_the_interpreter(monkeypatch):
    case = make_case(torch.tensor([0, 1]))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors, got device cpu"):
        call(TritonBackend(), case)


def test_launchers_check_index_tensors_and_the_v_buffer(case):
    from hotlora.kernels.triton_bgmv import bgmv_shrink
    from hotlora.kernels.triton_sgmv import sgmv_shrink

    b = case.plan(TritonBackend())
    v = torch.empty(b.num_lora_tokens, 64, device=DEVICE)
    with pytest.raises(ValueError, match="v must be"):
        bgmv_shrink(v.half(), case.x, case.lora_a, b.token_order, b.sorted_slots, b.slot_ranks, 16)
    with pytest.raises(ValueError, match="sorted_slots must be a 1-D int64"):
        bgmv_shrink(v, case.x, case.lora_a, b.token_order, b.sorted_slots.float(), b.slot_ranks, 16)
    with pytest.raises(ValueError, match="one entry per segment"):
        sgmv_shrink(
            v,
            case.x,
            case.lora_a,
            b.token_order,
            b.seg_slots,
            b.seg_starts[:1],
            b.seg_lens,
            b.slot_ranks,
            2,
            16,
        )
    with pytest.raises(ValueError, match="slot_ranks must be"):
        sgmv_shrink(
            v,
            case.x,
            case.lora_a,
            b.token_order,
            b.seg_slots,
            b.seg_starts,
            b.seg_lens,
            b.slot_ranks[:2],
            2,
            16,
        )


@pytest.mark.parametrize(
    ("slots", "ranks", "match"),
    [
        (torch.tensor([0, 4]), torch.full((4,), 8), r"must lie in \[-1, 3\]"),
        (torch.tensor([0, -2]), torch.full((4,), 8), r"must lie in \[-1, 3\]"),
        (torch.tensor([[0, 1]]), torch.full((4,), 8), "must be 1-D"),
        (torch.tensor([0.0, 1.0]), torch.full((4,), 8), "must be int64"),
        (torch.tensor([0, 1]), torch.tensor([8, -1, 8, 8]), "slot_ranks must be >= 0"),
    ],
)
@pytest.mark.parametrize("backend", [CpuBackend(), TritonBackend(), TorchReferenceBackend()], ids=str)
def test_plan_rejects_bad_slots(backend, slots, ranks, match):
    with pytest.raises(ValueError, match=match):
        backend.plan(slots, ranks)
