"""The device check's figures (deploy/gpu/device-check.sh): the engine and the kernels on a GPU, each stage a
JSON object written to --out and printed.

    python benchmarks/gpu_check.py decode --model DIR --label NAME --out FILE [--tiny]
    python benchmarks/gpu_check.py ttft --model DIR --label NAME --out FILE [--tiny]
    python benchmarks/gpu_check.py kernels --out FILE [--tiny]

decode   the engine in process (components as `hotlora serve --model DIR` builds them, no doors), N = 1, 8,
         32 and 64 concurrent requests of 8-token prompts and 64 new tokens (`ignore_eos`), on the base model
         and on 32 distinct rank-16 adapters on all seven projections (bf16, installed and pinned first),
         each with the CUDA-graph decode step and with it off (eager); tokens after the first / the time
         from the first token to the last (every prompt is read in one step, so all rows decode together);
         with graphs the best of 2 (the first also captures them), eager one run.
ttft     time to first token of 512-token prompts nobody sent before (base model; median of 3 after one
         warm-up).
kernels  (1) device-to-device copy bandwidth (bytes read + written / time, 512 MiB); (2) per layer of the
         Llama-3.2-1B shape, the LoRA update of the runner's four packed sites (qkv, o, gate_up, down; 32
         rank-16 adapters) against the layer's four base GEMMs, at 32 decode rows (graph-safe rows plan,
         CUDA-graph replays) and for 8 prompts x 512 tokens (segment plan); (3) the paged-attention kernels
         against the torch reference (gather + SDPA) on the same shapes: decode of 32 rows of 512-token
         context, and 8 chunks of 512 in one launch; each checked against fp64 first.

`--tiny`: small models and shapes, so that every stage runs on a CPU (the dry run; CUDA graphs there are
the eager static path, the kernels the CPU backend and Triton's interpreter).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hotlora.server.assembly import assemble
from hotlora.server.config import ServerConfig
from hotlora.server.engine.requests import GenerationRequest
from hotlora.server.engine.runner.decode_graphs import StaticDecode
from hotlora.server.engine.sampling import SamplingParams


@dataclass(frozen=True)
class Sizes:
    rows: tuple[int, ...] = (1, 8, 32, 64)
    adapters: int = 32
    rank: int = 16
    new_tokens: int = 64
    prompt_tokens: int = 8
    repeats: int = 2
    ttft_prompt: int = 512
    ttft_repeats: int = 3


FULL = Sizes()
TINY = Sizes(rows=(1, 2), adapters=2, rank=4, new_tokens=4, repeats=1, ttft_prompt=32, ttft_repeats=1)
BYTE_TOKENS = (4, 260)  # ids of byte tokens in benchmarks/gpu_models.py's tokenizers: any text


# ---- the engine ----------------------------------------------------------------------------------------
def components(model: Path, data_dir: Path, sizes: Sizes):
    config = ServerConfig(
        model=str(model),
        data_dir=str(data_dir),
        port=0,
        metrics_port=-1,
        http_port=-1,
        adapter_slots=max(sizes.adapters, 1),
        max_rank=sizes.rank,
        max_batch_size=max(sizes.rows),
    )
    return assemble(config)


def install_adapters(comp, model: Path, sizes: Sizes) -> list:
    """`sizes.adapters` distinct adapters uploaded, loaded and pinned; their handles."""
    from adapters import peft_files  # benchmarks/adapters.py: PEFT's own layout

    cfg = json.loads((model / "config.json").read_text())
    handles = []
    for i in range(sizes.adapters):
        name = f"check-{i}"
        files = peft_files(cfg, seed=1000 + i, rank=sizes.rank, dtype=torch.bfloat16)
        comp.adapters.upload("default", name, files)
        comp.adapters.load("default", name, pin=True, timeout=120)
        handles.append(comp.adapters.resolve("default", name)[0])
    return handles


def prompt(i: int, n: int, salt: int = 0) -> list[int]:
    lo, hi = BYTE_TOKENS
    g = torch.Generator().manual_seed(salt * 100_003 + i)
    return torch.randint(lo, hi, (n,), generator=g).tolist()


def run_requests(engine, reqs: list[GenerationRequest], timeout: float = 300.0) -> None:
    for r in reqs:
        engine.submit(r)
    end = time.monotonic() + timeout
    while not all(r.done for r in reqs):
        if time.monotonic() > end:
            raise TimeoutError(f"{sum(not r.done for r in reqs)} of {len(reqs)} requests did not finish")
        time.sleep(0.0005)
    failed = [r.error for r in reqs if r.error is not None]
    if failed:
        raise RuntimeError(f"a request failed: {failed[0]}")


def decode_rate(engine, handles: list, n: int, sizes: Sizes, salt: int) -> float:
    """Tokens a second of n rows decoding together (tokens after each row's first / first to last)."""
    params = SamplingParams(max_new_tokens=sizes.new_tokens, ignore_eos=True)
    reqs = [
        GenerationRequest(
            prompt(i, sizes.prompt_tokens, salt),
            params,
            adapter=handles[i % len(handles)] if handles else None,
        )
        for i in range(n)
    ]
    run_requests(engine, reqs)
    start = max(r.first_token_at for r in reqs)
    end = max(r.finished_at for r in reqs)
    return sum(len(r.output_ids) - 1 for r in reqs) / (end - start)


def decode(model: Path, label: str, sizes: Sizes) -> dict:
    with tempfile.TemporaryDirectory(prefix="hotlora-check-") as tmp:
        t0 = time.perf_counter()
        comp = components(model, Path(tmp), sizes)
        engine = comp.engine
        out = {"model": label, "device": str(comp.loaded.device), "dtype": str(comp.loaded.dtype)}
        out["load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        handles = install_adapters(comp, model, sizes)
        out["adapters_s"] = time.perf_counter() - t0
        graphs = engine.static_decode
        if graphs is None:  # a CPU: the same static path, eager (what the CUDA graph captures)
            graphs = StaticDecode(engine.runner, capture=False, lora_plan=engine.runtime.graph_plan)
        out["static_decode"] = "cuda graphs" if graphs.capture else "static path, eager (no CUDA)"
        out["weight_bytes"] = decode_weight_bytes(engine.runner)
        rates: dict[str, float] = {}
        salt = 0
        try:
            for n in sizes.rows:
                for kind in ("base", "mixed"):
                    for mode, static in (("graphs", graphs), ("eager", None)):
                        engine.static_decode = static  # read by the engine at each step
                        best = 0.0
                        # graphs: the first run also captures them; eager runs what is compiled already
                        for _ in range(sizes.repeats if static is not None else 1):
                            salt += 1
                            best = max(
                                best, decode_rate(engine, handles if kind == "mixed" else [], n, sizes, salt)
                            )
                        rates[f"n{n}_{kind}_{mode}"] = best
                        print(f"{label} N={n:2d} {kind:5s} {mode:6s}: {best:9.1f} tok/s", flush=True)
        finally:
            engine.static_decode = graphs
            comp.engine.stop()
            comp.adapters.close()
        out["tok_s"] = rates
        return out


def decode_weight_bytes(runner) -> int:
    """Bytes one decode step of one row reads of the weights: every matrix and norm, the LM head whole,
    the embedding one row (its whole matrix only when it is the LM head)."""
    w = runner.w
    total = w.nbytes
    if w.lm_head is not w.embed:
        total -= w.embed.numel() * w.embed.element_size()
    return total


def ttft(model: Path, label: str, sizes: Sizes) -> dict:
    with tempfile.TemporaryDirectory(prefix="hotlora-check-") as tmp:
        comp = components(model, Path(tmp), sizes)
        params = SamplingParams(max_new_tokens=1, ignore_eos=True)
        times = []
        try:
            for trial in range(sizes.ttft_repeats + 1):  # the first warms up (kernels, pools)
                req = GenerationRequest(prompt(0, sizes.ttft_prompt, salt=10_000 + trial), params)
                t0 = time.monotonic()
                run_requests(comp.engine, [req])
                if trial:
                    times.append(req.first_token_at - t0)
        finally:
            comp.engine.stop()
            comp.adapters.close()
        out = {"model": label, "prompt_tokens": sizes.ttft_prompt, "ttft_s": statistics.median(times)}
        print(f"{label} TTFT {sizes.ttft_prompt}: {out['ttft_s'] * 1e3:.1f} ms", flush=True)
        return out


# ---- the kernels ---------------------------------------------------------------------------------------
def timer(device: torch.device, repeats: int = 5):
    """µs of fn(): do_bench's median on CUDA (CUDA events), a median of host-timed runs elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3

    def host(fn) -> float:
        fn()
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs) * 1e6

    return host


def graph_of(fn, device: torch.device):
    """A CUDA graph's replay of fn's launches (fn itself off CUDA)."""
    if device.type != "cuda":
        return fn
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_bandwidth(device: torch.device, nbytes: int, bench) -> float:
    """Bytes a second of a device-to-device copy, counting bytes read and written."""
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * nbytes / (us / 1e6)


def lora_layer(shape: dict, device, dtype, bench, decode: bool, rows: int, segments: int) -> dict:
    """One layer's LoRA update through its four packed sites against its four base GEMMs."""
    from hotlora.adapters.lora_layers import b_bank
    from hotlora.kernels import get_backend

    h, i = shape["hidden_size"], shape["intermediate_size"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    sites = {"qkv": (h, (q, kv, kv)), "o": (q, (h,)), "gate_up": (h, (i, i)), "down": (i, (h,))}
    slots, rank = 32, 16
    backend = get_backend(device)
    g = torch.Generator().manual_seed(0)
    token_slots = (
        torch.arange(rows) % slots if decode else torch.arange(segments).repeat_interleave(rows // segments)
    )
    ranks = torch.full((slots,), rank)
    plan = (
        backend.graph_plan(token_slots.to(device), ranks.to(device), rank)
        if decode
        else backend.plan(token_slots, ranks, device)
    )
    base, lora, errs = [], [], []
    for h_in, outs in sites.values():
        x = (torch.randn(rows, h_in, generator=g) / h_in**0.25).to(device, dtype)
        w = (torch.randn(sum(outs), h_in, generator=g) / h_in**0.5).to(device, dtype)
        a = (torch.randn(slots, len(outs) * rank, h_in, generator=g) / h_in**0.5).to(device, dtype)
        bs = []
        for o in outs:
            b = b_bank(slots, o, rank, device, dtype, backend.rank_major_b)
            b.copy_(torch.randn(slots, o, rank, generator=g) / rank**0.5)
            bs.append(b)
        scales = torch.full((len(outs), slots), 2.0, device=device)
        offsets = tuple(sum(outs[:j]) for j in range(len(outs)))
        update = backend.bind_packed(a, tuple(bs), scales, offsets)
        y = torch.zeros(rows, sum(outs), device=device, dtype=dtype)
        update(y, x, plan)
        errs.append(_rel_err(y, _delta64(x, a, bs, scales, offsets, token_slots, rank)))
        base.append((x, w))
        lora.append((update, y, x))

    def base_step():
        for x, w in base:
            F.linear(x, w)

    def lora_step():
        for update, y, x in lora:
            update(y, x, plan)

    base_us = bench(graph_of(base_step, device))  # replays, as the decode step runs; no launch gaps
    lora_us = bench(graph_of(lora_step, device))
    return {
        "rows": rows,
        "base_us": base_us,
        "lora_us": lora_us,
        "fraction": lora_us / base_us,
        "rel_err": max(errs),
    }


def _delta64(x, a, bs, scales, offsets, token_slots, rank) -> torch.Tensor:
    """fp64: the update of each B slice j: scale[j, s] · (x[t] · A[s, jR:(j+1)R]ᵀ) · B_j[s]ᵀ, s = t's slot."""
    x64, out = x.double().cpu(), []
    for j, b in enumerate(bs):
        delta = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64)
        for s in token_slots.unique().tolist():
            rows = token_slots == s
            aj = a[s, j * rank : (j + 1) * rank].double().cpu()  # [R, H_in]
            delta[rows] = float(scales[j, s]) * (x64[rows] @ aj.T) @ b[s].double().cpu().T
        out.append(delta)
    return torch.cat(out, dim=1)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want).norm() / want.norm())


def attention(shape: dict, device, dtype, bench, rows: int, context: int, chunks: int) -> dict:
    """The Triton paged-attention kernels against the torch reference on one layer's pool."""
    from hotlora.kernels import attention_reference as reference
    from hotlora.kernels import triton_attention

    heads, kv_heads, d, bs = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"], 16
    per_seq = -(-context // bs)
    blocks = 1 + per_seq * max(rows, chunks)
    g = torch.Generator().manual_seed(1)
    k_pool = torch.randn(blocks, bs, kv_heads, d, generator=g).to(device, dtype)
    v_pool = torch.randn(blocks, bs, kv_heads, d, generator=g).to(device, dtype)
    tables = (
        (1 + torch.randperm(blocks - 1, generator=g)[: per_seq * max(rows, chunks)])
        .view(-1, per_seq)
        .to(device)
    )
    scale = d**-0.5
    out: dict = {}
    # decode: rows of `context` keys each
    q = torch.randn(rows, heads, d, generator=g).to(device, dtype)
    lens = torch.full((rows,), context, device=device)
    o = torch.empty_like(q)
    dtables = tables[:rows]
    triton_attention.paged_decode(q, k_pool, v_pool, dtables, lens, scale, None, o)
    want = reference.paged_decode(q.double(), k_pool.double(), v_pool.double(), dtables, lens, scale, None)
    out["decode_rel_err"] = _rel_err(o, want.cpu())
    out["decode_us"] = bench(
        lambda: triton_attention.paged_decode(q, k_pool, v_pool, dtables, lens, scale, None, o)
    )
    out["decode_reference_us"] = bench(
        lambda: reference.paged_decode(q, k_pool, v_pool, dtables, lens, scale, None)
    )
    # prefill: `chunks` fresh prompts of `context` tokens in one launch
    t = chunks * context
    qp = torch.randn(t, heads, d, generator=g).to(device, dtype)
    layout = torch.tensor([(c * context, context, 0) for c in range(chunks)], device=device)
    ptables = tables[:chunks]
    op = torch.empty_like(qp)
    triton_attention.varlen_prefill(qp, k_pool, v_pool, ptables, layout, context, scale, None, op)
    wantp = torch.zeros(qp.shape, dtype=torch.float64, device=device)
    reference.varlen_prefill(
        qp.double(), k_pool.double(), v_pool.double(), ptables, layout, scale, None, wantp
    )
    out["prefill_rel_err"] = _rel_err(op, wantp.cpu())
    out["prefill_us"] = bench(
        lambda: triton_attention.varlen_prefill(qp, k_pool, v_pool, ptables, layout, context, scale, None, op)
    )
    scratch = torch.empty_like(qp)
    out["prefill_reference_us"] = bench(
        lambda: reference.varlen_prefill(qp, k_pool, v_pool, ptables, layout, scale, None, scratch)
    )
    return out


def kernels(tiny: bool) -> dict:
    from gpu_models import SHAPES
    from gpu_models import TINY as TINY_SHAPES

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bench = timer(device, repeats=1 if tiny else 5)
    shape = (TINY_SHAPES if tiny else SHAPES)["llama-1b"]
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": "llama-1b"}
    out["copy_bytes_per_s"] = copy_bandwidth(device, (64 << 20) if tiny else (512 << 20), bench)
    print(f"copy bandwidth: {out['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + written)", flush=True)
    with torch.inference_mode():
        decode_rows = 4 if tiny else 32
        prompts, length = (2, 16) if tiny else (8, 512)
        out["lora_decode"] = lora_layer(shape, device, dtype, bench, True, decode_rows, decode_rows)
        out["lora_prefill"] = lora_layer(shape, device, dtype, bench, False, prompts * length, prompts)
        for key in ("lora_decode", "lora_prefill"):
            f = out[key]
            print(
                f"{key}: LoRA {f['lora_us']:.1f} µs / base {f['base_us']:.1f} µs = {f['fraction']:.3f} "
                f"(rel err {f['rel_err']:.1e})",
                flush=True,
            )
        out["attention"] = attention(shape, device, dtype, bench, decode_rows, 32 if tiny else 512, prompts)
        a = out["attention"]
        print(
            f"attention: decode {a['decode_us']:.1f} µs (reference {a['decode_reference_us']:.1f}), prefill "
            f"{a['prefill_us']:.1f} µs (reference {a['prefill_reference_us']:.1f})",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["decode", "ttft", "kernels"])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="small sizes (the CPU dry run)")
    args = ap.parse_args()
    sizes = TINY if args.tiny else FULL
    if args.stage == "kernels":
        result = kernels(args.tiny)
    else:
        if args.model is None:
            ap.error(f"{args.stage} needs --model")
        result = (decode if args.stage == "decode" else ttft)(
            args.model, args.label or args.model.name, sizes
        )
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
