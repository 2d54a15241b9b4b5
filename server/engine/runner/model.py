"""The model runner: Llama-family decoder layers over a flat batch of tokens, on the paged KV cache.

One step's tokens -- decode rows and prefill chunks of many sequences, each token with its own position and
adapter slot -- run as one [T, H] batch through fused projections (one GEMM for q/k/v, one for gate/up),
RoPE from a precomputed table, attention on the paged cache, and the multi-LoRA sites. The arithmetic follows
transformers' modelling code op for op (RMSNorm in fp32, then cast; RoPE as rotate-half; SiLU gate), so fp32
greedy decoding matches `generate`.

The same weights serve on-line training: :meth:`Runner.dense_hidden` is a cache-free causal forward with
autograd, and :meth:`Runner.get_decoder` / :meth:`Runner.get_output_embeddings` give the trainer the surface
of a transformers model. There is one copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hotlora.kernels import bf16_weights, block_weights, native
from hotlora.kernels.narrow_linear import long_chunk

from .attention import AttentionMetadata, attention_path, dense_attention, paged_attention
from .kv_cache import KVPool
from .spec import ModelSpec
from .weights import RowStack, RunnerWeights

# projection name -> the PEFT module names it fuses, in output-column order
FUSED = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass(frozen=True)
class StepInput:
    """One forward pass over the paged cache (built by the engine)."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attention: AttentionMetadata
    # the step's LoRA plan (kernels' LoraPlan) when the caller holds it; None: the sites read the runtime's
    # shared context (set by the engine). A static decode step passes its own, so that compiling one off the
    # engine thread does not race the engine's steps for the shared one.
    lora: object | None = None


class _DecoderOutput:
    def __init__(self, hidden: torch.Tensor, hidden_states: tuple | None = None):
        self.last_hidden_state = hidden
        self.hidden_states = hidden_states


class _DecoderView(nn.Module):
    """`runner.get_decoder()`: called like a transformers decoder by the trainer."""

    def __init__(self, runner: Runner):
        super().__init__()
        self._runner = [runner]  # not a submodule: parameters() stay the runner's own

    def forward(self, input_ids, attention_mask=None, use_cache=False, output_hidden_states=False, **_):
        runner = self._runner[0]
        if not output_hidden_states:
            return _DecoderOutput(runner.dense_hidden(input_ids, attention_mask))
        # as transformers: index k the state after layer k, the last after the final norm (the
        # embeddings at index 0 are not kept: nothing reads them)
        taps = dict.fromkeys(range(1, runner.spec.num_layers))
        out = runner.dense_hidden(input_ids, attention_mask, taps)
        return _DecoderOutput(out, (None, *(taps[k] for k in sorted(taps)), out))


class Runner(nn.Module):
    def __init__(self, spec: ModelSpec, weights: RunnerWeights, config, pool: KVPool | None = None):
        super().__init__()
        self.spec = spec
        self.w = weights
        self.config = config  # the transformers config (pad/eos ids, model_type) for the rest of the server
        self.pool = pool
        self.generation_config = None  # transformers GenerationConfig, when the model has one (EOS ids)
        self.kv_config = None  # set by the loader with the pool
        self.sites: dict[tuple[int, str], object] = {}  # (layer, projection) -> LoraSite
        self.dtype = weights.compute_dtype
        self.device = weights.embed.device
        self.linear = _linear_for(weights)
        # the C kernels for RMSNorm, RoPE and the activation: fp32 on a CPU where hotlora's kernels run
        self._ops = (
            native.ops()
            if self.device.type == "cpu" and self.dtype == torch.float32 and native.available()
            else None
        )
        self.scale = spec.head_dim**-0.5
        self.attention_path = attention_path(self.device)  # Triton kernels on CUDA, the CPU's elsewhere
        cos, sin = _rope_table(spec, spec.max_positions)
        self.register_buffer("rope_cos", cos.to(self.device, self.dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(self.device, self.dtype), persistent=False)
        # the weights as frozen parameters: parameters() and requires_grad checks see the model
        for i, t in enumerate(weights.tensors()):
            self.register_parameter(f"w{i}", nn.Parameter(t, requires_grad=False))
        self._lm_head = _LmHead(weights.lm_head, self.linear)
        # long prefill chunks' products and attention in bf16 (long_products_in_bf16)
        self.auto_bf16 = False

    # ---- the serving forward ----------------------------------------------------------------------------
    def forward(self, step: StepInput, taps: dict | None = None) -> torch.Tensor:
        """Final-norm hidden states [T, H] of the step's tokens; K/V written into the pool. `taps`: layer
        k -> filled with the residual stream after layer k [T, H] (transformers' `hidden_states[k]`)."""
        meta = step.attention
        pool = self.pool
        kernels = self._ops is not None and not torch.is_grad_enabled()

        def attend(i: int, q, k, v):
            pool.write(i, meta.slot_mapping, k, v)
            window = self.spec.sliding_windows[i]
            return paged_attention(
                q, k, v, pool.k[i], pool.v[i], meta, self.scale, window, self.auto_bf16, self.attention_path
            )

        return self._run(step.token_ids, step.positions, attend, taps, kernels, step.lora)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(hidden)

    # ---- training and scoring: no cache, autograd ------------------------------------------------------
    def dense_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, taps: dict | None = None
    ) -> torch.Tensor:
        """Right-padded [B, L] -> final-norm hidden [B, L, H], causal within each sequence (`taps` as in
        `forward`, each filled [B, L, H])."""
        b, length = input_ids.shape
        ids = input_ids.to(self.device)
        lengths = (
            attention_mask.to(self.device).sum(-1)
            if attention_mask is not None
            else torch.full((b,), length, device=self.device)
        )
        pos = torch.arange(length, device=self.device).expand(b, length).reshape(-1)

        def attend(i: int, q, k, v):
            shape = (b, length)
            return dense_attention(
                q.view(*shape, *q.shape[1:]),
                k.view(*shape, *k.shape[1:]),
                v.view(*shape, *v.shape[1:]),
                lengths,
                self.scale,
                self.spec.sliding_windows[i],
            ).reshape(b * length, -1)

        out = self._run(ids.reshape(-1), pos, attend, taps).view(b, length, -1)
        for k, h in (taps or {}).items():
            taps[k] = h.view(b, length, -1)
        return out

    def get_decoder(self) -> nn.Module:
        return _DecoderView(self)

    def get_output_embeddings(self) -> nn.Module:
        return self._lm_head

    # ---- the layers ---------------------------------------------------------------------------------------
    def _run(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: Callable,
        taps: dict | None = None,
        kernels: bool = False,
        lora=None,
    ) -> torch.Tensor:
        """`kernels`: RMSNorm (with the residual add before it), RoPE and the MLP's activation as hotlora's
        C kernels, in place where torch would allocate: serving only, never under autograd."""
        spec, w = self.spec, self.w
        if block_weights.is_packed(w.embed):
            h = block_weights.embedding(token_ids, w.embed)
        else:
            h = F.embedding(token_ids, w.embed).to(self.dtype)
        eps, heads, kv_heads, d = spec.rms_norm_eps, spec.num_heads, spec.num_kv_heads, spec.head_dim
        ops = self._ops
        norm = ops.rms_norm if kernels else _rms_norm
        if not kernels:
            cos = self.rope_cos[positions].unsqueeze(1)  # [T, 1, d]
            sin = self.rope_sin[positions].unsqueeze(1)
            half = d // 2
            # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): the sign moves onto the table (exactly)
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        t = token_ids.shape[0]
        qs, kvs = spec.q_size, spec.kv_size
        last = len(w.layers) - 1
        for i, layer in enumerate(w.layers):
            if i == 0 or not kernels:  # with the kernels, the previous layer's last add gave it
                x = norm(h, layer.input_norm, eps)
            qkv = self._project(i, "qkv", x, layer.qkv, layer.qkv_bias, lora)
            # RoPE on q's and k's heads in one pass (the same products and sums as rotating each)
            if kernels:
                ops.rope_(qkv, heads + kv_heads, d, self.rope_cos, self.rope_sin, positions)
                qk = qkv[:, : qs + kvs].view(t, -1, d)
            else:
                qk = _rope(qkv[:, : qs + kvs].view(t, -1, d), cos, sin)
            q, k = qk.split((heads, kv_heads), dim=1)
            v = qkv[:, qs + kvs :].view(t, kv_heads, d)
            o = self._project(i, "o", attend(i, q, k, v), layer.o, layer.o_bias, lora)
            if kernels:
                x = ops.add_rms_norm(h, o, layer.post_norm, eps)  # h += o, then its norm: one pass
            else:
                h = h + o
                x = norm(h, layer.post_norm, eps)
            gate_up = self._project(i, "gate_up", x, layer.gate_up, layer.gate_up_bias, lora)
            if kernels:
                act = ops.silu_mul(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                act = F.silu(gate) * up
            down = self._project(i, "down", act, layer.down, layer.down_bias, lora)
            if kernels:  # h += down, then the norm the next layer (or the final one) starts with
                x = ops.add_rms_norm(h, down, w.norm if i == last else w.layers[i + 1].input_norm, eps)
            else:
                h = h + down
            if taps is not None and i + 1 in taps:  # an earlier layer a pooled text reads
                taps[i + 1] = h.clone() if kernels else h  # the kernels add into h in place
        return x if kernels else norm(h, w.norm, eps)

    def long_products_in_bf16(self) -> bool:
        """Run the GEMMs of long prefill chunks (WIDEN_ROWS rows and more; torch's GEMM on the widened
        matrix) and those chunks' attention (where its C kernel has bf16) in bf16 arithmetic, decode and
        short chunks staying in fp32 on the blocks: --dtype auto on a CPU with avx512_bf16 or AMX serving a
        checkpoint of GGUF blocks in fp32 (server/precision.py's `long_products_bf16`), whose 512-token
        prefill is otherwise bound by fp32 arithmetic. Returns whether it applies (fp32 weights kept as
        blocks)."""
        if self.linear is not _by_storage:
            return False
        self.linear = self._lm_head._linear = _by_storage_long_in_bf16
        self.auto_bf16 = True
        return True

    def _project(self, layer: int, name: str, x, weight, bias, lora) -> torch.Tensor:
        site = self.sites.get((layer, name))
        if site is None:
            return self.linear(x, weight, bias)
        if self.linear is F.linear:
            y = self.linear(x, weight, bias)
        else:  # hotlora's weight kernels prefetch the adapters' rows the update reads next
            y = self.linear(x, weight, bias, site.rows_ahead(lora))
        return site.apply(y, x, lora)

    # ---- LoRA sites -------------------------------------------------------------------------------------
    def projection_shapes(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """projection -> (in_features, output size of each fused module)."""
        s = self.spec
        return {
            "qkv": (s.hidden_size, (s.q_size, s.kv_size, s.kv_size)),
            "o": (s.q_size, (s.hidden_size,)),
            "gate_up": (s.hidden_size, (s.intermediate_size, s.intermediate_size)),
            "down": (s.intermediate_size, (s.hidden_size,)),
        }


def _linear_for(weights: RunnerWeights) -> Callable:
    """F.linear, or the bf16-weight kernel when the matrices are stored narrower than the compute dtype, or
    one that picks by each matrix when some are kept in blocks (kernels/block_weights.py; a RowStack's
    parts each by theirs)."""
    if weights.packed_matrices[0]:
        return _by_storage
    if weights.stored_dtype == weights.compute_dtype:
        return F.linear
    return bf16_weights.linear


def _by_storage(x: torch.Tensor, weight, bias: torch.Tensor | None = None, ahead=None):
    if isinstance(weight, RowStack):
        return weight.linear(_by_storage, x, bias, ahead)
    if block_weights.is_packed(weight):
        return block_weights.linear(x, weight, bias, ahead)
    return F.linear(x, weight, bias)


def _by_storage_long_in_bf16(x: torch.Tensor, weight: torch.Tensor, bias=None, ahead=None):
    """_by_storage, with long chunks' products in bf16 arithmetic (Runner.long_products_in_bf16)."""
    if isinstance(weight, RowStack):
        return weight.linear(_by_storage_long_in_bf16, x, bias, ahead)
    if block_weights.is_packed(weight):
        return block_weights.linear(x, weight, bias, ahead, long_in_bf16=True)
    if long_chunk(x):
        return block_weights.long_product_bf16(x, weight, bias)
    return F.linear(x, weight, bias)


class _LmHead(nn.Module):
    def __init__(self, weight: torch.Tensor, linear: Callable):
        super().__init__()
        self._weight = [weight]  # shared with the embedding when tied; registered on the runner
        self._linear = linear

    @property
    def weight(self) -> torch.Tensor:
        return self._weight[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._linear(hidden, self._weight[0])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm: statistics in fp32, cast back, then the weight; in fp32 torch's fused
    # rms_norm does exactly that in one op instead of six
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' `x * cos + rotate_half(x) * sin`, with the sign of rotate_half folded into the table."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


def _rope_table(spec: ModelSpec, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    # as LlamaRotaryEmbedding: freqs = pos · inv_freq in fp32, emb = [freqs, freqs], times attention_scaling
    pos = torch.arange(length, dtype=torch.float32)
    freqs = pos[:, None] * spec.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * spec.rope_scaling, emb.sin() * spec.rope_scaling
