"""Where the engine's step crosses between the host and the compute device, in one place.

Index tensors built on the host (token ids, positions, block tables, sampling parameters) go over with
`to_device`: on CUDA through pinned memory as an asynchronous copy, so the host never waits for the device
to drain its queue before the copy (a plain copy from pageable memory does wait). What comes back is read
with `read_back`, once a step: the sampled token ids and the log-probabilities asked for, packed in one
tensor. On a CPU both are plain tensor handling.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`, without synchronising the host with the device."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    # the caching host allocator keeps the pinned block until the copy that reads it is done
    return host.pin_memory().to(device, non_blocking=True)


def tensor_on(data, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.tensor(data) built on the host and sent with `to_device`."""
    return to_device(torch.tensor(data, dtype=dtype), device)


def read_back(t: torch.Tensor) -> list:
    """The step's one synchronising read: `t` as (nested) Python lists."""
    return t.tolist()
