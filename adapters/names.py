"""Adapter names and references (`name` = latest version, `name@N` = a pinned version)."""

from __future__ import annotations

import re

from hotlora.adapters.errors import InvalidArgument

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(r"[1-9][0-9]{0,17}")
NAME_RULE = "1-64 characters from a-z 0-9 . _ -, starting with a letter or digit, without '..'"


def validate_name(name: str) -> str:
    """Return `name` if it is a valid adapter name, else raise InvalidArgument saying the rule."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(f"invalid adapter name {_shown(name)}: names are {NAME_RULE}")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`"name"` -> (name, None); `"name@N"` -> (name, N) with N >= 1."""
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("adapter reference is empty; use 'name' or 'name@N'")
    name, sep, version = ref.partition("@")
    if not sep:
        return validate_name(name), None
    if not _VERSION.fullmatch(version):
        raise InvalidArgument(
            f"invalid version {_shown(version)} in adapter reference {_shown(ref)}: "
            "use 'name@N' with N a positive integer"
        )
    return validate_name(name), int(version)


def _shown(text) -> str:
    """A client string quoted in a message, cut short: it may be megabytes."""
    if not isinstance(text, str) or len(text) <= 80:
        return repr(text)
    return f"{text[:80]!r}... ({len(text)} chars)"


def format_ref(name: str, version: int) -> str:
    return f"{name}@{version}"
