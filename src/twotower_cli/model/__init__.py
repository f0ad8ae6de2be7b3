"""The NemotronH tower in plain PyTorch: one file per mixer kind, explicit per-layer caches, strict loading."""

from twotower_cli.model.attention import Attention, causal_mask
from twotower_cli.model.cache import KVCache, MambaState, TowerCache
from twotower_cli.model.init import init_nemotron_h
from twotower_cli.model.mamba2 import Mamba2Mixer
from twotower_cli.model.mlp import MLP
from twotower_cli.model.moe import MoE, Router
from twotower_cli.model.nemotron_h import NemotronHBlock, NemotronHForCausalLM, NemotronHModel
from twotower_cli.model.norm import GatedGroupRMSNorm, RMSNorm

__all__ = [
    "MLP", "Attention", "GatedGroupRMSNorm", "KVCache", "Mamba2Mixer", "MambaState", "MoE", "NemotronHBlock",
    "NemotronHForCausalLM", "NemotronHModel", "RMSNorm", "Router", "TowerCache", "causal_mask", "init_nemotron_h",
]
