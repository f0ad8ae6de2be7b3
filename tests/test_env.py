"""`twotower env`: the report against what it reports on (torch, package metadata, the kernel probe, a fake
Hugging Face cache), offline, with fake GPUs where this machine has none."""

from __future__ import annotations

import json
from importlib import metadata
from types import SimpleNamespace

import pytest
import torch
from tests.test_hub import fake_cache
from typer.testing import CliRunner

from twotower_cli import hub
from twotower_cli.cli import get_app
from twotower_cli.ops import kernels

NANO = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An HF_HOME holding the Nano base only; downloads allowed by the environment, so that a lookup that
    went online would try (the report must look offline whatever HF_HUB_OFFLINE says)."""
    home = tmp_path / "hf"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    import huggingface_hub

    real = huggingface_hub.snapshot_download

    def offline_only(*a, **k):
        assert k.get("local_files_only"), "env looked a model up online"
        return real(*a, **k)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline_only)
    return home


def env(*args):
    return CliRunner().invoke(get_app(), ["env", *args])


def test_the_json_report_says_what_is_installed_and_cached(home):
    snap = fake_cache(home, NANO)
    r = env("--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert (out["torch"], out["torch_cuda"], out["cuda_available"]) == (
        torch.__version__, torch.version.cuda, torch.cuda.is_available())
    for name, version in out["libraries"].items():
        try:
            assert version == metadata.version(name)
        except metadata.PackageNotFoundError:
            assert version is None
    for family in kernels.FAMILIES:
        assert out["kernels"][family] == {"imports": kernels.available(family),
                                          "why_not": kernels.unavailable_reason(family)}
    assert out["hub"] == {"cache": str(home / "hub"), "offline": False, "endpoint": "https://huggingface.co"}
    from twotower_cli.towers import free_bytes

    assert abs(out["host_free_gib"] - free_bytes(torch.device("cpu")) / 2**30) < 1.0  # MemAvailable moves
    models = out["models"]
    assert models["tiny"] == {"where": "embedded", "path": str(hub.ASSETS / "tiny-twotower")}
    for alias in ("nemotron-3-nano", "nemotron-3-nano-base"):  # both name the base, the one cached
        assert models[alias] == {"where": "cache", "repo": NANO, "path": str(snap)}
    assert models["nemotron-labs-twotower"]["where"] is None
    assert set(models) == {*hub.EMBEDDED, *hub.ALIASES}


def test_the_human_report_is_a_line_a_subject_on_stderr(home):
    fake_cache(home, NANO)
    r = env()
    assert r.exit_code == 0 and r.stdout == ""
    lines = r.stderr.splitlines()
    labels = [ln.split(":")[0] for ln in lines]
    assert labels[:2] == ["twotower", "torch"] and {"kernels", "libraries", "hub cache", "models"} <= set(labels)
    models = next(ln for ln in lines if ln.startswith("models:"))
    assert "nemotron-3-nano (cache)" in models and "not cached: " in models and "nemotron-labs-twotower" in models
    if not torch.cuda.is_available():
        assert any(ln.startswith("GPUs: none") for ln in lines)


def test_gpus_and_a_bad_kernel_setting_are_reported_not_raised(home, monkeypatch):
    cards = [SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9, minor=0),
             SimpleNamespace(name="Tesla V100", total_memory=16 * 2**30, major=7, minor=0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: cards[i])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: ((60 if d.index == 0 else 2) * 2**30, 0))
    monkeypatch.setenv(kernels.ENV, "fast")
    r = env("--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["gpus"] == [
        {"device": "cuda:0", "name": "NVIDIA H100 80GB HBM3", "memory_gib": 80.0, "free_gib": 60.0,
         "capability": "9.0", "bf16": True},
        {"device": "cuda:1", "name": "Tesla V100", "memory_gib": 16.0, "free_gib": 2.0, "capability": "7.0",
         "bf16": False}]
    assert out["kernels"]["mode"].startswith("invalid: TWOTOWER_KERNELS='fast'")
    human = env().stderr
    assert "cuda:0: NVIDIA H100 80GB HBM3 · 80.0 GiB (60.0 free) · compute 9.0 · bf16 yes" in human
    assert "TWOTOWER_KERNELS=invalid" in human


def test_a_mirror_is_named(home, monkeypatch):
    """HF_ENDPOINT moves downloads and `inspect`'s header reads to a mirror: env says where, as set now."""
    assert "HF_ENDPOINT" not in env().stderr
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example/")
    assert json.loads(env("--json").stdout)["hub"]["endpoint"] == "https://hf-mirror.example"
    assert "hub at https://hf-mirror.example (HF_ENDPOINT)" in " ".join(env().stderr.split())
