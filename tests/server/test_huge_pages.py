"""The runner's weights in memory advised for 2 MiB pages: same values, same layout for every reader, and
nothing moved where Linux does not offer huge pages. (Greedy decoding through moved weights equals
transformers' for every family: tests/server/test_runner_families.py loads through the same path.)"""

from __future__ import annotations

import pytest
import torch

from hotlora.server.engine.runner import huge_pages
from hotlora.server.engine.runner.spec import ModelSpec
from hotlora.server.engine.runner.weights import build_weights, module_getter

needs_huge_pages = pytest.mark.skipif(not huge_pages.offered(), reason="Linux offers no huge pages here")


def _mapping(address: int) -> tuple[str, list[str]]:
    """The permissions and VmFlags of the mapping holding `address`, from /proc/self/smaps."""
    perms = None
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            perms = fields[1] if lo <= address < hi else None
        elif perms and fields[0] == "VmFlags:":
            return perms, fields[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _advised_and_private(address: int) -> bool:
    # advised: MADV_HUGEPAGE took; private: a shared anonymous mapping is shmem, which takes huge pages only
    # where shmem_enabled allows (it is `never` on most machines), so the advice would do nothing
    perms, flags = _mapping(address)
    return "hg" in flags and perms.endswith("p")


@needs_huge_pages
def test_a_buffer_starts_on_a_huge_page_zeroed_and_advised():
    buf = huge_pages.buffer(5 << 20)
    assert buf.numel() == 5 << 20 and buf.dtype == torch.uint8
    assert buf.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert not buf.any()
    assert _advised_and_private(buf.data_ptr())


def _weights(model, stored=None):
    spec = ModelSpec.from_config(model.config)
    return build_weights(spec, module_getter(model), torch.float32, "cpu", stored)


@needs_huge_pages
@pytest.mark.parametrize("stored", [None, torch.bfloat16], ids=["fp32", "bf16-stored"])
def test_moved_weights_hold_the_same_values_in_one_buffer(tiny_llama, stored):
    weights = _weights(tiny_llama, stored)
    before = [t.clone() for t in weights.tensors()]
    tied = weights.lm_head is weights.embed
    assert weights.into_huge_pages()
    after = weights.tensors()
    assert len(after) == len(before)
    for old, new in zip(before, after, strict=True):
        assert new.dtype == old.dtype and new.shape == old.shape and new.is_contiguous()
        assert torch.equal(new, old)
        assert new.data_ptr() % huge_pages.ALIGN == 0
    assert (weights.lm_head is weights.embed) == tied
    starts = sorted(t.data_ptr() for t in after)
    assert starts[0] % huge_pages.HUGE_PAGE == 0  # one buffer from a huge page boundary, end to end
    assert starts[-1] - starts[0] < sum(huge_pages.room(t) for t in after)
    assert _advised_and_private(starts[0])


def test_where_huge_pages_are_not_offered_nothing_moves(tiny_llama, monkeypatch):
    monkeypatch.setattr(huge_pages, "offered", lambda: False)
    weights = _weights(tiny_llama)
    before = weights.tensors()
    assert not weights.into_huge_pages()
    assert all(a is b for a, b in zip(weights.tensors(), before, strict=True))
