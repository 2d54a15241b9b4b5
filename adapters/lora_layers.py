"""Multi-LoRA layers injected once into the resident base model.

Each target nn.Linear is wrapped by a MultiLoraLinear that owns a SlotBank (the
per-slot A/B/scale tensors of that layer) and reads the forward pass's LoraBatch
from a LoraContext shared by all layers: `y = base(x) + Σ scale[s]·(x·A[s]ᵀ)·B[s]ᵀ`
for each token's slot s. The layer never indexes slots itself: the kernels backend
does (STYLE.md point 4). A fine-tune attaches its own trainable A/B (`train_lora`)
for the duration of a training step; the frozen base weights are shared, not copied."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hotlora.kernels import LoraBackend, LoraBatch, get_backend, make_lora_batch
from torch import nn


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
    batch: LoraBatch | None = None
    # module key (layer, short name) -> trainable LoRA while a training step runs
    training: dict[tuple[int, str], TrainableLora] = field(default_factory=dict)


class SlotBank:
    """One layer's adapter slots: a [S, R, in], b [S, out, R], scales [S] (fp32)."""

    def __init__(self, num_slots: int, max_rank: int, in_features: int, out_features: int, device, dtype):
        self.a = torch.zeros(num_slots, max_rank, in_features, device=device, dtype=dtype)
        self.b = torch.zeros(num_slots, out_features, max_rank, device=device, dtype=dtype)
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


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, key: tuple[int, str], bank: SlotBank, ctx: LoraContext):
        super().__init__()
        self.base = base
        self.key = key
        self.bank = bank
        self.ctx = ctx
        self.in_features = base.in_features
        self.out_features = base.out_features

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
            y = y2.view_as(y)
        train = self.ctx.training.get(self.key) if self.ctx.training else None
        if train is not None:
            h = nn.functional.dropout(x, train.dropout, self.training) if train.dropout else x
            y = y + train.scale * ((h @ train.a.t()) @ train.b.t())
        return y


def decoder_layers(model) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder `layers` to inject LoRA into")
    return layers


def inject_multi_lora(model, target_modules, num_slots: int, max_rank: int) -> tuple[LoraContext, dict]:
    """Wrap every target linear of every decoder layer; returns the shared context and
    {(layer, short name): MultiLoraLinear}."""
    param = next(model.parameters())
    ctx = LoraContext(backend=get_backend(param.device))
    wrapped: dict[tuple[int, str], MultiLoraLinear] = {}
    targets = set(target_modules)
    for i, layer in enumerate(decoder_layers(model)):
        for _, parent in list(layer.named_modules()):
            for child_name, child in list(parent.named_children()):
                if child_name in targets and isinstance(child, nn.Linear):
                    bank = SlotBank(
                        num_slots, max_rank, child.in_features, child.out_features, param.device, param.dtype
                    )
                    module = MultiLoraLinear(child, (i, child_name), bank, ctx)
                    setattr(parent, child_name, module)
                    wrapped[(i, child_name)] = module
    if not wrapped:
        raise ValueError(f"none of the target modules {sorted(targets)} is an nn.Linear in this model")
    return ctx, wrapped


def set_batch(ctx: LoraContext, row_slots: list[int], seq_len: int, slot_ranks: torch.Tensor, device) -> None:
    """Give every token of a [rows, seq_len] forward its row's slot."""
    if all(s < 0 for s in row_slots):
        ctx.batch = None
        return
    token_slots = torch.tensor(row_slots, dtype=torch.long).repeat_interleave(seq_len).to(device)
    ctx.batch = make_lora_batch(token_slots, slot_ranks)
