"""Where the multi-LoRA update meets the base model: `y = base(x) + Σ scale[s]·(x·A[s]ᵀ)·B[s]ᵀ` for each
token's slot s, read from the forward pass's LoraPlan in a LoraContext shared by every site.

Two kinds of site, one contract:
* :class:`LoraSite` -- the runner's fused projections (qkv, o, gate_up, down). Its PackedSlotBank stacks the
  targeted slices' A along the rank, so one shrink serves q, k and v; each slice has its own B and scale.
* :class:`MultiLoraLinear` -- the transformers path (a family the runner does not cover): each target
  nn.Linear is wrapped and owns a plain SlotBank.
Neither indexes slots itself: the kernels backend does (STYLE.md point 4). A fine-tune attaches its own
trainable A/B (`ctx.training`) for the duration of a training unit; the frozen base weights are shared,
not copied. Every site installs an adapter from its LoraWeights by (layer, module name)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hotlora.adapters.dora import magnitude_scale, scale_all_rows, scale_rows
from hotlora.kernels import LoraBackend, LoraPlan, get_backend


@dataclass
class TrainableLora:
    """A fine-tune's own LoRA for one module: y += scale · dropout(x)·Aᵀ·Bᵀ, with autograd."""

    a: nn.Parameter  # [r, in]
    b: nn.Parameter  # [out, r]
    scale: float
    dropout: float = 0.0


@dataclass
class LoraContext:
    """Shared by every MultiLoraLinear: what the current forward pass needs."""

    backend: LoraBackend
    batch: LoraPlan | None = None  # the backend's plan of the current forward pass (None: no adapters)
    # module key (layer, short name) -> trainable LoRA while a training step runs
    training: dict[tuple[int, str], TrainableLora] = field(default_factory=dict)
    # slots holding a DoRA adapter (adapters/dora.py): their rows get the slot's magnitude scaling
    dora: set[int] = field(default_factory=set)
    _dora_flags: torch.Tensor | None = None  # [S] bool on the compute device
    _dora_rows: tuple | None = None  # (plan, its DoRA rows or None): worked out once per forward

    def mark_dora(self, slot: int, on: bool, num_slots: int, device) -> None:
        """Called by each site's install/clear (the same answer from every site of an adapter)."""
        if self._dora_flags is None:
            self._dora_flags = torch.zeros(num_slots, dtype=torch.bool, device=device)
        if on:
            self.dora.add(slot)
        else:
            self.dora.discard(slot)
        self._dora_flags[slot] = on
        self._dora_rows = None

    def dora_rows(self, batch: LoraPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, their slots) of the plan's tokens whose slot holds a DoRA adapter; None when there are none.
        Worked out on the first site's ask and kept for the rest of the forward."""
        cached = self._dora_rows
        if cached is not None and cached[0] is batch:
            return cached[1]
        slots = batch.token_slots
        mask = self._dora_flags.index_select(0, slots.clamp(min=0)) & (slots >= 0)
        rows = mask.nonzero().flatten()
        found = (rows, slots.index_select(0, rows)) if rows.numel() else None
        self._dora_rows = (batch, found)
        return found


def b_bank(num_slots: int, out_features: int, max_rank: int, device, dtype, rank_major: bool) -> torch.Tensor:
    """A zeroed [S, out, R] B bank; `rank_major` (LoraBackend.rank_major_b): stored [S, R, out] and
    returned as its transposed view, the layout the CPU kernel's expand reads fastest."""
    if rank_major:
        return torch.zeros(num_slots, max_rank, out_features, device=device, dtype=dtype).transpose(1, 2)
    return torch.zeros(num_slots, out_features, max_rank, device=device, dtype=dtype)


class SlotBank:
    """One layer's adapter slots: a [S, R, in], b [S, out, R] (see b_bank), scales [S] (fp32)."""

    def __init__(
        self,
        num_slots: int,
        max_rank: int,
        in_features: int,
        out_features: int,
        device,
        dtype,
        rank_major_b: bool = False,
    ):
        self.a = torch.zeros(num_slots, max_rank, in_features, device=device, dtype=dtype)
        self.b = b_bank(num_slots, out_features, max_rank, device, dtype, rank_major_b)
        self.scales = torch.zeros(num_slots, device=device, dtype=torch.float32)

    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Install one adapter's module into `slot` (None = the adapter does not touch this layer)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        if a is None:
            self.scales[slot] = 0.0
            return
        r = a.shape[0]
        self.a[slot, :r].copy_(a)
        self.b[slot, :, :r].copy_(b)
        self.scales[slot] = scale

    def clear(self, slot: int) -> None:
        self.write(slot, None, None, 0.0)

    @property
    def nbytes_per_slot(self) -> int:
        return (self.a[0].numel() + self.b[0].numel()) * self.a.element_size()


class PackedSlotBank:
    """One fused projection's adapter slots: slice i's A in rows [i·R, i·R + r) of a [S, n·R, in],
    its B in bs[i] [S, out_i, R] (see b_bank), its scale in scales[i, S] (fp32)."""

    def __init__(
        self,
        out_sizes,
        num_slots: int,
        max_rank: int,
        in_features: int,
        device,
        dtype,
        rank_major_b: bool = False,
    ):
        n = len(out_sizes)
        self.max_rank = max_rank
        self.a = torch.zeros(num_slots, n * max_rank, in_features, device=device, dtype=dtype)
        self.bs = tuple(b_bank(num_slots, o, max_rank, device, dtype, rank_major_b) for o in out_sizes)
        self.scales = torch.zeros(n, num_slots, device=device, dtype=torch.float32)

    def write(self, slot: int, modules) -> None:
        """modules: one (a [r, in], b [out_i, r], scale) or None per slice (None: slice untouched)."""
        self.a[slot].zero_()
        for i, m in enumerate(modules):
            self.bs[i][slot].zero_()
            if m is None:
                self.scales[i, slot] = 0.0
                continue
            a, b, scale = m
            r = a.shape[0]
            self.a[slot, i * self.max_rank : i * self.max_rank + r].copy_(a)
            self.bs[i][slot, :, :r].copy_(b)
            self.scales[i, slot] = scale

    @property
    def nbytes_per_slot(self) -> int:
        return (self.a[0].numel() + sum(b[0].numel() for b in self.bs)) * self.a.element_size()


class LoraSite:
    """The update of one fused projection of one layer, for the slices an adapter may target.
    `names` are PEFT module names (q_proj, k_proj, ...); `offsets` their first output column."""

    def __init__(
        self, layer: int, names, out_sizes, offsets, in_features, bank: PackedSlotBank, ctx, total_out=None
    ):
        self.layer = layer
        self.names = tuple(names)
        self.out_sizes = tuple(out_sizes)
        self.offsets = tuple(offsets)
        self.in_features = in_features
        self.bank = bank
        self.ctx = ctx
        # the fused projection's whole output (slices no adapter may target included), for DoRA's scaling
        self.total_out = (
            total_out
            if total_out is not None
            else max(o + n for o, n in zip(self.offsets, self.out_sizes, strict=True))
        )
        # DoRA: the base projection's dense weight [total_out, in] (a callable: read at install only) and
        # bias, attached by the model's set-up; the per-slot scaling g [S, total_out], made on first use
        self.base_weight = None
        self.bias: torch.Tensor | None = None
        self.dora_scales: torch.Tensor | None = None
        # the backend's update of this bank (checked once; the bank is written in place, never replaced)
        self.update = ctx.backend.bind_packed(bank.a, bank.bs, bank.scales, self.offsets)

    def apply(self, y: torch.Tensor, x: torch.Tensor, batch: LoraPlan | None = None) -> torch.Tensor:
        """y: [T, out] (the base projection of x: [T, in]); serving adapters in place, a fine-tune's LoRA
        out of place (autograd). `batch`: the plan of this forward when the caller passes its own, else the
        context's. Returns the result."""
        ctx = self.ctx
        if batch is None:
            batch = ctx.batch
        if batch is not None and batch.has_lora:
            self.update(y, x, batch)
            if ctx.dora:
                _apply_dora(ctx, y, batch, self.dora_scales, self.bias)
        if ctx.training:
            for name, size, off in zip(self.names, self.out_sizes, self.offsets, strict=True):
                t = ctx.training.get((self.layer, name))
                if t is None:
                    continue
                h = nn.functional.dropout(x, t.dropout, True) if t.dropout else x
                delta = t.scale * ((h @ t.a.t()) @ t.b.t())
                cols = torch.arange(off, off + size, device=y.device)
                y = y.index_add(1, cols, delta.to(y.dtype))
        return y

    def rows_ahead(self, batch: LoraPlan | None = None):
        """What `apply` will read from the banks for this plan, for the base product before it to ask for
        while it computes (the weight kernels' `banks` and `slots`); None when there is no such list."""
        if batch is None:
            batch = self.ctx.batch
        if batch is None or not batch.has_lora:
            return None
        return self.update.ahead(batch)

    def attach_base(self, weight, bias: torch.Tensor | None) -> None:
        """weight: a callable returning the projection's dense weight [total_out, in] (DoRA's norms)."""
        self.base_weight, self.bias = weight, bias

    def install(self, slot: int, weights) -> None:
        mods = []
        for name in self.names:
            m = weights.modules.get((self.layer, name))
            mods.append(None if m is None else (m.a, m.b, m.scale))
        self.bank.write(slot, [_cast(m, self.bank.a) for m in mods])
        self._install_dora(slot, weights)

    def _install_dora(self, slot: int, weights) -> None:
        dora = [
            (off, size, weights.modules.get((self.layer, name)))
            for name, size, off in zip(self.names, self.out_sizes, self.offsets, strict=True)
        ]
        dora = [(off, size, m) for off, size, m in dora if m is not None and m.magnitude is not None]
        if dora or self.dora_scales is not None:
            g = torch.ones(self.total_out, dtype=torch.float32)
            if dora:
                if self.base_weight is None:
                    raise ValueError("DoRA needs the base weights of the projection; none were attached")
                weight = self.base_weight()
                for off, size, m in dora:
                    g[off : off + size] = magnitude_scale(
                        weight[off : off + size], m.a, m.b, m.scale, m.magnitude
                    )
            self._scales()[slot].copy_(g)
        a = self.bank.a
        self.ctx.mark_dora(slot, weights.is_dora, a.shape[0], a.device)

    def _scales(self) -> torch.Tensor:
        if self.dora_scales is None:
            s = self.bank.a.shape[0]
            self.dora_scales = torch.ones(s, self.total_out, dtype=torch.float32, device=self.bank.a.device)
        return self.dora_scales

    def clear(self, slot: int) -> None:
        self.bank.write(slot, [None] * len(self.names))
        if self.dora_scales is not None:
            self.dora_scales[slot] = 1.0
        self.ctx.mark_dora(slot, False, self.bank.a.shape[0], self.bank.a.device)

    @property
    def nbytes_per_slot(self) -> int:
        return self.bank.nbytes_per_slot


def _apply_dora(ctx: LoraContext, y: torch.Tensor, batch: LoraPlan, scales, bias) -> None:
    """DoRA's magnitude scaling of the rows of DoRA slots (after their LoRA update): see adapters/dora.py."""
    if scales is None:  # no DoRA adapter ever touched this site: g = 1 for every slot
        return
    if y.is_cuda and torch.cuda.is_current_stream_capturing():  # nothing may be read back: every row
        scale_all_rows(y, batch.token_slots, scales, bias)
        return
    found = ctx.dora_rows(batch)
    if found is not None:
        rows, slots = found
        scale_rows(y, rows, scales.index_select(0, slots), bias)


def _cast(module, like: torch.Tensor):
    if module is None:
        return None
    a, b, scale = module
    return a.to(like.device, like.dtype), b.to(like.device, like.dtype), scale


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, key: tuple[int, str], bank: SlotBank, ctx: LoraContext):
        super().__init__()
        self.base = base
        self.key = key
        self.bank = bank
        self.ctx = ctx
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.dora_scales: torch.Tensor | None = None  # [S, out] DoRA's g per slot, made on first use

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the base layer keeps working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.ctx.batch
        if batch is not None and batch.has_lora:
            y2 = y.reshape(-1, self.out_features)
            self.ctx.backend.add_lora(
                y2, x.reshape(-1, self.in_features), self.bank.a, self.bank.b, self.bank.scales, batch
            )
            if self.ctx.dora:
                _apply_dora(self.ctx, y2, batch, self.dora_scales, self.base.bias)
            y = y2.view_as(y)
        train = self.ctx.training.get(self.key) if self.ctx.training else None
        if train is not None:
            h = nn.functional.dropout(x, train.dropout, self.training) if train.dropout else x
            y = y + train.scale * ((h @ train.a.t()) @ train.b.t())
        return y

    def install(self, slot: int, weights) -> None:
        m = weights.modules.get(self.key)
        if m is None:
            self.bank.clear(slot)
        else:
            dev, dt = self.bank.a.device, self.bank.a.dtype
            self.bank.write(slot, m.a.to(dev, dt), m.b.to(dev, dt), m.scale)
        if (m is not None and m.magnitude is not None) or self.dora_scales is not None:
            if self.dora_scales is None:
                n = self.bank.a.shape[0]
                self.dora_scales = torch.ones(
                    n, self.out_features, dtype=torch.float32, device=self.bank.a.device
                )
            g = torch.ones(self.out_features, dtype=torch.float32)
            if m is not None and m.magnitude is not None:
                g = magnitude_scale(self.base.weight.detach(), m.a, m.b, m.scale, m.magnitude)
            self.dora_scales[slot].copy_(g)
        self.ctx.mark_dora(slot, weights.is_dora, self.bank.a.shape[0], self.bank.a.device)

    def clear(self, slot: int) -> None:
        self.bank.clear(slot)
        if self.dora_scales is not None:
            self.dora_scales[slot] = 1.0
        self.ctx.mark_dora(slot, False, self.bank.a.shape[0], self.bank.a.device)

    @property
    def nbytes_per_slot(self) -> int:
        return self.bank.nbytes_per_slot


def decoder_layers(model) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder `layers` to inject LoRA into")
    return layers


def make_lora_sites(
    layout: dict[str, tuple[int, tuple[str, ...], tuple[int, ...]]],
    num_layers: int,
    target_modules,
    num_slots: int,
    max_rank: int,
    device,
    dtype,
    compute_dtype: torch.dtype,
) -> tuple[LoraContext, dict[tuple[int, str], LoraSite]]:
    """The runner's sites: for each layer and fused projection (layout: projection -> (in_features, module
    names, their output sizes)), a LoraSite over the targeted names only, banks in `dtype`, activations in
    `compute_dtype`. Returns the shared context and {(layer, projection): site}."""
    ctx = LoraContext(backend=get_backend(device, compute_dtype))
    targets = set(target_modules)
    sites: dict[tuple[int, str], LoraSite] = {}
    for proj, (in_features, names, sizes) in layout.items():
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        picked = [(n, o, off) for n, o, off in zip(names, sizes, offsets, strict=True) if n in targets]
        if not picked:
            continue
        for layer in range(num_layers):
            bank = PackedSlotBank(
                [o for _, o, _ in picked], num_slots, max_rank, in_features, device, dtype,
                ctx.backend.rank_major_b,
            )  # fmt: skip
            sites[(layer, proj)] = LoraSite(
                layer, [n for n, _, _ in picked], [o for _, o, _ in picked], [f for _, _, f in picked],
                in_features, bank, ctx, total_out=sum(sizes),
            )  # fmt: skip
    if not sites:
        raise ValueError(f"none of the target modules {sorted(targets)} is a projection of this model")
    return ctx, sites


def inject_multi_lora(model, target_modules, num_slots: int, max_rank: int) -> tuple[LoraContext, dict]:
    """Wrap every target linear of every decoder layer; returns the shared context and
    {(layer, short name): MultiLoraLinear}."""
    param = next(model.parameters())
    ctx = LoraContext(backend=get_backend(param.device, param.dtype))
    wrapped: dict[tuple[int, str], MultiLoraLinear] = {}
    targets = set(target_modules)
    for i, layer in enumerate(decoder_layers(model)):
        for _, parent in list(layer.named_modules()):
            for child_name, child in list(parent.named_children()):
                if child_name in targets and isinstance(child, nn.Linear):
                    bank = SlotBank(
                        num_slots, max_rank, child.in_features, child.out_features, param.device, param.dtype,
                        ctx.backend.rank_major_b,
                    )  # fmt: skip
                    module = MultiLoraLinear(child, (i, child_name), bank, ctx)
                    setattr(parent, child_name, module)
                    wrapped[(i, child_name)] = module
    if not wrapped:
        raise ValueError(f"none of the target modules {sorted(targets)} is an nn.Linear in this model")
    return ctx, wrapped


def set_batch(ctx: LoraContext, token_slots: list[int], slot_ranks: torch.Tensor, device) -> None:
    """Give every token of the forward pass its slot (-1 = base model only): the backend plans it once."""
    if all(s < 0 for s in token_slots):
        ctx.batch = None
        return
    # the host's list: the backend plans on the host and sends the plan over (nothing read back)
    ctx.batch = ctx.backend.plan(torch.tensor(token_slots, dtype=torch.long), slot_ranks, device)


def graph_batch(
    ctx: LoraContext, token_slots: torch.Tensor, slot_ranks: torch.Tensor, max_rank: int
) -> LoraPlan:
    """The plan of a static decode step from its slot buffer (token_slots: [T] int64, on slot_ranks' device),
    through the backend's graph plan, which reads nothing back: a captured CUDA graph or a compiled step
    stays valid whatever the buffer and the slots hold later. The caller passes it to the forward
    (StepInput.lora)."""
    return ctx.backend.graph_plan(token_slots, slot_ranks, max_rank)
