"""Kernel figures (docs/design.md §6, figure 7): the batched multi-LoRA update vs the base linear layers.

For one decoder layer of the default model (SmolLM2-135M: q, k, v, o, gate, up, down), the time of
``backend.add_lora`` summed over the seven modules is compared with the base ``F.linear`` time of the same
modules, and with the pure-torch reference. On CPU the CPU path is measured; on CUDA the Triton kernels too.

    .venv/bin/python benchmarks/kernels.py            # prints a table, updates benchmarks/RESULTS.md
    .venv/bin/python benchmarks/kernels.py --bindings # the C kernels' per-call cost: binding vs ctypes

Writes the figures, with date and machine, into the ``## Kernels`` section of benchmarks/RESULTS.md
(``--bindings``: the ``## Kernel bindings`` section).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from results_file import RESULTS, write_lines  # benchmarks/results_file.py

from hotlora.adapters.lora_layers import b_bank
from hotlora.kernels import CpuBackend, TorchReferenceBackend, get_backend

HIDDEN, INTERMEDIATE, KV_DIM = 576, 1536, 192
MODULES = {  # name: (H_in, H_out)
    "q": (HIDDEN, HIDDEN),
    "k": (HIDDEN, KV_DIM),
    "v": (HIDDEN, KV_DIM),
    "o": (HIDDEN, HIDDEN),
    "gate": (HIDDEN, INTERMEDIATE),
    "up": (HIDDEN, INTERMEDIATE),
    "down": (INTERMEDIATE, HIDDEN),
}
NUM_SLOTS, R_MAX = 32, 64  # a device bank sized for rank up to 64: rank-16 adapters sit zero-padded in it


@dataclass
class Case:
    name: str
    token_slots: torch.Tensor  # [T]
    slot_ranks: torch.Tensor  # [S]


def cases() -> list[Case]:
    rank16 = torch.full((NUM_SLOTS,), 16)
    mixed = torch.tensor([4, 8, 16, 64] * (NUM_SLOTS // 4))
    return [
        Case("decode 32 rows, 32 adapters r16", torch.arange(32), rank16),
        Case("decode 32 rows, 8 adapters r16", torch.arange(32) % 8, rank16),
        Case("decode 32 rows, 32 adapters r4/8/16/64", torch.arange(32), mixed),
        Case("decode 32 rows, 32 adapters r64", torch.arange(32), torch.full((NUM_SLOTS,), 64)),
        Case("prefill 32x14, 32 adapters r16", torch.arange(32).repeat_interleave(14), rank16),
        Case("prefill 8x128, 8 adapters r16", torch.arange(8).repeat_interleave(128), rank16),
        Case("prefill 8x128, 8 adapters r4/8/16/64", torch.arange(8).repeat_interleave(128), mixed),
        Case("prefill 8x128, 1 adapter r16", torch.zeros(1024, dtype=torch.int64), rank16),
    ]


def time_interleaved(fns: dict, device: torch.device, rounds: int = 7) -> dict[str, float]:
    """Best time in µs of each fn; rounds alternate between the fns so that load from other processes
    on a shared machine hits them alike, and the minimum is the least-disturbed run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inner = {}
    for name, fn in fns.items():
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        inner[name] = max(1, int(5e-3 / max(time.perf_counter() - start, 1e-7)))  # ~5 ms per sample
    best = dict.fromkeys(fns, float("inf"))
    for r in range(rounds):
        for name, fn in fns.items():
            if name == "reference" and r >= 2:
                continue  # the oracle is slow; two samples are enough to show how slow
            sync()
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / inner[name] * 1e6)
    return best


def measure(case: Case, device: torch.device, backends: dict, dtype: torch.dtype) -> dict[str, float]:
    """µs per decoder layer (seven modules) for the base linears and each backend."""
    gen = torch.Generator().manual_seed(0)
    num_tokens = case.token_slots.shape[0]
    slots = case.token_slots.to(device)
    layers = []
    rank_major = get_backend(device).rank_major_b  # B laid out as a server's banks are on this device
    for h_in, h_out in MODULES.values():
        a = torch.zeros(NUM_SLOTS, R_MAX, h_in)
        b = b_bank(NUM_SLOTS, h_out, R_MAX, "cpu", torch.float32, rank_major)
        for s, r in enumerate(case.slot_ranks.tolist()):
            a[s, :r] = torch.randn(r, h_in, generator=gen) * 0.05
            b[s, :, :r] = torch.randn(h_out, r, generator=gen) * 0.05
        to = dict(device=device, dtype=dtype)
        layers.append(
            dict(
                x=torch.randn(num_tokens, h_in, generator=gen).to(**to),
                w=(torch.randn(h_out, h_in, generator=gen) * 0.05).to(**to),
                y=torch.zeros(num_tokens, h_out, **to),
                a=a.to(**to),
                b=b.to(**to),  # keeps the layout (preserve_format)
                scales=torch.full((NUM_SLOTS,), 2.0, device=device),
            )
        )

    def base():
        for m in layers:
            F.linear(m["x"], m["w"])

    fns = {"base": base}
    for name, backend in backends.items():

        def lora(backend=backend, plan=backend.plan(slots, case.slot_ranks)):
            for m in layers:
                backend.add_lora(m["y"], m["x"], m["a"], m["b"], m["scales"], plan)

        fns[name] = lora
    fast = next(iter(backends.values()))  # the device's own backend: its plan is the one a server builds
    fns["plan"] = lambda: fast.plan(slots, case.slot_ranks)
    figures = time_interleaved(fns, device)
    return figures


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        model = platform.processor() or "unknown CPU"
    text = f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return text


def cpu_kernel_args(parser: argparse.ArgumentParser, why_not: str | None) -> argparse.Namespace:
    """What a CPU kernel benchmark (weight_storage.py, decode_attention.py) starts with: `--threads` and
    `--repeats` parsed with the script's own flags, torch's threads set, torch seeded; exits when the kernel
    cannot run here (`why_not`: its unavailable reason, None when it can)."""
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if why_not is not None:
        raise SystemExit(f"the kernel cannot run here: {why_not}")
    torch.manual_seed(0)
    return args


def best_of(fns: dict, repeats: int) -> dict[str, float]:
    """Each callable's best wall time in seconds over `repeats` rounds, the callables interleaved in a round
    (a CPU kernel benchmark's A/B: a slow moment of the machine hits every side alike)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def kernel_table(section: str, script: str, about: str, header: str, rows: Iterator[str]) -> None:
    """A CPU kernel benchmark's table (weight_storage.py, decode_attention.py): dated and described, printed
    row by row as `rows` measures them (under inference_mode), then written into RESULTS.md's `section`."""
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"Measured {now} on {machine()} by `benchmarks/{script}`"
        f" (load average at start: {os.getloadavg()[0]:.1f}).",
        "",
        about,
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    print("\n".join(lines), flush=True)
    with torch.inference_mode():
        for row in rows:
            lines.append(row)
            print(row, flush=True)
    write_lines(section, lines)
    print(f"\nwritten to {RESULTS}")


def run_device(device: torch.device, dtype: torch.dtype) -> list[str]:
    fast = "cpu path" if device.type == "cpu" else "triton"
    backends = {fast: get_backend(device), "reference": TorchReferenceBackend()}
    if device.type == "cuda":
        backends["torch ops"] = CpuBackend(dtype=dtype, device=device)
    header = f"| {device.type} {str(dtype).removeprefix('torch.')} case | base µs | {fast} µs | lora/base |"
    header += " reference µs | speed-up vs ref |" + (" torch ops µs |" if "torch ops" in backends else "")
    header += " plan µs |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    print("\n".join(lines), flush=True)
    for case in cases():
        f = measure(case, device, backends, dtype)
        row = f"| {case.name} | {f['base']:.0f} | {f[fast]:.0f} | **{f[fast] / f['base']:.2f}** |"
        row += f" {f['reference']:.0f} | {f['reference'] / f[fast]:.1f}× |"
        row += f" {f['torch ops']:.0f} |" if "torch ops" in backends else ""
        row += f" {f['plan']:.0f} |"
        lines.append(row)
        print(row, flush=True)
    return lines


def binding_calls() -> dict[str, tuple]:
    """Each C kernel a decode step of the default model calls, at one row: (through its binding, through
    ctypes with the argument list the earlier ctypes binding passed). Both run the same C function of the
    same build, so the difference is the cost of the call."""
    from hotlora.kernels import native

    ops = native.ops()
    lib = ctypes.CDLL(str(native.build(native.cache_dir())))  # its C symbols, as ctypes loaded them
    p, i64, c_int, c_float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float

    def c_fn(name, *argtypes):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = list(argtypes), c_int
        return fn

    gen = torch.Generator().manual_seed(0)
    calls = {}
    # o_proj of the default model: 576 x 576 in Q4_1 blocks (24 bytes a block of 32)
    packed = torch.randint(0, 255, (HIDDEN, HIDDEN // 32 * 24), dtype=torch.uint8, generator=gen)
    packed.view(HIDDEN, -1)[:, HIDDEN // 32 * 16 :] = 0  # d and m: 0.0 (finite)
    x = torch.randn(1, HIDDEN, generator=gen)
    q4_1 = 0  # HOTLORA_Q4_1
    linear = c_fn("hotlora_linear_blocks", p, i64, i64, p, c_int, i64, p, p, c_int, p, p)

    def linear_ctypes():
        y = torch.empty(1, HIDDEN)
        linear(x.data_ptr(), 1, HIDDEN, packed.data_ptr(), 0, HIDDEN, y.data_ptr(), None, 1, None, None)

    calls["linear_blocks (576 x 576 Q4_1)"] = (
        lambda: ops.linear_blocks(x, packed, q4_1, None),
        linear_ctypes,
    )
    w = torch.ones(HIDDEN)
    norm = c_fn("hotlora_rms_norm", p, i64, i64, i64, p, c_float, p, c_int)

    def norm_ctypes():
        out = torch.empty(1, HIDDEN)
        norm(x.data_ptr(), 1, HIDDEN, x.stride(0), w.data_ptr(), 1e-5, out.data_ptr(), 1)

    calls["rms_norm (576)"] = (lambda: ops.rms_norm(x, w, 1e-5), norm_ctypes)
    gate_up = torch.randn(1, 2 * INTERMEDIATE, generator=gen)
    silu = c_fn("hotlora_silu_mul", p, i64, i64, i64, p, c_int)

    def silu_ctypes():
        out = torch.empty(1, INTERMEDIATE)
        silu(gate_up.data_ptr(), 1, INTERMEDIATE, gate_up.stride(0), out.data_ptr(), 1)

    calls["silu_mul (1536)"] = (lambda: ops.silu_mul(gate_up), silu_ctypes)
    heads, kv_heads, d, bs = 9, 3, 64, 16
    q = torch.randn(1, heads, d, generator=gen)
    k_pool = torch.randn(8, bs, kv_heads, d, generator=gen)
    tables, lens, out = torch.arange(1, 5)[None], torch.tensor([64]), torch.empty(1, heads, d)
    attend = c_fn(
        "hotlora_paged_decode_attention",
        *(p, i64, i64, i64, i64, i64, p, p, i64, i64, p, i64, p, i64, c_float, p, c_int),
    )

    def attend_ctypes():
        attend(
            q.data_ptr(), 1, heads, d, q.stride(0), q.stride(1), k_pool.data_ptr(), k_pool.data_ptr(), bs,
            kv_heads, tables.data_ptr(), 4, lens.data_ptr(), 0, 0.125, out.data_ptr(), 1,
        )  # fmt: skip

    calls["paged_decode_attention (64 keys)"] = (
        lambda: ops.paged_decode_attention(q, k_pool, k_pool, tables, lens, 0.125, 0, out),
        attend_ctypes,
    )
    # qkv's update at one decode row: 32 slots of rank 16 (R_max 16), rank-major B
    outs = (HIDDEN, KV_DIM, KV_DIM)
    a = torch.randn(32, 3 * 16, HIDDEN, generator=gen) * 0.05
    bs_ = [torch.randn(32, 16, o, generator=gen).transpose(1, 2) for o in outs]
    scales = torch.ones(3, 32)
    banks = ops.LoraBanks(a, bs_, scales, [0, HIDDEN, HIDDEN + KV_DIM])
    y, slots, ranks = torch.zeros(1, sum(outs)), torch.tensor([3]), torch.full((32,), 16)
    arrays = [torch.tensor([b.data_ptr() for b in bs_]), torch.tensor(outs), torch.tensor([0, HIDDEN, 768])]
    packed_fn = c_fn(
        "hotlora_lora_packed_t", p, i64, i64, p, p, i64, i64, i64, p, p, p, p, p, p, i64, p, i64, c_int, c_int
    )

    def lora_ctypes():
        u = torch.empty(1, 48)
        packed_fn(
            x.data_ptr(), 1, x.stride(0), slots.data_ptr(), a.data_ptr(), HIDDEN, 3, 16, ranks.data_ptr(),
            u.data_ptr(), *(t.data_ptr() for t in arrays), scales.data_ptr(), 32, y.data_ptr(), y.stride(0),
            1, 1,
        )  # fmt: skip

    calls["lora_packed (qkv, 1 row, r16)"] = (lambda: ops.lora_packed(y, x, slots, ranks, banks), lora_ctypes)
    return calls


def run_bindings() -> list[str]:
    header = "| kernel at one decode row | binding µs | ctypes µs | binding - ctypes µs |"
    lines = [header, "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with torch.inference_mode():
        for name, (binding, through_ctypes) in binding_calls().items():
            f = time_interleaved(
                {"binding": binding, "ctypes": through_ctypes}, torch.device("cpu"), rounds=9
            )
            row = f"| {name} | {f['binding']:.2f} | {f['ctypes']:.2f} | {f['binding'] - f['ctypes']:+.2f} |"
            lines.append(row)
            print(row, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default). On a machine shared with other jobs, 1 gives stable "
        "figures: two OpenMP threads fighting other processes for two cores vary by 10x from run to run.",
    )
    parser.add_argument(
        "--bindings", action="store_true", help="the per-call cost of the C kernels' bindings"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if args.bindings:
        lines = [
            f"Measured {now} on {machine()} by `benchmarks/kernels.py --bindings` (load average at start: "
            f"{os.getloadavg()[0]:.1f}).",
            "",
            "CPU time per call on one thread, best of interleaved rounds: each C kernel through its binding",
            "(kernels/csrc/bind_*.cpp: pybind11 on torch's headers, tensors in, shapes, dtypes and layouts",
            "checked, output allocated, GIL released) against the same C function of the same build through",
            "ctypes with the argument list the earlier ctypes binding passed (pointers and ints prepared in",
            "Python, output from torch.empty, no checks). The difference is the cost of the call itself.",
            "",
        ]
        print("\n".join(lines))
        lines += run_bindings()
        write_lines("Kernel bindings", lines)
        print(f"\nwritten to {RESULTS}")
        return
    lines = [
        f"Measured {now} on {machine()} by `benchmarks/kernels.py`.",
        "",
        "Per decoder layer of SmolLM2-135M (q, k, v, o, gate, up, down summed); `base` is the seven base",
        "`F.linear` calls, the LoRA columns one `add_lora` per module.",
        f"Bank: {NUM_SLOTS} slots, R_max={R_MAX}. `lora/base` is the LoRA update's cost as a fraction of",
        "the base linear layers' cost. Times are the best of interleaved samples",
        f"(load average at start: {os.getloadavg()[0]:.1f}; the machine is shared with other jobs).",
        "",
    ]
    print("\n".join(lines))
    with torch.inference_mode():
        lines += run_device(torch.device("cpu"), torch.float32)
        if torch.cuda.is_available():
            for dtype in (torch.float16, torch.bfloat16):
                lines += [""] + run_device(torch.device("cuda"), dtype)
    write_lines("Kernels", lines)
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
