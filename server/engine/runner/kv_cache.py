"""A paged KV cache: fixed-size blocks handed to sequences on demand, and automatic prefix caching.

Memory: one pool per layer, ``[num_blocks, block_size, kv_heads, head_dim]`` for K and for V. A sequence owns
a list of block ids (its block table); token p of the sequence lives at ``table[p // bs] * bs + p % bs``.
A sequence joining or leaving the batch copies nothing: it gets or returns block ids. Block 0 is never handed
out: padded block tables point at it.

Prefix caching (as vLLM's): a block that fills up is registered under a hash of everything before it and its
own tokens. A new request walks its prompt block by block and reuses every registered block whose hash
matches, so those tokens are never computed again. The hash chain starts from the request's *cache key* --
its tenant and its adapter version -- so no block is ever shared across tenants (whose timing would reveal
another tenant's prompts) or across adapters (LoRA changes K and V). Blocks nobody references stay cached and
are reused LRU-first when the free list runs dry.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from hotlora.kernels import native
from hotlora.server.engine.device_io import tensor_on

NULL_BLOCK = 0


@dataclass(frozen=True)
class KVCacheConfig:
    block_size: int = 16
    num_blocks: int = 4096
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is reserved), got {self.num_blocks}")

    @classmethod
    def for_bytes(cls, nbytes: int, bytes_per_token: int, **kw) -> KVCacheConfig:
        """As many blocks as `nbytes` holds at `bytes_per_token` (K and V of every layer)."""
        bs = kw.get("block_size", cls.block_size)
        return cls(num_blocks=max(2, nbytes // (bytes_per_token * bs)), **kw)


class KVPool:
    """The memory: K and V blocks of every layer, one tensor [layers, 2, blocks, block_size, kv_heads, d]."""

    def __init__(self, num_layers: int, config: KVCacheConfig, kv_heads: int, head_dim: int, dtype, device):
        shape = (num_layers, 2, config.num_blocks, config.block_size, kv_heads, head_dim)
        # torch.empty: pages are committed as blocks are first zeroed, so memory follows the tokens held
        self.data = torch.empty(shape, dtype=dtype, device=device)
        self.k = [self.data[i, 0] for i in range(num_layers)]
        self.v = [self.data[i, 1] for i in range(num_layers)]
        self.block_size = config.block_size
        self.bytes_per_token = 2 * num_layers * kv_heads * head_dim * self.data.element_size()
        # fp32 on a CPU where hotlora's C kernels run: one memcpy per row instead of two index_copy_ calls
        self._ops = (
            native.ops()
            if self.data.device.type == "cpu" and dtype == torch.float32 and native.available()
            else None
        )
        self.zero_blocks([NULL_BLOCK])

    def zero_blocks(self, blocks: list[int], written: list[int] | None = None) -> None:
        """Blocks just handed out. Attention reads whole blocks and masks the tail not yet written; masked
        values are multiplied by 0, so they must be finite, and uninitialised memory may hold NaN. `written`:
        the pool positions the coming step writes; a block it fills whole needs no zeros (a 512-token
        prompt's 32 blocks: 5-10 ms of its prefill)."""
        if written and blocks:
            bs, filled = self.block_size, {}
            for slot in written:
                filled[slot // bs] = filled.get(slot // bs, 0) + 1
            blocks = [b for b in blocks if filled.get(b, 0) < bs]
        if blocks:
            self.data.index_fill_(2, tensor_on(blocks, torch.int64, self.data.device), 0)

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, kv_heads, head_dim] of the step's tokens; slot_mapping: [T] pool positions."""
        if self._ops is not None and _rows_alike(k, v):
            self._ops.kv_write(k, v, slot_mapping, self.data, layer)
            return
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def _rows_alike(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Each row of k and of v is kv_heads x d contiguous floats, both with one row stride (the runner's views
    of its fused q/k/v rows; a single row has no stride to share): what the C copy reads."""
    d = k.shape[2]
    return k.stride()[1:] == v.stride()[1:] == (d, 1) and (k.shape[0] <= 1 or k.stride(0) == v.stride(0))


@dataclass
class SequenceKV:
    """One sequence's blocks; `hashes[i]` is block i's prefix hash once it is full."""

    key: Hashable
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    num_cached: int = 0  # prompt tokens found in the prefix cache at admission

    def table(self, device=None) -> torch.Tensor:
        return torch.tensor(self.blocks, dtype=torch.int64, device=device)


def chain_root(key: Hashable) -> bytes:
    return hashlib.blake2b(repr(key).encode(), digest_size=16).digest()


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens))
    return h.digest()


class BlockManager:
    """Which block belongs to whom. Not thread-safe: the engine thread owns it."""

    def __init__(self, config: KVCacheConfig):
        self.config = config
        self.block_size = config.block_size
        self._ref = [0] * config.num_blocks
        self._hash: dict[int, bytes] = {}  # block -> its registered prefix hash
        self._by_hash: dict[bytes, int] = {}
        self._free: list[int] = list(range(config.num_blocks - 1, NULL_BLOCK, -1))  # never cached
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unused; LRU
        self.fresh: list[int] = []  # blocks handed out since the last take_fresh() (to be zeroed)
        self.hits = 0  # prompt tokens served from the cache
        self.queries = 0  # prompt tokens looked up

    # ---- accounting -----------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.config.num_blocks - 1 - self.num_free

    @property
    def usage(self) -> float:
        return self.num_used / (self.config.num_blocks - 1)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- sequences --------------------------------------------------------------------------------------
    def open(self, key: Hashable, prompt: Sequence[int], lookup: bool = True) -> SequenceKV:
        """A new sequence; with prefix caching, takes every cached block its prompt starts with (at most
        len(prompt) - 1 tokens: the last prompt token is always computed, its logits start the output).
        lookup=False: compute every token (pooling needs each token's hidden state)."""
        seq = SequenceKV(key)
        if not self.config.prefix_caching or not lookup:
            return seq
        parent = chain_root(key)
        usable = (len(prompt) - 1) // self.block_size
        self.queries += len(prompt)
        for i in range(usable):
            h = block_hash(parent, prompt[i * self.block_size : (i + 1) * self.block_size])
            block = self._by_hash.get(h)
            if block is None:
                break
            self._take(block)
            seq.blocks.append(block)
            seq.hashes.append(h)
            parent = h
        seq.num_cached = len(seq.blocks) * self.block_size
        self.hits += seq.num_cached
        return seq

    def grow(self, seq: SequenceKV, num_tokens: int) -> bool:
        """Blocks for the first `num_tokens` tokens of `seq`; False (nothing taken) if the pool is short."""
        need = self.blocks_for(num_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.blocks.append(self._allocate())
        return True

    def commit(self, seq: SequenceKV, tokens: Sequence[int], num_computed: int) -> None:
        """Register the blocks that `num_computed` tokens have filled, so later requests can reuse them."""
        if not self.config.prefix_caching:
            return
        full = num_computed // self.block_size
        parent = seq.hashes[-1] if seq.hashes else chain_root(seq.key)
        for i in range(len(seq.hashes), full):
            h = block_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            seq.hashes.append(h)
            block = seq.blocks[i]
            if h not in self._by_hash and block not in self._hash:
                self._by_hash[h] = block
                self._hash[block] = h
            parent = h

    def close(self, seq: SequenceKV) -> None:
        """Give the sequence's blocks back (registered ones stay cached until evicted)."""
        for block in reversed(seq.blocks):  # tail first: evicted before the prefix blocks they extend
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._hash:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.blocks.clear()
        seq.hashes.clear()

    # ---- blocks -----------------------------------------------------------------------------------------
    def _take(self, block: int) -> None:
        if self._ref[block] == 0:
            self._evictable.pop(block, None)
        self._ref[block] += 1

    def _allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)  # least recently used cached block
            self._forget(block)
        self._ref[block] = 1
        self.fresh.append(block)
        return block

    def take_fresh(self) -> list[int]:
        """The blocks handed out since the last call (the engine zeroes them before the step)."""
        fresh, self.fresh = self.fresh, []
        return fresh

    def _forget(self, block: int) -> None:
        h = self._hash.pop(block, None)
        if h is not None and self._by_hash.get(h) == block:
            del self._by_hash[h]
