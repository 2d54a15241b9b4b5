"""CPU time per generated token at one stream on one thread: hotlora next to llama.cpp's llama-server, a
figure of the per-step cost that a busy shared machine does not swamp (its wall-clock rates do: at a load of
6 on 2 cores, a 2-thread decode falls from ~100 to ~2 tok/s, its two OpenMP threads waiting for each other
at every parallel region of a step).

    cd <checkout> && .venv/bin/python benchmarks/cpu_per_token.py hotlora llama-q4_1 [--label L] [--json F]

Each system is started as the peer kit starts it (`../shared/peers/compare.py`, imported: the same model,
prompts, greedy decoding, 32 new tokens with `ignore_eos`, hotlora from this checkout's `.venv/bin/hotlora`),
with one compute thread (OMP_NUM_THREADS=1; llama.cpp's THREADS=1). After two unmeasured requests, REQUESTS
requests run one after another on the base model, then on one adapter; the CPU time (user + system) of the
server's whole process group is read from /proc before and after. Printed: CPU ms per token and tokens per
CPU second (what one idle core would give), with the wall-clock rate of the same requests beside them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KIT = os.environ.get("PEERS_KIT", os.path.join(HERE, "..", "..", "..", "shared", "peers"))  # the team's kit
REQUESTS = int(os.environ.get("REQUESTS", "8"))


def load_kit():
    path = os.path.join(KIT, "compare.py")
    if not os.path.exists(path):
        raise SystemExit(f"no peer kit at {KIT} (set PEERS_KIT to the folder of compare.py)")
    spec = importlib.util.spec_from_file_location("peer_compare", path)
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    return kit


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group `pgid` (its threads included)."""
    ticks = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
        if int(fields[2]) == pgid:  # field 5: process group
            ticks += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("systems", nargs="+", help="compare.py's system names (hotlora, llama-q4_1, ...)")
    ap.add_argument("--label", default="", help="a name for this checkout's hotlora (before, after)")
    ap.add_argument("--json", help="also write the rows there")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # the servers inherit it (torch's and the C kernels' pool)
    os.environ["THREADS"] = "1"  # start-llama.sh's -t
    kit = load_kit()
    kit.NS = [1]  # llama.cpp: one slot
    rows = []

    def bench(name, gen, adapters):
        server = kit._running[-1]
        gen(kit.PROMPTS[0], None, kit.NEW)  # unmeasured
        gen(kit.PROMPTS[1], adapters[1], kit.NEW)
        for kind, adapter in (("base", None), ("adapter", adapters[1])):
            cpu0, t0, tokens = group_cpu_seconds(server.pid), time.perf_counter(), 0
            for i in range(REQUESTS):
                tokens += gen(kit.PROMPTS[2 + i], adapter, kit.NEW)[0]
            wall, cpu = time.perf_counter() - t0, group_cpu_seconds(server.pid) - cpu0
            row = {
                "system": f"{name} ({args.label})" if args.label and name == "hotlora" else name,
                "kind": kind,
                "tokens": tokens,
                "cpu_ms_per_token": 1000 * cpu / tokens,
                "tokens_per_cpu_s": tokens / cpu,
                "wall_tok_s": tokens / wall,
                "loadavg": os.getloadavg()[0],
            }
            rows.append(row)
            print(
                f"  {row['system']:24s} {kind:7s} {row['cpu_ms_per_token']:6.2f} CPU ms/token  "
                f"{row['tokens_per_cpu_s']:6.1f} tok/CPU-s  wall {row['wall_tok_s']:6.1f} tok/s  "
                f"load {row['loadavg']:.2f}",
                flush=True,
            )
        return []

    kit.bench = bench
    kit.ttft = lambda name, gen: {}
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.2f}")
    try:
        for system in args.systems:
            kit.RUNNERS[system](2)
    finally:
        kit.stop_all()
    print("\n| system | requests | CPU ms/token | tokens per CPU second | wall tok/s | load |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['system']} | {r['kind']} | {r['cpu_ms_per_token']:.2f} | {r['tokens_per_cpu_s']:.1f} | "
            f"{r['wall_tok_s']:.1f} | {r['loadavg']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
