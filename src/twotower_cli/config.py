"""NemotronH configuration read from a checkpoint's `config.json` (spec §1).

One frozen dataclass keeps the Hugging Face key names. The layer pattern is normalised to the
`hybrid_override_pattern` form ("M" Mamba-2, "*" attention, "E" MoE, "-" MLP) whichever form the file
uses; sizes that follow from others are properties (d_inner comes from the Mamba heads, never from
`expand`). The parsed source dictionary is kept whole so that `to_dict()` writes unknown keys back
unchanged, including the `{"__float__": "Infinity"}` spelling recent transformers use.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from twotower_cli.errors import TwoTowerError

LAYER_KINDS = {"M": "Mamba-2", "*": "attention", "E": "MoE", "-": "MLP"}

# `layers_block_type` spellings across transformers versions → pattern characters.
_BLOCK_TYPE_TO_CHAR = {
    "mamba": "M",
    "linear_attention": "M",
    "attention": "*",
    "full_attention": "*",
    "moe": "E",
    "mlp": "-",
}
_CHAR_TO_BLOCK_TYPE = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}

# Keys each layer kind cannot do without (no silent defaults for sizes that shape tensors).
_REQUIRED_BY_KIND = {
    "M": ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups"),
    "*": ("num_attention_heads", "num_key_value_heads"),
    "E": ("n_routed_experts", "moe_intermediate_size", "num_experts_per_tok"),
    "-": ("intermediate_size",),
}

TWOTOWER_ARCHITECTURE = "NemotronHTwoTowerForCausalLM"
DEFAULT_MASK_TOKEN_ID = 3
DEFAULT_BLOCK_SIZE = 16


def parse_float(value: Any, key: str) -> float:
    """A float from JSON, accepting the `{"__float__": "Infinity"}` form and Python's Infinity/NaN literals."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TwoTowerError(f"config key {key!r} holds {value!r}, not a number",
                            "fix config.json; infinity may be written Infinity or {\"__float__\": \"Infinity\"}") from None


def normalise_pattern(raw: dict[str, Any]) -> str:
    """The layer pattern as a string of M/*/E/-, from `hybrid_override_pattern` or `layers_block_type`.
    A config with both must say the same in both: transformers reads `layers_block_type` first, older
    readers (vLLM, NVIDIA's remote code) `hybrid_override_pattern`, so a disagreement is two models."""
    pattern_key = raw.get("hybrid_override_pattern")
    block_types = raw.get("layers_block_type")
    if pattern_key is not None and block_types is not None:
        pattern, listed = normalise_pattern({"hybrid_override_pattern": pattern_key}), \
            normalise_pattern({"layers_block_type": block_types})
        if pattern != listed:
            raise TwoTowerError(f"config.json's hybrid_override_pattern {pattern!r} and layers_block_type "
                                f"(read as {listed!r}) describe different layers",
                                "keep one of the two keys, the one that matches the weights")
        return pattern
    if pattern_key is not None:
        pattern = str(pattern_key)
    elif block_types is not None:
        if not isinstance(block_types, list):
            raise TwoTowerError(f"layers_block_type is {block_types!r}, not a list",
                                "it lists one layer kind per layer, e.g. [\"mamba\", \"moe\", \"attention\"]")
        chars = []
        for i, name in enumerate(block_types):
            if not isinstance(name, str) or name not in _BLOCK_TYPE_TO_CHAR:
                raise TwoTowerError(
                    f"layers_block_type[{i}] is {name!r}, not a NemotronH layer kind",
                    f"expected one of {sorted(_BLOCK_TYPE_TO_CHAR)}",
                )
            chars.append(_BLOCK_TYPE_TO_CHAR[name])
        pattern = "".join(chars)
    else:
        raise TwoTowerError("config.json has no layer pattern",
                            "a NemotronH config needs hybrid_override_pattern or layers_block_type")
    for i, ch in enumerate(pattern):
        if ch not in LAYER_KINDS:
            raise TwoTowerError(
                f"layer {i} has unknown kind {ch!r} in the pattern {pattern!r}",
                "pattern characters are M (Mamba-2), * (attention), E (MoE) and - (MLP)",
            )
    return pattern


@dataclass(frozen=True)
class NemotronHConfig:
    """Hyper-parameters of one NemotronH tower; HF key names, defaults as in NVIDIA's Nano config."""

    hidden_size: int
    vocab_size: int
    pattern: str
    num_hidden_layers: int
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    attention_bias: bool = False
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    intermediate_size: int = 0
    mlp_bias: bool = False
    mlp_hidden_act: str = "relu2"
    moe_intermediate_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    # tokens of a sequence (prompt and completion) the model is meant for; attention has no positions, so
    # nothing breaks beyond it. Absent: 4096, as transformers' and vLLM's NemotronHConfig read such a config
    max_position_embeddings: int = 4096
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ---------------------------------------------------------------- reading and writing
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NemotronHConfig:
        """Parse and validate a config dictionary; the dictionary itself is kept for round trips."""
        if not isinstance(raw, dict):
            raise TwoTowerError("config.json is not a JSON object", "a Hugging Face config is a JSON object")
        pattern = normalise_pattern(raw)
        for key in ("hidden_size", "vocab_size"):
            if raw.get(key) is None:
                raise TwoTowerError(f"config.json is missing {key!r}" + (" (it is null)" if key in raw else ""),
                                    "is this a NemotronH checkpoint?")
        for kind in sorted(set(pattern)):
            for key in _REQUIRED_BY_KIND[kind]:
                if raw.get(key) is None:
                    raise TwoTowerError(
                        f"config.json is missing {key!r}, needed by its {LAYER_KINDS[kind]} layers",
                        "is this a NemotronH checkpoint?",
                    )
        n_layers = raw.get("num_hidden_layers")
        n_layers = len(pattern) if n_layers is None else n_layers  # null, as absent: transformers counts the pattern
        if n_layers != len(pattern):
            raise TwoTowerError(
                f"num_hidden_layers is {n_layers} but the layer pattern has {len(pattern)} layers",
                "make num_hidden_layers equal the pattern length",
            )
        known = {f.name for f in fields(cls)} - {"pattern", "raw", "num_hidden_layers", "time_step_limit"}
        kwargs: dict[str, Any] = {k: raw[k] for k in known if k in raw and raw[k] is not None}
        limit = raw.get("time_step_limit")
        if limit is not None:
            if not isinstance(limit, (list, tuple)) or len(limit) != 2:
                raise TwoTowerError(f"time_step_limit is {limit!r}", "it must be a pair [min, max]")
            kwargs["time_step_limit"] = (parse_float(limit[0], "time_step_limit"),
                                         parse_float(limit[1], "time_step_limit"))
        if "routed_scaling_factor" in kwargs:
            kwargs["routed_scaling_factor"] = parse_float(kwargs["routed_scaling_factor"], "routed_scaling_factor")
        if "layer_norm_epsilon" in kwargs:
            kwargs["layer_norm_epsilon"] = parse_float(kwargs["layer_norm_epsilon"], "layer_norm_epsilon")
        cfg = cls(pattern=pattern, num_hidden_layers=len(pattern), raw=copy.deepcopy(raw), **kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> NemotronHConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise TwoTowerError(f"no config.json at {path.parent}", "point at a checkpoint folder that has config.json")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TwoTowerError(f"{path} is not valid JSON: {e}", "the file may be truncated or corrupt") from None
        return cls.from_dict(raw)

    @classmethod
    def build(cls, pattern: str, **kwargs: Any) -> NemotronHConfig:
        """A config from keyword arguments (tests, the tiny model): written as a NemotronH config.json would be."""
        raw: dict[str, Any] = {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            "hybrid_override_pattern": pattern,
            "num_hidden_layers": len(pattern),
        }
        raw.update(kwargs)
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The source dictionary, unknown keys included, as it should be written back."""
        return copy.deepcopy(self.raw)

    def with_updates(self, **updates: Any) -> NemotronHConfig:
        """A new config whose dictionary has these keys replaced (None deletes a key)."""
        raw = self.to_dict()
        for k, v in updates.items():
            if v is None:
                raw.pop(k, None)
            else:
                raw[k] = v
        return NemotronHConfig.from_dict(raw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.raw, indent=2) + "\n")

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        kinds = set(self.pattern)
        positive = ["hidden_size", "vocab_size", "max_position_embeddings"]
        if "M" in kinds:
            positive += ["mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size"]
        if "*" in kinds:
            positive += ["num_attention_heads", "num_key_value_heads", "attention_head_dim"]
        if "E" in kinds:
            positive += ["n_routed_experts", "moe_intermediate_size", "num_experts_per_tok"]
        if "-" in kinds:
            positive += ["intermediate_size"]
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TwoTowerError(f"config key {key!r} is {value!r}", "it must be a positive integer")
        if "M" in kinds and self.mamba_num_heads % self.n_groups:
            raise TwoTowerError(
                f"mamba_num_heads ({self.mamba_num_heads}) is not divisible by n_groups ({self.n_groups})",
                "each Mamba group must own a whole number of heads",
            )
        if "*" in kinds and self.num_attention_heads % self.num_key_value_heads:
            raise TwoTowerError(
                f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})",
                "grouped-query attention needs whole groups",
            )
        if "E" in kinds:
            if self.num_experts_per_tok > self.n_routed_experts:
                raise TwoTowerError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})",
                    "a token cannot use more experts than exist",
                )
            if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:
                raise TwoTowerError(
                    f"router groups do not fit: n_routed_experts={self.n_routed_experts}, n_group={self.n_group}, "
                    f"topk_group={self.topk_group}",
                    "n_group must divide n_routed_experts and topk_group must be at most n_group",
                )
        block = self.raw.get("twotower")
        if block is not None and not isinstance(block, dict):
            raise TwoTowerError(f"config key 'twotower' is {block!r}", "it is an object like {\"mask_token_id\": 3, "
                                "\"block_size\": 16}, or absent")
        for key, low, high in (("mask_token_id", 0, self.vocab_size - 1), ("block_size", 1, None)):
            value = (block or {}).get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low
                                      or (high is not None and value > high)):
                raise TwoTowerError(f"config key twotower.{key} is {value!r}",
                                    f"it must be an integer from {low}" + (f" to {high} (the vocabulary)" if high else "")
                                    + (f"; NVIDIA's is {DEFAULT_MASK_TOKEN_ID}" if key == "mask_token_id" else
                                       f"; NVIDIA's is {DEFAULT_BLOCK_SIZE}"))
        if self.mlp_hidden_act != "relu2":
            raise TwoTowerError(f"mlp_hidden_act {self.mlp_hidden_act!r} is not supported", "NemotronH uses relu2")
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(self, key)
            ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
            if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i for i in ids):
                raise TwoTowerError(f"config key {key!r} is {value!r}",
                                    "it must be a token id (a non-negative integer)"
                                    + (", a list of them" if key == "eos_token_id" else "") + " or null")

    # ---------------------------------------------------------------- derived sizes
    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim else self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.attention_head_dim

    @property
    def d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def in_proj_dim(self) -> int:
        return self.d_inner + self.conv_dim + self.mamba_num_heads

    @property
    def shared_expert_size(self) -> int:
        return self.moe_shared_expert_intermediate_size or self.moe_intermediate_size

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return list(e) if isinstance(e, (list, tuple)) else [int(e)]

    # ---------------------------------------------------------------- two-tower fields
    @property
    def is_twotower(self) -> bool:
        return TWOTOWER_ARCHITECTURE in (self.raw.get("architectures") or [])

    @property
    def twotower(self) -> dict[str, Any]:
        block = self.raw.get("twotower")
        return block if isinstance(block, dict) else {}

    @property
    def mask_token_id(self) -> int:
        return int(self.twotower.get("mask_token_id", DEFAULT_MASK_TOKEN_ID))

    @property
    def block_size(self) -> int:
        return int(self.twotower.get("block_size", DEFAULT_BLOCK_SIZE))

    def layer_indices(self, kind: str) -> list[int]:
        return [i for i, ch in enumerate(self.pattern) if ch == kind]


def pattern_to_block_types(pattern: str) -> list[str]:
    """The `layers_block_type` list form of a pattern (for writing configs newer transformers read)."""
    return [_CHAR_TO_BLOCK_TYPE[ch] for ch in pattern]
