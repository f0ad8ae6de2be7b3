"""One NemotronH tower (spec §2): embeddings, a stack of pre-norm residual blocks, final norm; and the causal LM.

    NemotronHModel.forward(input_ids [b, L], cache: TowerCache | None, attention_mask [b, L] bool | None)
        -> hidden [b, L, H] (after norm_f)
    NemotronHForCausalLM.forward(...) -> logits [b, L, V] fp32

Block i: x = x + mixer(norm(x)), the mixer chosen by pattern character (M Mamba-2, * attention, E MoE,
- MLP). State names equal the checkpoint's (`layout.nemotron_h_shapes`), so loading is strict.

With a cache the forward reads it and extends it in place: prefill (empty cache), extension by any number
of tokens, one-token decode; the same code path for all three. `attention_mask` False marks left padding
of these L tokens; it is appended to `cache.key_mask` so later steps keep ignoring the pads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from twotower_cli.config import NemotronHConfig
from twotower_cli.errors import TwoTowerError
from twotower_cli.model.attention import Attention, causal_mask
from twotower_cli.model.cache import KVCache, MambaState, TowerCache
from twotower_cli.model.mamba2 import Mamba2Mixer
from twotower_cli.model.mlp import MLP
from twotower_cli.model.moe import MoE
from twotower_cli.model.norm import RMSNorm


def make_mixer(cfg: NemotronHConfig, kind: str, router_dtype: torch.dtype = torch.float32) -> nn.Module:
    if kind == "M":
        return Mamba2Mixer(cfg)
    if kind == "*":
        return Attention(cfg)
    if kind == "E":
        return MoE(cfg, router_dtype)
    if kind == "-":
        return MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
    raise ValueError(f"unknown layer kind {kind!r}")


class NemotronHBlock(nn.Module):
    """Pre-norm residual block. `kind` is the pattern character; `norm` and `mixer` are public so that the
    denoiser can interleave its own modulation between them (spec §5)."""

    def __init__(self, cfg: NemotronHConfig, kind: str, router_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = make_mixer(cfg, kind, router_dtype)


class NemotronHModel(nn.Module):
    def __init__(self, cfg: NemotronHConfig, router_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        # nn.Embedding's own init (normal_) on the meta device, where checkpoints are built before loading,
        # runs through torch._refs, whose first use imports torch._dynamo: ~1.4 s of every command's
        # start-up. So the weight is made here, and initialised the same way only on a real device.
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(NemotronHBlock(cfg, kind, router_dtype) for kind in cfg.pattern)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def make_cache(self, batch: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> TowerCache:
        """An empty cache: zero Mamba states, K/V with T = 0 (defaults: the embeddings' device and dtype)."""
        device = device if device is not None else self.embeddings.weight.device
        dtype = dtype if dtype is not None else self.embeddings.weight.dtype
        layers: list[MambaState | KVCache | None] = []
        for layer in self.layers:
            if layer.kind == "M":
                layers.append(MambaState.zeros(self.cfg, batch, device, dtype))
            elif layer.kind == "*":
                layers.append(KVCache.empty(self.cfg, batch, device, dtype))
            else:
                layers.append(None)
        return TowerCache(layers)

    def layer_forward(self, i: int, x: Tensor, cache: TowerCache | None = None, attn_mask: Tensor | None = None,
                      pad_mask: Tensor | None = None) -> Tensor:
        """Block i on x [b, L, H]; updates cache.layers[i] in place when a cache is given.
        attn_mask: [b|1, 1, L, T] bool for attention layers; pad_mask: [b, L] bool for Mamba layers."""
        layer = self.layers[i]
        h = layer.norm(x)
        entry = None if cache is None else cache.layers[i]
        if layer.kind == "M":
            out, state = layer.mixer(h, entry, pad_mask, in_place=cache is not None)  # our own cache's state
            if cache is not None:
                cache.layers[i] = state
        elif layer.kind == "*":
            out, _, _ = layer.mixer(h, entry, mask=attn_mask, append=cache is not None)  # the cache grows
        else:
            out = layer.mixer(h)
        return x + out

    def forward(self, input_ids: Tensor, cache: TowerCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        b, L = input_ids.shape
        t_past = 0 if cache is None else cache.length
        pad_mask = None if attention_mask is None else attention_mask.bool()

        # Key validity over [past ‖ new]; None while every position so far is a real token.
        key_mask = None
        if pad_mask is not None or (cache is not None and cache.key_mask is not None):
            past = (cache.key_mask if cache is not None and cache.key_mask is not None
                    else torch.ones(b, t_past, dtype=torch.bool, device=input_ids.device))
            new = pad_mask if pad_mask is not None else torch.ones(b, L, dtype=torch.bool, device=input_ids.device)
            key_mask = torch.cat([past, new], dim=1)
        # No pads: attention builds the causal mask itself (and on CUDA can then use flash attention).
        attn_mask = None
        if key_mask is not None:
            attn_mask = causal_mask(L, t_past, input_ids.device)[None, None] & key_mask[:, None, None, :]  # [b,1,L,T]

        x = self.embeddings(input_ids)
        for i in range(len(self.layers)):
            x = self.layer_forward(i, x, cache, attn_mask, pad_mask)
        if cache is not None:
            cache.key_mask = key_mask
            cache.length = t_past + L
        return self.norm_f(x)

    def step_into(self, input_ids: Tensor, cache: TowerCache, kv: dict[int, tuple[Tensor, Tensor]], pos: Tensor,
                  valid: Tensor) -> Tensor:
        """A context step of L tokens (input_ids [b, L]) over fixed-size buffers, for a CUDA graph
        (`TowerBackend`): `kv[i]` = layer i's key/value buffers [b, kv, C, d] with the past at columns
        0 .. pos-1, `pos` [1] long on the device, `valid` [b, C] bool (the key mask; the new columns set
        here). Every tensor it writes keeps its storage: the new keys/values go into the buffers
        (`Attention.step_into`), the Mamba layers' new states are copied into the cache's state tensors (the
        kernels update those in place already on a one-token step). `cache`'s length, key mask and K/V
        tensors are the caller's to advance. Computes what `forward(input_ids, cache)` does; returns hidden
        [b, L, H] after norm_f."""
        L, C = input_ids.shape[1], valid.shape[1]
        cols = pos + torch.arange(L, device=pos.device)
        valid.index_fill_(1, cols, True)
        causal = torch.arange(C, device=pos.device)[None, :] <= cols[:, None]  # [L, C]
        mask = valid[:, None, None, :] & causal[None, None]
        x = self.embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer.norm(x)
            if layer.kind == "M":
                state = cache.layers[i]
                out, new = layer.mixer(h, state, in_place=True)
                for have, got in ((state.conv, new.conv), (state.ssm, new.ssm)):
                    if got is not have:
                        have.copy_(got)
            elif layer.kind == "*":
                out = layer.mixer.step_into(h, *kv[i], cols, mask)
            else:
                out = layer.mixer(h)
            x = x + out
        return self.norm_f(x)


class NemotronHForCausalLM(nn.Module):
    def __init__(self, cfg: NemotronHConfig, router_dtype: torch.dtype = torch.float32):
        super().__init__()
        if cfg.tie_word_embeddings:
            raise TwoTowerError("tie_word_embeddings=true is not supported",
                                "NemotronH checkpoints keep a separate lm_head.weight")
        self.cfg = cfg
        self.backbone = NemotronHModel(cfg, router_dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def make_cache(self, batch: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> TowerCache:
        return self.backbone.make_cache(batch, device, dtype)

    def forward(self, input_ids: Tensor, cache: TowerCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        hidden = self.backbone(input_ids, cache, attention_mask)
        return self.lm_head(hidden).float()
