"""Batched multi-adapter LoRA math: Triton SGMV/BGMV kernels, a pure-torch reference, the CPU path.

Imports torch only at import time; triton is imported when a TritonBackend is created.

Mixed ranks: per-slot rank (as S-LoRA), not rank buckets. Each slot's real rank travels in every plan's
``slot_ranks``; the Triton kernels read it per slot and bound their rank loops/blocks by it, the CPU path
slices ``A[s, :r_s]``. Buckets would need one bank and one launch per bucket and move adapters between
banks when ranks change; a per-slot bound costs one scalar load and keeps a single padded bank per layer.
"""

from .backend import CpuBackend, LoraBackend, TorchReferenceBackend, TritonBackend, get_backend
from .cpu_plan import CpuPlan, CpuRoute, SegmentPlan
from .plan import LoraPlan
from .reference import add_lora_packed_reference, add_lora_reference, expand_reference, shrink_reference
from .triton_plan import RowsPlan, SgmvPlan

__all__ = [
    "CpuBackend",
    "CpuPlan",
    "CpuRoute",
    "LoraBackend",
    "LoraPlan",
    "RowsPlan",
    "SegmentPlan",
    "SgmvPlan",
    "TorchReferenceBackend",
    "TritonBackend",
    "add_lora_packed_reference",
    "add_lora_reference",
    "expand_reference",
    "get_backend",
    "shrink_reference",
]
