"""fp32 activations times bf16-stored weights on AVX-512 CPUs without avx512_bf16 (`--weight-dtype bfloat16`).

There oneDNN emulates bf16 and runs 2-7x slower than fp32, so bf16 *compute* is no option; but a decode step
is bound by the bytes of weights it reads, and bf16 *storage* halves them. `csrc/bf16_weights.c` widens the
weights to fp32 in registers and accumulates in fp32 (benchmarks/bf16_weights.py measures it against torch's
fp32 GEMM). The C source is compiled on first use with the system C compiler into the user cache directory,
keyed by a hash of the source and flags, and loaded with ctypes.

At and above `WIDEN_ROWS` rows (long prefill chunks, where the GEMM is compute-bound and MKL's fp32 kernel is
faster than this one), and whenever autograd needs a gradient through the product (on-line training), the
weight is widened to fp32 and torch runs the GEMM.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("csrc") / "bf16_weights.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp", "-shared", "-fPIC")
NEEDED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "fma")
# Rows of x from which torch's fp32 GEMM on a widened copy beats the kernel (measured at 128: 0.97x,
# at 512: 0.62x, single thread, SmolLM2 shapes).
WIDEN_ROWS = 256
# Below this many multiply-adds one thread does it: waking a second one costs more than it saves.
PARALLEL_FROM = 1 << 16


class Unavailable(RuntimeError):
    """This machine cannot run the kernel; the message says why."""


def unavailable_reason() -> str | None:
    """None when the kernel can run here; otherwise what is missing."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "the CPU's flags cannot be read from /proc/cpuinfo"
    missing = [f for f in NEEDED_CPU_FLAGS if f not in flags]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C compiler (cc, gcc or $CC) to build the kernel"
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight.float(), bias)` for fp32 `x` [..., K] and a bf16 `weight` [N, K]."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows >= WIDEN_ROWS or rows == 0 or (x.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, weight.float(), bias)
    if x.dtype != torch.float32 or weight.dtype != torch.bfloat16:
        raise TypeError(f"expected float32 x and bfloat16 weight, got {x.dtype} and {weight.dtype}")
    n, k = weight.shape
    x2 = x.reshape(rows, k).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.empty(rows, n, dtype=torch.float32)
    status = _library().hotlora_linear_bf16w(
        x2.data_ptr(),
        rows,
        k,
        w.data_ptr(),
        n,
        y.data_ptr(),
        None if b is None else b.data_ptr(),
        torch.get_num_threads() if rows * n * k >= PARALLEL_FROM else 1,
    )
    if status != 0:
        raise MemoryError(f"bf16-weight linear: no scratch memory for {rows} x {k}")
    return y.view(*x.shape[:-1], n)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hotlora" / "kernels"


@functools.cache
def _library() -> ctypes.CDLL:
    why = unavailable_reason()
    if why is not None:
        raise Unavailable(f"--weight-dtype bfloat16 cannot run here: {why}")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"bf16_weights-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # built beside the target, then renamed: a process building at the same time never loads half a file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run(
                [_compiler(), *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise Unavailable(f"building {SOURCE.name} failed:\n{done.stderr.strip()}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    fn = lib.hotlora_linear_bf16w
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib
