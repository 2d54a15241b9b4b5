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

from hotlora.kernels import block_weights

from . import huge_pages
from .spec import ModelSpec

Getter = Callable[[str], torch.Tensor | None]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [q + 2 kv, H]: rows of q_proj, then k_proj, then v_proj
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [H, q]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [H]
    gate_up: torch.Tensor  # [2 I, H]: rows of gate_proj, then up_proj
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [H, I]
    down_bias: torch.Tensor | None


@dataclass
class RunnerWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]; the embedding itself when the model ties them

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(owner, name) for owner, name in self._fields()]

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
        buf = huge_pages.buffer(sum(huge_pages.room(getattr(owner, name)) for owner, name in fields))
        if buf is None:
            return False
        tied = self.lm_head is self.embed
        offset = 0
        for owner, name in fields:
            t = getattr(owner, name)
            setattr(owner, name, huge_pages.place(buf, offset, t))
            offset += huge_pages.room(t)
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
        floats = [t.dtype for t in self.tensors() if t.dim() == 2 and t.is_floating_point()]
        return floats[0] if floats else self.compute_dtype

    @property
    def packed_matrices(self) -> tuple[int, int]:
        """(matrices kept in blocks, matrices in all) -- see `build_weights`' `pack_exact_blocks`."""
        mats = [t for t in self.tensors() if t.dim() == 2]
        return sum(block_weights.is_packed(t) for t in mats), len(mats)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def build_weights(
    spec: ModelSpec,
    get: Getter,
    dtype: torch.dtype,
    device,
    stored: torch.dtype | None = None,
    pack_exact_blocks: bool = False,
) -> RunnerWeights:
    """Fuse and cast, layer by layer. `get(name)` returns a checkpoint tensor by its transformers name
    (`model.layers.0.self_attn.q_proj.weight`, ...) or None when the checkpoint has no such tensor.
    `stored`: the dtype of the projection matrices, the embedding and the LM head when narrower than the
    compute `dtype` (bf16 widened by the kernel); norms and biases are always in `dtype`.
    `pack_exact_blocks` (the loader's `_packs` decides: fp32 on a CPU that runs the kernel): each matrix
    (projections, embedding, LM head) whose fp32 values are exactly those of GGUF Q4_1 or Q8_0 blocks (a
    checkpoint dequantized from a GGUF file) is kept as those blocks (kernels/block_weights.py), the others
    as they are; the values read back are the same fp32 numbers."""
    stored = stored or dtype

    def need(name: str) -> torch.Tensor:
        t = get(name)
        if t is None:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        return t

    def cast(t: torch.Tensor | None, to: torch.dtype = dtype) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=to).contiguous()

    def packed(t: torch.Tensor) -> torch.Tensor:
        blocks = block_weights.pack(t) if pack_exact_blocks else None
        return t if blocks is None else blocks

    def matrix(name: str) -> torch.Tensor:
        return packed(cast(need(name), stored))

    def fused(prefix: str, names: tuple[str, ...], kind: str) -> torch.Tensor:
        t = cast(
            torch.cat([need(f"{prefix}.{n}.{kind}") for n in names], 0), stored if kind == "weight" else dtype
        )
        return packed(t) if kind == "weight" else t

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
    head = get("lm_head.weight")
    lm_head = embed if spec.tie_word_embeddings or head is None else packed(cast(head, stored))
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
