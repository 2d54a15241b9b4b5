"""hotlora's C kernels as torch operators (`torch.ops.hotlora.*`), for torch.compile.

Dynamo cannot trace a ctypes call: it would break the graph at each one. Registered as operators with a fake
implementation (output shapes only), the kernels are single nodes of one graph instead (runner.decode_graphs
compiles the decode step). Each kernel module calls its operator while torch.compile traces it, and its C
function directly otherwise.

Registered through `torch.library.Library` rather than `torch.library.custom_op`: the latter's Python layer
(argument defaults, alias checks) cost ~27 µs a call on ops with mutated arguments, several ms a decode step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIB = torch.library.Library("hotlora", "FRAGMENT")


def define(schema: str, impl: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Register `torch.ops.hotlora.<name>` (schema as in native_functions.yaml: `Tensor(a!)` marks an argument
    written in place) with its CPU implementation and its fake; returns the operator."""
    name = schema.split("(", 1)[0]
    if hasattr(torch.ops.hotlora, name):
        # defined already by this source imported under another name (transformers probes for a top-level
        # `kernels` package, which is this directory when the repository root is on sys.path)
        return getattr(torch.ops.hotlora, name).default
    _LIB.define(schema)
    _LIB.impl(name, impl, "CPU")
    torch.library.register_fake(f"hotlora::{name}", fake, lib=_LIB)
    return getattr(torch.ops.hotlora, name).default
