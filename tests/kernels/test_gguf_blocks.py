"""GGUF weight types as hotlora keeps them (kernels/gguf_blocks.py): a GGUF file's blocks, laid out for the
kernel, read back bit for bit as the `gguf` package dequantizes them, for every kept type on random valid
blocks; `quantize` gives the `gguf` package's own blocks for Q8_0/Q4_0/Q4_1 and llama.cpp's reference
quantizer's bytes for Q4_K/Q6_K (a fixture made with llama.cpp's own code: data/make_k_quants_fixture.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from hotlora.kernels import gguf_blocks, native
from hotlora.kernels.gguf_blocks import BlockMatrix, Format

KEPT = [GGMLQuantizationType[f.name] for f in Format]
FIXTURE = Path(__file__).with_name("data") / "k_quants_llama_cpp.npz"


def random_gguf_blocks(kind: GGMLQuantizationType, n: int, k: int, seed: int = 0) -> np.ndarray:
    """n rows of k weights in valid random GGUF blocks of `kind` (uint8 [n, row bytes]): random quants and
    6/8-bit scales, finite fp16 scales of either sign, some zero."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[kind]
    if kind == GGMLQuantizationType.F16:
        return rng.standard_normal((n, k), dtype=np.float32).astype(np.float16).view(np.uint8)
    if kind == GGMLQuantizationType.BF16:
        return (
            torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
            .bfloat16()
            .view(torch.uint8)
            .numpy()
        )
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)

    def scales() -> np.ndarray:
        d = rng.standard_normal((n, k // block)) * 0.01
        d[rng.random(d.shape) < 0.05] = 0.0
        return d.astype(np.float16).view(np.uint8).reshape(n, k // block, 2)

    at = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}[kind.name]
    for a in at:
        raw[..., a : a + 2] = scales()
    return raw.reshape(n, -1)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("kind", KEPT, ids=lambda t: t.name)
@pytest.mark.parametrize("k", [256, 1536])
def test_a_gguf_files_blocks_read_back_as_the_gguf_package_dequantizes_them(kind, k):
    raw = random_gguf_blocks(kind, 7, k, seed=k)
    m = gguf_blocks.from_gguf(raw, kind, (7, k))
    assert m.shape == (7, k) and m.fmt.name == kind.name
    want = quants.dequantize(raw, kind)
    np.testing.assert_array_equal(_bits(gguf_blocks.dequantize(m).numpy()), _bits(want))
    rows = torch.tensor([5, 0, 5])
    np.testing.assert_array_equal(_bits(gguf_blocks.dequantize(m, rows).numpy()), _bits(want[[5, 0, 5]]))


def test_a_wrong_scale_or_min_decoding_would_be_caught():
    """The comparison above fails for a Q4_K whose scales or mins are read one sub-block off, or a Q6_K
    whose scales are read unsigned: it can fail."""
    raw = random_gguf_blocks(GGMLQuantizationType.Q4_K, 3, 512)
    want = quants.dequantize(raw, GGMLQuantizationType.Q4_K)
    m = gguf_blocks.from_gguf(raw, GGMLQuantizationType.Q4_K, (3, 512))
    nb = 512 // 32
    for region in (slice(nb * 16 + 16, nb * 16 + 16 + nb), slice(nb * 16 + 16 + nb, nb * 16 + 16 + 2 * nb)):
        d = m.data.clone()
        d[:, region] = d[:, region].roll(1, dims=1)
        assert not np.array_equal(gguf_blocks.dequantize(m.with_data(d)).numpy(), want)
    raw6 = random_gguf_blocks(GGMLQuantizationType.Q6_K, 3, 512)
    m6 = gguf_blocks.from_gguf(raw6, GGMLQuantizationType.Q6_K, (3, 512))
    d = m6.data.clone()
    d[:, -32:] = d[:, -32:] & 0x7F  # the int8 scales' sign bits dropped
    assert not np.array_equal(
        gguf_blocks.dequantize(m6.with_data(d)).numpy(), quants.dequantize(raw6, GGMLQuantizationType.Q6_K)
    )


@pytest.mark.parametrize("fmt", [Format.Q8_0, Format.Q4_0, Format.Q4_1])
def test_quantize_gives_the_gguf_packages_own_blocks(fmt):
    g = torch.Generator().manual_seed(1)
    w = torch.cat([torch.randn(9, 320, generator=g) * 0.03, torch.zeros(1, 320)])
    want = quants.quantize(w.numpy(), fmt.ggml_type)
    np.testing.assert_array_equal(
        gguf_blocks.quantize(w, fmt).data.numpy(),
        gguf_blocks.from_gguf(want, fmt.ggml_type, (10, 320)).data.numpy(),
    )


def test_quantize_to_16_bits_rounds_to_nearest_even():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(gguf_blocks.dequantize(gguf_blocks.quantize(w, Format.F16)), w.half().float())
    assert torch.equal(gguf_blocks.dequantize(gguf_blocks.quantize(w, Format.BF16)), w.bfloat16().float())


@pytest.mark.skipif(native.unavailable_reason() is not None, reason=f"{native.unavailable_reason()}")
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_quants_are_llama_cpps_reference_bytes(kind):
    data = np.load(FIXTURE)
    names = sorted({key.split(".")[0] for key in data.files})
    assert len(names) >= 5
    for name in names:
        x = torch.from_numpy(data[f"{name}.x"])
        m = gguf_blocks.quantize(x, Format[kind])
        want = gguf_blocks.from_gguf(data[f"{name}.{kind}"], GGMLQuantizationType[kind], tuple(x.shape))
        assert torch.equal(m.data, want.data), name
        if name == "normal":  # and what they hold is close to what was quantized
            err = (gguf_blocks.dequantize(m) - x).abs().max().item()
            assert err < (0.01 if kind == "Q4_K" else 0.003), err


def test_types_not_kept_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="Q5_K is not kept"):
        gguf_blocks.from_gguf(np.zeros((1, 176), np.uint8), GGMLQuantizationType.Q5_K, (1, 256))
    with pytest.raises(ValueError, match="multiple of 256"):
        gguf_blocks.quantize(torch.zeros(2, 96), Format.Q4_K)
    with pytest.raises(ValueError, match=r"contiguous uint8 \[rows, 20\]"):
        BlockMatrix(torch.zeros(2, 21, dtype=torch.uint8), Format.Q4_0, 32)
    f32 = gguf_blocks.from_gguf(
        np.arange(8, dtype=np.float32).view(np.uint8), GGMLQuantizationType.F32, (2, 4)
    )
    assert f32.dtype == torch.float32 and torch.equal(f32, torch.arange(8.0).view(2, 4))
