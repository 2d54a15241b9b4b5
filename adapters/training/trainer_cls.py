"""SEQ_CLS fine-tuning: feature extraction (HEAD_ONLY) and LoRA with a head (LORA, as LP-FT).

1. Features: the last real token's final hidden state of every example, or another `HeadFeatures`
   choice (mean over its tokens, an upper-middle layer) AUTO compares. Every choice compared is computed
   in the same forward, once without gradients, and shared between folds and candidates.
2. Head: logistic regression on those features (features scaled to unit RMS per dimension, a little L2),
   full batch, early stopping on validation accuracy. HEAD_ONLY ends here.
3. LORA: the fitted head initialises a joint LoRA + head fine-tune (linear probing, then fine-tuning:
   the LoRA starts from a head that already works instead of a random one), one mini-batch per unit.
   Linear probing runs a fixed LP_EPOCHS: LoRA's starting head is not chosen on validation examples.
LORA_PROGRESSIVE unfreezes the LoRA layers from the top down, a quarter more each epoch.
The best state over phases 2 (HEAD_ONLY) or 3 (LORA, from its start) is kept (validation accuracy,
then validation loss), and every validation is recorded in `curve`. Without
validation examples (the refit after k-fold cross-validation) each phase runs the epochs `schedule`
gives and keeps its last state."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from hotlora.adapters.head_features import HeadFeatures
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
    one_thread,
    placeholder_module,
)
from hotlora.adapters.training.validation import majority_share
from hotlora.adapters.weights import LoraWeights

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
        features: HeadFeatures = HeadFeatures(),
        compared: tuple[HeadFeatures, ...] = (),
        schedule: tuple[int, int] = (0, 0),
        feature_cache: dict | None = None,
    ):
        super().__init__(model, ctx, data, hyper.seed, unit_seconds)
        self.labels, self.method, self.hyper = labels, method, hyper
        self.shapes, self.num_layers, self.previous = shapes, num_layers, previous
        if method != "HEAD_ONLY" and not features.is_default:
            raise ValueError("a LoRA candidate's head reads the last token's final state")
        self.head_features = features
        """What the head reads (stored with it: Classify computes the same)."""
        self.choices = tuple(dict.fromkeys((features, *compared)))
        """Every feature choice the job compares: computed together, once per example."""
        self.schedule = schedule
        """(head epochs, LoRA epochs) when there are no validation examples to stop early on."""
        self.best_epochs = (0, 0)
        """(head epochs, LoRA epochs) of the best validated state: the refit's `schedule`."""
        # features of the model as it starts (base, or the continued adapter): the same in every fold
        self.feature_cache = {} if feature_cache is None else feature_cache
        self.progress.metric_name = "accuracy"
        carried = nonzero_modules(previous)
        if method == "HEAD_ONLY":
            self.lora = LoraSet.of(previous, False, self.device) if previous is not None else self.lora
        elif carried:
            self.lora = LoraSet({k: (m.a, m.b, m.scale) for k, m in carried.items()}, True, self.device)
        else:
            keys = [(layer, t) for layer in hyper.layers_to_transform for t in hyper.target_modules]
            self.lora = LoraSet.fresh(keys, shapes, hyper.rank, hyper.alpha, hyper.seed, self.device)

    def _features(self, seqs: list[list[int]], choice: HeadFeatures) -> Iterator[torch.Tensor]:
        cache = self.feature_cache
        choices = tuple(dict.fromkeys((*self.choices, choice)))
        todo = [s for s in dict.fromkeys(map(tuple, seqs)) if any((c, s) not in cache for c in choices)]
        for part in self.eval_parts(len(todo)):
            with torch.no_grad():
                pooled = self.features([list(todo[i]) for i in part], choices)
            for c, rows in pooled.items():
                for i, row in zip(part, rows.float().cpu(), strict=True):
                    cache[(c, todo[i])] = row
            yield
        return torch.stack([cache[(choice, tuple(s))] for s in seqs])

    def _run(self) -> Iterator[None]:
        p, d, hp = self.progress, self.data, self.hyper
        validated = bool(d.val_inputs)
        yt, yv = torch.tensor(d.train_targets), torch.tensor(d.val_targets, dtype=torch.long)
        p.phase = "features"
        own = self.head_features
        xt = yield from self._features(d.train_inputs, own)
        xv = (yield from self._features(d.val_inputs, own)) if validated else xt[:0]
        prev_head = None if self.previous is None else self.previous.head_weight
        prev_features = None if self.previous is None else self.previous.head_features
        if not validated:
            p.baseline_metric = 0.0
        elif prev_head is not None:  # the previous head on the features it reads
            xp = (yield from self._features(d.val_inputs, prev_features)) if prev_features != own else xv
            p.baseline_metric = _accuracy(xp @ prev_head.t(), yv)
        else:
            p.baseline_metric = majority_share(d.train_targets, d.val_targets)

        # phase 2: logistic regression on the frozen features
        p.phase = "head"
        head_only = self.method == "HEAD_ONLY"
        scale = xt.pow(2).mean(0).sqrt().clamp_min(1e-6)
        st, sv = xt / scale, xv / scale
        carry = prev_head is not None and prev_features == own  # a head on other features starts afresh
        w = nn.Parameter(prev_head * scale if carry else torch.zeros(len(self.labels), xt.shape[1]))
        opt = torch.optim.Adam([w], lr=hp.learning_rate if head_only else 1e-2)
        epochs = hp.epochs if head_only else LP_EPOCHS
        if not validated:
            epochs = self.schedule[0]
        select = validated and head_only  # linear probing keeps its last state
        if head_only:
            p.total_steps = epochs
        stopper = EarlyStopping(HEAD_PATIENCE)
        if epochs == 0:  # the refit found the continued head best as it was
            stopper.update((0.0, 0.0), lambda: (w.detach() / scale).clone())
        for epoch in range(1, epochs + 1):
            with one_thread():
                loss = F.cross_entropy(st @ w.t(), yt) + HEAD_L2 * w.pow(2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            if epoch % HEAD_EVAL_EVERY and epoch != epochs:
                continue
            if select:
                with one_thread():
                    key = _key(sv @ w.detach().t(), yv)
                self.curve.append(((epoch, 0), key))
            else:
                key = (float(epoch), 0.0)  # the last state is the one
            stopper.update(key, lambda: (w.detach() / scale).clone(), at=epoch)
            if head_only:
                p.step, p.epoch, p.train_loss = epoch, epoch, float(loss.detach())
                p.validation_metric = stopper.best if validated else 0.0
            if stopper.stop:
                break
            if self.unit_spent():
                yield
        head = stopper.best_state
        self.best_epochs = (stopper.best_at, 0)
        if head_only:
            modules = (
                dict(self.previous.modules)
                if self.previous is not None
                else placeholder_module(self.num_layers, self.shapes, self.hyper.target_modules[0])
            )
            self.outcome = self._outcome(modules, head, stopper.best if validated else 0.0)
            return

        # phase 3: LoRA + head, one mini-batch per unit
        p.phase = "lora"
        lora_stop = EarlyStopping(LORA_PATIENCE)
        start = _key(xv @ head.t(), yv) if validated else (0.0, 0.0)
        if validated:
            self.curve.append(((stopper.best_at, 0), start))
        lora_stop.update(start, lambda: (self.lora.snapshot(), head.clone()))
        p.validation_metric = lora_stop.best if validated else 0.0
        w = nn.Parameter(head.to(self.device).clone())
        opt = torch.optim.Adam([*self.lora.parameters(), w], lr=hp.learning_rate)
        batches_per_epoch = -(-len(d.train_inputs) // hp.batch_size)
        lora_epochs = hp.epochs if validated else self.schedule[1]
        p.total_steps = lora_epochs * batches_per_epoch
        layers = sorted({layer for layer, _ in self.lora.params})
        for epoch in range(1, lora_epochs + 1):
            p.epoch = epoch
            frozen = frozen_layers(layers, epoch) if self.method == "LORA_PROGRESSIVE" else set()
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
                drop_frozen_grads(self.lora, frozen)
                opt.step()
                p.step += 1
                p.train_loss = total
                yield
            if validated:
                val_logits = []
                for part in self.eval_parts(len(d.val_inputs)):
                    with torch.no_grad():
                        out = self.pooled([d.val_inputs[i] for i in part]).float() @ w.t()
                        val_logits.append(out.cpu())
                    yield
                key = _key(torch.cat(val_logits), yv)
                self.curve.append(((self.best_epochs[0], epoch), key))
            else:
                key = (float(epoch), 0.0)
            lora_stop.update(key, lambda: (self.lora.snapshot(), w.detach().cpu().clone()), at=epoch)
            p.validation_metric = lora_stop.best if validated else 0.0
            if lora_stop.stop:
                break
        modules, head = lora_stop.best_state
        self.best_epochs = (self.best_epochs[0], lora_stop.best_at)
        self.outcome = self._outcome(modules, head, lora_stop.best if validated else 0.0)

    def _outcome(self, modules, head: torch.Tensor, score: float) -> TrainOutcome:
        rank = max(m.rank for m in modules.values())
        first = next(iter(modules.values()))
        alpha = (
            self.previous.alpha
            if self.previous is not None and self.method == "HEAD_ONLY"
            else (first.scale * first.rank if self.method == "HEAD_ONLY" else self.hyper.alpha)
        )
        if self.method != "HEAD_ONLY" and nonzero_modules(self.previous):
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
            head_features=self.head_features,
        )
        return TrainOutcome(weights, score, self.progress.baseline_metric, "accuracy")


def _key(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """What early stopping and the k-fold choice compare: accuracy, then (on a tie) lower loss."""
    with torch.no_grad():
        return _accuracy(logits, y), -float(F.cross_entropy(logits.float(), y))


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())
