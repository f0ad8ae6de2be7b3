"""Per-layer inference state of one NemotronH tower (spec §2 "Cache per layer", design principle 6).

    MambaState  conv [b, conv_dim, K]: the last K = conv_kernel raw (pre-conv) xBC columns, zeros before
                the first tokens; ssm [b, heads, head_dim, state] fp32.
    KVCache     k, v [b, kv_heads, T, head_dim]; T may be 0.
    TowerCache  one entry per layer (MambaState for M, KVCache for *, None for E and -), the key padding
                mask [b, T] (False at left-pad positions; None = all valid) and the number of tokens seen.
                `stack` puts the rows of several caches in one (the shorter ones left-padded), `select` keeps
                some rows (and drops the pad columns no kept row needs): a server's batch takes in new
                sequences and lets finished ones go between blocks.

The model creates these (`NemotronHModel.make_cache`) and extends them in place (an attention layer replaces
its KVCache's k / v by the [past ‖ new] it attended over: `Attention(append=True)`); `clone()` gives an
independent copy (the sampler keeps snapshots, the denoiser reads a state without writing it back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from twotower_cli.config import NemotronHConfig


@dataclass
class MambaState:
    conv: Tensor  # [b, conv_dim, K]
    ssm: Tensor  # [b, h, p, n], fp32

    @classmethod
    def zeros(cls, cfg: NemotronHConfig, batch: int, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> MambaState:
        conv = torch.zeros(batch, cfg.conv_dim, cfg.conv_kernel, device=device, dtype=dtype)
        ssm = torch.zeros(batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size,
                          device=device, dtype=torch.float32)
        return cls(conv, ssm)

    def clone(self) -> MambaState:
        return MambaState(self.conv.clone(), self.ssm.clone())


@dataclass
class KVCache:
    k: Tensor  # [b, kv_heads, T, head_dim]
    v: Tensor

    @classmethod
    def empty(cls, cfg: NemotronHConfig, batch: int, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> KVCache:
        shape = (batch, cfg.num_key_value_heads, 0, cfg.attention_head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def clone(self) -> KVCache:
        return KVCache(self.k.clone(), self.v.clone())

    def padded(self, length: int) -> KVCache:
        """The same keys and values after `length - self.length` zero columns (left padding)."""
        extra = length - self.length
        if extra == 0:
            return self
        zeros = self.k.new_zeros(self.k.shape[0], self.k.shape[1], extra, self.k.shape[3])
        return KVCache(torch.cat([zeros, self.k], dim=2), torch.cat([zeros, self.v], dim=2))


@dataclass
class TowerCache:
    layers: list[MambaState | KVCache | None]
    key_mask: Tensor | None = None  # [b, T] bool, False at left-pad positions
    length: int = 0  # tokens seen

    def clone(self) -> TowerCache:
        return TowerCache([None if c is None else c.clone() for c in self.layers],
                          None if self.key_mask is None else self.key_mask.clone(), self.length)

    @property
    def batch(self) -> int:
        for c in self.layers:
            if c is not None:
                return (c.conv if isinstance(c, MambaState) else c.k).shape[0]
        raise ValueError("a cache without Mamba or attention layers")

    def valid(self) -> Tensor:
        """The key mask [b, T], all True where `key_mask` is None."""
        if self.key_mask is not None:
            return self.key_mask
        device = next(c.ssm if isinstance(c, MambaState) else c.k for c in self.layers if c is not None).device
        return torch.ones(self.batch, self.length, dtype=torch.bool, device=device)

    @staticmethod
    def stack(caches: list[TowerCache]) -> TowerCache:
        """One cache with the rows of `caches` in order; each is left-padded to the longest (zero keys and
        values, masked out), so every row attends to exactly the keys it had."""
        length = max(c.length for c in caches)
        layers: list[MambaState | KVCache | None] = []
        for states in zip(*(c.layers for c in caches), strict=True):
            first = states[0]
            if first is None:
                layers.append(None)
            elif isinstance(first, MambaState):
                layers.append(MambaState(torch.cat([s.conv for s in states]), torch.cat([s.ssm for s in states])))
            else:
                padded = [s.padded(length) for s in states]
                layers.append(KVCache(torch.cat([s.k for s in padded]), torch.cat([s.v for s in padded])))
        key_mask = None
        if any(c.key_mask is not None or c.length < length for c in caches):
            masks = [c.valid() for c in caches]
            key_mask = torch.cat([torch.cat([m.new_zeros(m.shape[0], length - m.shape[1]), m], dim=1) for m in masks])
        return TowerCache(layers, key_mask, length)

    def select(self, rows: Tensor | list[int]) -> TowerCache:
        """The cache of `rows` only, without the leading columns that are padding in all of them."""
        index = torch.as_tensor(rows, dtype=torch.long)
        mask = None if self.key_mask is None else self.key_mask[index.to(self.key_mask.device)]
        start = 0
        if mask is not None:
            used = mask.any(dim=0).nonzero()
            start = int(used[0]) if len(used) else self.length
            mask = mask[:, start:]
            if bool(mask.all()):
                mask = None
        layers: list[MambaState | KVCache | None] = []
        for c in self.layers:
            if c is None:
                layers.append(None)
            elif isinstance(c, MambaState):
                i = index.to(c.conv.device)
                layers.append(MambaState(c.conv[i], c.ssm[i]))
            else:
                i = index.to(c.k.device)
                layers.append(KVCache(c.k[i, :, start:], c.v[i, :, start:]))
        return TowerCache(layers, mask, self.length - start)
