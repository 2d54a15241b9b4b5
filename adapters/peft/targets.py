"""Which layer sites an adapter covers: PEFT's module-matching rules applied to the resident base model.

`resolve_targets` maps a validated `LoraConfig` to (layer, linear layer) -> (rank, scale), so an adapter
covers exactly the modules PEFT would wrap (tests/adapters/test_peft_format.py checks this against peft).
"""

from __future__ import annotations

import math
import time
from typing import Any

import regex
from peft import LoraConfig

from hotlora.adapters.base_model_info import BaseModelInfo
from hotlora.adapters.errors import FailedPrecondition, InvalidArgument
from hotlora.adapters.peft.config import check_rank
from hotlora.adapters.peft.files import AdapterLimits

_REGEX_BUDGET_S = 2.0
_MAX_PATTERN_CHARS = 1024


class _Matcher:
    """PEFT 0.21's module matching (`check_target_module_exists`, `get_pattern_key`), rule for rule, but on
    the `regex` engine under a time budget: user regexes are hostile and `re` cannot be interrupted."""

    def __init__(self, config: LoraConfig):
        self.config = config
        self.deadline = time.monotonic() + _REGEX_BUDGET_S

    def _run(self, option: str, pattern: str, key: str, full: bool = False) -> regex.Match[str] | None:
        if len(pattern) > _MAX_PATTERN_CHARS:
            raise InvalidArgument(f"{option} pattern is longer than {_MAX_PATTERN_CHARS} characters")
        timeout = max(self.deadline - time.monotonic(), 1e-3)
        try:
            if full:
                return regex.fullmatch(pattern, key, timeout=timeout)
            return regex.match(pattern, key, timeout=timeout)
        except regex.error as exc:
            raise InvalidArgument(f"{option} has an invalid regular expression {pattern!r}: {exc}") from None
        except TimeoutError:
            raise InvalidArgument(f"{option} regular expression {pattern!r} is too slow to match") from None

    def targets(self, key: str) -> bool:
        c = self.config
        if c.exclude_modules:
            if isinstance(c.exclude_modules, str):
                if self._run("exclude_modules", c.exclude_modules, key, full=True):
                    return False
            elif key in c.exclude_modules or any(key.endswith(f".{e}") for e in c.exclude_modules):
                return False
        for m in c.modules_to_save or ():
            if self._run("modules_to_save", rf"(^|.*\.){m}($|\..*)", key):
                return False
        if isinstance(c.target_modules, str):
            return self._run("target_modules", c.target_modules, key, full=True) is not None
        if key in c.target_modules:
            return True
        found = any(key.endswith(f".{t}") for t in c.target_modules)
        layers = c.layers_to_transform
        if not found or layers is None or layers == []:
            return found
        if not c.layers_pattern:
            match = self._run("layers_to_transform", r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            patterns = [c.layers_pattern] if isinstance(c.layers_pattern, str) else c.layers_pattern
            for p in patterns:
                match = self._run("layers_pattern", rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers

    def pattern_value(self, option: str, patterns: dict[str, Any], key: str, default: Any) -> Any:
        for pattern in patterns:
            if self._run(option, rf"(.*\.)?({pattern})$", key):
                return patterns[pattern]
        return default


def resolve_targets(
    config: LoraConfig, base: BaseModelInfo, limits: AdapterLimits
) -> dict[tuple[int, str], tuple[int, float]]:
    """(layer, short name) -> (r, scale) for every module PEFT would wrap on this base model."""
    by_path = {path: short for short, path in base.linear_paths.items()}
    plan: dict[tuple[int, str], tuple[int, float]] = {}
    matcher = _Matcher(config)
    prefix = base.layer_prefix + "."
    for key in base.module_names(str(config.task_type)):
        if not matcher.targets(key):
            continue
        index, _, path = key.removeprefix(prefix).partition(".")
        if not key.startswith(prefix) or path not in by_path:
            kind = "an embedding or output layer" if not key.startswith(prefix) else "not a linear layer"
            raise InvalidArgument(
                f"target_modules selects {key!r}, which is {kind}; LoRA is supported only on the linear "
                f"layers inside decoder layers: {', '.join(base.linear_shapes)}"
            )
        r = matcher.pattern_value("rank_pattern", config.rank_pattern, key, config.r)
        alpha = matcher.pattern_value("alpha_pattern", config.alpha_pattern, key, config.lora_alpha)
        check_rank(f"rank of {key}", r, limits)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        plan[(int(index), by_path[path])] = (r, float(scale))
    if not plan:
        raise FailedPrecondition(
            f"adapter_config.json targets no linear layer of this base model (target_modules="
            f"{config.target_modules!r}, layers_to_transform={config.layers_to_transform!r}); its decoder "
            f"layers have: {', '.join(base.linear_shapes)}"
        )
    return plan
