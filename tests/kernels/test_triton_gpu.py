"""The Triton kernels compiled for a real GPU: what the interpreter cannot show.

The interpreter runs 16-bit tl.dot through fp32 and has no CUDA graphs; here the kernels run as compiled
code, at model-scale shapes, against an fp64 reference, and the graph-safe decode plan is captured once and
replayed with new slots and newly installed adapters.
"""

import pytest
import torch

from hotlora.kernels import TritonBackend

from .lora_cases import MIXED_RANKS, make_case, popularity_slots

pytestmark = pytest.mark.gpu

# ‖out − ref‖ / ‖ref‖ of the LoRA delta against fp64 math on the same (rounded) inputs
REL_TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def delta_reference(x, a, b, scales, token_slots, slot_ranks) -> torch.Tensor:
    """fp64: delta[t] = scale[s] · x[t] · A[s, :r]ᵀ · B[s, :, :r]ᵀ, 0 for slot -1 or rank 0."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64, device=x.device)
    token_slots = token_slots.to(x.device)
    for s in sorted(set(token_slots.tolist())):
        r = int(slot_ranks[s]) if s >= 0 else 0
        if r == 0:
            continue
        rows = token_slots == s
        out[rows] = float(scales[s]) * (x[rows].double() @ a[s, :r].double().T) @ b[s, :, :r].double().T
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kernel", ["sgmv", "bgmv", "rows"])
@pytest.mark.parametrize(
    ("h_in", "h_out"), [(576, 1536), (2048, 512), (4096, 11008), (11008, 4096)], ids=lambda v: str(v)
)
def test_model_scale_against_fp64(kernel, h_in, h_out, dtype):
    gen = torch.Generator().manual_seed(h_in + h_out)
    slots = popularity_slots("zipf", 48, len(MIXED_RANKS), gen)
    slots[5] = -1
    case = make_case(slots, h_in=h_in, h_out=h_out, dtype=dtype, device="cuda")
    x, a, b = case.x, case.lora_a, case.lora_b
    want = delta_reference(x, a, b, case.scales, slots, case.slot_ranks)
    y = torch.zeros_like(case.y)  # the delta alone, so its rounding is all that is compared
    ranks = case.slot_ranks.cuda()
    backend = TritonBackend(None if kernel == "rows" else kernel)
    batch = (
        backend.graph_plan(case.token_slots, ranks, a.shape[1])
        if kernel == "rows"
        else backend.plan(case.token_slots, case.slot_ranks)
    )
    backend.add_lora(y, x, a, b, case.scales, batch)
    assert not torch.isnan(y).any(), "NaN: padding beyond a slot's rank was read"
    assert rel_err(y, want) < REL_TOL[dtype]
    # accumulates into y (not overwrites), base-only rows untouched
    y2 = case.y.clone()
    TritonBackend(None if kernel == "rows" else kernel).add_lora(y2, x, a, b, case.scales, batch)
    assert torch.equal(y2[slots == -1], case.y[slots == -1])
    assert rel_err(y2.double() - case.y.double(), want) < 3 * REL_TOL[dtype] + 1e-2 * (dtype != torch.float32)


def test_rows_plan_captured_as_a_cuda_graph_follows_new_slots_and_installs():
    """One capture, several replays: the slots buffer is refilled and a slot's adapter replaced between
    replays; every replay equals the reference for what the buffers hold at replay time."""
    torch.manual_seed(0)
    rows, h_in, h_out, num_slots, r_max = 32, 576, 1536, 8, 16
    dt = torch.bfloat16
    a = torch.randn(num_slots, r_max, h_in, device="cuda", dtype=dt) * 0.05
    b = torch.randn(num_slots, h_out, r_max, device="cuda", dtype=dt) * 0.05
    scales = torch.rand(num_slots, device="cuda") + 0.5
    ranks = torch.tensor([16, 8, 4, 16, 0, 16, 12, 16], device="cuda")
    for s, r in enumerate(ranks.tolist()):
        a[s, r:] = 0
        b[s, :, r:] = 0
    slots_buf = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
    x = torch.randn(rows, h_in, device="cuda", dtype=dt)
    y = torch.zeros(rows, h_out, device="cuda", dtype=dt)
    backend = TritonBackend()
    batch = backend.graph_plan(slots_buf, ranks, r_max)

    def step():
        y.zero_()
        backend.add_lora(y, x, a, b, scales, batch)

    step()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator().manual_seed(3)
    for replay in range(4):
        slots_buf.copy_(torch.randint(-1, num_slots, (rows,), generator=gen))
        if replay == 2:  # install another adapter into slot 1 (rank 8 -> 16) between replays
            a[1] = torch.randn(r_max, h_in, device="cuda", dtype=dt) * 0.05
            b[1] = torch.randn(h_out, r_max, device="cuda", dtype=dt) * 0.05
            ranks[1] = 16
        graph.replay()
        torch.cuda.synchronize()
        want = delta_reference(x, a, b, scales, slots_buf.cpu(), ranks.cpu())
        assert rel_err(y, want) < REL_TOL[dt], f"replay {replay}"
