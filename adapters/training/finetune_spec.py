"""What a fine-tune is asked to do, checked before a job is queued: examples, labels, hyper-parameters.

Everything a caller can get wrong is refused here with InvalidArgument (or ResourceExhausted for sizes),
so a queued job fails only for reasons the caller could not have seen coming."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from hotlora.adapters.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

METHODS = ("AUTO", "HEAD_ONLY", "LORA", "LORA_PROGRESSIVE")
PROMOTE = ("GATED", "ALWAYS")
# AUTO tries these in order of cost and keeps the best validated one (adapters/training/adaptation.py)
AUTO_ORDER = {"SEQ_CLS": ("HEAD_ONLY", "LORA", "LORA_PROGRESSIVE"), "CAUSAL_LM": ("LORA", "LORA_PROGRESSIVE")}
VALIDATION_FRACTION = 0.2
MAX_SECONDS = 24 * 3600.0
MAX_EPOCHS = 100
MAX_BATCH_SIZE = 256


@dataclass(frozen=True)
class Example:
    text: str = ""
    label: str = ""
    prompt: str = ""
    completion: str = ""


@dataclass(frozen=True)
class HyperParams:
    """0 / empty means "the default for the method" (see `with_defaults`)."""

    rank: int = 0
    """LoRA rank of new modules (default 8)."""
    alpha: float = 0.0
    """LoRA alpha (default 2 × rank)."""
    learning_rate: float = 0.0
    """Adam learning rate (default 1e-3 for LoRA, 1e-2 for a head)."""
    epochs: int = 0
    """Passes over the training examples (default: enough for ~150 optimizer steps, 2..20; head: 300).
    Early stopping on the validation metric usually ends sooner."""
    batch_size: int = 0
    """Examples per optimizer step (default 8)."""
    target_modules: tuple[str, ...] = ()
    """Linear layers that get LoRA (default: every module the server can adapt)."""
    layers_to_transform: tuple[int, ...] = ()
    """Decoder layers that get LoRA (default: the upper half)."""
    seed: int = 0


@dataclass(frozen=True)
class FineTuneSpec:
    adapter: str
    task: str
    """"SEQ_CLS" or "CAUSAL_LM"."""
    method: str = "AUTO"
    examples: tuple[Example, ...] = ()
    validation: tuple[Example, ...] = ()
    """Empty: a (stratified) 20% split of `examples` with the job's seed."""
    hyper: HyperParams = field(default_factory=HyperParams)
    promote: str = "GATED"
    labels: tuple[str, ...] = ()
    """SEQ_CLS label order (default: sorted labels, or the continued adapter's)."""
    use_chat_template: bool = False
    description: str = ""
    max_seconds: float = 0.0
    """Time budget of the method search (AUTO); 0 = the server's --finetune-max-seconds."""


@dataclass(frozen=True)
class FineTuneLimits:
    max_examples: int = 10_000
    """Training plus validation examples in one job."""
    max_example_chars: int = 8192
    max_labels: int = 256
    max_rank: int = 64


def check_spec(
    spec: FineTuneSpec, limits: FineTuneLimits, num_layers: int, target_modules: tuple[str, ...]
) -> None:
    """Refuse an inconsistent request; says what is wrong and what is allowed."""
    if spec.task not in ("SEQ_CLS", "CAUSAL_LM"):
        raise InvalidArgument(f"task must be SEQ_CLS or CAUSAL_LM (got {spec.task!r})")
    if spec.method not in METHODS:
        raise InvalidArgument(f"method must be one of {', '.join(METHODS)} (got {spec.method!r})")
    if spec.method == "HEAD_ONLY" and spec.task != "SEQ_CLS":
        raise InvalidArgument(
            "method HEAD_ONLY trains a classification head: it needs task SEQ_CLS; "
            "use LORA (or AUTO) for CAUSAL_LM"
        )
    if not (math.isfinite(spec.max_seconds) and 0 <= spec.max_seconds <= MAX_SECONDS):
        raise InvalidArgument(
            f"max_seconds must be 0 (the server's default) to {MAX_SECONDS:.0f}; got {spec.max_seconds}"
        )
    if spec.promote not in PROMOTE:
        raise InvalidArgument(f"promote must be GATED or ALWAYS (got {spec.promote!r})")
    if not spec.examples:
        raise InvalidArgument("no training examples; give at least 2")
    n = len(spec.examples) + len(spec.validation)
    if n > limits.max_examples:
        raise ResourceExhausted(f"{n} examples in one job; this server accepts at most {limits.max_examples}")
    if not spec.validation and len(spec.examples) < 2:
        raise InvalidArgument(
            "at least 2 examples are needed to split off a validation set (or give validation examples)"
        )
    for where, items in (("examples", spec.examples), ("validation", spec.validation)):
        for i, e in enumerate(items):
            check_example(spec.task, e, f"{where}[{i}]", limits)
    if spec.task == "SEQ_CLS":
        _check_labels(spec, limits)
    elif spec.labels:
        raise InvalidArgument("labels apply only to SEQ_CLS fine-tunes")
    _check_hyper(spec.hyper, limits, num_layers, target_modules)


def check_example(task: str, e: Example, where: str, limits: FineTuneLimits) -> None:
    if task == "SEQ_CLS":
        if e.prompt or e.completion:
            raise InvalidArgument(f"{where}: a SEQ_CLS example is {{text, label}}; it has prompt/completion")
        if not e.text or not e.label:
            raise InvalidArgument(f"{where}: a SEQ_CLS example needs a non-empty text and label")
    else:
        if e.text or e.label:
            raise InvalidArgument(
                f"{where}: a CAUSAL_LM example is {{prompt, completion}}; it has text/label"
            )
        if not e.prompt or not e.completion:
            raise InvalidArgument(f"{where}: a CAUSAL_LM example needs a non-empty prompt and completion")
    size = len(e.text) + len(e.prompt) + len(e.completion)
    if size > limits.max_example_chars:
        raise ResourceExhausted(f"{where} has {size} characters; at most {limits.max_example_chars}")


def _check_labels(spec: FineTuneSpec, limits: FineTuneLimits) -> None:
    seen = {e.label for e in spec.examples}
    if spec.labels:
        if len(set(spec.labels)) != len(spec.labels):
            raise InvalidArgument("labels must be unique")
        unknown = sorted({e.label for e in (*spec.examples, *spec.validation)} - set(spec.labels))
        if unknown:
            raise InvalidArgument(
                f"examples use label(s) {unknown[:5]} that are not in labels {list(spec.labels)[:10]}"
            )
    if len(seen) < 2:
        raise InvalidArgument(
            f"the training examples have {len(seen)} distinct label(s); a classifier needs at least 2"
        )
    n = len(spec.labels) or len(seen | {e.label for e in spec.validation})
    if n > limits.max_labels:
        raise ResourceExhausted(f"{n} labels; at most {limits.max_labels}")


def _check_hyper(hp: HyperParams, limits: FineTuneLimits, num_layers: int, targets: tuple[str, ...]) -> None:
    if not 0 <= hp.rank <= limits.max_rank:
        raise InvalidArgument(f"rank must be 1..{limits.max_rank} (or 0 for the default 8); got {hp.rank}")
    if not (math.isfinite(hp.alpha) and 0 <= hp.alpha <= 1024):
        raise InvalidArgument(f"alpha must be in (0, 1024] (or 0 for 2 × rank); got {hp.alpha}")
    if not (math.isfinite(hp.learning_rate) and 0 <= hp.learning_rate <= 1.0):
        raise InvalidArgument(
            f"learning_rate must be in (0, 1] (or 0 for the default); got {hp.learning_rate}"
        )
    if not 0 <= hp.epochs <= MAX_EPOCHS:
        raise InvalidArgument(f"epochs must be 1..{MAX_EPOCHS} (or 0 for the default); got {hp.epochs}")
    if not 0 <= hp.batch_size <= MAX_BATCH_SIZE:
        raise InvalidArgument(f"batch_size must be 1..{MAX_BATCH_SIZE} (or 0 for 8); got {hp.batch_size}")
    bad = sorted(set(hp.target_modules) - set(targets))
    if bad:
        raise InvalidArgument(
            f"target_modules {bad} cannot carry LoRA on this server; allowed: {', '.join(targets)}"
        )
    beyond = sorted(i for i in hp.layers_to_transform if not 0 <= i < num_layers)
    if beyond:
        raise InvalidArgument(
            f"layers_to_transform {beyond} out of range; the base model has layers 0..{num_layers - 1}"
        )
    if not 0 <= hp.seed < 2**63:
        raise InvalidArgument("seed must be in [0, 2^63)")


def label_order(spec: FineTuneSpec, previous: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The head's row order: the continued adapter's labels, else the request's, else sorted."""
    used = {e.label for e in (*spec.examples, *spec.validation)}
    if previous:
        unknown = sorted(used - set(previous))
        if unknown:
            raise InvalidArgument(
                f"examples use label(s) {unknown[:5]} that the continued adapter's head lacks; "
                f"its labels are {list(previous)[:10]} (fine-tune a new adapter name for new labels)"
            )
        if spec.labels and tuple(spec.labels) != tuple(previous):
            raise InvalidArgument(f"labels must match the continued adapter's labels {list(previous)[:10]}")
        return tuple(previous)
    return tuple(spec.labels) or tuple(sorted(used))


def candidate_methods(spec: FineTuneSpec) -> tuple[str, ...]:
    """The methods a job tries, cheapest first: AUTO's list for the task, or the one asked for."""
    return AUTO_ORDER[spec.task] if spec.method == "AUTO" else (spec.method,)


def with_defaults(
    hp: HyperParams, method: str, n_train: int, num_layers: int, targets: tuple[str, ...]
) -> HyperParams:
    batch = hp.batch_size or 8
    steps_per_epoch = max(1, math.ceil(n_train / batch))
    if method == "HEAD_ONLY":
        epochs = hp.epochs or 300  # full-batch head epochs are microseconds
        lr = hp.learning_rate or 1e-2
    else:
        epochs = hp.epochs or max(2, min(20, math.ceil(150 / steps_per_epoch)))
        lr = hp.learning_rate or 1e-3
    rank = hp.rank or 8
    return replace(
        hp,
        rank=rank,
        alpha=hp.alpha or 2.0 * rank,
        learning_rate=lr,
        epochs=epochs,
        batch_size=batch,
        target_modules=tuple(hp.target_modules) or tuple(targets),
        layers_to_transform=tuple(sorted(set(hp.layers_to_transform)))
        or tuple(range(num_layers // 2, num_layers)),  # the upper half (progressive: unfrozen from the top)
    )


def tokenize_examples(
    tok, max_example_tokens: int, spec: FineTuneSpec, items, labels, where: str
) -> tuple[list, list]:
    """(inputs, targets) of examples: text ids and label indices, or prompt ids and completion ids
    (eos included)."""
    index = {label: i for i, label in enumerate(labels)}

    def ids(text: str, where: str, special: bool = True) -> list[int]:
        out = list(tok(text, add_special_tokens=special)["input_ids"])
        if not out:
            raise InvalidArgument(f"{where} is empty after tokenization")
        return out

    def prompt_ids(prompt: str, where: str) -> list[int]:
        if not spec.use_chat_template:
            return ids(prompt, where)
        if not getattr(tok, "chat_template", None):
            raise FailedPrecondition("use_chat_template: this model has no chat template")
        out = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )
        return list(out["input_ids"])

    def encode(items, where):
        inputs, targets = [], []
        for i, e in enumerate(items):
            w = f"{where}[{i}]"
            if spec.task == "SEQ_CLS":
                x, y = ids(e.text, w), index[e.label]
                n = len(x)
            else:
                x = prompt_ids(e.prompt, w)
                y = ids(e.completion, w, special=False) + (
                    [tok.eos_token_id] if tok.eos_token_id is not None else []
                )
                n = len(x) + len(y)
            if n > max_example_tokens:
                raise ResourceExhausted(f"{w} has {n} tokens; at most {max_example_tokens} per example")
            inputs.append(x)
            targets.append(y)
        return inputs, targets

    return encode(items, where)
