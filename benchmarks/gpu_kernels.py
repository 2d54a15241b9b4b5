"""GPU kernel figures (docs/design.md §6, figure 8): the Triton SGMV/BGMV LoRA update against the base GEMMs,
compiled.

For one decoder layer at three model scales (SmolLM2-135M, a Llama-3.2-1B shape, a Llama-7B shape) the seven
``add_lora`` calls (q, k, v, o, gate, up, down) are timed against the layer's base GEMMs as the runner runs
them (fused qkv, o, fused gate_up, down), and each case's LoRA delta is compared with an fp64 reference.

    python benchmarks/gpu_kernels.py [--out DIR]     # needs CUDA; prints a markdown table

Times: ``triton.testing.do_bench`` medians (L2 flushed before every run). ``eager`` includes the launches of
one add_lora per module with the plan built once per forward (its host cost is the ``plan µs`` column);
``graph`` replays a CUDA graph of the same launches (decode uses the graph-safe rows plan).
``per step`` multiplies the per-layer LoRA time by the model's layer count: the latency LoRA adds to one
forward pass (Punica/vLLM report about +2 ms per token at 7B scale).
"""

from __future__ import annotations

import argparse
import datetime
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hotlora.kernels import CpuBackend, TritonBackend


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    kv: int  # k/v projection width (kv heads x head dim)
    inter: int
    layers: int

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        h, kv, i = self.hidden, self.kv, self.inter
        return {
            "q": (h, h),
            "k": (h, kv),
            "v": (h, kv),
            "o": (h, h),
            "gate": (h, i),
            "up": (h, i),
            "down": (i, h),
        }

    @property
    def fused(self) -> list[tuple[int, int]]:  # the runner's base GEMMs
        h, kv, i = self.hidden, self.kv, self.inter
        return [(h, h + 2 * kv), (h, h), (h, 2 * i), (i, h)]


SHAPES = [
    Shape("SmolLM2-135M", 576, 192, 1536, 30),
    Shape("Llama-1B", 2048, 512, 8192, 16),
    Shape("Llama-7B", 4096, 4096, 11008, 32),
]


@dataclass(frozen=True)
class Case:
    name: str
    token_slots: torch.Tensor  # [T]
    slot_ranks: torch.Tensor  # [S]
    decode: bool


def cases() -> list[Case]:
    r16 = lambda n: torch.full((n,), 16)
    mixed = torch.tensor([4, 8, 16, 64] * 8)
    prefill = torch.arange(8).repeat_interleave(512)
    return [
        Case("decode 32 rows, 32 adapters r16", torch.arange(32), r16(32), True),
        Case("decode 64 rows, 64 adapters r16", torch.arange(64), r16(64), True),
        Case("decode 32 rows, 32 adapters r4/8/16/64", torch.arange(32), mixed, True),
        Case("prefill 8x512, 8 adapters r16", prefill, r16(8), False),
        Case("prefill 8x512, 8 adapters r4/8/16/64", prefill, mixed[:8], False),
    ]


def fp64_delta(x, a, b, scale, slots, ranks) -> torch.Tensor:
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64, device=x.device)
    for s in sorted(set(slots.tolist())):
        r = int(ranks[s])
        rows = slots.to(x.device) == s
        out[rows] = float(scale[s]) * (x[rows].double() @ a[s, :r].double().T) @ b[s, :, :r].double().T
    return out


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # µs


def graph_of(fn) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def run_case(shape: Shape, case: Case, dtype: torch.dtype) -> dict:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    T = case.token_slots.shape[0]
    S, R = case.slot_ranks.shape[0], int(case.slot_ranks.max())
    mods = []
    for h_in, h_out in shape.modules.values():
        a = torch.zeros(S, R, h_in)
        b = torch.zeros(S, h_out, R)
        for s, r in enumerate(case.slot_ranks.tolist()):
            a[s, :r] = torch.randn(r, h_in, generator=gen) / h_in**0.5
            b[s, :, :r] = torch.randn(h_out, r, generator=gen) / r**0.5
        mods.append(
            dict(
                x=torch.randn(T, h_in, generator=gen).to(dev, dtype),
                y=torch.zeros(T, h_out, device=dev, dtype=dtype),
                a=a.to(dev, dtype),
                b=b.to(dev, dtype),
                s=torch.full((S,), 2.0, device=dev),
            )
        )
    weights = [
        (
            torch.randn(T, i, generator=gen).to(dev, dtype),
            (torch.randn(o, i, generator=gen) / i**0.5).to(dev, dtype),
        )
        for i, o in shape.fused
    ]
    slots = case.token_slots.to(dev)
    ranks_dev = case.slot_ranks.to(dev)
    triton_be, torch_be = TritonBackend(), CpuBackend(dtype=dtype, device=dev)
    plan = triton_be.plan(slots, case.slot_ranks)
    rows_plan = triton_be.graph_plan(slots, ranks_dev, R)

    def base():
        for x, w in weights:
            F.linear(x, w)

    def lora(backend=triton_be, batch=plan):
        for m in mods:
            backend.add_lora(m["y"], m["x"], m["a"], m["b"], m["s"], batch)

    # correctness first: the delta of each module against fp64, on these very inputs
    errs = []
    for m in mods:
        m["y"].zero_()
        triton_be.add_lora(m["y"], m["x"], m["a"], m["b"], m["s"], rows_plan if case.decode else plan)
        want = fp64_delta(m["x"], m["a"], m["b"], m["s"], case.token_slots, case.slot_ranks)
        assert not torch.isnan(m["y"]).any()
        errs.append(float((m["y"].double() - want).norm() / want.norm()))

    out = {"T": T, "rel_err": max(errs)}
    out["base"] = bench(base)
    out["base_graph"] = bench(graph_of(base).replay)
    out["lora"] = bench(lora)
    torch_plan = torch_be.plan(slots, case.slot_ranks)
    out["torch_ops"] = bench(lambda: lora(torch_be, torch_plan))
    graph_plan = rows_plan if case.decode else plan
    out["lora_graph"] = bench(graph_of(lambda: lora(triton_be, graph_plan)).replay)
    t0 = time.perf_counter()
    for _ in range(20):
        triton_be.plan(slots, case.slot_ranks)
    torch.cuda.synchronize()
    out["plan"] = (time.perf_counter() - t0) / 20 * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table to DIR/gpu_kernels.md")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    import triton

    dtype = getattr(torch, args.dtype)
    head = [
        f"Measured {datetime.datetime.now():%Y-%m-%d %H:%M} on {torch.cuda.get_device_name()}, torch "
        f"{torch.__version__}, triton {triton.__version__}, {args.dtype}, by `benchmarks/gpu_kernels.py`.",
        "",
        "| model shape | case | base µs (graph) | LoRA eager µs | LoRA graph µs | **LoRA/base (graph)** | "
        "torch ops µs | plan µs | LoRA per step | rel. err vs fp64 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(head), flush=True)
    lines = list(head)
    with torch.inference_mode():
        for shape in SHAPES:
            for case in cases():
                f = run_case(shape, case, dtype)
                per_step = f["lora_graph"] * shape.layers / 1e3
                row = (
                    f"| {shape.name} | {case.name} | {f['base']:.1f} ({f['base_graph']:.1f}) | "
                    f"{f['lora']:.1f} | "
                    f"{f['lora_graph']:.1f} | **{f['lora_graph'] / f['base_graph']:.2f}** | "
                    f"{f['torch_ops']:.1f} | {f['plan']:.0f} | {per_step:.2f} ms ({shape.layers} layers) | "
                    f"{f['rel_err']:.1e} |"
                )
                print(row, flush=True)
                lines.append(row)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_kernels.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
