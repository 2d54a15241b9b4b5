"""The 1B workload's figures (benchmarks/workload_1b.py made it), by the peer kit's own protocol: its
compare.py measures each system one at a time -- 32 new tokens per request with ignore_eos, greedy, its
prompts, N concurrent requests on the base and on N distinct adapters, TTFT of a 512-token prompt (here 512
tokens under the 1B's Llama 3 tokenizer) -- and this script adds what the 1B needs: which file or
checkpoint each system serves, resident memory, and the N=1 decode against the memory-bandwidth limit.

    NS=1,8,32 .venv/bin/python benchmarks/compare_1b.py                 # the default systems, in turn
    NS=1,8,32 .venv/bin/python benchmarks/compare_1b.py hotlora-q4_0 llama-q4_0

Systems: hotlora-{f16,q8_0,q4_0,q4_k_m} (`--model` the GGUF file), hotlora-quantize-{q8_0,q4_0,q4_k}
(`--model hf/ --quantize ...`), llama-{f16,q8_0,q4_0,q4_k_m} (llama-server on the same files, the kit's
start-llama.sh), vllm-bf16 (the kit's vLLM on hf/). env: ONEB_DIR (/tmp/hotlora-1b), KIT
(/work/shared/peers), NS, OUT_JSON (the results as JSON), HOTLORA_EXTRA (more `hotlora serve` flags).
Prints the kit's table, then the ratios the issue asks for, with the load average at start and end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

ONEB = Path(os.environ.get("ONEB_DIR", "/tmp/hotlora-1b"))
KIT = Path(os.environ.get("KIT", "/work/shared/peers"))
os.environ["PEERS_DIR"] = str(ONEB)  # the kit's scripts read the 1B's adapters, files and model dir there
os.environ.setdefault("LOG_DIR", str(ONEB / "logs"))

GGUF = {k: ONEB / "models" / f"1b-{k}.gguf" for k in ("f16", "q8_0", "q4_0", "q4_k_m")}
DEFAULT = [
    "llama-q4_0", "hotlora-q4_0", "llama-q8_0", "hotlora-q8_0", "llama-q4_k_m", "hotlora-q4_k_m",
    "hotlora-quantize-q4_0", "vllm-bf16",
]  # fmt: skip


def _kit():
    spec = importlib.util.spec_from_file_location("peer_compare", KIT / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


compare = _kit()
rss: dict[int, int] = {}  # pid -> peak resident bytes seen before it was stopped


def _ttft_prompt_512(tag: object) -> str:
    """512 tokens (BOS included) under the 1B's tokenizer, the tag first: no prefix cache can serve it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ONEB / "hf"))
    body = " ".join(
        f"Line {j}: the parcel for order {1000 + j} left the depot and should arrive within two days."
        for j in range(40)
    )
    text = f"Run {tag}. Summarize the shipping log below in one sentence.\n{body}"
    ids = tok(text, add_special_tokens=False).input_ids
    for keep in range(508, 500, -1):  # decode/encode may merge at the cut: find the cut that gives 511
        cut = tok.decode(ids[:keep]) + "\nSummary:"
        if len(tok(cut).input_ids) == 512:
            return cut
    raise RuntimeError("no 512-token prompt")


def _resident(pid: int) -> int:
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().split(") ")[1].split()[1]) == pid:
                    out += [int(d.name), *_children(int(d.name))]
            except (OSError, IndexError, ValueError):
                pass
    return out


_real_stop = compare.stop


def _stop_measuring(proc) -> None:
    rss[proc.pid] = max(rss.get(proc.pid, 0), _resident(proc.pid))
    _real_stop(proc)


_real_start = compare.start


def _start(cmd, log_name: str, env=None):
    # the kit names llama-server's log after its BASE argument, here a file's path
    return _real_start(cmd, log_name.replace("/", "_"), env)


compare.stop = _stop_measuring
compare.start = _start
compare.ttft_prompt = _ttft_prompt_512


def _hotlora(args: str):
    def run(n):
        os.environ["HOTLORA_ARGS"] = f"{args} {os.environ.get('HOTLORA_EXTRA', '')}"
        return compare.run_hotlora(n)

    return run


def _llama(path: Path):
    return lambda n: compare.run_llama(n, str(path))


SYSTEMS = {
    **{f"hotlora-{k}": _hotlora(f"--model {p}") for k, p in GGUF.items()},
    **{
        f"hotlora-quantize-{k}": _hotlora(f"--model {ONEB / 'hf'} --quantize {k}")
        for k in ("q8_0", "q4_0", "q4_k")
    },
    **{f"llama-{k}": _llama(p) for k, p in GGUF.items()},
    "vllm-bf16": lambda n: compare.run_vllm(n, "bfloat16"),
}


def read_bandwidth() -> float:
    """Bytes a second this machine reads from memory: the best of 5 sums over 1 GiB, torch's threads."""
    import torch

    t = torch.ones(1 << 28)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        float(t.sum())
        best = max(best, t.numel() * 4 / (time.perf_counter() - t0))
    return best


def hotlora_weight_bytes() -> int | None:
    """The weights' bytes the last hotlora server logged (its runner line)."""
    log = Path(os.environ["LOG_DIR"]) / "compare-hotlora.log"
    found = re.findall(r"weights (\d+) MiB", log.read_text(errors="replace")) if log.is_file() else []
    return int(found[-1]) << 20 if found else None


def main() -> int:
    names = sys.argv[1:] or DEFAULT
    bad = [s for s in names if s not in SYSTEMS]
    if bad:
        print(f"unknown systems {bad}; one of {', '.join(SYSTEMS)}")
        return 2
    for p in (ONEB / "hf", ONEB / "adapters", *GGUF.values()):
        if not p.exists():
            print(f"missing {p}: run benchmarks/workload_1b.py first")
            return 2
    n_adapters = max(max(compare.NS), 2)
    load0 = os.getloadavg()
    bandwidth = read_bandwidth()
    print(
        f"1B workload {ONEB}  NS={compare.NS}  load average {load0[0]:.2f}  "
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    results, failed = {}, []
    try:
        for s in names:
            print(f"\n== {s}", flush=True)
            before = set(rss)
            try:
                rows, ttft = SYSTEMS[s](n_adapters)
            except Exception as e:  # report, go on with the next system (the kit's way)
                failed.append(s)
                print(f"  {s} FAILED: {e}", flush=True)
                continue
            pids = set(rss) - before
            results[s] = {
                "rows": rows,
                "ttft_s": ttft["median_s"],
                "prompt_tokens": ttft["prompt_tokens"],
                "resident_bytes": max((rss[p] for p in pids), default=0),
                "weight_bytes": hotlora_weight_bytes() if s.startswith("hotlora") else None,
            }
    finally:
        compare.stop_all()
    load1 = os.getloadavg()
    print_table(results, bandwidth)
    print(f"\nload average: {load0[0]:.2f} at start, {load1[0]:.2f} at end")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    if os.environ.get("OUT_JSON"):
        Path(os.environ["OUT_JSON"]).write_text(json.dumps(
            {"results": results, "bandwidth": bandwidth, "load": [load0, load1], "ns": compare.NS}, indent=1
        ))  # fmt: skip
    return 1 if failed else 0


def print_table(results: dict, bandwidth: float) -> None:
    print("\n| system | N | base tok/s | mixed tok/s | mixed/base |")
    print("|---|---|---|---|---|")
    for s, r in results.items():
        for row in r["rows"]:
            print(f"| {s} | {row['n']} | {row['base_tok_s']:.1f} | {row['mixed_tok_s']:.1f} | "
                  f"{row['mixed_over_base']:.2f} |")  # fmt: skip
    print(
        "\n| system | TTFT ms (prompt tokens) | resident GiB | weights GiB | N=1 base: GB/s read, of limit |"
    )
    print("|---|---|---|---|---|")
    for s, r in results.items():
        n1 = next((row for row in r["rows"] if row["n"] == 1), None)
        weights = r["weight_bytes"]
        if s.startswith("llama-"):
            weights = GGUF[s.split("-", 1)[1]].stat().st_size
        bw = ""
        if n1 and weights:
            read = weights * n1["base_tok_s"]
            bw = f"{read / 1e9:.1f} GB/s, {read / bandwidth:.2f}"
        gib = f"{weights / 2**30:.2f}" if weights else ""
        ttft = f"{r['ttft_s'] * 1000:.0f} ({r['prompt_tokens']})"
        print(f"| {s} | {ttft} | {r['resident_bytes'] / 2**30:.2f} | {gib} | {bw} |")
    ratios(results)


def _at(results, s, n, key="base_tok_s"):
    row = next((row for row in results.get(s, {}).get("rows", []) if row["n"] == n), None)
    return row[key] if row else None


def ratios(results: dict) -> None:
    print("\nGoals (issue #35):")
    for k in ("q4_0", "q8_0", "q4_k_m"):
        ours, theirs = _at(results, f"hotlora-{k}", 1), _at(results, f"llama-{k}", 1)
        if ours and theirs:
            print(
                f"  N=1 base, {k}: hotlora / llama.cpp on the same file = {ours / theirs:.2f} (goal >= 1.0)"
            )
    peers = [s for s in results if not s.startswith("hotlora")]
    ours = [s for s in results if s.startswith("hotlora")]
    n = max((row["n"] for r in results.values() for row in r["rows"]), default=None)
    if peers and ours and n:
        for key, goal in (("base_tok_s", 1.5), ("mixed_tok_s", 3.0)):
            best_peer = max(peers, key=lambda s: _at(results, s, n, key) or 0)
            best = max(ours, key=lambda s: _at(results, s, n, key) or 0)
            ratio = _at(results, best, n, key) / _at(results, best_peer, n, key)
            print(
                f"  N={n} {key.split('_')[0]}: {best} / best peer {best_peer} = {ratio:.2f} (goal >= {goal})"
            )
        for s in ours:
            if _at(results, s, n):
                print(f"  N={n} mixed/base {s}: {_at(results, s, n, 'mixed_over_base'):.2f} (goal >= 0.8)")
        best_ttft = min(peers, key=lambda s: results[s]["ttft_s"])
        for s in ours:
            ratio = results[s]["ttft_s"] / results[best_ttft]["ttft_s"]
            print(f"  TTFT {s} / best peer {best_ttft}: {ratio:.2f} (goal <= 0.7)")


if __name__ == "__main__":
    sys.exit(main())
