"""Builds the trainers and evaluators a job's search runs, on the resident model, per candidate."""

from __future__ import annotations

from hotlora.adapters.head_features import HeadFeatures
from hotlora.adapters.training.adaptation import Candidate
from hotlora.adapters.training.evaluation import Evaluator
from hotlora.adapters.training.finetune_spec import FineTuneSpec, with_defaults
from hotlora.adapters.training.trainer import TrainData
from hotlora.adapters.training.trainer_cls import ClassifierTrainer
from hotlora.adapters.training.trainer_lm import CompletionTrainer


class WorkerFactory:
    def __init__(
        self,
        manager,
        spec: FineTuneSpec,
        labels: tuple[str, ...],
        previous,
        head_choices: tuple[HeadFeatures, ...] = (),
    ):
        self.m, self.spec, self.labels, self.previous = manager, spec, labels, previous
        self.head_choices = head_choices
        """Every head feature choice the job compares: computed together when one is needed."""

    def trainer(self, cand: Candidate, data: TrainData, schedule: tuple[int, int], feature_cache: dict):
        m = self.m
        hyper = with_defaults(
            self.spec.hyper, cand.method, len(data.train_inputs), m.base.num_layers, m.targets
        )
        if self.spec.task == "SEQ_CLS":
            return ClassifierTrainer(
                m.model,
                m.ctx,
                data,
                labels=self.labels,
                method=cand.method,
                hyper=hyper,
                shapes=m.base.linear_shapes,
                num_layers=m.base.num_layers,
                previous=self.previous,
                unit_seconds=m.unit_seconds,
                features=cand.features,
                compared=self.head_choices,
                schedule=schedule,
                feature_cache=feature_cache,
            )
        return CompletionTrainer(
            m.model,
            m.ctx,
            data,
            hyper=hyper,
            shapes=m.base.linear_shapes,
            previous=self.previous,
            unit_seconds=m.unit_seconds,
            method=cand.method,
            schedule=schedule,
        )

    def evaluator(self, weights, data: TrainData) -> Evaluator:
        m = self.m
        return Evaluator(
            m.model, m.ctx, data, task=self.spec.task, weights=weights, unit_seconds=m.unit_seconds
        )
