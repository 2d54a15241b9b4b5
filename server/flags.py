"""Flags declared once: each field of a config class (`config_class`) is one command-line flag and one
environment variable, and everything else is derived from that one declaration.

    port: int = flag(50051, "gRPC port (0 = pick a free one and log it)", ge=0, le=65535)

gives `--port PORT` (help, default and range in `--help`), `HOTLORA_PORT`, and the check: a bad value
raises `ConfigError` with `--port must be 0..65535 (got 70000)`. The type says how the text is read
(int, float, bool: `--flag`/`--no-flag` and true/false/1/0 in the environment, str, `Literal[...]` for a
closed set of choices); `ge`/`gt`/`le`/`pattern` bound it; an `Annotated` validator checks what bounds
cannot (a file that must exist). Checks between fields are one `model_validator` per class.
Values are read flag > environment variable > default."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

ENV_PREFIX = "HOTLORA_"


def flag(default: Any, help: str, *, must: str = "", **bounds: Any) -> Any:
    """One flag's default, help and bounds (`ge`, `gt`, `le`, `pattern`, as pydantic's `Field`).
    `must` words the allowed values in messages where the bare bounds would not say it ("at least 1 MiB")."""
    return Field(default, description=help, json_schema_extra={"must": must} if must else None, **bounds)


class ConfigError(ValueError):
    """Bad settings, one problem a line, each naming its flag."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


def config_class(cls=None, *, frozen: bool = False):
    """A pydantic dataclass whose construction (also by `dataclasses.replace`) raises `ConfigError`
    naming the flags, not pydantic's `ValidationError` naming the fields."""

    def wrap(cls):
        cls = pydantic_dataclass(cls, frozen=frozen, config=ConfigDict(extra="forbid"))
        validated_init = cls.__init__

        @functools.wraps(validated_init)
        def __init__(self, *args, **kwargs):
            try:
                validated_init(self, *args, **kwargs)
            except ValidationError as exc:
                raise ConfigError(_problems(cls, exc)) from None

        cls.__init__ = __init__
        return cls

    return wrap if cls is None else wrap(cls)


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of `cls` declared with `flag(...)` (a field without help, such as a nested config,
    is not a flag)."""
    infos = cls.__pydantic_fields__
    return [f for f in dataclasses.fields(cls) if infos[f.name].description]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One argparse flag per field of `cls`; a flag not given parses as None (`values_from` then reads
    the environment)."""
    for f in flag_fields(cls):
        info = cls.__pydantic_fields__[f.name]
        notes = [f"env {env_name(f.name)}", f"default {info.default!r}"]
        bounds = _allowed(info)
        if bounds and not _choices(info):
            notes.insert(0, bounds)
        help_ = f"{info.description} [{'; '.join(notes)}]".replace("%", "%%")
        if info.annotation is bool:  # --flag / --no-flag
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_,
            )
        else:
            choices = _choices(info)
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            parser.add_argument(flag_name(f.name), dest=f.name, default=None, metavar=metavar, help=help_)


def values_from(
    cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], set[str]]:
    """The values set for `cls`'s flags, flag before environment variable, and the names read from the
    environment. Text is converted by the class's own validation."""
    environ = os.environ if environ is None else environ
    values, from_env = {}, set()
    for f in flag_fields(cls):
        value = getattr(args, f.name, None) if args is not None else None
        if value is None and env_name(f.name) in environ:
            value = environ[env_name(f.name)]
            from_env.add(f.name)
        if value is not None:
            values[f.name] = value
    return values, from_env


def config_from(cls, args: argparse.Namespace | None = None, environ=None, **fixed: Any):
    """`cls` built from flags, then the environment, then its defaults (`fixed`: fields that are not
    flags, such as a nested config). A problem with a value read from the environment names its variable."""
    values, from_env = values_from(cls, args, environ)
    try:
        return cls(**fixed, **values)
    except ConfigError as exc:
        notes = {flag_name(n): env_name(n) for n in from_env}
        raise ConfigError([_with_source(p, notes) for p in exc.problems]) from None


def _with_source(problem: str, env_of_flag: dict[str, str]) -> str:
    for flag, env in env_of_flag.items():
        if problem.startswith(flag + " ") or problem.startswith(flag + ":"):
            return f"{problem} [set by {env}]"
    return problem


# ---- messages ----------------------------------------------------------------------------------------

_PARSING = {"int_parsing": "int", "int_from_float": "int", "float_parsing": "float", "bool_parsing": "bool"}
_BOUNDS = (
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "literal_error",
    "string_pattern_mismatch",
    "string_too_short",
)


def _problems(cls, exc: ValidationError) -> list[str]:
    infos = cls.__pydantic_fields__
    problems = []
    for err in exc.errors(include_url=False):
        if not err["loc"]:  # the class's check between fields: one problem a line
            problems += str(err["ctx"]["error"]).splitlines()
            continue
        name = str(err["loc"][0])
        if name not in infos:
            problems.append(f"unknown setting {name!r}")
            continue
        problems.append(_problem(flag_name(name), infos[name], err))
    return problems


def _problem(flag: str, info, err: dict) -> str:
    kind, value = err["type"], err.get("input")
    if kind in _PARSING:
        return f"{flag} expects {_PARSING[kind]}, got {value!r}"
    if kind in _BOUNDS:
        shown = repr(value) if isinstance(value, str) and _is_text(info) else str(value)
        return f"{flag} must be {_allowed(info)} (got {shown})"
    if kind == "value_error":  # an Annotated validator's own words
        message = str(err["ctx"]["error"])
        return f"{flag} {message}" if message.startswith("must ") else f"{flag}: {message}"
    return f"{flag}: {err['msg']} (got {value!r})"


def _is_text(info) -> bool:
    return info.annotation is str or bool(_choices(info))


def _choices(info) -> tuple[str, ...]:
    return get_args(info.annotation) if get_origin(info.annotation) is Literal else ()


def _allowed(info) -> str:
    """The allowed values in words: `must`, the choices, or the bounds."""
    extra = info.json_schema_extra or {}
    if extra.get("must"):
        return extra["must"]
    choices = _choices(info)
    if choices:
        return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
    bounds = {}
    for m in info.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if hasattr(m, key):
                bounds[key] = _number(getattr(m, key))
    low = (
        f"at least {bounds['ge']}"
        if "ge" in bounds
        else f"more than {bounds['gt']}"
        if "gt" in bounds
        else ""
    )
    if "ge" in bounds and "le" in bounds:
        return f"{bounds['ge']}..{bounds['le']}"
    if "gt" in bounds and "le" in bounds:
        return f"in ({bounds['gt']}, {bounds['le']}]"
    high = f"at most {bounds['le']}" if "le" in bounds else f"below {bounds['lt']}" if "lt" in bounds else ""
    return " and ".join(x for x in (low, high) if x)


def _number(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
