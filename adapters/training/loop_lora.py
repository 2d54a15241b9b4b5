"""A LoRA whose training loop the user drives (the Tinker API): forward_backward accumulates gradients,
optim_step applies AdamW, snapshots serve or save the weights. On the resident model, in the engine's
training units, like a fine-tune job's trainer (trainer.py): the frozen base weights are used in place,
only the LoRA A/B (fp32 masters) get gradients.

A forward_backward runs as a `PreemptibleRun` (train_units.py): its loop goes through the data in passes of
at most PASS_TOKENS tokens, and a unit may end at any linear layer of a pass, so a large batch never holds
the engine for longer than --max-train-unit-ms while serving waits. The gradient of a call is added to what
earlier calls left (the SDK's semantics: optim_step applies and clears it)."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from hotlora.adapters.lora_layers import LoraContext
from hotlora.adapters.training.loop_losses import LossDatum, elementwise_loss
from hotlora.adapters.training.train_units import PreemptibleRun
from hotlora.adapters.training.trainer import LoraSet
from hotlora.adapters.weights import LoraModule, LoraWeights

Key = tuple[int, str]
PASS_TOKENS = 1024  # tokens in one forward(+backward) pass: bounds the [tokens, vocab] logits it holds
ALPHA = 32.0  # lora_alpha of every run (Tinker's): scale = ALPHA / rank
ADAM_STATES = 2  # exp_avg and exp_avg_sq per parameter
MLP = ("gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def lora_targets(server_targets: tuple[str, ...], train_mlp: bool, train_attn: bool) -> tuple[str, ...]:
    wanted = (MLP if train_mlp else ()) + (ATTN if train_attn else ())
    return tuple(sorted(t for t in server_targets if t in wanted))


def state_bytes(shapes: dict[str, tuple[int, int]], layers: int, targets: tuple[str, ...], rank: int) -> int:
    """Host bytes a run holds: fp32 A/B, their gradients and AdamW's two moments."""
    params = sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets) * layers
    return params * 4 * (2 + ADAM_STATES)


@dataclass
class AdamStep:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class PassResult:
    """What a forward(_backward) gives back per datum: [T] log-probabilities and elementwise losses."""

    logprobs: list[np.ndarray] = field(default_factory=list)
    losses: list[np.ndarray] = field(default_factory=list)

    @property
    def loss_sum(self) -> float:
        return float(sum(float(x.sum()) for x in self.losses))


class LoopLora:
    """One training run's LoRA on the resident model."""

    def __init__(
        self,
        model,
        ctx: LoraContext,
        *,
        num_layers: int,
        shapes: dict[str, tuple[int, int]],
        targets: tuple[str, ...],
        rank: int,
        seed: int,
        unit_seconds: float,
    ):
        self.model, self.ctx, self.unit_seconds = model, ctx, unit_seconds
        self.rank, self.targets = rank, targets
        param = next(model.parameters())
        self.device, self.dtype = param.device, getattr(model, "dtype", param.dtype)
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
        keys = [(layer, t) for layer in range(num_layers) for t in targets]
        self.lora = LoraSet.fresh(keys, shapes, rank, ALPHA, seed, self.device)
        self.steps = 0
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=0.0)

    # ---- forward_backward --------------------------------------------------------------------
    def pass_run(self, data: list[LossDatum], loss_fn: str, config: dict, backward: bool):
        """A PreemptibleRun computing `data`'s logprobs and losses (and their gradients if `backward`);
        its `result` is a PassResult once it has ended."""
        out = PassResult()

        def loop() -> Iterator[None]:
            for part in _passes(data):
                self._one_pass(part, loss_fn, config, backward, out)
                yield
            release_freed_memory()

        run = PreemptibleRun(loop, self.unit_seconds)
        run.result = out
        return run

    def unit(self, run: PreemptibleRun) -> bool:
        """Advance `run` by one unit with this LoRA in the LoRA sites (engine thread)."""
        saved = self.ctx.batch
        self.ctx.batch = None  # a serving batch never applies to a training forward
        try:
            with torch.inference_mode(False), torch.enable_grad():
                self.ctx.training = self.lora.for_forward(self.dtype)
            return run.advance()
        finally:
            self.ctx.training = {}
            self.ctx.batch = saved

    def _one_pass(self, part: list[LossDatum], loss_fn: str, config: dict, backward: bool, out: PassResult):
        lengths = [len(d.tokens) for d in part]
        width = max(lengths)
        ids = torch.full((len(part), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for i, d in enumerate(part):
            ids[i, : lengths[i]] = torch.tensor(d.tokens, dtype=torch.long)
            mask[i, : lengths[i]] = 1
        ctx = torch.enable_grad() if backward else torch.no_grad()
        with ctx:
            hidden = self.decoder(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
            ).last_hidden_state
            total = hidden.new_zeros((), dtype=torch.float32)
            for i, d in enumerate(part):
                logits = self.lm_head(hidden[i, : lengths[i]]).float()
                targets = torch.from_numpy(d.inputs["target_tokens"]).to(self.device)
                lp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
                extra = {
                    k: torch.from_numpy(v).to(self.device)
                    for k, v in d.inputs.items()
                    if k != "target_tokens"
                }
                losses = elementwise_loss(loss_fn, lp, extra, config)
                total = total + losses.sum()
                out.logprobs.append(lp.detach().cpu().numpy().astype(np.float32))
                out.losses.append(losses.detach().cpu().numpy().astype(np.float32))
            if backward:
                total.backward()

    # ---- optim_step ----------------------------------------------------------------------------
    def optim_step(self, adam: AdamStep) -> dict[str, float]:
        """AdamW with the step's parameters on the gradient accumulated since the last step, then clear it."""
        params = self.lora.parameters()
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        if adam.grad_clip_norm > 0 and norm > adam.grad_clip_norm:
            for g in grads:
                g.mul_(adam.grad_clip_norm / (norm + 1e-6))
        for group in self.optimizer.param_groups:
            group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
        with torch.inference_mode(False):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {"grad_norm:mean": norm, "learning_rate:mean": adam.learning_rate}

    # ---- weights and state ------------------------------------------------------------------------
    def weights(self) -> LoraWeights:
        """A copy of the current weights, as a served or exported adapter holds them."""
        modules = self.lora.snapshot()
        return LoraWeights(
            task="CAUSAL_LM",
            rank=self.rank,
            alpha=ALPHA,
            target_modules=tuple(sorted({t for _, t in modules})),
            modules=modules,
        )

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """AdamW's moments and step count by module key (`layer.name.a.exp_avg`, ...), copied."""
        out: dict[str, torch.Tensor] = {"steps": torch.tensor([self.steps], dtype=torch.int64)}
        for (layer, name), (a, b, _) in sorted(self.lora.params.items()):
            for which, p in (("a", a), ("b", b)):
                st = self.optimizer.state.get(p, {})
                for moment in ("exp_avg", "exp_avg_sq", "step"):
                    if moment in st:
                        out[f"{layer}.{name}.{which}.{moment}"] = (
                            st[moment].detach().cpu().clone().reshape(-1)
                        )
        return out

    def load(self, weights: LoraWeights, optimizer: dict[str, torch.Tensor] | None) -> None:
        """Replace the weights (and AdamW's state, or start it fresh); the gradient is cleared."""
        with torch.no_grad():
            for key, (a, b, _) in self.lora.params.items():
                m: LoraModule = weights.modules[key]
                a.copy_(m.a)
                b.copy_(m.b)
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=0.0)
        self.steps = 0
        if optimizer:
            self.steps = int(optimizer["steps"][0])
            for (layer, name), (a, b, _) in self.lora.params.items():
                for which, p in (("a", a), ("b", b)):
                    prefix = f"{layer}.{name}.{which}."
                    if prefix + "exp_avg" in optimizer:
                        self.optimizer.state[p] = {
                            "step": optimizer[prefix + "step"].reshape(()).clone(),
                            "exp_avg": optimizer[prefix + "exp_avg"].reshape(p.shape).clone().to(self.device),
                            "exp_avg_sq": optimizer[prefix + "exp_avg_sq"]
                            .reshape(p.shape)
                            .clone()
                            .to(self.device),
                        }

    def compatible(self, weights: LoraWeights) -> str | None:
        """Why `weights` cannot be loaded into this run (None: it can)."""
        if set(weights.modules) != set(self.lora.params):
            return "its modules differ from this run's (another rank's or other train_mlp/train_attn)"
        for key, (a, b, _) in self.lora.params.items():
            m = weights.modules[key]
            if m.a.shape != a.shape or m.b.shape != b.shape:
                return f"module {key} has rank {m.rank}, this run {self.rank}"
        return None


def release_freed_memory() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim; nothing elsewhere).

    Each forward_backward runs in a thread of its own (PreemptibleRun), and glibc gives threads their own
    malloc arenas: a pass's activations, freed, stayed cached in that thread's arena, so successive calls
    landing in different arenas held several passes' worth of memory (the default model's server grew
    past 20 GB in a recipe's few steps; with one arena it stayed at its first step's size)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def _passes(data: list[LossDatum]) -> Iterator[list[LossDatum]]:
    """The data in order, in passes of at most PASS_TOKENS tokens (a longer datum alone)."""
    part: list[LossDatum] = []
    tokens = 0
    for d in data:
        if part and tokens + len(d.tokens) > PASS_TOKENS:
            yield part
            part, tokens = [], 0
        part.append(d)
        tokens += len(d.tokens)
    if part:
        yield part
