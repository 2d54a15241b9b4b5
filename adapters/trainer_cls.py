"""SEQ_CLS fine-tuning: feature extraction (HEAD_ONLY) and LoRA with a head (LORA, as LP-FT).

1. Features: the last real token's hidden state of every example, computed once without gradients.
2. Head: logistic regression on those features (features scaled to unit RMS per dimension, a little L2),
   full batch, early stopping on validation accuracy. HEAD_ONLY ends here.
3. LORA: the fitted head initialises a joint LoRA + head fine-tune (linear probing, then fine-tuning:
   the LoRA starts from a head that already works instead of a random one), one mini-batch per unit.
The best state over phases 2 and 3 is kept (validation accuracy, then validation loss)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
from hotlora.adapters.finetune_spec import HyperParams
from hotlora.adapters.trainer import (
    UNIT_SECONDS,
    EarlyStopping,
    LoraSet,
    TrainData,
    Trainer,
    TrainOutcome,
    nonzero_modules,
    placeholder_module,
)
from hotlora.adapters.weights import LoraWeights
from torch import nn
from torch.nn import functional as F

HEAD_L2 = 1e-3  # on the RMS-scaled features
HEAD_EVAL_EVERY = 10  # head epochs per unit (each is one [n, H] x [H, C] product)
HEAD_PATIENCE = 5  # evaluations
LORA_PATIENCE = 3  # epochs
LP_EPOCHS = 200  # head epochs before the LoRA phase


class ClassifierTrainer(Trainer):
    def __init__(
        self,
        model,
        ctx,
        data: TrainData,
        *,
        labels: tuple[str, ...],
        method: str,
        hyper: HyperParams,
        shapes: dict[str, tuple[int, int]],
        num_layers: int,
        previous: LoraWeights | None = None,
        unit_seconds: float = UNIT_SECONDS,
    ):
        super().__init__(model, ctx, data, hyper.seed, unit_seconds)
        self.labels, self.method, self.hyper = labels, method, hyper
        self.shapes, self.num_layers, self.previous = shapes, num_layers, previous
        self.progress.metric_name = "accuracy"
        carried = nonzero_modules(previous)
        if method == "HEAD_ONLY":
            self.lora = LoraSet.of(previous, False, self.device) if previous is not None else self.lora
        elif carried:
            self.lora = LoraSet({k: (m.a, m.b, m.scale) for k, m in carried.items()}, True, self.device)
        else:
            keys = [(layer, t) for layer in hyper.layers_to_transform for t in hyper.target_modules]
            self.lora = LoraSet.fresh(keys, shapes, hyper.rank, hyper.alpha, hyper.seed, self.device)

    def _features(self, seqs: list[list[int]]) -> Iterator[torch.Tensor]:
        out = []
        for part in self.eval_parts(len(seqs)):
            with torch.no_grad():
                out.append(self.pooled([seqs[i] for i in part]).float().cpu())
            yield
        return torch.cat(out)

    def _run(self) -> Iterator[None]:
        p, d, hp = self.progress, self.data, self.hyper
        yt, yv = torch.tensor(d.train_targets), torch.tensor(d.val_targets)
        p.phase = "features"
        xt = yield from self._features(d.train_inputs)
        xv = yield from self._features(d.val_inputs)
        prev_head = None if self.previous is None else self.previous.head_weight
        if prev_head is not None:
            p.baseline_metric = _accuracy(xv @ prev_head.t(), yv)
        else:
            majority = Counter(d.train_targets).most_common(1)[0][0]
            p.baseline_metric = float((yv == majority).float().mean())

        # phase 2: logistic regression on the frozen features
        p.phase = "head"
        scale = xt.pow(2).mean(0).sqrt().clamp_min(1e-6)
        st, sv = xt / scale, xv / scale
        w = nn.Parameter(
            prev_head * scale if prev_head is not None else torch.zeros(len(self.labels), xt.shape[1])
        )
        opt = torch.optim.Adam([w], lr=hp.learning_rate if self.method == "HEAD_ONLY" else 1e-2)
        epochs = hp.epochs if self.method == "HEAD_ONLY" else LP_EPOCHS
        if self.method == "HEAD_ONLY":
            p.total_steps = epochs
        stopper = EarlyStopping(HEAD_PATIENCE)
        for epoch in range(1, epochs + 1):
            loss = F.cross_entropy(st @ w.t(), yt) + HEAD_L2 * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if epoch % HEAD_EVAL_EVERY and epoch != epochs:
                continue
            with torch.no_grad():
                logits = sv @ w.t()
                key = (_accuracy(logits, yv), -float(F.cross_entropy(logits, yv)))
            stopper.update(key, lambda: (w.detach() / scale).clone())
            if self.method == "HEAD_ONLY":
                p.step, p.epoch, p.train_loss = epoch, epoch, float(loss.detach())
                p.validation_metric = stopper.best
            yield
            if stopper.stop:
                break
        head = stopper.best_state
        if self.method == "HEAD_ONLY":
            modules = (
                dict(self.previous.modules)
                if self.previous is not None
                else placeholder_module(self.num_layers, self.shapes, self.hyper.target_modules[0])
            )
            self.outcome = self._outcome(modules, head, stopper.best)
            return

        # phase 3: LoRA + head, one mini-batch per unit
        p.phase = "lora"
        lora_stop = EarlyStopping(LORA_PATIENCE)
        lora_stop.update(stopper.best_key, lambda: (self.lora.snapshot(), head.clone()))
        p.validation_metric = lora_stop.best
        w = nn.Parameter(head.to(self.device).clone())
        opt = torch.optim.Adam([*self.lora.parameters(), w], lr=hp.learning_rate)
        batches_per_epoch = -(-len(d.train_inputs) // hp.batch_size)
        p.total_steps = hp.epochs * batches_per_epoch
        for epoch in range(1, hp.epochs + 1):
            p.epoch = epoch
            for idx in self.batches(len(d.train_inputs), hp.batch_size):
                opt.zero_grad()
                total = 0.0
                for k, part in enumerate(self.micro(idx)):  # gradient accumulation, one part per unit
                    if k:
                        yield
                    logits = self.pooled([d.train_inputs[i] for i in part]).float() @ w.t()
                    loss = F.cross_entropy(logits, yt[part].to(self.device), reduction="sum") / len(idx)
                    loss.backward()
                    total += loss.item()
                opt.step()
                p.step += 1
                p.train_loss = total
                yield
            val_logits = []
            for part in self.eval_parts(len(d.val_inputs)):
                with torch.no_grad():
                    val_logits.append((self.pooled([d.val_inputs[i] for i in part]).float() @ w.t()).cpu())
                yield
            logits = torch.cat(val_logits)
            key = (_accuracy(logits, yv), -float(F.cross_entropy(logits, yv)))
            lora_stop.update(key, lambda: (self.lora.snapshot(), w.detach().cpu().clone()))
            p.validation_metric = lora_stop.best
            if lora_stop.stop:
                break
        modules, head = lora_stop.best_state
        self.outcome = self._outcome(modules, head, lora_stop.best)

    def _outcome(self, modules, head: torch.Tensor, score: float) -> TrainOutcome:
        rank = max(m.rank for m in modules.values())
        first = next(iter(modules.values()))
        alpha = (
            self.previous.alpha
            if self.previous is not None and self.method == "HEAD_ONLY"
            else (first.scale * first.rank if self.method == "HEAD_ONLY" else self.hyper.alpha)
        )
        if self.method == "LORA" and nonzero_modules(self.previous):
            alpha = self.previous.alpha
        weights = LoraWeights(
            task="SEQ_CLS",
            rank=rank,
            alpha=float(alpha),
            target_modules=tuple(sorted({s for _, s in modules})),
            modules=modules,
            head_weight=head.float().cpu().contiguous(),
            head_bias=None,
            labels=self.labels,
        )
        return TrainOutcome(weights, score, self.progress.baseline_metric, "accuracy")


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())
