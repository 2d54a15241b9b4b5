"""What a fine-tuned version keeps beside its weights: the examples it learned from (so that the next
version can replay them and be checked against them) and how it was validated.

Stored as one more file of the version (`hotlora_training.json`, content-addressed like the weights,
committed in the same transaction), so it lives and dies with the version. It is not part of the PEFT
directory: ExportAdapter leaves it out and uploads drop a file of that name."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from hotlora.adapters.peft.format import RECORD_FILE
from hotlora.adapters.training.finetune_spec import Example

__all__ = ["RECORD_FILE", "TrainingRecord", "ValidationSummary"]


@dataclass(frozen=True)
class ValidationSummary:
    scheme: str = ""
    """"kfold" or "holdout"."""
    metric_name: str = ""
    score: float = 0.0
    stderr: float = 0.0
    baseline: float = 0.0
    examples: int = 0
    """Examples the score was measured on."""
    method: str = ""
    previous_task_reference: float = 0.0
    """The previous version's score on its own validation examples (continued adapters)."""
    previous_task_score: float = 0.0
    """This version's score on them."""
    previous_task_stderr: float = 0.0
    previous_task_examples: int = 0


@dataclass(frozen=True)
class TrainingRecord:
    train: tuple[Example, ...] = ()
    """Every training example of this version and of the versions it continued (replay pool)."""
    validation: tuple[Example, ...] = ()
    """Held-out examples of this version and its predecessors (the forgetting check); empty after
    k-fold cross-validation, where every training example was validated once."""
    summary: ValidationSummary = field(default_factory=ValidationSummary)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "train": [asdict(e) for e in self.train],
                "validation": [asdict(e) for e in self.validation],
                "summary": asdict(self.summary),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainingRecord:
        raw = json.loads(data)
        fields = ValidationSummary.__dataclass_fields__
        return cls(
            train=tuple(Example(**e) for e in raw.get("train", ())),
            validation=tuple(Example(**e) for e in raw.get("validation", ())),
            summary=ValidationSummary(**{k: v for k, v in raw.get("summary", {}).items() if k in fields}),
        )
