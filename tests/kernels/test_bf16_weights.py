"""The bf16-weight kernel against torch: fp32 x times the bf16 weights widened to fp32, in float64 as the
reference, over every path of the kernel (one row streamed, 2-4 row tiles on the widened buffer, row and
column tails, K not a multiple of 32, bias, one thread and several) and of its Python side (3-D input,
torch's GEMM from WIDEN_ROWS rows and under autograd)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hotlora.kernels import bf16_weights, native

pytestmark = pytest.mark.skipif(
    bf16_weights.unavailable_reason() is not None, reason=f"{bf16_weights.unavailable_reason()}"
)


def _clear():
    native.ops.cache_clear()
    native.available.cache_clear()


def _reference(x, w, b=None):
    y = x.double() @ w.double().t()
    return (y if b is None else y + b.double()).float()


def _case(rows: int, k: int, n: int, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    w = (torch.randn(n, k, generator=g) * 0.1).to(torch.bfloat16)
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 33])
@pytest.mark.parametrize("k, n", [(576, 960), (1536, 24), (33, 7), (100, 13), (31, 9), (64, 1)])
def test_the_kernel_equals_the_product_with_widened_weights(rows, k, n):
    x, w, b = _case(rows, k, n, seed=rows * 1000 + k + n)
    got = bf16_weights.linear(x, w, b)
    torch.testing.assert_close(got, _reference(x, w, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bf16_weights.linear(x, w), _reference(x, w), rtol=1e-5, atol=1e-4)


def test_one_thread_and_two_threads_give_the_same_numbers(monkeypatch):
    x, w, b = _case(5, 576, 3072)
    two = bf16_weights.linear(x, w, b)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = bf16_weights.linear(x, w, b)
    assert torch.equal(one, two)  # each output is summed by one thread in one order


def test_batched_input_and_long_prefill_chunks_go_through_torch_with_the_same_result():
    x, w, b = _case(2 * bf16_weights.WIDEN_ROWS, 96, 40)
    got = bf16_weights.linear(x.view(2, bf16_weights.WIDEN_ROWS, 96), w, b)
    assert got.shape == (2, bf16_weights.WIDEN_ROWS, 40)
    torch.testing.assert_close(got.view(-1, 40), _reference(x, w, b), rtol=1e-5, atol=1e-4)
    small = bf16_weights.linear(x[:3].view(1, 3, 96), w, b)
    torch.testing.assert_close(small.view(3, 40), _reference(x[:3], w, b), rtol=1e-5, atol=1e-4)


def test_gradients_flow_to_the_input_as_through_f_linear():
    x, w, b = _case(4, 64, 16)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    (bf16_weights.linear(x1, w, b) ** 2).sum().backward()
    (F.linear(x2, w.float(), b) ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_wrong_dtypes_are_refused_with_a_message():
    x, w, _ = _case(2, 64, 8)
    with pytest.raises(TypeError, match="bfloat16 weight"):
        bf16_weights.linear(x, w.float())


def test_a_machine_without_a_compiler_gets_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(native, "compiler", lambda: None)
    _clear()
    try:
        assert "no C and C++ compiler" in bf16_weights.unavailable_reason()
        with pytest.raises(bf16_weights.Unavailable, match="no C and C\\+\\+ compiler"):
            bf16_weights.linear(*_case(1, 64, 8)[:2])
    finally:
        _clear()


def test_a_failed_build_is_reported_and_leaves_no_library(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "compiler", lambda: "false")  # a compiler that always fails
    _clear()
    try:
        with pytest.raises(bf16_weights.Unavailable, match="building hotlora's CPU kernels failed at"):
            bf16_weights.linear(*_case(1, 64, 8)[:2])
        built = tmp_path / "hotlora" / "kernels"
        files = [p for p in built.rglob("*") if p.is_file()]
        assert not [p for p in files if p.suffix == ".so"]  # no module
        assert not [p for p in files if p.name.startswith("tmp")]  # no half-written file (objects of the
        # sources that did compile are kept: named by their hash, they serve the next build)
    finally:
        _clear()
