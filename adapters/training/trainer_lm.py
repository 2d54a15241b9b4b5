"""CAUSAL_LM fine-tuning: LoRA on prompt → completion pairs, loss on the completion tokens only.

The validation metric is the negative mean cross-entropy per completion token (higher is better); the
baseline is the same metric before the first update, i.e. the base model's zero-shot score (or the
continued adapter's). Without validation examples (the refit after k-fold cross-validation) it trains
for the epochs `schedule` gives and keeps the last state. LORA_PROGRESSIVE unfreezes from the top."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.nn import functional as F

from hotlora.adapters.training.finetune_spec import HyperParams
from hotlora.adapters.training.trainer import (
    UNIT_SECONDS,
    EarlyStopping,
    LoraSet,
    TrainData,
    Trainer,
    TrainOutcome,
    drop_frozen_grads,
    frozen_layers,
    nonzero_modules,
)
from hotlora.adapters.weights import LoraWeights

METRIC = "neg_completion_loss"
PATIENCE = 2  # epochs


class CompletionTrainer(Trainer):
    def __init__(
        self,
        model,
        ctx,
        data: TrainData,
        *,
        hyper: HyperParams,
        shapes: dict[str, tuple[int, int]],
        previous: LoraWeights | None = None,
        unit_seconds: float = UNIT_SECONDS,
        method: str = "LORA",
        schedule: tuple[int, int] = (0, 0),
    ):
        super().__init__(model, ctx, data, hyper.seed, unit_seconds)
        self.hyper, self.previous, self.method = hyper, previous, method
        self.schedule = schedule
        """(0, LoRA epochs) when there are no validation examples to stop early on."""
        self.best_epochs = (0, 0)
        self.lm_head = model.get_output_embeddings()
        self.progress.metric_name = METRIC
        carried = nonzero_modules(previous)
        if carried:
            self.lora = LoraSet({k: (m.a, m.b, m.scale) for k, m in carried.items()}, True, self.device)
            self.alpha = previous.alpha
        else:
            keys = [(layer, t) for layer in hyper.layers_to_transform for t in hyper.target_modules]
            self.lora = LoraSet.fresh(keys, shapes, hyper.rank, hyper.alpha, hyper.seed, self.device)
            self.alpha = hyper.alpha

    def _loss(self, idx: list[int], inputs, targets) -> tuple[torch.Tensor, int]:
        """Summed completion-token cross-entropy of examples `idx`, and the number of those tokens."""
        seqs = [inputs[i] + targets[i] for i in idx]
        hidden, _ = self.hidden(seqs)
        total, count = hidden.new_zeros((), dtype=torch.float32), 0
        for row, i in enumerate(idx):
            start, n = len(inputs[i]), len(targets[i])
            # position t predicts token t+1: completion tokens are predicted from start-1 .. start+n-2
            logits = self.lm_head(hidden[row, start - 1 : start - 1 + n]).float()
            total = total + F.cross_entropy(
                logits, torch.tensor(targets[i], device=logits.device), reduction="sum"
            )
            count += n
        return total, count

    def _evaluate(self) -> Iterator[None]:
        d = self.data
        total, count = 0.0, 0
        for part in self.eval_parts(len(d.val_inputs)):
            with torch.no_grad():
                s, n = self._loss(part, d.val_inputs, d.val_targets)
            total, count = total + float(s), count + n
            yield
        return -total / max(count, 1)

    def _run(self) -> Iterator[None]:
        p, d, hp = self.progress, self.data, self.hyper
        validated = bool(d.val_inputs)
        p.phase = "baseline"
        p.baseline_metric = (yield from self._evaluate()) if validated else 0.0
        stopper = EarlyStopping(PATIENCE)
        stopper.update((p.baseline_metric, 0.0), self.lora.snapshot)
        if validated:
            self.curve.append(((0, 0), (p.baseline_metric, 0.0)))
        p.validation_metric = p.baseline_metric
        p.phase = "lora"
        opt = torch.optim.Adam(self.lora.parameters(), lr=hp.learning_rate)
        epochs = hp.epochs if validated else self.schedule[1]
        p.total_steps = epochs * -(-len(d.train_inputs) // hp.batch_size)
        layers = sorted({layer for layer, _ in self.lora.params})
        for epoch in range(1, epochs + 1):
            p.epoch = epoch
            frozen = frozen_layers(layers, epoch) if self.method == "LORA_PROGRESSIVE" else set()
            for idx in self.batches(len(d.train_inputs), hp.batch_size):
                opt.zero_grad()
                count = sum(len(d.train_targets[i]) for i in idx)
                loss_sum = 0.0
                for k, part in enumerate(self.micro(idx)):  # gradient accumulation, one part per unit
                    if k:
                        yield
                    total, _ = self._loss(part, d.train_inputs, d.train_targets)
                    (total / count).backward()
                    loss_sum += total.item()
                drop_frozen_grads(self.lora, frozen)
                opt.step()
                p.step += 1
                p.train_loss = loss_sum / count
                yield
            metric = (yield from self._evaluate()) if validated else float(epoch)
            stopper.update((metric, 0.0), self.lora.snapshot, at=epoch)
            if validated:
                self.curve.append(((0, epoch), (metric, 0.0)))
            p.validation_metric = stopper.best if validated else 0.0
            if stopper.stop:
                break
        modules = stopper.best_state
        self.best_epochs = (0, stopper.best_at)
        weights = LoraWeights(
            task="CAUSAL_LM",
            rank=max(m.rank for m in modules.values()),
            alpha=float(self.alpha),
            target_modules=tuple(sorted({s for _, s in modules})),
            modules=modules,
        )
        score = stopper.best if validated else 0.0
        self.outcome = TrainOutcome(weights, score, p.baseline_metric, METRIC)
