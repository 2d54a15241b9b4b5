"""The interface the multi-LoRA layers call, with a reference, a CPU and a Triton implementation.

Once per forward pass the caller asks the backend for its plan, ``plan = backend.plan(token_slots,
slot_ranks)`` (or ``backend.graph_plan(...)`` for a decode step captured as a CUDA graph); then every site
applies it: the runner's fused projections through the site bound once to their banks
(``site = backend.bind_packed(a, bs, scales, offsets)``, then ``site(y2d, x2d, plan)`` a step), the wrapped
nn.Linear layers of the transformers path through ``backend.add_lora(y2d, x2d, bank.a, bank.b, bank.scales,
plan)``. Each backend plans only what it reads (as vLLM's ``LoRAKernelMeta``; the CPU's plan also carries
the step's route, decided there once), and the layers never call a kernel directly. :func:`get_backend`
picks the implementation for a device: Triton on CUDA when triton imports, the CPU path otherwise.
"""

from __future__ import annotations

import abc

import torch

from . import native
from .cpu import add_lora_cpu, add_lora_packed_cpu
from .cpu_plan import CpuPlan, CpuRoute, plan_cpu
from .plan import LoraPlan, check_graph_plan_args, graph_slots_plan, plan_slots
from .reference import add_lora_reference
from .triton_plan import RowsPlan, SgmvPlan, plan_rows, plan_sgmv
from .validation import check_add_lora_args, check_same_device


class LoraBackend(abc.ABC):
    """Adds the batched multi-adapter LoRA update to a layer's output."""

    #: the plan types add_lora accepts (what plan and graph_plan return)
    plan_types: tuple[type[LoraPlan], ...] = (LoraPlan,)
    #: whether banks may be bf16 under fp32 x and y (else x, y and banks share one dtype)
    bf16_banks: bool = False
    #: whether the layers should store B rank-major (storage [S, R, H_out], passed as the [S, H_out, R]
    #: transposed view; any backend reads either, this is the one it is fastest on)
    rank_major_b: bool = False

    @abc.abstractmethod
    def plan(self, token_slots: torch.Tensor, slot_ranks: torch.Tensor, device=None) -> LoraPlan:
        """The plan of one forward pass, shared by every layer. token_slots: [T] int64 (slot per token,
        -1 = base only), on the host (the engine's slot list: nothing is read back from the device) or on
        the compute device (read back once); slot_ranks: [S] int64, real rank per slot (0 = empty);
        device: where the plan's tensors live (None: token_slots' device)."""

    @abc.abstractmethod
    def graph_plan(self, token_slots: torch.Tensor, slot_ranks: torch.Tensor, max_rank: int) -> LoraPlan:
        """The plan of a decode step with static shapes (server.runner.decode_graphs), called with the
        step's slot buffer before its forward runs. token_slots: [T] int64 and slot_ranks: [S] int64, on one
        device; max_rank: the bank's R_max."""

    @abc.abstractmethod
    def add_lora(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scales: torch.Tensor,
        batch: LoraPlan,
        out_offset: int = 0,
    ) -> None:
        """y[t, off:off+H_out] += scales[s] * (x[t] @ lora_a[s, :r_s]ᵀ) @ lora_b[s, :, :r_s]ᵀ for s = slot of token t (skip s = -1).
        y: [T, H_out_total] (in place), x: [T, H_in], lora_a: [S, R_max, H_in], lora_b: [S, H_out, R_max],
        scales: [S] float32. Entries of lora_a/lora_b beyond a slot's rank are zero-padded but must not be paid for."""  # noqa: E501

    def add_lora_packed(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_bs: tuple[torch.Tensor, ...],
        scales: torch.Tensor,
        batch: LoraPlan,
        out_offsets: tuple[int, ...],
    ) -> None:
        """A fused projection (qkv, gate_up): slice i of the packed bank updates y's columns
        [off_i, off_i + H_i): ``y[t, off_i:] += scales[i, s] · (x[t] · A[s, iR:iR+r_s]ᵀ) · B_i[s, :, :r_s]ᵀ``.
        lora_a: [S, n·R, H_in], lora_bs: n x [S, H_i, R], scales: [n, S] float32, out_offsets: n ints.
        This default runs one add_lora per slice on views of the bank; backends override it to shrink once."""
        r_max = self.check_packed(lora_a, lora_bs, scales, out_offsets)
        for i, (b, off) in enumerate(zip(lora_bs, out_offsets, strict=True)):
            self.add_lora(y, x, lora_a[:, i * r_max : (i + 1) * r_max], b, scales[i], batch, off)

    def bind_packed(self, lora_a, lora_bs, scales, out_offsets) -> PackedSite:
        """add_lora_packed for one site whose banks stay these tensors (written in place, never replaced),
        checked once here: a backend may work out once what depends only on the banks."""
        self.check_packed(lora_a, lora_bs, scales, out_offsets)
        return PackedSite(self, lora_a, tuple(lora_bs), scales, tuple(out_offsets))

    @staticmethod
    def check_packed(lora_a, lora_bs, scales, out_offsets) -> int:
        """Shapes of a packed call that add_lora's checks do not see; returns R (rank rows per slice)."""
        n = len(lora_bs)
        if n < 1 or len(out_offsets) != n:
            raise ValueError(f"one output offset per B slice: got {len(out_offsets)} offsets for {n} slices")
        if lora_a.dim() != 3 or lora_a.shape[1] % n:
            raise ValueError(f"lora_a {tuple(lora_a.shape)} does not hold {n} equal slices of rank rows")
        if scales.shape != (n, lora_a.shape[0]) or scales.dtype != torch.float32:
            raise ValueError(
                f"scales must be [n={n}, S={lora_a.shape[0]}] float32, "
                f"got {tuple(scales.shape)} {scales.dtype}"
            )
        return lora_a.shape[1] // n

    def check_plan(self, batch: LoraPlan) -> None:
        """A plan from another backend lacks what this one reads: refuse it by type (TypeError)."""
        if not isinstance(batch, self.plan_types):
            wanted = " or ".join(t.__name__ for t in self.plan_types)
            raise TypeError(
                f"{type(self).__name__} needs a {wanted} (from its own plan/graph_plan), "
                f"got {type(batch).__name__}"
            )

    def check(self, y, x, lora_a, lora_b, scales, batch: LoraPlan, out_offset: int) -> None:
        """Shapes, dtypes and devices of one call, against the plan (ValueError on a mismatch)."""
        self.check_plan(batch)
        check_add_lora_args(y, x, lora_a, lora_b, scales, batch.num_tokens, out_offset, self.bf16_banks)
        check_same_device(x.device, y=y, lora_a=lora_a, lora_b=lora_b, scales=scales)
        if isinstance(batch, RowsPlan) and batch.slot_ranks.device != x.device:
            raise ValueError("a rows plan's slot_ranks must live on the compute device")
        if batch.slot_ranks.shape[0] != lora_a.shape[0]:
            raise ValueError(
                f"the batch was built for {batch.slot_ranks.shape[0]} slots, "
                f"but the bank has {lora_a.shape[0]}"
            )
        if batch.max_rank > lora_a.shape[1]:
            raise ValueError(
                f"the batch uses rank {batch.max_rank} but the bank holds at most {lora_a.shape[1]}"
            )


class TorchReferenceBackend(LoraBackend):
    """The fp32 oracle (kernels.reference): slow, obviously right; for tests and debugging.
    It reads only the slots, so it accepts any backend's plan."""

    def plan(self, token_slots, slot_ranks, device=None) -> LoraPlan:
        return plan_slots(token_slots if device is None else token_slots.to(device), slot_ranks)

    def graph_plan(self, token_slots, slot_ranks, max_rank) -> LoraPlan:
        return graph_slots_plan(token_slots, slot_ranks, max_rank)

    def add_lora(self, y, x, lora_a, lora_b, scales, batch, out_offset=0) -> None:
        self.check(y, x, lora_a, lora_b, scales, batch, out_offset)
        if batch.has_lora:
            add_lora_reference(y, x, lora_a, lora_b, scales, batch.token_slots, batch.slot_ranks, out_offset)


class CpuBackend(LoraBackend):
    """The CPU path (kernels.cpu): each step's plan decides its route, the C kernel or a torch strategy."""

    plan_types = (CpuPlan,)
    bf16_banks = True  # fp32 x/y with bf16 banks (--adapter-dtype bfloat16): widened as they are read
    rank_major_b = True  # the C expand then sums along output rows, with no horizontal sums

    def __init__(
        self, route: CpuRoute | str | None = None, dtype: torch.dtype = torch.float32, device="cpu"
    ) -> None:
        """`dtype`, `device`: the activations' (the compute dtype and device): the C kernel takes fp32 ones
        on the CPU, where it runs. `route`: a route to take wherever it applies (tests, benchmarks); None
        picks one by each batch's shape."""
        self.forced = None if route is None else CpuRoute(route)
        on_cpu = torch.device(device).type == "cpu"
        self.kernel = on_cpu and dtype == torch.float32 and native.available()

    def plan(self, token_slots, slot_ranks, device=None) -> CpuPlan:
        if device is not None:
            token_slots = token_slots.to(device)
        return plan_cpu(token_slots, slot_ranks, self.kernel, self.forced)

    def graph_plan(self, token_slots, slot_ranks, max_rank) -> CpuPlan:
        # the CPU runs a static decode step eagerly (nothing captured): the slots are read as it starts
        check_graph_plan_args(token_slots, slot_ranks, max_rank)
        return self.plan(token_slots, slot_ranks)

    def add_lora(self, y, x, lora_a, lora_b, scales, batch, out_offset=0) -> None:
        self.check_plan(batch)
        if not batch.has_lora:
            return
        self.check(y, x, lora_a, lora_b, scales, batch, out_offset)
        add_lora_cpu(y, x, lora_a, lora_b, scales, batch, out_offset)

    def add_lora_packed(self, y, x, lora_a, lora_bs, scales, batch, out_offsets) -> None:
        self.check_plan(batch)
        if not batch.has_lora:
            return
        r_max = self.check_packed(lora_a, lora_bs, scales, out_offsets)
        for i, (b, off) in enumerate(zip(lora_bs, out_offsets, strict=True)):  # as per slice
            self.check(y, x, lora_a[:, i * r_max : (i + 1) * r_max], b, scales[i], batch, off)
        add_lora_packed_cpu(y, x, lora_a, lora_bs, scales, batch, out_offsets)

    def bind_packed(self, lora_a, lora_bs, scales, out_offsets) -> PackedSite:
        self.check_packed(lora_a, lora_bs, scales, out_offsets)
        return CpuPackedSite(self, lora_a, tuple(lora_bs), scales, tuple(out_offsets))


class TritonBackend(LoraBackend):
    """Triton SGMV / BGMV shrink + expand kernels (CUDA; CPU only under TRITON_INTERPRET=1).

    BGMV is used when segments average fewer than BGMV_MAX_MEAN_SEGMENT tokens (decode: each row its own
    adapter, no tl.dot rows wasted), SGMV otherwise (an adapter's weights read once per 16-64 rows).
    """

    BGMV_MAX_MEAN_SEGMENT = 2
    plan_types = (SgmvPlan, RowsPlan)

    def __init__(self, kernel: str | None = None) -> None:
        from . import triton_bgmv, triton_sgmv  # triton is optional: import only when this backend is used

        if kernel not in (None, "sgmv", "bgmv"):
            raise ValueError(f"kernel must be None, 'sgmv' or 'bgmv', got {kernel!r}")
        self.kernel = kernel
        self._sgmv = triton_sgmv
        self._bgmv = triton_bgmv

    def plan(self, token_slots, slot_ranks, device=None) -> SgmvPlan:
        return plan_sgmv(token_slots, slot_ranks, device)

    def graph_plan(self, token_slots, slot_ranks, max_rank) -> RowsPlan:
        return plan_rows(token_slots, slot_ranks, max_rank)

    def choose_kernel(self, batch: SgmvPlan | RowsPlan) -> str:
        if isinstance(batch, RowsPlan):
            return "bgmv"  # a graph-safe plan has no segments
        if self.kernel is not None:
            return self.kernel
        short = batch.num_lora_tokens < self.BGMV_MAX_MEAN_SEGMENT * batch.num_segments
        return "bgmv" if short else "sgmv"

    def add_lora(self, y, x, lora_a, lora_b, scales, batch, out_offset=0) -> None:
        self.check_plan(batch)
        if not batch.has_lora:
            return
        self.check(y, x, lora_a, lora_b, scales, batch, out_offset)
        v = torch.empty(batch.num_lora_tokens, lora_a.shape[1], dtype=torch.float32, device=x.device)
        kernel = self.choose_kernel(batch)
        self._shrink(kernel, v, x, lora_a, batch, num_slices=1)
        self._expand(kernel, y, v, lora_b, scales, batch, out_offset)

    def add_lora_packed(self, y, x, lora_a, lora_bs, scales, batch, out_offsets) -> None:
        self.check_plan(batch)
        if not batch.has_lora:
            return
        r_max = self.check_packed(lora_a, lora_bs, scales, out_offsets)
        n = len(lora_bs)
        for i, (lb, off) in enumerate(zip(lora_bs, out_offsets, strict=True)):
            self.check(y, x, lora_a[:, i * r_max : (i + 1) * r_max], lb, scales[i], batch, off)
        # one shrink over the packed bank (x read once for q, k and v), then one expand per slice
        v = torch.empty(batch.num_lora_tokens, n * r_max, dtype=torch.float32, device=x.device)
        kernel = self.choose_kernel(batch)
        self._shrink(kernel, v, x, lora_a, batch, num_slices=n)
        for i, (lb, off) in enumerate(zip(lora_bs, out_offsets, strict=True)):
            self._expand(kernel, y, v[:, i * r_max : (i + 1) * r_max], lb, scales[i], batch, off)

    def _shrink(self, kernel: str, v, x, lora_a, p: SgmvPlan | RowsPlan, num_slices: int) -> None:
        if kernel == "bgmv":
            self._bgmv.bgmv_shrink(
                v, x, lora_a, p.token_order, p.sorted_slots, p.slot_ranks, p.max_rank, num_slices=num_slices
            )
        else:
            self._sgmv.sgmv_shrink(
                v, x, lora_a, p.token_order, p.seg_slots, p.seg_starts, p.seg_lens, p.slot_ranks,
                p.max_segment_len, p.max_rank, num_slices=num_slices,
            )  # fmt: skip

    def _expand(self, kernel: str, y, v, lora_b, scales, p: SgmvPlan | RowsPlan, out_offset: int) -> None:
        if kernel == "bgmv":
            self._bgmv.bgmv_expand(
                y, v, lora_b, scales, p.token_order, p.sorted_slots, p.slot_ranks, out_offset
            )
        else:
            self._sgmv.sgmv_expand(
                y, v, lora_b, scales, p.token_order, p.seg_slots, p.seg_starts, p.seg_lens, p.slot_ranks,
                p.max_segment_len, out_offset,
            )  # fmt: skip


class PackedSite:
    """One site's packed update on its banks (LoraBackend.bind_packed): ``site(y, x, plan)`` is
    ``backend.add_lora_packed(y, x, *banks, plan, out_offsets)``."""

    def __init__(self, backend: LoraBackend, lora_a, lora_bs, scales, out_offsets) -> None:
        self.backend = backend
        self.banks = (lora_a, lora_bs, scales)
        self.out_offsets = out_offsets

    def __call__(self, y: torch.Tensor, x: torch.Tensor, plan: LoraPlan) -> None:
        self.backend.add_lora_packed(y, x, *self.banks, plan, self.out_offsets)

    def ahead(self, plan: LoraPlan):
        """What this update reads for `plan`, for the base product before it to prefetch: None here."""
        return None


class CpuPackedSite(PackedSite):
    """A site of the CPU backend: its banks checked once as the C kernel reads them (ops().LoraBanks, where
    the kernel runs); each call applies the plan's route with no check of its own (the kernel's binding
    checks the tensors)."""

    def __init__(self, backend: CpuBackend, lora_a, lora_bs, scales, out_offsets) -> None:
        super().__init__(backend, lora_a, lora_bs, scales, out_offsets)
        self.kernel_banks = None
        if backend.kernel:
            self.kernel_banks = native.ops().LoraBanks(lora_a, list(lora_bs), scales, list(out_offsets))

    def __call__(self, y: torch.Tensor, x: torch.Tensor, plan: CpuPlan) -> None:
        if plan.route is CpuRoute.KERNEL:
            native.ops().lora_packed(y, x, plan.slots, plan.ranks, self.kernel_banks)
        else:
            self.backend.add_lora_packed(y, x, *self.banks, plan, self.out_offsets)

    def ahead(self, plan: CpuPlan):
        """(banks, step slots): the rows the kernel's update of this site reads next, for the weight kernel
        before it to prefetch; None off the kernel's route or for a single row."""
        if plan.route is not CpuRoute.KERNEL or plan.ahead is None:
            return None
        return self.kernel_banks, plan.ahead


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_backend(device: torch.device | str, dtype: torch.dtype = torch.float32) -> LoraBackend:
    """TritonBackend on CUDA (when triton imports), CpuBackend otherwise; `dtype`: the activations'."""
    if torch.device(device).type == "cuda" and triton_available():
        return TritonBackend()
    return CpuBackend(dtype=dtype, device=device)
