"""One tower per device (issue 8): `load_model` reads every tensor straight onto its tower's device.

Without two devices here, the routing is checked two ways: `tower_device_map` sends each TwoTower key where
`TwoTower.place` would move it (checked with the meta device), and a spy on `Checkpoint.iter_tensors` shows
`load_model` asking for each checkpoint tensor on its own tower's device (two distinct CPU device objects,
`cpu` and `cpu:0`, stand in for two GPUs), with the fp32 parameters of the spec still fp32 after a bf16 load.
"""

from __future__ import annotations

import pytest
import torch
from tests.twotower_helpers import random_base, tiny_cfg, write_twotower

from twotower_cli import layout
from twotower_cli.checkpoint import Checkpoint
from twotower_cli.towers import TwoTower, load_model, tower_device_map


def test_device_map_agrees_with_place():
    cfg = tiny_cfg()
    model = TwoTower(cfg).place("cpu", "meta")
    route = tower_device_map(torch.device("cpu"), torch.device("meta"))
    for key, t in model.state_dict().items():
        assert route(key) == t.device, key
    assert route("context_tower.layers.0.mixer.A_log").type == "cpu"
    assert route("context_lm_head.weight").type == "cpu"
    for key in ("denoiser_tower.embeddings.weight", "lm_head.weight", "t_embedder.mlp.0.weight",
                "t_block.1.bias", "scale_shift_tables.3"):
        assert route(key).type == "meta", key


@pytest.fixture(scope="module")
def twotower_folder(tmp_path_factory):
    cfg = tiny_cfg()
    return write_twotower(tmp_path_factory.mktemp("place") / "tt", random_base(cfg, seed=5))


def test_load_model_reads_each_tower_onto_its_device(twotower_folder, monkeypatch):
    requested: dict[str, list[torch.device]] = {}
    original = Checkpoint.iter_tensors

    def spy(self, names, device="cpu"):
        for n in names:
            requested.setdefault(n, []).append(torch.device(device))
        return original(self, names, device="cpu")

    monkeypatch.setattr(Checkpoint, "iter_tensors", spy)
    ctx, den = torch.device("cpu"), torch.device("cpu", 0)
    loaded = load_model(twotower_folder, need_denoiser=True, dtype=torch.bfloat16, context_device=ctx,
                        denoiser_device=den)
    assert requested, "nothing was read"
    for name, devices in requested.items():
        want = ctx if name.startswith(("context_tower.", "context_lm_head.")) else den
        assert devices == [want], f"{name} read on {devices}, expected [{want}]"
    for key, t in loaded.twotower.state_dict().items():
        want = torch.float32 if layout.keep_fp32(key) else torch.bfloat16
        assert t.dtype == want, f"{key}: {t.dtype}"


def test_ar_mode_reads_only_the_context_tower(twotower_folder, monkeypatch):
    requested: list[str] = []
    original = Checkpoint.iter_tensors

    def spy(self, names, device="cpu"):
        requested.extend(names)
        return original(self, names, device=device)

    monkeypatch.setattr(Checkpoint, "iter_tensors", spy)
    loaded = load_model(twotower_folder, need_denoiser=False)
    assert loaded.twotower is None and loaded.ar is not None
    assert requested and all(n.startswith(("context_tower.", "context_lm_head.")) for n in requested)


def test_context_reaches_the_denoiser_device_once_per_block(twotower_folder, monkeypatch):
    """With the towers on two devices, `TowerBackend.denoise` copies the context cache to the denoiser's
    device when the context has changed (reset, extend), not at every denoiser step of a block; the numbers
    are those of one device. (One CPU here: the device test is forced, and the copy spied on.)"""
    from twotower_cli import towers

    loaded = load_model(twotower_folder, need_denoiser=True)
    g = torch.Generator().manual_seed(0)
    prompt, block = torch.randint(4, 40, (2, 7), generator=g), torch.randint(4, 40, (2, 4), generator=g)
    masks = torch.full((2, 4), 3)

    def run(backend):
        outs = []
        with torch.no_grad():
            for _ in range(2):
                backend.reset(2)
                backend.extend(prompt)
                outs += [backend.denoise(masks, torch.tensor([0.2, 0.7])) for _ in range(3)]
                backend.extend(block)
                outs += [backend.denoise(masks, None) for _ in range(2)]
        return outs

    ref = run(towers.TowerBackend(loaded.twotower, loaded.ar))
    copies = []

    def spy(cache, device):
        copies.append(cache.length)
        return towers.TowerCache(list(cache.layers), cache.key_mask, cache.length)  # a view: same CPU tensors

    monkeypatch.setattr(towers, "_same_device", lambda a, b: False)
    monkeypatch.setattr(towers, "cache_on", spy)
    got = run(towers.TowerBackend(loaded.twotower, loaded.ar))
    assert copies == [7, 11, 7, 11], copies  # once after each prompt and each committed block
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)


def test_cache_on_copies_every_layer_state():
    from twotower_cli.model.cache import KVCache, MambaState, TowerCache
    from twotower_cli.towers import cache_on

    cfg = tiny_cfg("M*")
    cache = TowerCache([MambaState.zeros(cfg, 2), KVCache.empty(cfg, 2)], torch.ones(2, 3, dtype=torch.bool), 3)
    moved = cache_on(cache, torch.device("meta"))
    assert moved.length == 3 and moved.key_mask.device.type == "meta"
    assert moved.layers[0].ssm.device.type == "meta" and moved.layers[0].conv.device.type == "meta"
    assert moved.layers[1].k.device.type == "meta" and moved.layers[1].v.device.type == "meta"
    assert cache.layers[0].ssm.device.type == "cpu", "the context's own cache must stay where it is"



def test_load_bytes_counts_what_is_read_onto_each_device(twotower_folder):
    """Against an independent count from the checkpoint's headers: each tower's tensors at 4 bytes in fp32, on
    its own device; in bf16 at 2 bytes but the spec's fp32 tensors at 4; as in the file without a dtype."""
    from twotower_cli.checkpoint import open_checkpoint
    from twotower_cli.config import NemotronHConfig
    from twotower_cli.towers import load_bytes

    ckpt = open_checkpoint(twotower_folder)
    with torch.device("meta"):
        model = TwoTower(NemotronHConfig.from_dict(ckpt.config_raw))
    a, b = torch.device("cpu"), torch.device("cpu", 0)
    tensors = ckpt.tensors.values()
    context = sum(t.numel for t in tensors if t.name.startswith(("context_tower.", "context_lm_head.")))
    total = sum(t.numel for t in tensors)
    assert load_bytes(model, ckpt, torch.float32, tower_device_map(a, b)) == {a: 4 * context, b: 4 * (total - context)}
    fp32 = sum(t.numel for t in tensors if layout.keep_fp32(t.name))
    assert load_bytes(model, ckpt, torch.bfloat16, lambda _key: a) == {a: 2 * (total - fp32) + 4 * fp32}
    assert load_bytes(model, ckpt, None, lambda _key: a) == {a: sum(t.nbytes for t in tensors)}


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_a_model_larger_than_the_free_memory_is_one_error_before_loading(twotower_folder, monkeypatch, mode):
    from typer.testing import CliRunner

    from twotower_cli import towers
    from twotower_cli.cli import get_app

    args = ["generate", "hi", "--model", str(twotower_folder), "--mode", mode, "--device", "cpu", "-n", "2"]
    monkeypatch.setattr(towers, "free_bytes", lambda device: 1000)
    real_load_state = towers.load_state
    read = []
    monkeypatch.setattr(towers, "load_state", lambda *a, **k: read.append(1))
    r = CliRunner().invoke(get_app(), args)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and not read, r.output
    assert "GiB on cpu and 0.0 GiB is free there" in lines[0] and "--dtype bf16 halves it" in lines[0]
    assert ("--mode ar reads the context tower only" in lines[0]) == (mode != "ar")
    monkeypatch.setattr(towers, "load_state", real_load_state)
    monkeypatch.setenv("TWOTOWER_SKIP_MEMORY_CHECK", "1")
    r = CliRunner().invoke(get_app(), args)
    assert r.exit_code == 0, r.output


def test_one_gpu_named_two_ways_is_one_device_to_the_memory_check(twotower_folder, monkeypatch):
    """`--device cuda --denoiser-device cuda:0` (or `--context-device cuda:0` beside the default `cuda`) puts
    both towers on one GPU under two names: the check adds them up (each tower fits alone, both do not),
    and load_model calls it one device (so the hint offers one tower per device). Two GPUs stay two."""
    from twotower_cli import towers
    from twotower_cli.errors import TwoTowerError

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(towers, "free_bytes", lambda device: 10 * 2**30)
    one, two = torch.device("cuda"), torch.device("cuda", 0)
    with pytest.raises(TwoTowerError, match="12.0 GiB on cuda:0 and 10.0 GiB is free there"):
        towers.check_room({one: 6 * 2**30, two: 6 * 2**30}, torch.bfloat16, two_devices=False, whole=True)
    towers.check_room({two: 6 * 2**30, torch.device("cuda", 1): 6 * 2**30}, torch.bfloat16, two_devices=True,
                      whole=True)

    seen = {}

    def check(need, dtype, two_devices, whole):
        seen.update(need=need, two_devices=two_devices)
        raise RuntimeError("checked")

    monkeypatch.setattr(towers, "check_room", check)
    with pytest.raises(RuntimeError, match="checked"):
        load_model(twotower_folder, need_denoiser=True, dtype=torch.bfloat16, context_device="cuda",
                   denoiser_device="cuda:0", check_memory=True)
    assert seen["two_devices"] is False and set(seen["need"]) == {one, two}


@pytest.mark.parametrize("command", [("generate", "hi"), ("bench",)])
@pytest.mark.parametrize("option", ["--device", "--context-device", "--denoiser-device"])
@pytest.mark.parametrize("count", [1, 2])
def test_a_gpu_index_beyond_the_machines_gpus_is_one_error_naming_how_many(twotower_folder, monkeypatch, option,
                                                                         count, command):
    """`--device cuda:3` with fewer GPUs was a traceback from the memory check (CUDA's invalid device
    ordinal); now one Error line saying how many GPUs there are, before anything is read. bench places the
    towers as generate does (the 30B model's two towers need two 80 GB GPUs)."""
    from typer.testing import CliRunner

    from twotower_cli import towers
    from twotower_cli.cli import get_app
    from twotower_cli.runtime import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    read = []
    monkeypatch.setattr(towers, "load_state", lambda *a, **k: read.append(1))
    r = CliRunner().invoke(get_app(), [*command, "--model", str(twotower_folder), option, "cuda:3", "-n", "2"])
    gpus = "1 GPU" if count == 1 else "2 GPUs"
    hint = f"use {option} cuda (cuda:0)" if count == 1 else "use cuda:0 to cuda:1"  # the option it came from
    assert r.exit_code == 1 and r.stderr.strip() == (
        f"Error: {option} cuda:3 asked for but this machine has {gpus} (hint: {hint})"), r.output
    assert not read
    assert pick_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)  # the last one is there
    assert pick_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize("option", ["--device", "--context-device", "--denoiser-device"])
def test_cuda_asked_for_without_cuda_names_the_option_that_asked(twotower_folder, monkeypatch, option):
    """`eval --context-device cuda --denoiser-device cpu` on a machine without CUDA hinted "use --device cpu",
    an option that was not the one at fault."""
    from typer.testing import CliRunner

    from twotower_cli.cli import get_app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = CliRunner().invoke(get_app(), ["generate", "hi", "--model", str(twotower_folder), option, "cuda", "-n", "2"])
    assert r.exit_code == 1 and r.stderr.strip() == (
        f"Error: {option} cuda asked for but CUDA is not available (hint: use {option} cpu)"), r.output


@pytest.mark.parametrize(("option", "device", "needle"), [
    ("--device", "mps", "float64"), ("--denoiser-device", "meta", "use cpu, cuda or cuda:N"),
    ("--context-device", "nonsense", "unknown device"),
])
def test_a_device_twotower_does_not_run_on_is_one_error_before_the_load(twotower_folder, monkeypatch, option, device,
                                                                       needle):
    """`--device mps` was "cannot read model.safetensors ... may be truncated or corrupt" (the load's
    error for the tensor it could not place): the device is refused by name before anything is read."""
    from typer.testing import CliRunner

    from twotower_cli import towers
    from twotower_cli.cli import get_app

    read = []
    monkeypatch.setattr(towers, "load_state", lambda *a, **k: read.append(1))
    r = CliRunner().invoke(get_app(), ["generate", "hi", "--model", str(twotower_folder), option, device, "-n", "2"])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], r.output
    assert "safetensors" not in r.stderr and not read
