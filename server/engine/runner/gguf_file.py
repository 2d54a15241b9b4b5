"""A GGUF file (llama.cpp's model format) read as untrusted input.

The header -- metadata key/values, then tensor infos -- is parsed here from a read-only memory map, every
count, length and offset checked against the bytes left in the file and against the limits below before
anything is built from it; a tensor is then a view of the mapped file, never read whole. Nothing is
trusted: a bad magic, a count the file cannot hold, a string or an array running past the end, a shape
whose size overflows, a tensor outside the data section or over another one are refused with a
`GGUFError` that says where.

The `gguf` package's GGUFReader is not used for the header: it builds a numpy view per array entry in a
Python loop (21 s for Llama 3's 128k-token vocabulary and 280k merges here, against 0.2 s of CPU) and trusts
the counts it reads (an array said to hold 2^40 entries loops for hours). Its constants -- tensor types, block
sizes, value types -- are the ones used.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 had 32-bit counts; llama.cpp has not written it since 2023
DEFAULT_ALIGNMENT = 32
# Limits far above any real model's (a 70B Llama has 723 tensors and ~30 keys; vocabularies run to 262k
# tokens and merges to ~1M) and low enough that a hostile header cannot make the parse run long.
MAX_TENSORS = 1 << 16
MAX_KEYS = 1 << 16
MAX_ARRAY = 1 << 24  # entries of one metadata array
MAX_STRING = 1 << 24  # bytes of one metadata string (chat templates are ~10 KiB)
MAX_KEY = 1 << 16  # bytes of a key (the GGUF spec's limit)
MAX_NAME = 63  # bytes of a tensor name (ggml's GGML_MAX_NAME, with its terminating NUL)
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 62

_SCALARS = {  # value type -> struct format (little-endian)
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


class GGUFError(ValueError):
    """The file is not a GGUF file hotlora reads; the message says what is wrong and where."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    """In torch's order (rows first): GGUF's dimensions reversed, so a matrix is [out, in]."""
    offset: int
    """Of its first byte in the file."""
    nbytes: int

    @property
    def elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFFile:
    """A validated GGUF file: its metadata, its tensors' infos and read-only views of their bytes."""

    path: Path
    version: int
    metadata: dict[str, object]
    """Key -> int, float, bool, str, a numpy array (numbers) or a list of str."""
    tensors: dict[str, TensorInfo]
    data_offset: int
    header_sha256: str
    """Of every byte before the tensor data: the metadata and the tensors' names, types, shapes, offsets."""
    _map: mmap.mmap = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (uint8, read-only, backed by the file's pages)."""
        t = self.tensors[name]
        return np.frombuffer(self._map, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def close(self) -> None:
        """Unmap the file; views from `raw` must be gone by then."""
        self._map.close()


def read(path: str | os.PathLike) -> GGUFFile:
    """Parse and check the header of the GGUF file at `path`; raises GGUFError with the reason."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFError(f"{path} is not a GGUF file: {size} bytes, shorter than a GGUF header")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise GGUFError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return _Parser(path, mm).parse()
    except BaseException:
        mm.close()
        raise


class _Parser:
    def __init__(self, path: Path, mm: mmap.mmap):
        self.path, self.mm, self.size, self.pos = path, mm, len(mm), 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> int:
        """Reserve n bytes at the current position; returns their start."""
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated or corrupt: {what} at byte {self.pos} runs past the end ({self.size} bytes)"
            )
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str):
        at = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.mm, at)[0]

    def string(self, limit: int, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        if n > limit:
            raise self.fail(f"{what} at byte {self.pos - 8} is said to be {n} bytes long (at most {limit})")
        at = self.take(n, what)
        try:
            return self.mm[at : at + n].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} at byte {at} is not UTF-8") from exc

    def parse(self) -> GGUFFile:
        if self.mm[:4] != MAGIC:
            raise self.fail(f"not a GGUF file (starts with {bytes(self.mm[:4])!r}, not {MAGIC!r})")
        self.pos = 4
        version = self.unpack("<I", "the version")
        if version & 0xFFFF == 0 and version != 0:
            raise self.fail("a big-endian GGUF file: only little-endian files are read")
        if version not in VERSIONS:
            raise self.fail(f"GGUF version {version} (versions {', '.join(map(str, VERSIONS))} are read)")
        n_tensors = self.unpack("<Q", "the tensor count")
        n_keys = self.unpack("<Q", "the metadata count")
        # each tensor info takes at least 8 + 4 + 8 + 4 + 8 bytes, each key/value at least 8 + 4 + 1
        self.count(n_tensors, MAX_TENSORS, 32, "tensors")
        self.count(n_keys, MAX_KEYS, 13, "metadata keys")
        metadata: dict[str, object] = {}
        for _ in range(n_keys):
            key = self.string(MAX_KEY, "a metadata key")
            if key in metadata:
                raise self.fail(f"metadata key {key!r} appears twice")
            metadata[key] = self.value(self.unpack("<I", f"the type of {key!r}"), key)
        infos = [self.tensor_info() for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment must be a power of two (got {alignment!r})")
        data_offset = -(-self.pos // alignment) * alignment
        tensors = self.place(infos, data_offset, alignment)
        digest = hashlib.sha256(self.mm[: min(data_offset, self.size)]).hexdigest()
        return GGUFFile(self.path, version, metadata, tensors, data_offset, digest, self.mm)

    def count(self, n: int, limit: int, min_bytes: int, what: str) -> None:
        if n > limit:
            raise self.fail(f"the header says {n} {what} (at most {limit} are read)")
        if n * min_bytes > self.size - self.pos:
            raise self.fail(
                f"truncated or corrupt: {n} {what} cannot fit in the {self.size - self.pos} bytes left"
            )

    def value(self, raw_type: int, key: str, in_array: bool = False):
        try:
            kind = GGUFValueType(raw_type)
        except ValueError:
            raise self.fail(f"metadata {key!r} has an unknown value type {raw_type}") from None
        if kind == GGUFValueType.STRING:
            return self.string(MAX_STRING, f"the value of {key!r}")
        if kind in _SCALARS:
            v = self.unpack(_SCALARS[kind], f"the value of {key!r}")
            return bool(v) if kind == GGUFValueType.BOOL else v
        if in_array:
            raise self.fail(f"metadata {key!r} is an array of arrays (not read)")
        item = self.unpack("<I", f"the item type of {key!r}")
        n = self.unpack("<Q", f"the length of {key!r}")
        if n > MAX_ARRAY:
            raise self.fail(f"metadata {key!r} is said to hold {n} entries (at most {MAX_ARRAY} are read)")
        try:
            item_kind = GGUFValueType(item)
        except ValueError:
            raise self.fail(f"metadata {key!r} is an array of an unknown value type {item}") from None
        if item_kind in _NUMPY:
            dtype = np.dtype(_NUMPY[item_kind])
            at = self.take(n * dtype.itemsize, f"the {n} entries of {key!r}")
            arr = np.frombuffer(self.mm, dtype=dtype, count=n, offset=at).copy()
            return arr.astype(bool) if item_kind == GGUFValueType.BOOL else arr
        if item_kind == GGUFValueType.STRING:
            self.count(n, MAX_ARRAY, 8, f"strings in {key!r}")
            return self.strings(n, key)
        raise self.fail(f"metadata {key!r} is an array of arrays (not read)")

    def strings(self, n: int, key: str) -> list[str]:
        """`string` n times, in one tight loop (a vocabulary's 128k tokens and 280k merges: 0.2 s)."""
        mm, pos, size, length = self.mm, self.pos, self.size, struct.Struct("<Q").unpack_from
        out = []
        try:
            for i in range(n):
                if pos + 8 > size:
                    raise self.fail(f"truncated or corrupt: entry {i} of {key!r} runs past the end")
                (k,) = length(mm, pos)
                if k > MAX_STRING or pos + 8 + k > size:
                    raise self.fail(
                        f"truncated or corrupt: entry {i} of {key!r} ({k} bytes) runs past the end"
                    )
                out.append(mm[pos + 8 : pos + 8 + k].decode("utf-8"))
                pos += 8 + k
        except UnicodeDecodeError as exc:
            raise self.fail(f"entry {len(out)} of {key!r} is not UTF-8") from exc
        self.pos = pos
        return out

    def tensor_info(self) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
        name = self.string(MAX_NAME, "a tensor name")
        n_dims = self.unpack("<I", f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} are read)")
        dims = [self.unpack("<Q", f"a dimension of tensor {name!r}") for _ in range(n_dims)]
        raw_type = self.unpack("<I", f"the type of tensor {name!r}")
        offset = self.unpack("<Q", f"the offset of tensor {name!r}")
        try:
            kind = GGMLQuantizationType(raw_type)
            block, _ = GGML_QUANT_SIZES[kind]
        except (ValueError, KeyError):
            raise self.fail(f"tensor {name!r} has an unknown type {raw_type}") from None
        elements = 1
        for d in dims:
            elements *= d
            if elements > MAX_ELEMENTS:
                raise self.fail(f"tensor {name!r}'s shape {dims} overflows (more than 2^62 elements)")
        if dims[0] % block:
            raise self.fail(
                f"tensor {name!r} is {kind.name} (blocks of {block}) but its rows hold {dims[0]} values"
            )
        return name, kind, tuple(reversed(dims)), offset

    def place(self, infos: list, data_offset: int, alignment: int) -> dict[str, TensorInfo]:
        """Each tensor inside the data section, aligned, over no other one."""
        tensors: dict[str, TensorInfo] = {}
        for name, kind, shape, offset in infos:
            if name in tensors:
                raise self.fail(f"tensor {name!r} appears twice")
            block, type_size = GGML_QUANT_SIZES[kind]
            elements = 1
            for d in shape:
                elements *= d
            nbytes = elements // block * type_size
            if offset % alignment:
                raise self.fail(f"tensor {name!r}'s offset {offset} is not a multiple of {alignment}")
            if data_offset + offset + nbytes > self.size:
                raise self.fail(
                    f"tensor {name!r} ({nbytes} bytes at data offset {offset}) ends past the end of the "
                    f"file ({self.size} bytes; truncated?)"
                )
            tensors[name] = TensorInfo(name, kind, shape, data_offset + offset, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise self.fail(f"tensors {a!r} and {b!r} overlap")
        return tensors
