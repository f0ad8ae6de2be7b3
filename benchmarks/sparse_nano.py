"""Build a Nemotron-3-Nano-30B-A3B-shaped checkpoint that costs no disk (shared by benchmarks and tests).

The real Nano config (spec §1 table), 52 layers, 6,243 tensors, 31,577,940,288 parameters in bf16:
about 63 GB in 13 shards of at most 5 GB. Each shard gets a real safetensors header and is then
extended with `truncate`, so its data is a hole that reads as zeros and occupies no blocks. Header-only
tools (inspect, split --dry-run) see exactly what they would see on the real download.

    python benchmarks/sparse_nano.py /tmp/nano-sparse     # build (idempotent) and print its size
"""

from __future__ import annotations

import json
from pathlib import Path

from twotower_cli.checkpoint import assign_shards, encode_header, shard_names, write_index
from twotower_cli.config import NemotronHConfig
from twotower_cli.layout import nemotron_h_shapes

NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
NANO_PARAMETERS = 31_577_940_288
NANO_TENSORS = 6_243


def nano_config_dict() -> dict:
    """config.json of NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16 (the keys that shape tensors, plus ids)."""
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "hybrid_override_pattern": NANO_PATTERN,
        "num_hidden_layers": 52,
        "hidden_size": 2688,
        "vocab_size": 131072,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "mamba_num_heads": 64,
        "mamba_head_dim": 64,
        "ssm_state_size": 128,
        "n_groups": 8,
        "conv_kernel": 4,
        "chunk_size": 128,
        "use_conv_bias": True,
        "mamba_proj_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "mlp_hidden_act": "relu2",
        "intermediate_size": 1856,
        "moe_intermediate_size": 1856,
        "moe_shared_expert_intermediate_size": 3712,
        "n_routed_experts": 128,
        "num_experts_per_tok": 6,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "rope_theta": 10000,
        "torch_dtype": "bfloat16",
    }


def build_sparse_nano(folder: str | Path, max_shard_bytes: int = 5 * 10**9) -> Path:
    """Write the sparse checkpoint into `folder` (created; reused if already complete)."""
    folder = Path(folder)
    cfg = NemotronHConfig.from_dict(nano_config_dict())
    shapes = nemotron_h_shapes(cfg)
    sizes = [(name, 2 * _numel(shape)) for name, shape in shapes.items()]
    groups = assign_shards(sizes, max_shard_bytes)
    files = shard_names(len(groups))
    if (folder / "model.safetensors.index.json").is_file() and all((folder / f).is_file() for f in files):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    nbytes = dict(sizes)
    weight_map = {}
    for file, group in zip(files, groups, strict=True):
        header = encode_header([(n, "BF16", shapes[n], nbytes[n]) for n in group], {"format": "pt"})
        with open(folder / file, "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(nbytes[n] for n in group))  # a hole: no disk blocks
        weight_map.update({n: file for n in group})
    write_index(folder, weight_map, sum(nbytes.values()))
    (folder / "config.json").write_text(json.dumps(nano_config_dict(), indent=2) + "\n")
    return folder


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="/tmp/twotower-nano-sparse",
                        help="where to build it (default: /tmp/twotower-nano-sparse)")
    out = build_sparse_nano(parser.parse_args().folder)
    n_files = len(list(out.glob("*.safetensors")))
    apparent = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"{out}: {n_files} shards, {apparent / 1e9:.2f} GB apparent, "
          f"{sum(p.stat().st_blocks * 512 for p in out.glob('*')) / 1e6:.2f} MB on disk")
