"""Per-layer inference state of one NemotronH tower (spec §2 "Cache per layer", design principle 6).

    MambaState  conv [b, conv_dim, K]: the last K = conv_kernel raw (pre-conv) xBC columns, zeros before
                the first tokens; ssm [b, heads, head_dim, state] fp32.
    KVCache     k, v [b, kv_heads, T, head_dim]; T may be 0.
    TowerCache  one entry per layer (MambaState for M, KVCache for *, None for E and -), the key padding
                mask [b, T] (False at left-pad positions; None = all valid) and the number of tokens seen.

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


@dataclass
class TowerCache:
    layers: list[MambaState | KVCache | None]
    key_mask: Tensor | None = None  # [b, T] bool, False at left-pad positions
    length: int = 0  # tokens seen

    def clone(self) -> TowerCache:
        return TowerCache([None if c is None else c.clone() for c in self.layers],
                          None if self.key_mask is None else self.key_mask.clone(), self.length)
