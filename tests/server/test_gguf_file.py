"""GGUF files read as untrusted input (server/engine/runner/gguf_file.py): a file the `gguf` package
writes reads back as written; a truncated or hostile one -- cut at any byte, a bad magic, counts and
lengths the file cannot hold, shapes that overflow, tensors past the end or over each other, arrays of
billions of entries -- is refused with a GGUFError that says what, and nothing else escapes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, quants

from hotlora.server.engine.runner import gguf_file
from hotlora.server.engine.runner.gguf_file import GGUFError


def _str(s: bytes | str) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, kind: GGUFValueType, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", kind) + payload


def _tensor(name: str, dims: list[int], kind: int, offset: int) -> bytes:
    out = _str(name) + struct.pack("<I", len(dims))
    out += b"".join(struct.pack("<Q", d) for d in dims)
    return out + struct.pack("<IQ", kind, offset)


def craft(
    kvs: list[bytes] = (),
    tensors: list[bytes] = (),
    data: bytes = b"",
    version: int = 3,
    n_tensors: int | None = None,
    n_kvs: int | None = None,
    magic: bytes = b"GGUF",
) -> bytes:
    """A GGUF file's bytes from hand-made parts (counts overridable), its data section 32-aligned."""
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kvs is None else n_kvs)  # fmt: skip
    head += b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32) + data


ARCH = _kv("general.architecture", GGUFValueType.STRING, _str("llama"))


def _write(tmp_path, blob: bytes, name: str = "m.gguf"):
    p = tmp_path / name
    p.write_bytes(blob)
    return p


def refused(tmp_path, blob: bytes, *words: str) -> str:
    with pytest.raises(GGUFError) as info:
        gguf_file.read(_write(tmp_path, blob))
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    return msg


def test_a_file_the_gguf_package_writes_reads_back_as_written(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    q = quants.quantize(w, GGMLQuantizationType.Q8_0)
    path = tmp_path / "w.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_token_list(["a", "b", "é", "<s>"])
    writer.add_token_scores([0.0, -1.0, -2.0, 0.5])
    writer.add_bool("x.flag", True)
    writer.add_tensor("norm.weight", np.ones(64, np.float32))
    writer.add_tensor("q.weight", q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("h.weight", w.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    g = gguf_file.read(path)
    assert g.version == 3 and g.architecture == "llama"
    assert g.metadata["llama.block_count"] == 2 and g.metadata["llama.rope.freq_base"] == 10000.0
    assert g.metadata["tokenizer.ggml.tokens"] == ["a", "b", "é", "<s>"]
    np.testing.assert_array_equal(g.metadata["tokenizer.ggml.scores"], [0.0, -1.0, -2.0, 0.5])
    assert g.metadata["x.flag"] is True
    assert {n: (t.type.name, t.shape) for n, t in g.tensors.items()} == {
        "norm.weight": ("F32", (64,)),
        "q.weight": ("Q8_0", (8, 64)),
        "h.weight": ("F16", (8, 64)),
    }
    np.testing.assert_array_equal(g.raw("q.weight"), q.reshape(-1))
    np.testing.assert_array_equal(g.raw("h.weight").view(np.float16).reshape(8, 64), w.astype(np.float16))
    assert g.raw("norm.weight").flags.writeable is False


def test_the_header_hash_covers_the_metadata_not_the_tensor_data(tmp_path):
    t = _tensor("w", [32], GGMLQuantizationType.F32, 0)
    a = gguf_file.read(_write(tmp_path, craft([ARCH], [t], b"\0" * 128), "a.gguf"))
    b = gguf_file.read(_write(tmp_path, craft([ARCH], [t], b"\1" * 128), "b.gguf"))
    other = _kv("general.architecture", GGUFValueType.STRING, _str("qwen2"))
    c = gguf_file.read(_write(tmp_path, craft([other], [t], b"\0" * 128), "c.gguf"))
    assert a.header_sha256 == b.header_sha256 != c.header_sha256


def test_every_truncation_is_refused_with_a_gguf_error(tmp_path):
    tokens = _kv(
        "tokenizer.ggml.tokens",
        GGUFValueType.ARRAY,
        struct.pack("<IQ", GGUFValueType.STRING, 3) + _str("a") + _str("bc") + _str("d"),
    )
    scores = _kv("s", GGUFValueType.ARRAY, struct.pack("<IQ", GGUFValueType.FLOAT32, 2) + b"\0" * 8)
    blob = craft([ARCH, tokens, scores], [_tensor("w", [32, 2], GGMLQuantizationType.F32, 0)], b"\0" * 256)
    gguf_file.read(_write(tmp_path, blob))  # whole, it reads
    for cut in range(len(blob) - 1):
        with pytest.raises(GGUFError, match="GGUF|truncated|past the end"):
            gguf_file.read(_write(tmp_path, blob[:cut]))


def test_bad_magic_version_and_byte_order(tmp_path):
    refused(tmp_path, craft([ARCH], magic=b"GGML"), "not a GGUF file")
    refused(tmp_path, craft([ARCH], version=1), "version 1")
    refused(tmp_path, craft([ARCH], version=3 << 24), "big-endian")
    refused(tmp_path, b"GGUF\x03", "shorter than a GGUF header")


def test_counts_the_file_cannot_hold_are_refused_before_parsing(tmp_path):
    refused(tmp_path, craft([ARCH], n_kvs=1 << 40), str(1 << 40), "metadata keys")
    refused(tmp_path, craft([ARCH], n_kvs=5000), "cannot fit")
    refused(tmp_path, craft([ARCH], n_tensors=1 << 20), "tensors")


def test_a_metadata_array_of_billions_of_entries_is_refused_at_once(tmp_path):
    huge = struct.pack("<IQ", GGUFValueType.UINT32, 3_000_000_000)
    refused(tmp_path, craft([ARCH, _kv("a", GGUFValueType.ARRAY, huge)]), "3000000000 entries")
    # within the entry limit but longer than the file
    long = struct.pack("<IQ", GGUFValueType.STRING, 1 << 20)
    refused(tmp_path, craft([ARCH, _kv("b", GGUFValueType.ARRAY, long)]), "cannot fit")
    nums = struct.pack("<IQ", GGUFValueType.UINT64, 1 << 20)
    refused(tmp_path, craft([ARCH, _kv("c", GGUFValueType.ARRAY, nums)]), "past the end")


def test_strings_and_values_that_lie_are_refused(tmp_path):
    refused(tmp_path, craft([_str("k") + struct.pack("<I", 8) + struct.pack("<Q", 1 << 50)]), "long")
    refused(tmp_path, craft([_kv("k", GGUFValueType.STRING, struct.pack("<Q", 1000) + b"x")]), "past the end")
    refused(tmp_path, craft([_kv("k", 99, b"\0" * 8)]), "unknown value type 99")
    nested = struct.pack("<IQ", GGUFValueType.ARRAY, 1) + struct.pack("<IQ", GGUFValueType.UINT8, 0)
    refused(tmp_path, craft([_kv("k", GGUFValueType.ARRAY, nested)]), "array of arrays")
    refused(tmp_path, craft([ARCH, ARCH]), "appears twice")
    refused(tmp_path, craft([_kv("k", GGUFValueType.STRING, _str(b"\xff\xfe"))]), "not UTF-8")
    align = _kv("general.alignment", GGUFValueType.UINT32, struct.pack("<I", 48))
    refused(tmp_path, craft([ARCH, align]), "power of two")


def test_tensor_infos_that_lie_are_refused(tmp_path):
    f32 = GGMLQuantizationType.F32

    def one(t: bytes, data: bytes = b"\0" * 256) -> bytes:
        return craft([ARCH], [t], data)

    refused(tmp_path, one(_tensor("w", [1 << 32, 1 << 32, 1 << 32], f32, 0)), "overflows")
    refused(tmp_path, one(_tensor("w", [32, 1 << 20], f32, 0)), "past the end")
    refused(tmp_path, one(_tensor("w", [32], f32, 1 << 40)), "past the end")
    refused(tmp_path, one(_tensor("w", [32], f32, 8)), "not a multiple of 32")
    refused(tmp_path, one(_tensor("w", [32], 77, 0)), "unknown type 77")
    refused(tmp_path, one(_tensor("w", [48], GGMLQuantizationType.Q8_0, 0)), "blocks of 32")
    refused(tmp_path, one(_tensor("w", [], f32, 0)), "0 dimensions")
    refused(tmp_path, one(_tensor("w", [1] * 5, f32, 0)), "5 dimensions")
    refused(tmp_path, one(_tensor("x" * 200, [32], f32, 0)), "a tensor name", "long")
    two = [_tensor("a", [32], f32, 0), _tensor("b", [32], f32, 128)]
    assert set(gguf_file.read(_write(tmp_path, craft([ARCH], two, b"\0" * 256))).tensors) == {"a", "b"}
    overlap = [_tensor("a", [32], f32, 0), _tensor("b", [32], f32, 96)]
    refused(tmp_path, craft([ARCH], overlap, b"\0" * 256), "overlap")
    dup = [_tensor("a", [32], f32, 0), _tensor("a", [32], f32, 128)]
    refused(tmp_path, craft([ARCH], dup, b"\0" * 256), "appears twice")


def test_a_missing_or_unreadable_path_is_a_gguf_error(tmp_path):
    with pytest.raises(GGUFError, match="cannot read"):
        gguf_file.read(tmp_path / "absent.gguf")
    with pytest.raises(GGUFError, match="cannot read"):
        gguf_file.read(tmp_path)
