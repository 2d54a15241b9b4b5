"""PEFT adapter directories in and out: `adapter_config.json` + `adapter_model.safetensors`.

Parsing treats every byte as hostile: sizes are checked before anything is decoded, user regexes run
under a time budget, and only safetensors is ever deserialised. PEFT's own LoraConfig validates the
config; target resolution repeats PEFT's matching rules on the module names of the resident base model,
so an adapter covers exactly the modules PEFT would wrap (the tests check this against peft itself).

The parts: peft_files (file names, `AdapterLimits`), peft_config (adapter_config.json), peft_targets (which
layer sites), peft_tensors (adapter_model.safetensors), peft_writer (the way out). Import from here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from hotlora.adapters.base_model_info import BaseModelInfo
from hotlora.adapters.errors import InvalidArgument, ResourceExhausted
from hotlora.adapters.head_features import HEAD_FILE, HeadFeatures
from hotlora.adapters.peft.config import MAX_ALPHA, load_config
from hotlora.adapters.peft.files import (
    CONFIG_FILE,
    IGNORED_FILES,
    KEY_PREFIX,
    MIB,
    PICKLE_SUFFIXES,
    RECORD_FILE,
    WEIGHTS_FILE,
    AdapterLimits,
    check_files,
)
from hotlora.adapters.peft.targets import resolve_targets
from hotlora.adapters.peft.tensors import (
    FLOAT_DTYPES,
    load_safetensors,
    refuse_foreign_modules,
    take_head,
    take_modules,
)
from hotlora.adapters.peft.writer import write_peft_adapter
from hotlora.adapters.weights import LoraWeights

__all__ = [
    "CONFIG_FILE",
    "FLOAT_DTYPES",
    "HEAD_FILE",
    "IGNORED_FILES",
    "KEY_PREFIX",
    "MAX_ALPHA",
    "MIB",
    "PICKLE_SUFFIXES",
    "RECORD_FILE",
    "WEIGHTS_FILE",
    "AdapterLimits",
    "parse_peft_adapter",
    "write_peft_adapter",
]


def parse_peft_adapter(
    files: dict[str, bytes], base: BaseModelInfo, limits: AdapterLimits, labels: Sequence[str] = ()
) -> LoraWeights:
    """Validate a PEFT adapter directory (file name -> bytes) against the base model."""
    check_files(files, limits)
    config = load_config(files[CONFIG_FILE], base, limits)
    plan = resolve_targets(config, base, limits)
    tensors = load_safetensors(files[WEIGHTS_FILE], limits)
    task = str(config.task_type)
    modules = take_modules(tensors, plan, base, dora=bool(config.use_dora))
    head_weight = head_bias = None
    if task == "SEQ_CLS":
        head_weight, head_bias = take_head(tensors, base)
    if tensors:
        extra = sorted(tensors)
        refuse_foreign_modules(extra, base)
        raise InvalidArgument(
            f"{WEIGHTS_FILE} has {len(extra)} tensor(s) that adapter_config.json does not account for, "
            f"e.g. {extra[0]!r}; allowed: lora_A/lora_B of the targeted modules"
            + (f" and the '{base.head_name}' head" if task == "SEQ_CLS" else "")
        )
    names = _check_labels(labels, task, head_weight, limits)
    features = HeadFeatures()
    if HEAD_FILE in files:
        if head_weight is None:
            raise InvalidArgument(f"{HEAD_FILE} applies only to SEQ_CLS adapters; this adapter is {task}")
        if len(files[HEAD_FILE]) > limits.max_config_bytes:
            raise ResourceExhausted(f"{HEAD_FILE} is over {limits.max_config_bytes} bytes")
        features = HeadFeatures.from_bytes(files[HEAD_FILE], base.num_layers)
    return LoraWeights(
        task=task,
        rank=max(m.rank for m in modules.values()),
        alpha=float(config.lora_alpha),
        target_modules=tuple(sorted({short for _, short in modules})),
        modules=modules,
        head_weight=head_weight,
        head_bias=head_bias,
        labels=names,
        head_features=features,
    )


def _check_labels(
    labels: Sequence[str], task: str, head: torch.Tensor | None, limits: AdapterLimits
) -> tuple[str, ...]:
    labels = tuple(labels)
    if head is None:
        if labels:
            raise InvalidArgument("labels apply only to SEQ_CLS adapters; this adapter is CAUSAL_LM")
        return ()
    n = int(head.shape[0])
    if n > limits.max_labels:
        raise ResourceExhausted(f"the head has {n} labels; the limit is {limits.max_labels}")
    if not labels:
        return tuple(f"LABEL_{i}" for i in range(n))
    if len(labels) != n:
        raise InvalidArgument(f"{len(labels)} labels were given but the classification head has {n} outputs")
    for label in labels:
        if not isinstance(label, str) or not label or len(label) > limits.max_label_chars:
            raise InvalidArgument(
                f"label {label!r} must be a non-empty string of at most {limits.max_label_chars} characters"
            )
    dupes = [label for label, c in Counter(labels).items() if c > 1]
    if dupes:
        raise InvalidArgument(f"labels must be unique; repeated: {dupes[:5]}")
    return labels
