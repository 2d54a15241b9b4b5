#!/usr/bin/env bash
# hotlora's CUDA path on a lent GPU, in one command (docs/gpu.md):
#
#   deploy/gpu/device-check.sh                 # on the device image (Python 3.12, torch 2.11 + CUDA 13,
#                                              # triton 3.6, no network), .whl/ carried beside the code
#   deploy/gpu/device-check.sh --cpu-dry-run   # here: every stage on the CPU with tiny sizes (CI runs it)
#
# Stages, each with its own time limit and one PASS/FAIL/SKIP line; logs and figures.json under $OUT:
#   setup    install from .whl/ what the image lacks (never torch or triton: the image's CUDA builds),
#            map `hotlora` onto this checkout, generate the gRPC stubs, check the imports and the GPU
#   models   random-weight model directories: the default model's shapes and Llama-3.2-1B's
#   decode   (b) engine decode N=1/8/32/64, base and 32 rank-16 adapters, CUDA graphs on and off, per model
#   ttft     (c) time to first token of a 512-token prompt, per model
#   kernels  (d) copy bandwidth, LoRA per layer against the base GEMMs (32 decode rows, 8x512 prefill),
#            the paged-attention kernels against their torch reference
#   tests    (a) the tests marked gpu and the Triton kernel tests, compiled for real
# The whole run stops starting stages after TOTAL_S seconds (8 minutes with the stages' own limits).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--cpu-dry-run]" >&2; exit 2 ;;
esac

if [ "$DRY" = 1 ]; then
  TOTAL_S=${TOTAL_S:-1800}
  SCALE=${SCALE:-4}  # a busy CI machine: the limits are the device's, the dry run proves the stages run
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  OUT=${OUT:-$(mktemp -d -t hotlora-dry-run-XXXX)}
  WORK=${WORK:-$(mktemp -d -t hotlora-dry-work-XXXX)}
  TINY=--tiny
  export TRITON_INTERPRET=1
else
  PY=${PYTHON:-python3}
  OUT=${OUT:?"OUT: the folder the device call brings back"}
  WORK=${WORK:-/tmp/hotlora-device-check}
  TINY=
  TOTAL_S=${TOTAL_S:-450}
  SCALE=1
  export TRITON_INTERPRET=0
fi
mkdir -p "$OUT" "$WORK/figures"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
: > "$WORK/stages.tsv"
START=$(date +%s)

say() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME LIMIT_S LOG COMMAND...: runs COMMAND with its time limit (and what is left of TOTAL_S),
# output appended to $OUT/LOG; one line says how it went
stage() {
  local name=$1 limit=$2 log=$OUT/$3
  shift 3
  local left=$((TOTAL_S - ($(date +%s) - START)))
  limit=$((limit * SCALE))
  if [ "$left" -lt 10 ]; then
    say "SKIP $name: the run's $TOTAL_S s are spent"
    printf '%s\tskipped\t0\n' "$name" >> "$WORK/stages.tsv"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0 rc
  t0=$(date +%s)
  echo "=== $name (limit ${limit} s): $*" >> "$log"
  timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >> "$log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0))
  if [ "$rc" = 0 ]; then
    say "PASS $name (${took} s)"
    printf '%s\tpassed\t%s\n' "$name" "$took" >> "$WORK/stages.tsv"
    return 0
  fi
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    say "FAIL $name: over its ${limit} s limit (log: $(basename "$log"))"
  else
    say "FAIL $name: exit $rc after ${took} s (log: $(basename "$log"); its last lines:)"
    tail -n 5 "$log" | sed 's/^/    /' | tee -a "$SUMMARY"
  fi
  printf '%s\tfailed\t%s\n' "$name" "$took" >> "$WORK/stages.tsv"
  return 1
}

setup() {
  "$PY" deploy/gpu/wheels.py install --wheels "$ROOT/.whl" --target "$WORK/site" || return 1
  "$PY" deploy/gpu/wheels.py shim --target "$WORK/site" || return 1
  if [ ! -f gen/hotlora/v1/.generated ]; then make --no-print-directory proto PY="$PY" || return 1; fi
  "$PY" - "$DRY" <<'EOF'
import sys

import torch
import triton

import hotlora
import hotlora.server.assembly  # noqa: F401 -- the whole server imports
from hotlora.kernels import triton_attention  # noqa: F401

dry = sys.argv[1] == "1"
print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, "triton",
      triton.__version__, "hotlora:", hotlora.__file__, "->", hotlora.__path__[0])
if not dry:
    assert torch.cuda.is_available(), "no CUDA device visible to torch"
    print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory >> 30, "GiB")
EOF
}

tests() {
  local gpu_files kernel_files run=(-rs) parallel=()
  gpu_files=$(grep -rl "pytest.mark.gpu" tests --include='test_*.py' | sort)
  kernel_files="$(ls tests/kernels/test_triton_*.py) tests/kernels/test_plan_from_host.py"
  kernel_files+=" tests/server/test_triton_attention_engine.py tests/server/test_device_sampling.py"
  if [ "$DRY" = 1 ]; then
    run=(--collect-only)  # the plumbing: the same tests collect (CI runs them itself, interpreted)
  elif "$PY" -c "import xdist" 2>/dev/null; then
    parallel=(-n 8)  # compiling the kernels' variants is most of the time: in parallel
  fi
  local rc=0
  # shellcheck disable=SC2086 -- the file lists are words
  "$PY" -m pytest -q -p no:cacheprovider "${run[@]}" "${parallel[@]}" -m gpu $gpu_files || rc=1
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -p no:cacheprovider "${run[@]}" "${parallel[@]}" $kernel_files || rc=1
  return $rc
}

models() { "$PY" benchmarks/gpu_models.py --dir "$WORK/models" $TINY; }

figure() {  # figure STAGE MODEL: benchmarks/gpu_check.py STAGE on one model
  (cd benchmarks && "$PY" gpu_check.py "$1" --model "$WORK/models/$2" --label "$2" \
    --out "$WORK/figures/$1-$2.json" $TINY)
}

kernels() { (cd benchmarks && "$PY" gpu_check.py kernels --out "$WORK/figures/kernels.json" $TINY); }

export -f setup tests models figure kernels
export PY ROOT OUT WORK DRY TINY
say "hotlora device check $( [ "$DRY" = 1 ] && echo '(CPU dry run)' ) at $(git rev-parse --short HEAD 2>/dev/null || echo "a checkout without .git"), $(date -u +%FT%TZ)"
# the goals' stages first (the ~1B model), the default model's last: what a short lease must not miss
if stage setup 120 setup.log setup; then
  if stage models 90 models.log models; then
    stage "decode llama-1b" 200 decode.log figure decode llama-1b
    stage "ttft llama-1b" 60 ttft.log figure ttft llama-1b
  fi
  stage kernels 120 kernels.log kernels
  stage tests 200 tests.log tests
  if [ -d "$WORK/models/default" ]; then
    stage "decode default" 200 decode.log figure decode default
    stage "ttft default" 60 ttft.log figure ttft default
  fi
fi
"$PY" deploy/gpu/figures.py --figures "$WORK/figures" --stages "$WORK/stages.tsv" --out "$OUT/figures.json" \
  | tee -a "$SUMMARY"
TAB=$'\t'
failed=$(grep -c -v "${TAB}passed${TAB}" "$WORK/stages.tsv")
say "device check: $(grep -c "${TAB}passed${TAB}" "$WORK/stages.tsv") stages passed, $failed not, in $(($(date +%s) - START)) s; logs and figures.json in $OUT"
[ "$failed" = 0 ]
