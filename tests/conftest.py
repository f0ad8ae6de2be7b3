"""Tiny random NemotronH models and checkpoints shared by the test suite.

Fixtures (each returns a factory so a test can build several):
    tiny_config(pattern="M*EM-E", **overrides) -> NemotronHConfig   hidden 64, vocab 100, 4 q / 2 kv heads of 16,
        Mamba 4 heads × 16 with 2 groups and state 8, chunk 8, 8 routed experts top-2 (n_group 1);
        pass **GROUPED_ROUTER for the n_group=2 / topk_group=1 variant.
    tiny_model(cfg, seed=0, std=0.02) -> NemotronHForCausalLM      random (init_nemotron_h), eval mode
    make_checkpoint(tmp_path, cfg, seed=0, sharded=False, std=0.02) -> Path   config.json + safetensors written
        by our checkpoint module (sharded with a small max_shard_size)
    hf_checkpoint(tmp_path, cfg, sharded=False, seed=0, original_format=True, std=0.1) -> Path   such weights
        read by transformers' NemotronHForCausalLM and written by its save_pretrained (needs the dev extra);
        std 0.1 gives logits of order 1, so a 1e-4 parity bound means something

    fake_hub -> FakeHub   a local stand-in for the Hugging Face hub (tests/fake_hub.py), serving folders
    online -> FakeHub     that, with an empty HF_HOME, downloads allowed and HF_ENDPOINT at it
    downloads -> list     snapshot_download recorded: nothing cached, a download answered with the served folder

The plain functions (build_tiny_config, ...) are importable too: `from conftest import build_tiny_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import triton_interpret
from fake_hub import FakeHub
from twotower_cli.checkpoint import write_checkpoint
from twotower_cli.config import NemotronHConfig
from twotower_cli.model import NemotronHForCausalLM, init_nemotron_h

# Test tensors are tiny: intra-op threads only add synchronisation, which on a shared 2-core machine made
# the cached-decode tests 20x slower (66 s vs 15 s for the core suite under load). Tests only, never library code.
torch.set_num_threads(1)

TINY: dict[str, Any] = dict(
    hidden_size=64, vocab_size=100,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    intermediate_size=40, layer_norm_epsilon=1e-5, tie_word_embeddings=False,
)
GROUPED_ROUTER: dict[str, Any] = dict(n_group=2, topk_group=1)


def build_tiny_config(pattern: str = "M*EM-E", **overrides: Any) -> NemotronHConfig:
    return NemotronHConfig.build(pattern, **{**TINY, **overrides})


def build_tiny_model(cfg: NemotronHConfig, seed: int = 0, std: float = 0.02) -> NemotronHForCausalLM:
    model = NemotronHForCausalLM(cfg)
    init_nemotron_h(model, torch.Generator().manual_seed(seed), std=std)
    return model.eval()


def write_tiny_checkpoint(tmp_path: Path, cfg: NemotronHConfig, seed: int = 0, sharded: bool = False,
                          name: str | None = None, std: float = 0.02) -> Path:
    model = build_tiny_model(cfg, seed, std)
    out = Path(tmp_path) / (name or f"tiny-{seed}-{'sharded' if sharded else 'single'}")
    # ~40 KB of fp32 tensors; 16 KB shards give a handful of files.
    return write_checkpoint(out, dict(model.state_dict()), cfg.to_dict(), max_shard_size=16_000 if sharded else "5GB")


def write_hf_checkpoint(tmp_path: Path, cfg: NemotronHConfig, sharded: bool = False, seed: int = 0,
                        original_format: bool = True, std: float = 0.1) -> Path:
    """Our random weights → transformers' from_pretrained → its save_pretrained. Returns the saved folder."""
    transformers = pytest.importorskip("transformers")
    src = write_tiny_checkpoint(tmp_path, cfg, seed, name=f"hf-src-{seed}-{sharded}-{original_format}", std=std)
    hf = transformers.NemotronHForCausalLM.from_pretrained(src, dtype=torch.float32)
    out = Path(tmp_path) / f"hf-{seed}-{'sharded' if sharded else 'single'}-{'orig' if original_format else 'fused'}"
    hf.save_pretrained(out, max_shard_size="16KB" if sharded else "5GB", save_original_format=original_format)
    return out


@pytest.fixture
def tiny_config():
    return build_tiny_config


@pytest.fixture
def tiny_model():
    return build_tiny_model


@pytest.fixture
def make_checkpoint():
    return write_tiny_checkpoint


@pytest.fixture
def hf_checkpoint():
    return write_hf_checkpoint


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ------------------------------------------------------------------------------------------- gpu marker
if triton_interpret.active():  # TRITON_INTERPRET=1 on a CPU: the gpu tests run mamba-ssm's Triton kernels there
    triton_interpret.install()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped (not failed) without it, so `pytest` alone stays green on CPU.
    Under Triton's interpreter (tests/triton_interpret.py) they run on the CPU instead."""
    if torch.cuda.is_available() or triton_interpret.active():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------- a local hub

@pytest.fixture
def fake_hub():
    hub = FakeHub()
    yield hub
    hub.server.shutdown()


@pytest.fixture
def online(tmp_path, monkeypatch, fake_hub):
    """An empty cache, downloads allowed, the hub at the fake's address."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    return fake_hub


@pytest.fixture
def downloads(online, monkeypatch):
    """snapshot_download as the hub would answer it: nothing cached; a download is recorded and answered with
    the folder the fake hub serves."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    made = []

    def snapshot_download(repo_id, **kw):
        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        made.append(repo_id)
        return str(online.repos[repo_id])

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return made
