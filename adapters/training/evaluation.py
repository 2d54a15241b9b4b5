"""Scoring an adapter (or the base model) on labelled examples, in bounded units the engine runs
between serving steps, like training.

SEQ_CLS: accuracy, macro-F1 (over the labels that occur in the truth or the predictions, as
scikit-learn's `f1_score(average="macro")`), the confusion matrix (rows: true label, columns: predicted,
in the adapter's label order) and the mean cross-entropy. CAUSAL_LM: the mean cross-entropy per
completion token, its perplexity, and exact match: the share of examples whose greedy continuation of
the prompt is exactly the completion (then end of sequence), checked from one teacher-forced forward —
greedy decoding yields the completion iff every completion token is the argmax after its prefix."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from hotlora.adapters.training.trainer import UNIT_SECONDS, LoraSet, TrainData, Trainer
from hotlora.adapters.weights import LoraWeights


@dataclass(frozen=True)
class Evaluation:
    task: str
    examples: int
    accuracy: float = 0.0
    macro_f1: float = 0.0
    confusion: tuple[tuple[int, ...], ...] = ()
    labels: tuple[str, ...] = ()
    loss: float = 0.0
    perplexity: float = 0.0
    exact_match: float = 0.0
    loss_stderr: float = 0.0
    """Standard error of the mean per-example completion loss (CAUSAL_LM)."""
    tokens: int = 0
    predictions: tuple[int, ...] = field(default=(), repr=False)


class Evaluator(Trainer):
    """`data.val_inputs/val_targets` are scored (label indices, or completion ids with eos)."""

    def __init__(
        self,
        model,
        ctx,
        data: TrainData,
        *,
        task: str,
        weights: LoraWeights | None,
        unit_seconds: float = UNIT_SECONDS,
    ):
        super().__init__(model, ctx, data, 0, unit_seconds)
        self.task, self.weights = task, weights
        if weights is not None:
            self.lora = LoraSet.of(weights, False, self.device)
        self.lm_head = model.get_output_embeddings()
        self.result: Evaluation | None = None
        self.progress.phase = "evaluating"
        self.progress.total_steps = len(data.val_inputs)

    def _run(self) -> Iterator[None]:
        if self.task == "SEQ_CLS":
            yield from self._classify()
        else:
            yield from self._complete()

    def _classify(self) -> Iterator[None]:
        d, head = self.data, self.weights.head_weight
        logits = []
        for part in self.eval_parts(len(d.val_inputs)):
            with torch.no_grad():
                seqs = [d.val_inputs[i] for i in part]
                pooled = self.pooled(seqs, self.weights.head_features).float().cpu()
            bias = 0.0 if self.weights.head_bias is None else self.weights.head_bias
            logits.append(pooled @ head.t() + bias)
            self.progress.step += len(part)
            yield
        self.result = classification_metrics(torch.cat(logits), d.val_targets, self.weights.labels)

    def _complete(self) -> Iterator[None]:
        d = self.data
        total, tokens, exact, per_example = 0.0, 0, 0, []
        for part in self.eval_parts(len(d.val_inputs)):
            with torch.no_grad():
                hidden, _ = self.hidden([d.val_inputs[i] + d.val_targets[i] for i in part])
                for row, i in enumerate(part):
                    start, n = len(d.val_inputs[i]), len(d.val_targets[i])
                    logits = self.lm_head(hidden[row, start - 1 : start - 1 + n]).float()
                    target = torch.tensor(d.val_targets[i], device=logits.device)
                    loss = float(F.cross_entropy(logits, target, reduction="sum"))
                    total, tokens = total + loss, tokens + n
                    per_example.append(loss / n)
                    exact += bool((logits.argmax(-1) == target).all())
            self.progress.step += len(part)
            yield
        loss = total / max(tokens, 1)
        m = len(per_example)
        spread = 0.0
        if m > 1:
            mean = sum(per_example) / m
            spread = math.sqrt(sum((x - mean) ** 2 for x in per_example) / (m - 1) / m)
        self.result = Evaluation(
            task="CAUSAL_LM",
            examples=len(d.val_inputs),
            loss=loss,
            perplexity=math.exp(min(loss, 700.0)),
            exact_match=exact / max(len(d.val_inputs), 1),
            loss_stderr=spread,
            tokens=tokens,
        )


def classification_metrics(logits: torch.Tensor, targets: list[int], labels: tuple[str, ...]) -> Evaluation:
    y = torch.tensor(targets, dtype=torch.long)
    pred = logits.argmax(-1)
    c = len(labels)
    confusion = torch.zeros(c, c, dtype=torch.long)
    for t, p in zip(y.tolist(), pred.tolist(), strict=True):
        confusion[t, p] += 1
    f1s = []
    for k in range(c):
        tp = int(confusion[k, k])
        fp = int(confusion[:, k].sum()) - tp
        fn = int(confusion[k, :].sum()) - tp
        if tp + fp + fn:  # the label occurs in the truth or the predictions
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return Evaluation(
        task="SEQ_CLS",
        examples=len(targets),
        accuracy=float((pred == y).float().mean()) if targets else 0.0,
        macro_f1=sum(f1s) / len(f1s) if f1s else 0.0,
        confusion=tuple(tuple(int(v) for v in r) for r in confusion),
        labels=tuple(labels),
        loss=float(F.cross_entropy(logits, y)) if targets else 0.0,
        predictions=tuple(pred.tolist()),
    )
