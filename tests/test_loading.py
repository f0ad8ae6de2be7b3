"""Strict lazy loading: every tensor equals the file afterwards, problems are named, drops are reported."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_config, write_tiny_checkpoint
from twotower_cli import layout
from twotower_cli.checkpoint import open_checkpoint, write_checkpoint
from twotower_cli.errors import TwoTowerError
from twotower_cli.model import NemotronHForCausalLM, NemotronHModel
from twotower_cli.model.loading import _LIST_LIMIT, load_nemotron_h, load_state
from twotower_cli.towers import load_model


def file_tensors(path):
    ckpt = open_checkpoint(path)
    return dict(ckpt.iter_tensors(list(ckpt.tensors)))


@pytest.mark.parametrize("sharded", [False, True])
def test_load_equals_file_and_nothing_is_reinitialised(tmp_path, sharded):
    cfg = build_tiny_config()
    path = write_tiny_checkpoint(tmp_path, cfg, sharded=sharded)
    if sharded:
        assert len(open_checkpoint(path).files) > 1
    model = load_nemotron_h(path)
    state, ref = model.state_dict(), file_tensors(path)
    assert set(state) == set(ref) == set(layout.nemotron_h_shapes(cfg))
    for name, t in ref.items():
        assert torch.equal(state[name], t), f"{name} differs from the file after loading"
    assert not any(t.is_meta for t in state.values()) and not model.training


def test_dtype_cast_keeps_fp32_parameters(tmp_path):
    path = write_tiny_checkpoint(tmp_path, build_tiny_config())
    model = load_nemotron_h(path, dtype=torch.bfloat16)
    for name, t in model.state_dict().items():
        assert t.dtype == (torch.float32 if layout.keep_fp32(name) else torch.bfloat16), name
    assert model.backbone.layers[2].mixer.gate.e_score_correction_bias.dtype == torch.float32


def rewrite(tmp_path, path, edit, name="edited"):
    """Copy of a checkpoint with its tensor dict edited."""
    tensors = file_tensors(path)
    edit(tensors)
    return write_checkpoint(tmp_path / name, tensors, open_checkpoint(path).config_raw)


def test_missing_and_wrong_shape_are_named(tmp_path):
    path = write_tiny_checkpoint(tmp_path, build_tiny_config())

    def edit(t):
        del t["backbone.layers.0.mixer.dt_bias"]
        del t["backbone.layers.2.mixer.experts.3.up_proj.weight"]
        t["backbone.layers.1.mixer.k_proj.weight"] = torch.zeros(3, 64)

    with pytest.raises(TwoTowerError) as err:
        load_nemotron_h(rewrite(tmp_path, path, edit))
    msg = str(err.value)
    for name in ("backbone.layers.0.mixer.dt_bias", "backbone.layers.2.mixer.experts.3.up_proj.weight",
                 "backbone.layers.1.mixer.k_proj.weight is [3, 64], expected [32, 64]"):
        assert name in msg, msg


def test_a_missing_shard_is_named_not_its_tensors(tmp_path):
    """A shard the index lists but the folder lacks: one error naming the file (as `inspect` does), with a hint
    to fetch or write it again; it was "N tensor(s) missing: ... is the config.json the one these weights were
    saved with?"."""
    path = write_tiny_checkpoint(tmp_path, build_tiny_config(), sharded=True)
    files = open_checkpoint(path).files
    (path / files[1]).unlink()
    with pytest.raises(TwoTowerError) as err:
        load_nemotron_h(path)
    assert err.value.message == f"checkpoint at {path} is incomplete: shard {files[1]} named in the index is missing"
    assert err.value.hint == "re-download the checkpoint, or re-run the `twotower split` that wrote it"
    (path / files[-1]).unlink()
    with pytest.raises(TwoTowerError, match=f"2 shards named in the index are missing: {files[1]}, {files[-1]} "):
        load_model(path, need_denoiser=False)


class _FailingSafeOpen:
    """safe_open whose reads raise `error` (what a GPU out of memory, or a host one, raises mid-load)."""

    def __init__(self, error):
        self.error = error

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def get_tensor(self, name):
        raise self.error


@pytest.mark.parametrize(("error", "device", "where"), [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "cuda:0", "memory on cuda:0"),
    (MemoryError(), "cpu", "host memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"), "cpu", "host memory"),
])
def test_out_of_memory_while_reading_is_not_called_a_corrupt_file(tmp_path, monkeypatch, error, device, where):
    """A read that fails for want of memory said "the file may be truncated or corrupt" (sending people to
    re-download a good file): it says out of memory, with what may make room. A file that is really cut short
    still says truncated or corrupt."""
    import safetensors

    path = write_tiny_checkpoint(tmp_path, build_tiny_config())
    ckpt = open_checkpoint(path)
    name = sorted(ckpt.tensors)[0]
    monkeypatch.setattr(safetensors, "safe_open", _FailingSafeOpen(error))
    for read in (lambda: dict(ckpt.iter_tensors([name], device=device)), lambda: ckpt.read(name, device=device)):
        with pytest.raises(TwoTowerError) as err:
            read()
        assert err.value.message.startswith(f"out of {where} reading "), err.value.message
        assert "corrupt" not in str(err.value) and "--dtype" in err.value.hint and "--device" in err.value.hint
    monkeypatch.undo()
    data = path / "model.safetensors"
    with open(data, "r+b") as f:  # opened above, then cut short: safetensors refuses it
        f.truncate(data.stat().st_size - 8)
    with pytest.raises(TwoTowerError, match="may be truncated or corrupt"):
        dict(ckpt.iter_tensors([name]))


def test_unexpected_is_an_error_mtp_is_dropped_and_reported(tmp_path):
    cfg = build_tiny_config()
    path = write_tiny_checkpoint(tmp_path, cfg)
    extra = rewrite(tmp_path, path, lambda t: t.update({"backbone.layers.0.mixer.surprise": torch.ones(2)}), "extra")
    with pytest.raises(TwoTowerError, match="unexpected tensor.*backbone.layers.0.mixer.surprise"):
        load_nemotron_h(extra)
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    report = load_state(model, open_checkpoint(extra), allow_unused=True)
    assert report.unused == ["backbone.layers.0.mixer.surprise"]

    mtp = rewrite(tmp_path, path, lambda t: t.update({"mtp.layers.0.norm.weight": torch.ones(64)}), "mtp")
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    report = load_state(model, open_checkpoint(mtp))
    assert report.dropped == ["mtp.layers.0.norm.weight"] and report.loaded == len(layout.nemotron_h_shapes(cfg))


def test_legacy_embedding_name(tmp_path):
    path = write_tiny_checkpoint(tmp_path, build_tiny_config())

    def edit(t):
        t["backbone.embedding.weight"] = t.pop("backbone.embeddings.weight")

    model = load_nemotron_h(rewrite(tmp_path, path, edit))
    assert torch.equal(model.backbone.embeddings.weight, file_tensors(path)["backbone.embeddings.weight"])


def test_key_map_loads_one_tower_of_a_twotower_file(tmp_path):
    """A tower module under a TwoTower prefix: `context_tower.X` in the file for `X` in the module."""
    cfg = build_tiny_config()
    src = file_tensors(write_tiny_checkpoint(tmp_path, cfg))
    two = {}
    for name, t in src.items():
        if name.startswith("backbone."):
            two["context_tower." + name[len("backbone."):]] = t
            two["denoiser_tower." + name[len("backbone."):]] = t + 1
    path = write_checkpoint(tmp_path / "two", two, cfg.to_dict())
    with torch.device("meta"):
        tower = NemotronHModel(cfg)
    with pytest.raises(TwoTowerError, match="unexpected"):
        load_state(tower, open_checkpoint(path), key_map=lambda k: "denoiser_tower." + k)
    report = load_state(tower, open_checkpoint(path), key_map=lambda k: "denoiser_tower." + k, allow_unused=True)
    assert len(report.unused) == report.loaded == len(two) // 2
    for k, t in tower.state_dict().items():
        assert torch.equal(t, two["denoiser_tower." + k]), k


def test_no_config_is_an_error(tmp_path):
    path = write_tiny_checkpoint(tmp_path, build_tiny_config())
    (path / "config.json").unlink()
    with pytest.raises(TwoTowerError, match="no config.json"):
        load_nemotron_h(path)


def test_a_config_of_other_layers_is_one_short_error_that_counts_them(tmp_path):
    """A config.json of more layers than the weights hold listed every missing tensor in its one error line
    (19.5 kB for the tiny model's 8 layers described as 32; thousands of names for Nano's 52). Now at most
    _LIST_LIMIT names a kind, and the hint counts the layers on each side."""
    cfg = build_tiny_config()
    path = write_tiny_checkpoint(tmp_path, cfg)
    raw = json.loads((path / "config.json").read_text())
    pattern = raw["hybrid_override_pattern"]
    raw["hybrid_override_pattern"] *= 4
    raw["num_hidden_layers"] = len(raw["hybrid_override_pattern"])
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(TwoTowerError) as e:
        load_nemotron_h(path)
    layers = len(pattern)
    assert e.value.message.count("backbone.layers.") == _LIST_LIMIT and "... and " in e.value.message
    assert "tensors missing" in e.value.message and "tensor(s)" not in e.value.message
    assert e.value.hint == f"config.json describes {4 * layers} layers where the weights hold {layers}: use the config.json they were saved with"
    assert len(e.value.message) < 2000
    raw["hybrid_override_pattern"] = pattern  # the same layers, another width: no count
    raw["num_hidden_layers"] = layers
    raw["intermediate_size"] = raw["intermediate_size"] * 2
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(TwoTowerError, match="with the wrong shape") as e:
        load_nemotron_h(path)
    assert e.value.hint == "is the config.json the one these weights were saved with?"


@pytest.mark.parametrize("fused", [False, True])
def test_experts_are_read_into_their_stack_without_a_second_copy(tmp_path, monkeypatch, fused):
    """Per-expert tensors (NVIDIA's layout) or fused stacks (transformers' in-memory layout) land in the
    rows of one tensor per layer that `Experts` takes whole: `torch.stack` never runs."""
    cfg = build_tiny_config()
    path = write_tiny_checkpoint(tmp_path, cfg)
    if fused:
        def fuse(t):
            for stem in {k.rsplit(".", 3)[0] for k in t if ".mixer.experts." in k}:
                for proj in ("up_proj", "down_proj"):
                    t[f"{stem}.{proj}"] = torch.stack([t.pop(f"{stem}.{j}.{proj}.weight")
                                                       for j in range(cfg.n_routed_experts)])
        path = rewrite(tmp_path, path, fuse, "fused")
        assert any(k.endswith("mixer.experts.up_proj") for k in open_checkpoint(path).tensors)
    stacks = []
    real_stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **k: stacks.append(a) or real_stack(*a, **k))
    model = load_nemotron_h(path, dtype=torch.bfloat16)
    assert stacks == []
    ref = file_tensors(write_tiny_checkpoint(tmp_path / "again", cfg))
    moe = model.backbone.layers[cfg.layer_indices("E")[0]].mixer
    assert moe.experts.up_proj.dtype == torch.bfloat16 and moe.experts.up_proj.is_contiguous()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name].to(t.dtype)), name
