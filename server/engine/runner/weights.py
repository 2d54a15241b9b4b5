"""The base model's weights as the runner uses them: q/k/v and gate/up fused into one matrix each.

Read straight from a Hugging Face directory's safetensors (sharded or not) one layer at a time, so the peak
memory is the fused weights plus one layer, never a second copy of the model. The same mapping builds them
from an in-memory transformers model (tests compare the two paths on one set of weights).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hotlora.kernels import block_weights, gguf_blocks
from hotlora.kernels.gguf_blocks import BlockMatrix

from . import huge_pages
from .spec import ModelSpec


@dataclass(frozen=True)
class RowStack:
    """A fused projection whose parts are kept in different block formats (a Q4_K_M file's q and k in Q4_K
    and v in Q6_K): their outputs side by side, each part through its own kernel."""

    parts: tuple[torch.Tensor | BlockMatrix, ...]

    @property
    def out_features(self) -> int:
        return sum(p.shape[0] for p in self.parts)

    @property
    def in_features(self) -> int:
        return self.parts[0].shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def linear(self, fn: Callable, x: torch.Tensor, bias=None, ahead=None) -> torch.Tensor:
        """torch.cat of `fn(x, part, its slice of bias[, ahead])` (ahead: with the last part, whose product
        runs right before the LoRA update that reads it)."""
        outs, start = [], 0
        for i, part in enumerate(self.parts):
            n = part.shape[0]
            b = None if bias is None else bias[start : start + n]
            last = i == len(self.parts) - 1
            outs.append(fn(x, part, b, ahead) if last and ahead is not None else fn(x, part, b))
            start += n
        return torch.cat(outs, -1)


# a weight matrix: a float tensor, GGUF blocks (kernels/gguf_blocks.py), or parts of either
Matrix = torch.Tensor | BlockMatrix | RowStack
Getter = Callable[[str], torch.Tensor | BlockMatrix | None]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    qkv: Matrix  # [q + 2 kv, H]: rows of q_proj, then k_proj, then v_proj
    qkv_bias: torch.Tensor | None
    o: Matrix  # [H, q]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [H]
    gate_up: Matrix  # [2 I, H]: rows of gate_proj, then up_proj
    gate_up_bias: torch.Tensor | None
    down: Matrix  # [H, I]
    down_bias: torch.Tensor | None


@dataclass
class RunnerWeights:
    embed: Matrix  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H]
    lm_head: Matrix  # [V, H]; the embedding itself when the model ties them

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the weights hold (a block matrix's bytes), each once."""
        return [t for owner, name in self._fields() for t in _storage(getattr(owner, name))]

    def matrices(self) -> list[Matrix]:
        """Every weight matrix (a RowStack's parts each)."""
        out = []
        for t in (getattr(o, n) for o, n in self._fields()):
            parts = t.parts if isinstance(t, RowStack) else (t,)
            out += [p for p in parts if isinstance(p, BlockMatrix) or p.dim() == 2]
        return out

    def _fields(self) -> list[tuple[object, str]]:
        """(owner, attribute) of every tensor, each once (a tied LM head is the embedding)."""
        out = [(self, "embed"), (self, "norm")]
        if self.lm_head is not self.embed:
            out.append((self, "lm_head"))
        for layer in self.layers:
            out += [(layer, name) for name, t in vars(layer).items() if t is not None]
        return out

    def into_huge_pages(self) -> bool:
        """Move every tensor into one CPU buffer backed by 2 MiB pages (`huge_pages.py`: a decode step's
        walk through the matrices then misses the TLB once per 2 MiB, not per 4 KiB), one tensor at a time
        so the peak is about the model plus one tensor. False, with nothing moved, off the CPU or where
        Linux does not offer huge pages."""
        fields = self._fields()
        if self.embed.device.type != "cpu":
            return False
        buf = huge_pages.buffer(sum(huge_pages.room(t) for t in self.tensors()))
        if buf is None:
            return False
        tied = self.lm_head is self.embed
        offset = 0

        def place(t):
            nonlocal offset
            if isinstance(t, RowStack):
                return RowStack(tuple(place(p) for p in t.parts))
            placed = huge_pages.place(buf, offset, _storage(t)[0])
            offset += huge_pages.room(placed)
            return t.with_data(placed) if isinstance(t, BlockMatrix) else placed

        for owner, name in fields:
            setattr(owner, name, place(getattr(owner, name)))
        if tied:
            self.lm_head = self.embed
        return True

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.norm.dtype

    @property
    def stored_dtype(self) -> torch.dtype:
        """The float dtype the matrices not kept in blocks are in: the compute dtype, or bf16 under fp32
        (--weight-dtype bfloat16)."""
        floats = [t.dtype for t in self.matrices() if not isinstance(t, BlockMatrix)]
        return floats[0] if floats else self.compute_dtype

    @property
    def packed_matrices(self) -> tuple[int, int]:
        """(matrices kept in blocks, matrices in all)."""
        mats = self.matrices()
        return sum(isinstance(t, BlockMatrix) for t in mats), len(mats)

    @property
    def block_formats(self) -> dict[str, int]:
        """Block format name -> how many matrices are kept in it."""
        out: dict[str, int] = {}
        for t in self.matrices():
            if isinstance(t, BlockMatrix):
                out[t.fmt.name] = out.get(t.fmt.name, 0) + 1
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _storage(t: Matrix) -> list[torch.Tensor]:
    if isinstance(t, RowStack):
        return [s for p in t.parts for s in _storage(p)]
    return [t.data if isinstance(t, BlockMatrix) else t]


def build_weights(
    spec: ModelSpec,
    get: Getter,
    dtype: torch.dtype,
    device,
    stored: torch.dtype | None = None,
    pack_exact_blocks: bool = False,
    keep_blocks: bool = False,
) -> RunnerWeights:
    """Fuse and cast, layer by layer. `get(name)` returns a checkpoint tensor by its transformers name
    (`model.layers.0.self_attn.q_proj.weight`, ...), a BlockMatrix (a GGUF file's, or --quantize's), or
    None when the checkpoint has no such tensor. A BlockMatrix is kept as it is where `keep_blocks` (fp32
    on a CPU that runs the kernel: the loader decides), else dequantized to `stored`; a fused projection of
    parts in different formats is a RowStack of them.
    `stored`: the dtype of the projection matrices, the embedding and the LM head when narrower than the
    compute `dtype` (bf16 widened by the kernel); norms and biases are always in `dtype`.
    `pack_exact_blocks` (the loader's `_packs` decides: fp32 on a CPU that runs the kernel): each matrix
    (projections, embedding, LM head) whose fp32 values are exactly those of GGUF Q4_1 or Q8_0 blocks (a
    checkpoint dequantized from a GGUF file) is kept as those blocks (kernels/block_weights.py), the others
    as they are; the values read back are the same fp32 numbers."""
    stored = stored or dtype

    def need(name: str):
        t = get(name)
        if t is None:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        return kept(t)

    def kept(t):
        return gguf_blocks.dequantize(t) if isinstance(t, BlockMatrix) and not keep_blocks else t

    def cast(t: torch.Tensor | None, to: torch.dtype = dtype) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=to).contiguous()

    def packed(t: torch.Tensor) -> torch.Tensor:
        blocks = block_weights.pack(t) if pack_exact_blocks else None
        return t if blocks is None else blocks

    def matrix(name: str) -> Matrix:
        return as_matrix(need(name))

    def as_matrix(t) -> Matrix:
        return t if isinstance(t, BlockMatrix) else packed(cast(t, stored))

    def fused(prefix: str, names: tuple[str, ...], kind: str) -> Matrix:
        parts = [need(f"{prefix}.{n}.{kind}") for n in names]
        if kind != "weight":
            return cast(torch.cat(parts, 0))
        if not any(isinstance(p, BlockMatrix) for p in parts):
            return packed(cast(torch.cat(parts, 0), stored))
        if all(isinstance(p, BlockMatrix) and p.fmt == parts[0].fmt for p in parts):
            return parts[0].with_data(torch.cat([p.data for p in parts], 0))
        return RowStack(tuple(p if isinstance(p, BlockMatrix) else packed(cast(p, stored)) for p in parts))

    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        attn, mlp = f"{p}.self_attn", f"{p}.mlp"
        layers.append(
            LayerWeights(
                input_norm=cast(need(f"{p}.input_layernorm.weight")),
                qkv=fused(attn, ("q_proj", "k_proj", "v_proj"), "weight"),
                qkv_bias=fused(attn, ("q_proj", "k_proj", "v_proj"), "bias") if spec.qkv_bias else None,
                o=matrix(f"{attn}.o_proj.weight"),
                o_bias=cast(need(f"{attn}.o_proj.bias")) if spec.o_bias else None,
                post_norm=cast(need(f"{p}.post_attention_layernorm.weight")),
                gate_up=fused(mlp, ("gate_proj", "up_proj"), "weight"),
                gate_up_bias=fused(mlp, ("gate_proj", "up_proj"), "bias") if spec.mlp_bias else None,
                down=matrix(f"{mlp}.down_proj.weight"),
                down_bias=cast(need(f"{mlp}.down_proj.bias")) if spec.mlp_bias else None,
            )
        )
    embed = matrix("model.embed_tokens.weight")
    head = None if spec.tie_word_embeddings else get("lm_head.weight")
    lm_head = embed if head is None else as_matrix(kept(head))
    return RunnerWeights(embed=embed, layers=layers, norm=cast(need("model.norm.weight")), lm_head=lm_head)


def safetensors_getter(model_dir: str | Path) -> Getter:
    """Tensors of a Hugging Face directory by name, read lazily from `model.safetensors` or the shards an
    `model.safetensors.index.json` lists. Only safetensors: a pickled checkpoint is never loaded."""
    from safetensors import safe_open

    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = json.loads(index.read_text())["weight_map"]
        where = {name: root / f for name, f in files.items()}
    elif (root / "model.safetensors").is_file():
        with safe_open(root / "model.safetensors", framework="pt") as f:
            where = dict.fromkeys(f.keys(), root / "model.safetensors")
    else:
        raise FileNotFoundError(f"{root} has no model.safetensors (or index): only safetensors are loaded")
    # some checkpoints were saved from the bare decoder, without the `model.` prefix
    if "model.embed_tokens.weight" not in where and "embed_tokens.weight" in where:
        where = {("model." + k if not k.startswith("lm_head") else k): v for k, v in where.items()}
        strip = True
    else:
        strip = False
    handles: dict[Path, object] = {}

    def get(name: str) -> torch.Tensor | None:
        path = where.get(name)
        if path is None:
            return None
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        stored = name.removeprefix("model.") if strip else name
        return handles[path].get_tensor(stored)

    return get


def module_getter(model: torch.nn.Module) -> Getter:
    """Tensors of an in-memory transformers *ForCausalLM by name (tests; the fallback never needs this)."""
    state = dict(model.state_dict())
    return lambda name: state.get(name)
