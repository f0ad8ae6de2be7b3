"""Random checkpoints for the header/byte tests of inspect and split (no model code involved).

`random_checkpoint` fills the spec §1 layout (layout.nemotron_h_shapes) with seeded random values and
writes it with our checkpoint module; `hf_written` has transformers build and `save_pretrained` a tiny
NemotronH (cached per process: importing transformers is the slow part); `sparse_nano` loads the shared
builder of the 30B-shaped sparse checkpoint from benchmarks/. Random values are fine: these tests are
about names, shapes and bytes.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from twotower_cli.checkpoint import write_checkpoint
from twotower_cli.config import NemotronHConfig
from twotower_cli.layout import nemotron_h_shapes

ROOT = Path(__file__).resolve().parents[1]

SMALL: dict[str, Any] = dict(
    hidden_size=16, vocab_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    mamba_num_heads=4, mamba_head_dim=4, ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=8,
    intermediate_size=24, moe_intermediate_size=12, moe_shared_expert_intermediate_size=20,
    n_routed_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
    time_step_limit=[0.0, {"__float__": "Infinity"}],
)
PATTERN = "M*E-ME"


def small_config(pattern: str = PATTERN, **overrides: Any) -> NemotronHConfig:
    return NemotronHConfig.build(pattern, **{**SMALL, **overrides})


def random_tensors(cfg: NemotronHConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                   fp32_router: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of the single-tower layout, random; `fp32_router` stores the spec's fp32 names in fp32."""
    from twotower_cli.layout import keep_fp32

    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g).to(torch.float32 if fp32_router and keep_fp32(name) else dtype)
            for name, shape in nemotron_h_shapes(cfg).items()}


def write_word_tokenizer(folder: Path, size: int) -> None:
    """A real tokenizer.json (the tokenizers library's word-level model) of `size` ids: <unk>, <s>, </s>, w3…"""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def random_checkpoint(folder: Path, cfg: NemotronHConfig | None = None, dtype: torch.dtype = torch.bfloat16,
                      max_shard_size: int | str = "5GB", extra: dict[str, torch.Tensor] | None = None,
                      tokenizer: bool = True, **kw: Any) -> Path:
    """config.json + (sharded) safetensors + a few tokenizer/generation files, written by our code."""
    cfg = cfg or small_config()
    tensors = random_tensors(cfg, dtype, **kw) | (extra or {})
    write_checkpoint(folder, tensors, cfg.to_dict(), max_shard_size=max_shard_size)
    if tokenizer:
        write_word_tokenizer(folder, min(cfg.vocab_size, 32))
        (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>"}\n')
        (folder / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}\n')
    return folder


_HF_CACHE = Path(tempfile.mkdtemp(prefix="twotower-hf-"))  # transformers-written checkpoints, built once a run
atexit.register(shutil.rmtree, _HF_CACHE, ignore_errors=True)  # (each run left one in /tmp)


@functools.cache
def _hf_build(sharded: bool, original_format: bool) -> Path:
    import transformers

    cfg = transformers.NemotronHConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=len(PATTERN), hybrid_override_pattern=PATTERN,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, mamba_num_heads=4, mamba_head_dim=4,
        ssm_state_size=8, n_groups=2, intermediate_size=24, moe_intermediate_size=12,
        moe_shared_expert_intermediate_size=20, n_routed_experts=4, num_experts_per_tok=2, chunk_size=8)
    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(cfg)
    out = _HF_CACHE / f"hf-{'sharded' if sharded else 'single'}-{'orig' if original_format else 'fused'}"
    model.save_pretrained(out, max_shard_size="20KB" if sharded else "5GB", save_original_format=original_format)
    return out


def hf_written(dest: Path, sharded: bool = False, original_format: bool = True) -> Path:
    """A tiny NemotronH written by transformers' save_pretrained, copied to `dest` (tests may corrupt it)."""
    shutil.copytree(_hf_build(sharded, original_format), dest)
    return dest


@functools.cache
def _sparse_module() -> Any:
    spec = importlib.util.spec_from_file_location("sparse_nano", ROOT / "benchmarks" / "sparse_nano.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sparse_nano(folder: Path) -> Path:
    return _sparse_module().build_sparse_nano(folder)


def nano_parameters() -> int:
    return _sparse_module().NANO_PARAMETERS
