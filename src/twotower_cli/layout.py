"""Tensor names and shapes a config implies, for the NemotronH single tower (spec §1) and the TwoTower
checkpoint (spec §3). Pure functions of the config: inspect, split and the loaders all check against them.
"""

from __future__ import annotations

import re

from twotower_cli.config import NemotronHConfig

# Tensors kept in fp32 in memory whatever the load dtype (spec §1).
FP32_SUFFIXES = ("mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.gate.weight", "mixer.gate.e_score_correction_bias")

# Source keys that the model does not use and that split/loaders drop deliberately (and report).
DROPPED_PATTERNS = (re.compile(r"^mtp\."), re.compile(r"^model\.mtp\."), re.compile(r".*\.rotary_emb\.inv_freq$"))

LEGACY_RENAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}

TIME_EMBED_DIM = 256


def keep_fp32(name: str) -> bool:
    return name.endswith(FP32_SUFFIXES)


def is_dropped(name: str) -> bool:
    return any(p.match(name) for p in DROPPED_PATTERNS)


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layers_held(names) -> int:
    """Layers a set of tensor names covers: 1 + the highest `layers.N.` index among those the model uses
    (not the dropped `mtp.*`)."""
    found = [int(m.group(1)) for n in names if not is_dropped(n) and (m := _LAYER_INDEX.search(n))]
    return max(found, default=-1) + 1


def layer_count_note(described: int, names) -> str | None:
    """A config.json of `described` layers beside weights (`names`) of another depth, in one line (else None)."""
    held = layers_held(names)
    if held and held != described:
        return f"config.json describes {described} layers where the weights hold {held}"
    return None


def layer_shapes(cfg: NemotronHConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Shapes of layer i's tensors, names relative to `layers.{i}.`."""
    H = cfg.hidden_size
    kind = cfg.pattern[i]
    out: dict[str, tuple[int, ...]] = {"norm.weight": (H,)}
    if kind == "M":
        out.update({
            "mixer.in_proj.weight": (cfg.in_proj_dim, H),
            "mixer.conv1d.weight": (cfg.conv_dim, 1, cfg.conv_kernel),
            "mixer.dt_bias": (cfg.mamba_num_heads,),
            "mixer.A_log": (cfg.mamba_num_heads,),
            "mixer.D": (cfg.mamba_num_heads,),
            "mixer.norm.weight": (cfg.d_inner,),
            "mixer.out_proj.weight": (H, cfg.d_inner),
        })
        if cfg.use_conv_bias:
            out["mixer.conv1d.bias"] = (cfg.conv_dim,)
        if cfg.mamba_proj_bias:
            out["mixer.in_proj.bias"] = (cfg.in_proj_dim,)
            out["mixer.out_proj.bias"] = (H,)
    elif kind == "*":
        out.update({
            "mixer.q_proj.weight": (cfg.q_dim, H),
            "mixer.k_proj.weight": (cfg.kv_dim, H),
            "mixer.v_proj.weight": (cfg.kv_dim, H),
            "mixer.o_proj.weight": (H, cfg.q_dim),
        })
        if cfg.attention_bias:
            out.update({"mixer.q_proj.bias": (cfg.q_dim,), "mixer.k_proj.bias": (cfg.kv_dim,),
                        "mixer.v_proj.bias": (cfg.kv_dim,), "mixer.o_proj.bias": (H,)})
    elif kind == "E":
        out["mixer.gate.weight"] = (cfg.n_routed_experts, H)
        out["mixer.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
        for j in range(cfg.n_routed_experts):
            out[f"mixer.experts.{j}.up_proj.weight"] = (cfg.moe_intermediate_size, H)
            out[f"mixer.experts.{j}.down_proj.weight"] = (H, cfg.moe_intermediate_size)
            if cfg.mlp_bias:
                out[f"mixer.experts.{j}.up_proj.bias"] = (cfg.moe_intermediate_size,)
                out[f"mixer.experts.{j}.down_proj.bias"] = (H,)
        if cfg.n_shared_experts:
            S = cfg.shared_expert_size  # not times n_shared_experts (model.moe.MoE)
            out["mixer.shared_experts.up_proj.weight"] = (S, H)
            out["mixer.shared_experts.down_proj.weight"] = (H, S)
            if cfg.mlp_bias:
                out["mixer.shared_experts.up_proj.bias"] = (S,)
                out["mixer.shared_experts.down_proj.bias"] = (H,)
    elif kind == "-":
        out["mixer.up_proj.weight"] = (cfg.intermediate_size, H)
        out["mixer.down_proj.weight"] = (H, cfg.intermediate_size)
        if cfg.mlp_bias:
            out["mixer.up_proj.bias"] = (cfg.intermediate_size,)
            out["mixer.down_proj.bias"] = (H,)
    return out


def tower_shapes(cfg: NemotronHConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of one tower (embeddings, layers, norm_f) under `prefix` (e.g. "backbone.")."""
    out = {f"{prefix}embeddings.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_hidden_layers):
        out.update({f"{prefix}layers.{i}.{k}": v for k, v in layer_shapes(cfg, i).items()})
    out[f"{prefix}norm_f.weight"] = (cfg.hidden_size,)
    return out


def nemotron_h_shapes(cfg: NemotronHConfig) -> dict[str, tuple[int, ...]]:
    """The single-tower checkpoint (spec §1)."""
    out = tower_shapes(cfg, "backbone.")
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return out


def time_conditioning_shapes(cfg: NemotronHConfig) -> dict[str, tuple[int, ...]]:
    H = cfg.hidden_size
    out = {
        "t_embedder.mlp.0.weight": (H, TIME_EMBED_DIM),
        "t_embedder.mlp.0.bias": (H,),
        "t_embedder.mlp.2.weight": (H, H),
        "t_embedder.mlp.2.bias": (H,),
        "t_block.1.weight": (3 * H, H),
        "t_block.1.bias": (3 * H,),
    }
    for i in range(cfg.num_hidden_layers):
        out[f"scale_shift_tables.{i}"] = (3, H)
    return out


def twotower_shapes(cfg: NemotronHConfig) -> dict[str, tuple[int, ...]]:
    """The TwoTower checkpoint (spec §3)."""
    out = tower_shapes(cfg, "context_tower.")
    out["context_lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    out.update(tower_shapes(cfg, "denoiser_tower."))
    out["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    out.update(time_conditioning_shapes(cfg))
    return out


def source_key_for_twotower(name: str) -> str | None:
    """The single-tower key a TwoTower tower/head tensor is copied from; None for time conditioning."""
    for prefix in ("context_tower.", "denoiser_tower."):
        if name.startswith(prefix):
            return "backbone." + name[len(prefix):]
    if name in ("context_lm_head.weight", "lm_head.weight"):
        return "lm_head.weight"
    return None
