"""config.json parsing (spec §1): both pattern forms, infinity spellings, validation, round trips."""

from __future__ import annotations

import json
import math

import pytest

from conftest import TINY
from twotower_cli.config import NemotronHConfig, pattern_to_block_types
from twotower_cli.errors import TwoTowerError


def raw(pattern="M*EM-E", **overrides):
    d = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
         "hybrid_override_pattern": pattern, "num_hidden_layers": len(pattern), **TINY}
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not None}


def test_both_pattern_forms_agree():
    a = NemotronHConfig.from_dict(raw())
    b_raw = raw(hybrid_override_pattern=None, layers_block_type=pattern_to_block_types("M*EM-E"))
    b = NemotronHConfig.from_dict(b_raw)
    assert a.pattern == b.pattern == "M*EM-E"
    newer = raw(hybrid_override_pattern=None,
                layers_block_type=["linear_attention", "full_attention", "moe", "linear_attention", "mlp", "moe"])
    assert NemotronHConfig.from_dict(newer).pattern == "M*EM-E"
    both = raw(layers_block_type=newer["layers_block_type"])  # both keys, saying the same: fine
    assert NemotronHConfig.from_dict(both).pattern == "M*EM-E"
    assert NemotronHConfig.from_dict({**raw(), "num_hidden_layers": None}).num_hidden_layers == 6  # null: counted


@pytest.mark.parametrize("limit", [[0.0, {"__float__": "Infinity"}], [0.0, float("inf")]])
def test_time_step_limit_infinity_spellings(tmp_path, limit):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw(time_step_limit=limit)))  # json writes float("inf") as Infinity
    cfg = NemotronHConfig.from_file(tmp_path)
    assert cfg.time_step_limit == (0.0, math.inf)
    assert NemotronHConfig.from_dict(raw()).time_step_limit == (0.0, math.inf)  # absent → no clamp


def test_d_inner_never_from_expand():
    cfg = NemotronHConfig.from_dict(raw(expand=2, mamba_num_heads=6, mamba_head_dim=8, n_groups=3))
    assert cfg.d_inner == 48 != 2 * cfg.hidden_size
    assert cfg.conv_dim == 48 + 2 * 3 * 8 and cfg.in_proj_dim == 48 + cfg.conv_dim + 6


def test_unknown_keys_round_trip_unchanged(tmp_path):
    d = raw(mtp_layers_block_type=["attention", "moe"], transformers_version="5.24.0",
            time_step_limit=[0.0, {"__float__": "Infinity"}], something_new={"nested": [1, 2]})
    cfg = NemotronHConfig.from_dict(d)
    assert cfg.to_dict() == d
    cfg.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text()) == d


@pytest.mark.parametrize("overrides,match", [
    ({"num_hidden_layers": 5}, "num_hidden_layers is 5 but the layer pattern has 6"),
    ({"hybrid_override_pattern": "M*XM-E", "num_hidden_layers": 6}, "unknown kind 'X'"),
    ({"hybrid_override_pattern": None, "layers_block_type": ["mamba", "conv"]}, "not a NemotronH layer kind"),
    ({"num_attention_heads": 5}, "not divisible by num_key_value_heads"),
    ({"mamba_num_heads": 5}, "not divisible by n_groups"),
    ({"hidden_size": None}, "missing 'hidden_size'"),
    ({"n_routed_experts": None}, "missing 'n_routed_experts'"),
    ({"hybrid_override_pattern": None}, "no layer pattern"),
    ({"layers_block_type": ["mamba"] * 6}, r"hybrid_override_pattern 'M\*EM-E' and layers_block_type \(read as "
                                          r"'MMMMMM'\) describe different layers"),
    ({"hybrid_override_pattern": None, "layers_block_type": "mamba"}, "layers_block_type is 'mamba', not a list"),
    ({"hybrid_override_pattern": None, "layers_block_type": [["mamba"]]}, "not a NemotronH layer kind"),
    ({"time_step_limit": [0.0, "lots"]}, "not a number"),
    ({"max_position_embeddings": 0}, "config key 'max_position_embeddings' is 0"),
    ({"max_position_embeddings": "long"}, "config key 'max_position_embeddings' is 'long'"),
    ({"twotower": {"mask_token_id": "three"}}, "config key twotower.mask_token_id is 'three'"),
    ({"twotower": {"mask_token_id": 100}}, "config key twotower.mask_token_id is 100"),  # vocab_size 100
    ({"twotower": {"block_size": 0}}, "config key twotower.block_size is 0"),
    ({"twotower": {"block_size": 16.5}}, "config key twotower.block_size is 16.5"),
    ({"twotower": [3, 16]}, "config key 'twotower' is"),
])
def test_validation_errors(overrides, match):
    with pytest.raises(TwoTowerError, match=match):
        NemotronHConfig.from_dict(raw(**overrides))


@pytest.mark.parametrize("key,value,match", [
    ("hidden_size", None, r"missing 'hidden_size' \(it is null\)"),
    ("vocab_size", None, r"missing 'vocab_size' \(it is null\)"),
    ("eos_token_id", "x", "config key 'eos_token_id' is 'x'"),
    ("eos_token_id", [2, "x"], r"config key 'eos_token_id' is \[2, 'x'\]"),
    ("pad_token_id", -1, "config key 'pad_token_id' is -1"),
    ("bos_token_id", 1.5, "config key 'bos_token_id' is 1.5"),
])
def test_null_sizes_and_bad_token_ids_are_config_errors(key, value, match):
    """Keys present with a value of the wrong kind (not left out, which `raw` does for None): a TwoTowerError
    naming the key, not a TypeError or ValueError from deep inside (which the CLI reports as a bug)."""
    d = raw()
    d[key] = value
    with pytest.raises(TwoTowerError, match=match):
        NemotronHConfig.from_dict(d)


def test_token_ids_that_are_fine():
    assert NemotronHConfig.from_dict({**raw(), "eos_token_id": 11}).eos_token_ids == [11]
    assert NemotronHConfig.from_dict({**raw(), "eos_token_id": [2, 11]}).eos_token_ids == [2, 11]


def test_max_position_embeddings_is_read_and_defaults_as_transformers_does():
    """The context length `serve` bounds requests by: the config's value, or 4096 where the key is absent or
    null (transformers' NemotronHConfig default; the embedded tiny model's config has none)."""
    assert NemotronHConfig.from_dict(raw(max_position_embeddings=262144)).max_position_embeddings == 262144
    assert NemotronHConfig.from_dict(raw()).max_position_embeddings == 4096
    assert NemotronHConfig.from_dict({**raw(), "max_position_embeddings": None}).max_position_embeddings == 4096
