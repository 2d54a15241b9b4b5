"""The on-line trainer's common parts: a training loop written as a generator and driven one bounded
unit at a time, trainable LoRA on the resident model's MultiLoraLinear layers, batching, early stopping.

A loop `yield`s after every mini-batch (forward+backward+update) or evaluation batch; a unit ends there or,
mid-pass, once it has run --max-train-unit-ms (train_units.py), so the engine can serve between two units.
While a unit runs the engine runs no forward of its own: the trainer installs its LoRA in `ctx.training`
for the unit and removes it in a `finally`, and keeps `ctx.batch` None so no serving adapter leaks into a
training forward. The frozen base weights are used
in place; only the LoRA A/B (fp32 masters) and the head get gradients."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from hotlora.adapters.head_features import LAST_LAYER, HeadFeatures
from hotlora.adapters.lora_layers import LoraContext, TrainableLora
from hotlora.adapters.training.train_units import PreemptibleRun
from hotlora.adapters.weights import LoraModule, LoraWeights

Key = tuple[int, str]
EVAL_BATCH = 4  # examples per forward-only pass (features, validation)
MICRO_BATCH = 2  # examples per forward+backward pass: a mini-batch is accumulated over several
UNIT_SECONDS = 0.05  # the longest a unit runs before it yields at a layer boundary (--max-train-unit-ms)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run small products ([examples, hidden] x [hidden, labels]) on one thread: on a busy CPU every
    parallel region waits for a second thread to be scheduled (a 64x64 product took 12 ms on two threads
    at load 13, 0.01 ms on one). The engine thread is the only one computing while a unit runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Progress:
    """What a job reports while it runs (FineTuneMetrics)."""

    phase: str = "preparing"
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    train_loss: float = 0.0
    validation_metric: float | None = None
    """The best validated score so far; None until one is measured (never a 0 that is not a score)."""
    baseline_metric: float | None = None
    """What the gate compares with; None until it is known."""
    metric_name: str = ""
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def remaining(self) -> float:
        if self.step <= 0 or self.total_steps <= self.step:
            return 0.0
        return self.elapsed / self.step * (self.total_steps - self.step)


@dataclass(frozen=True)
class TrainOutcome:
    weights: LoraWeights
    score: float
    """Best validation metric (higher is better)."""
    baseline: float
    metric_name: str


@dataclass(frozen=True)
class TrainData:
    """Tokenized examples. SEQ_CLS: `inputs` are text ids, `targets` label indices. CAUSAL_LM: `inputs`
    are prompt ids, `targets` completion ids (eos included)."""

    train_inputs: list[list[int]]
    train_targets: list
    val_inputs: list[list[int]]
    val_targets: list


class LoraSet:
    """Trainable LoRA for some (layer, module) keys: fp32 master A/B, cast to the model dtype per unit."""

    def __init__(self, modules: dict[Key, tuple[torch.Tensor, torch.Tensor, float]], trainable: bool, device):
        self.params: dict[Key, tuple[nn.Parameter, nn.Parameter, float]] = {}
        for key, (a, b, scale) in modules.items():
            pa = nn.Parameter(a.detach().to(device, torch.float32).clone(), requires_grad=trainable)
            pb = nn.Parameter(b.detach().to(device, torch.float32).clone(), requires_grad=trainable)
            self.params[key] = (pa, pb, scale)

    @classmethod
    def fresh(
        cls, keys: list[Key], shapes: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int, device
    ) -> LoraSet:
        """PEFT's init: A kaiming-uniform, B zero, so the adapter starts as the base model."""
        gen = torch.Generator().manual_seed(seed)
        modules = {}
        for key in sorted(keys):
            in_f, out_f = shapes[key[1]]
            bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
            a = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound
            modules[key] = (a, torch.zeros(out_f, rank), alpha / rank)
        return cls(modules, True, device)

    @classmethod
    def of(cls, weights: LoraWeights, trainable: bool, device) -> LoraSet:
        return cls({k: (m.a, m.b, m.scale) for k, m in weights.modules.items()}, trainable, device)

    def parameters(self) -> list[nn.Parameter]:
        return [p for a, b, _ in self.params.values() for p in (a, b) if p.requires_grad]

    def for_forward(self, dtype) -> dict[Key, TrainableLora]:
        return {k: TrainableLora(a.to(dtype), b.to(dtype), s) for k, (a, b, s) in self.params.items()}

    def snapshot(self) -> dict[Key, LoraModule]:
        return {
            k: LoraModule(a.detach().float().cpu().clone(), b.detach().float().cpu().clone(), s)
            for k, (a, b, s) in self.params.items()
        }


class Trainer:
    """Drives `_run()` (a generator: one yield per bounded unit) from `step()`."""

    def __init__(
        self, model, ctx: LoraContext, data: TrainData, seed: int, unit_seconds: float = UNIT_SECONDS
    ):
        self.model = model
        self.unit_seconds = unit_seconds
        self.ctx = ctx
        self.data = data
        if any(p.requires_grad for p in model.parameters()):
            raise ValueError("the base model must be frozen (requires_grad_(False)); LoRA and head train")
        self.decoder = model.get_decoder()
        param = next(model.parameters())
        # the compute dtype (a runner may store its weights narrower: --weight-dtype)
        self.device, self.dtype = param.device, getattr(model, "dtype", param.dtype)
        self.pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
        self.lora = LoraSet({}, False, self.device)
        self.progress = Progress()
        self.outcome: TrainOutcome | None = None
        self.curve: list[tuple[tuple[int, int], tuple[float, float]]] = []
        """Every validation: (head epochs, LoRA epochs) reached and (metric, tie-break); k-fold
        chooses one schedule from all folds' curves (validation.choose_epochs)."""
        self.rng = torch.Generator().manual_seed(seed)
        self.units = PreemptibleRun(self._run, unit_seconds)

    def _run(self) -> Iterator[None]:
        raise NotImplementedError

    def step(self) -> bool:
        """Run one bounded unit; False once training is over (then `outcome` is set)."""
        saved_batch = self.ctx.batch
        self.ctx.batch = None  # a serving batch must never apply to a training forward
        try:
            with torch.inference_mode(False), torch.enable_grad():
                self.ctx.training = self.lora.for_forward(self.dtype)
            return self.units.advance()
        finally:
            self.ctx.training = {}
            self.ctx.batch = saved_batch

    def unit_spent(self) -> bool:
        """Whether this unit used its time: cheap work (a head's epochs) yields only then."""
        return time.perf_counter() - self.units.unit_started >= self.unit_seconds

    # ---- forward helpers ------------------------------------------------------------------
    def hidden(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded forward of the decoder: hidden [B, L, H] and lengths [B]."""
        out, lengths = self._decode(seqs, False)
        return out.last_hidden_state, lengths

    def features(self, seqs: list[list[int]], choices) -> dict[HeadFeatures, torch.Tensor]:
        """[B, H] pooled features of each choice (`HeadFeatures`), all from one forward."""
        out, lengths = self._decode(seqs, any(c.layer != LAST_LAYER for c in choices))
        result = {}
        for c in choices:
            h = out.last_hidden_state if c.layer == LAST_LAYER else out.hidden_states[c.layer]
            if c.pooling == "mean":
                mask = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]).to(h.dtype)
                result[c] = (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)
            else:
                result[c] = h[torch.arange(len(seqs), device=h.device), lengths - 1]
        return result

    def pooled(self, seqs: list[list[int]], features: HeadFeatures = HeadFeatures()) -> torch.Tensor:
        """[B, H]: what a head on `features` reads (by default the last real token's final state)."""
        return self.features(seqs, (features,))[features]

    def _decode(self, seqs: list[list[int]], all_layers: bool):
        lengths = torch.tensor([len(s) for s in seqs])
        L = int(lengths.max())
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        out = self.decoder(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            use_cache=False,
            output_hidden_states=all_layers,
        )
        return out, lengths.to(self.device)

    def micro(self, idx: list[int]) -> list[list[int]]:
        """A mini-batch in forward+backward passes of MICRO_BATCH examples (whatever the unit budget: the
        gradient is accumulated in the same order however the units fall)."""
        return [idx[i : i + MICRO_BATCH] for i in range(0, len(idx), MICRO_BATCH)]

    def eval_parts(self, n: int) -> list[list[int]]:
        """range(n) in forward-only passes of EVAL_BATCH examples."""
        return [list(range(i, min(i + EVAL_BATCH, n))) for i in range(0, n, EVAL_BATCH)]

    def batches(self, n: int, size: int) -> list[list[int]]:
        order = torch.randperm(n, generator=self.rng).tolist()
        return [order[i : i + size] for i in range(0, n, size)]


class EarlyStopping:
    """Keeps the best state by (metric, tie-break); `stop` after `patience` evaluations without gain."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_key: tuple[float, float] | None = None
        self.best_state = None
        self.best_at = 0
        """The epoch of the best evaluation (what a refit on every example trains for)."""
        self.since_best = 0

    def update(self, key: tuple[float, float], state_fn, at: int = 0) -> bool:
        """Record one evaluation (after epoch `at`); True if it is the best so far."""
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best_state, self.since_best, self.best_at = key, state_fn(), 0, at
            return True
        self.since_best += 1
        return False

    @property
    def stop(self) -> bool:
        return self.since_best >= self.patience

    @property
    def best(self) -> float:
        return -math.inf if self.best_key is None else self.best_key[0]


UNFREEZE_STAGES = 4  # progressive unfreezing: a quarter more of the layers each epoch, top first


def frozen_layers(layers: list[int], epoch: int) -> set[int]:
    """Progressive unfreezing (ULMFiT): at epoch 1 only the top quarter of `layers` trains, at epoch 2
    the top half, ..., all from epoch UNFREEZE_STAGES on; the lower ones keep their values meanwhile."""
    ordered = sorted(set(layers), reverse=True)
    n = math.ceil(len(ordered) * min(max(epoch, 1), UNFREEZE_STAGES) / UNFREEZE_STAGES)
    return set(ordered[n:])


def drop_frozen_grads(lora: LoraSet, frozen: set[int]) -> None:
    """Adam skips a parameter without a gradient: frozen layers neither move nor build moments."""
    for (layer, _), (a, b, _) in lora.params.items():
        if layer in frozen:
            a.grad = None
            b.grad = None


def placeholder_module(
    num_layers: int, shapes: dict[str, tuple[int, int]], target: str
) -> dict[Key, LoraModule]:
    """A zero rank-1 module on the last layer: a head-only adapter is still a loadable PEFT LoRA adapter
    (PEFT and our parser both need at least one LoRA module); it adds exactly nothing."""
    in_f, out_f = shapes[target]
    return {(num_layers - 1, target): LoraModule(torch.zeros(1, in_f), torch.zeros(out_f, 1), 1.0)}


def nonzero_modules(weights: LoraWeights | None) -> dict[Key, LoraModule]:
    if weights is None:
        return {}
    return {k: m for k, m in weights.modules.items() if bool(m.b.any()) and bool(m.a.any())}
