"""Kernel tests run the Triton kernels under the Triton interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined; hotlora.kernels imports its
Triton modules lazily (when a TritonBackend is made), so setting it here, at collection, is early enough.
The CPU-path tests do not use Triton and are unaffected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
