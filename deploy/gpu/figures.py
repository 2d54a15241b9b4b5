"""One JSON of the device check's figures (deploy/gpu/device-check.sh), with the goals of issue 36 computed
from them and a short table printed:

- mixed/base at N=32 on the ~1B model (32 distinct rank-16 adapters against the base, CUDA graphs): >= 0.9
- N=1 decode as a fraction of the memory-bandwidth limit on the ~1B model: tok/s x the weight bytes a
  token reads / the measured copy bandwidth (bytes read + written a second): >= 0.5
- LoRA per layer as a fraction of the base GEMMs at 32 decode rows (the 1B shape): <= 0.10
- the CUDA-graph decode step against eager at N=1 on the ~1B model (tok/s ratio): >= 1.5

A figure whose stage did not run is null, and its goal "not measured". In a dry run (tiny sizes) the
largest N measured stands in for 32, and the numbers say only that the stages run.

    python deploy/gpu/figures.py --figures DIR --stages stages.tsv --out figures.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GOAL_MODEL = "llama-1b"


def load(figures: Path) -> dict:
    out = {}
    for path in sorted(figures.glob("*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


def stages(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, seconds = line.split("\t")
        rows.append({"stage": name, "status": status, "seconds": int(seconds)})
    return rows


def goals(figs: dict) -> list[dict]:
    decode = figs.get(f"decode-{GOAL_MODEL}", {})
    tok = decode.get("tok_s", {})
    kernels = figs.get("kernels", {})
    ns = sorted({int(k.split("_")[0][1:]) for k in tok})
    n = 32 if 32 in ns else (ns[-1] if ns else None)

    def ratio(a, b):
        return a / b if a is not None and b else None

    bandwidth = kernels.get("copy_bytes_per_s")
    limit = ratio(bandwidth, decode.get("weight_bytes"))  # tokens a second the copy rate allows
    mixed = ratio(tok.get(f"n{n}_mixed_graphs"), tok.get(f"n{n}_base_graphs"))
    graphs = ratio(tok.get("n1_base_graphs"), tok.get("n1_base_eager"))
    rows = [
        (f"mixed/base decode, N={n}", mixed, ">=", 0.9),
        ("N=1 decode / bandwidth limit", ratio(tok.get("n1_base_graphs"), limit), ">=", 0.5),
        ("LoRA / base GEMMs per layer, decode", kernels.get("lora_decode", {}).get("fraction"), "<=", 0.10),
        ("CUDA-graph / eager decode, N=1", graphs, ">=", 1.5),
    ]
    out = []
    for name, value, op, target in rows:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"goal": name, "value": value, "target": f"{op} {target}", "met": met})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--figures", type=Path, required=True)
    ap.add_argument("--stages", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    figs = load(args.figures)
    result = {"stages": stages(args.stages), "goals": goals(figs), "figures": figs}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"goals on {GOAL_MODEL}:")
    for g in result["goals"]:
        value = "not measured" if g["value"] is None else f"{g['value']:.3f}"
        verdict = {True: "met", False: "NOT MET", None: ""}[g["met"]]
        print(f"  {g['goal']:40s} {value:>13s}  (goal {g['target']}) {verdict}")
    for name, f in sorted(figs.items()):
        if name.startswith("ttft-"):
            print(f"  TTFT {f['prompt_tokens']} tokens, {f['model']:31s} {f['ttft_s'] * 1e3:10.1f} ms")


if __name__ == "__main__":
    main()
