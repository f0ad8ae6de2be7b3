"""split: byte-exact towers and heads (ours and transformers-written, single-file and sharded), identity
time conditioning, config fields, a consistent index, inspect-clean output, safety (existing OUT,
interruptions, full disk, read errors, untouched source), dtype conversion, the 30B dry-run plan."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers_ckpt import ROOT, hf_written, random_checkpoint, random_tensors, small_config, sparse_nano
from twotower_cli.checkpoint import INDEX_NAME, index_problems, open_checkpoint, write_checkpoint
from twotower_cli.cli import get_app
from twotower_cli.errors import TwoTowerError
from twotower_cli.inspect import inspect_checkpoint
from twotower_cli.layout import nemotron_h_shapes, time_conditioning_shapes, twotower_shapes
from twotower_cli.split import RangeCopier, execute, load_source, plan_split, verify_output

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(get_app(), ["split", *args])


def raw_bytes(folder: Path, name: str) -> bytes:
    info = open_checkpoint(folder).tensors[name]
    with open(folder / info.file, "rb") as f:
        f.seek(info.file_range[0])
        return f.read(info.nbytes)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_exact_split(src: Path, out: Path, source_key=lambda k: k) -> None:
    """Every tower and head tensor of `out` holds exactly the bytes of its source tensor."""
    cfg = small_config()
    assert sorted(open_checkpoint(out).tensors) == sorted(twotower_shapes(cfg))
    for key in nemotron_h_shapes(cfg):
        want = raw_bytes(src, source_key(key))
        rest = key[len("backbone."):]
        heads = ("context_lm_head.weight", "lm_head.weight")
        for dst in heads if key == "lm_head.weight" else (f"context_tower.{rest}", f"denoiser_tower.{rest}"):
            assert raw_bytes(out, dst) == want, dst
    assert inspect_checkpoint(out).problems == []


def assert_identity_time_conditioning(out: Path, dtype=torch.bfloat16) -> None:
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    cfg = small_config()
    for i in range(cfg.num_hidden_layers):
        table = tensors[f"scale_shift_tables.{i}"]
        assert table.dtype == dtype
        assert torch.equal(table.float(), torch.tensor([[0.0] * 16, [0.0] * 16, [1.0] * 16]))
    assert not tensors["t_block.1.weight"].any() and not tensors["t_block.1.bias"].any()
    w = tensors["t_embedder.mlp.0.weight"].float()
    assert 0.01 < w.std() < 0.03 and not tensors["t_embedder.mlp.0.bias"].any()
    assert inspect_checkpoint(out).twotower["time_conditioning"] == "identity"


# ---------------------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("src_shards,out_shards", [("5GB", "5GB"), ("3KB", "4KB"), ("5GB", "4KB")])
def test_round_trip_is_byte_exact(tmp_path, src_shards, out_shards):
    src = random_checkpoint(tmp_path / "src", max_shard_size=src_shards)
    before = digest(src)
    result = invoke(str(src), "-o", str(tmp_path / "out"), "--max-shard-size", out_shards, "--verify")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert_exact_split(src, out)
    assert_identity_time_conditioning(out)
    assert digest(src) == before  # the source is only read
    assert "verified" in result.stderr and "wrote" in result.stderr


def test_index_and_shard_sizes(tmp_path):
    src = random_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    assert invoke(str(src), "-o", str(out), "--max-shard-size", "4KB").exit_code == 0
    ckpt = open_checkpoint(out)
    idx = json.loads((out / INDEX_NAME).read_text())
    assert index_problems(ckpt) == []
    assert idx["metadata"]["total_size"] == ckpt.total_bytes
    assert set(idx["weight_map"]) == set(twotower_shapes(small_config()))
    for shard in ckpt.shards.values():
        data = sum(t.nbytes for t in shard.tensors.values())
        assert data <= 4000 or len(shard.tensors) == 1
    assert (out / "model.safetensors").exists() is False
    # Loadable by safetensors itself (contiguous offsets, aligned header).
    assert all(load_file(str(out / f)) for f in ckpt.files)


def test_config_fields(tmp_path):
    cfg = small_config(my_custom_key={"kept": [1, 2]},
                       auto_map={"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                                 "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"})
    src = random_checkpoint(tmp_path / "src", cfg)
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "modeling_nemotron_h.py").write_text("# remote code")
    out = tmp_path / "out"
    result = invoke(str(src), "-o", str(out), "--mask-token-id", "7", "--block-size", "32")
    assert result.exit_code == 0, result.output
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["NemotronHTwoTowerForCausalLM"] and conf["model_type"] == "nemotron_h"
    assert conf["twotower"] == {"mask_token_id": 7, "block_size": 32, "source": str(src), "format_version": 1,
                                "cross_attention_layers": [1]}
    assert conf["my_custom_key"] == {"kept": [1, 2]}
    assert conf["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
    assert conf["hybrid_override_pattern"] == "M*E-ME"
    assert "auto_map" not in conf
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not (out / "modeling_nemotron_h.py").exists()


def test_unused_keys_are_dropped_and_listed(tmp_path):
    cfg = small_config()
    extra = {"mtp.layers.0.norm.weight": torch.ones(16), "backbone.layers.0.mixer.rotary_emb.inv_freq": torch.ones(4)}
    src = random_checkpoint(tmp_path / "src", cfg, extra=extra)
    plan = plan_split(*load_source(src), "5GB", "keep", 3, 16, "src")
    assert sorted(plan.dropped) == sorted(extra)
    result = invoke(str(src), "--dry-run")
    assert result.exit_code == 0
    assert "mtp.layers.0.norm.weight" in result.stderr and "dropped 2 tensors" in result.stderr


@pytest.mark.hf
@pytest.mark.parametrize("sharded", [False, True])
def test_transformers_written_source(tmp_path, sharded):
    src = hf_written(tmp_path / "hf", sharded=sharded)
    out = tmp_path / "out"
    result = invoke(str(src), "-o", str(out), "--verify")
    assert result.exit_code == 0, result.output
    assert_exact_split(src, out)
    assert_identity_time_conditioning(out, torch.float32)


@pytest.mark.hf
def test_transformers_fused_experts_are_unfused(tmp_path):
    """save_original_format=False writes model.* names and [E, out, in] expert stacks: split renames and
    slices them (named transforms), and expert j is exactly slice j of the stack."""
    src = hf_written(tmp_path / "hf", sharded=True, original_format=False)
    out = tmp_path / "out"
    result = invoke(str(src), "-o", str(out), "--verify")
    assert result.exit_code == 0, result.output
    assert "unfused" in result.stderr and "model.* → backbone.*" in result.stderr
    source = {}
    for f in src.glob("*.safetensors"):
        source.update(load_file(str(f)))
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert sorted(got) == sorted(twotower_shapes(small_config()))
    for layer in (2, 5):
        for proj in ("up_proj", "down_proj"):
            stack = source[f"model.layers.{layer}.mixer.experts.{proj}"]
            for j in range(stack.shape[0]):
                for tower in ("context_tower", "denoiser_tower"):
                    assert torch.equal(got[f"{tower}.layers.{layer}.mixer.experts.{j}.{proj}.weight"], stack[j])
    assert torch.equal(got["denoiser_tower.embeddings.weight"], source["model.embeddings.weight"])
    assert inspect_checkpoint(out).problems == []


@pytest.mark.parametrize("key,shape,message", [
    # layer 0 is Mamba: the stack's slices were written as experts of layer 0, and the output failed inspect
    ("backbone.layers.0.mixer.experts.up_proj", (4, 12, 16), "unexpected tensor backbone.layers.0.mixer.experts.up_proj"),
    # five experts where the config has four: expert 4 went into the output as well
    ("backbone.layers.2.mixer.experts.up_proj", (5, 12, 16), "cannot unfuse it into 4 experts of shape [12, 16]"),
    # a stack beside the per-expert tensors it would make: one of the two was silently kept
    ("backbone.layers.2.mixer.experts.up_proj", (4, 12, 16), "are both backbone.layers.2.mixer.experts.0.up_proj.weight"),
])
def test_fused_expert_stacks_that_do_not_fit_the_config_are_refused(tmp_path, key, shape, message):
    src = random_checkpoint(tmp_path / "src", extra={key: torch.ones(shape, dtype=torch.bfloat16)})
    result = invoke(str(src), "-o", str(tmp_path / "x"))
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert leftovers(tmp_path, "x") == []
    assert any(message in p for p in inspect_checkpoint(src).problems)


def test_time_conditioning_is_deterministic(tmp_path):
    src = random_checkpoint(tmp_path / "src")
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke(str(src), "-o", str(a)).exit_code == 0
    assert invoke(str(src), "-o", str(b)).exit_code == 0
    assert digest(a) == digest(b)


# ---------------------------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype,torch_dtype", [("fp32", torch.float32), ("fp16", torch.float16)])
def test_dtype_conversion(tmp_path, dtype, torch_dtype):
    src = random_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    result = invoke(str(src), "-o", str(out), "--dtype", dtype, "--verify")
    assert result.exit_code == 0, result.output
    source = load_file(str(src / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    for key, value in source.items():
        rest = key[len("backbone."):]
        dst = ("lm_head.weight",) if key == "lm_head.weight" else (f"context_tower.{rest}", f"denoiser_tower.{rest}")
        for d in dst:
            assert got[d].dtype == torch_dtype and torch.equal(got[d], value.to(torch_dtype)), d
    assert_identity_time_conditioning(out, torch_dtype)


@pytest.mark.parametrize(("src_dtype", "value", "fits"), [
    (torch.float32, 65504.0, True),  # fp16's largest
    (torch.float32, 65519.0, True),  # rounds down to it
    (torch.float32, 65520.0, False),  # rounds up to Inf
    (torch.float32, -1e6, False),
    (torch.bfloat16, 1e6, False),
    (torch.bfloat16, 60000.0, True),
    (torch.float32, float("inf"), True),  # already not finite in the source: kept as it is (inspect --values)
    (torch.float32, float("nan"), True),
])
def test_fp16_refuses_a_value_it_would_turn_into_inf(tmp_path, src_dtype, value, fits):
    """--dtype fp16 of a value beyond its range would write Inf (and numpy warned with a source line): one
    Error line naming the tensor, no output, the source untouched. Values that round into range convert as
    torch converts them."""
    cfg = small_config()
    norm = random_tensors(cfg, src_dtype)["backbone.norm_f.weight"]
    norm[3] = value
    src = random_checkpoint(tmp_path / "src", cfg, dtype=src_dtype, extra={"backbone.norm_f.weight": norm})
    before = digest(src)
    r = invoke(str(src), "-o", str(tmp_path / "out"), "--dtype", "fp16")
    assert "RuntimeWarning" not in r.output
    if fits:
        assert r.exit_code == 0, r.output
        got = load_file(str(tmp_path / "out" / "model.safetensors"))["context_tower.norm_f.weight"]
        torch.testing.assert_close(got, norm.to(torch.float16), rtol=0, atol=0, equal_nan=True)
        assert torch.isfinite(got[3]) == math.isfinite(value)
    else:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
        assert r.exit_code == 1 and len(errors) == 1, r.output
        assert "norm_f.weight holds values beyond fp16's range" in errors[0] and "--dtype bf16" in errors[0]
        assert not (tmp_path / "out").exists() and "Traceback" not in r.output
    assert digest(src) == before


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_dtype_conversion_updates_the_configs_dtype(tmp_path, key):
    """transformers' from_pretrained(dtype="auto") loads the dtype config.json names: after --dtype bf16 a
    config still saying float32 would load the bf16 weights widened to fp32 (twice the memory)."""
    cfg = small_config()
    src = random_checkpoint(tmp_path / "src", cfg.with_updates(**{key: "float32"}), dtype=torch.float32)
    result = invoke(str(src), "-o", str(tmp_path / "bf16"), "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())[key] == "bfloat16"
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16
    assert invoke(str(src), "-o", str(tmp_path / "keep")).exit_code == 0
    assert json.loads((tmp_path / "keep" / "config.json").read_text())[key] == "float32"


def test_a_config_with_layers_block_type_only_gets_the_pattern_string_too(tmp_path):
    """transformers 5 may write `layers_block_type` alone; NVIDIA's TwoTower config and transformers < 5 read
    `hybrid_override_pattern`: the output has both, saying the same, and the source's list is kept."""
    from twotower_cli.config import pattern_to_block_types

    cfg = small_config()
    types = pattern_to_block_types(cfg.pattern)
    src = random_checkpoint(tmp_path / "src", cfg.with_updates(hybrid_override_pattern=None, layers_block_type=types))
    assert "hybrid_override_pattern" not in json.loads((src / "config.json").read_text())
    result = invoke(str(src), "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["hybrid_override_pattern"] == _spec_pattern({"layers_block_type": types}) == cfg.pattern
    assert written["layers_block_type"] == types
    assert "hybrid_override_pattern added" in result.output


def test_bf16_conversion_matches_torch_rounding(tmp_path):
    src = random_checkpoint(tmp_path / "src", dtype=torch.float32)
    out = tmp_path / "out"
    assert invoke(str(src), "-o", str(out), "--dtype", "bf16", "--verify").exit_code == 0
    source, got = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key in ("backbone.layers.0.mixer.in_proj.weight", "lm_head.weight"):
        dst = "lm_head.weight" if key == "lm_head.weight" else "denoiser_tower." + key[len("backbone."):]
        assert got[dst].dtype == torch.bfloat16 and torch.equal(got[dst], source[key].to(torch.bfloat16))


def test_encode_special_values():
    import numpy as np

    from twotower_cli.split import _decode, _encode

    x = np.array([np.nan, np.inf, -np.inf, -0.0, 1.0, 3.14159, 65504.0, 1e-40], np.float32)
    for dtype, torch_dtype in (("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)):
        want = torch.from_numpy(x.copy()).to(torch_dtype)
        got = torch.frombuffer(bytearray(_encode(x, dtype)), dtype=torch_dtype)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[~got.isnan()], want[~want.isnan()]), dtype
        back = _decode(_encode(x, dtype), dtype)
        assert np.array_equal(np.isnan(back), np.isnan(x))


def test_fp32_tensors_are_never_narrowed(tmp_path):
    src = random_checkpoint(tmp_path / "src", dtype=torch.float32)
    plan = plan_split(*load_source(src), "5GB", "bf16", 3, 16, "src")
    dtypes = {t.name: t.dtype for t in plan.tensors}
    assert dtypes["context_tower.layers.0.mixer.A_log"] == "F32"
    assert dtypes["denoiser_tower.layers.2.mixer.gate.e_score_correction_bias"] == "F32"
    assert dtypes["context_tower.layers.0.mixer.in_proj.weight"] == "BF16"
    assert dtypes["t_block.1.weight"] == "BF16"
    out = execute(plan, tmp_path / "out", verify=True).out
    assert inspect_checkpoint(out).problems == []


# ---------------------------------------------------------------------------------------------- copy paths

@pytest.mark.parametrize("method", ["copy_file_range", "sendfile", "buffered"])
def test_every_copy_method_is_exact(tmp_path, method):
    src = random_checkpoint(tmp_path / "src", max_shard_size="3KB")
    plan = plan_split(*load_source(src), "4KB", "keep", 3, 16, "src")
    result = execute(plan, tmp_path / "out", copier=RangeCopier(method), verify=True)
    assert result.copy_method == method
    assert result.bytes_verified == plan.tensor_bytes
    assert_exact_split(src, tmp_path / "out")


def test_copy_falls_back_when_copy_file_range_is_refused(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    src = random_checkpoint(tmp_path / "src")
    result = execute(plan_split(*load_source(src)), tmp_path / "out", copier=RangeCopier("copy_file_range"))
    assert result.copy_method == "sendfile"
    assert_exact_split(src, tmp_path / "out")


def test_split_does_not_import_torch(tmp_path):
    src = random_checkpoint(tmp_path / "src")
    code = ("import sys; from twotower_cli.split import execute, load_source, plan_split; "
            f"execute(plan_split(*load_source({str(src)!r})), {str(tmp_path / 'out')!r}, verify=True); "
            f"execute(plan_split(*load_source({str(src)!r}), dtype='fp32'), {str(tmp_path / 'o2')!r}, verify=True); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_verify_catches_a_corrupt_output(tmp_path):
    src = random_checkpoint(tmp_path / "src")
    plan = plan_split(*load_source(src))
    out = execute(plan, tmp_path / "out").out
    info = open_checkpoint(out).tensors["denoiser_tower.layers.3.mixer.up_proj.weight"]
    with open(out / info.file, "r+b") as f:
        f.seek(info.file_range[0] + 3)
        f.write(b"\xff")
    with pytest.raises(TwoTowerError, match="denoiser_tower.layers.3.mixer.up_proj.weight differs"):
        verify_output(plan, out)


# ---------------------------------------------------------------------------------------------- safety

def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}"))]


def test_existing_output_is_refused_unless_forced(tmp_path):
    src = random_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke(str(src), "-o", str(out))
    assert result.exit_code == 1 and result.stderr.startswith("Error:") and "already exists" in result.stderr
    assert (out / "keep.txt").exists()
    assert invoke(str(src), "-o", str(out), "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and inspect_checkpoint(out).problems == []
    assert leftovers(tmp_path, "out") == ["out"]


def test_output_never_replaces_or_enters_the_source_nor_replaces_the_current_folder(tmp_path, monkeypatch):
    models = tmp_path / "models"
    src = random_checkpoint(models / "base")
    (models / "notes.txt").write_text("mine")
    before = digest(src)
    cases = [(src, "the output folder is the source folder"), (models, "holds the source checkpoint"),
             (src / "..", "holds the source checkpoint")]
    for out, message in cases:
        for force in ([], ["--force"]):
            result = invoke(str(src), "-o", str(out), *force)
            assert result.exit_code == 1 and message in result.stderr and result.stderr.count("Error:") == 1, \
                result.stderr
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", "./", "../work"):
        result = invoke(str(src), "-o", out, "--force")
        assert result.exit_code == 1 and "is the current folder or holds it" in result.stderr, result.stderr
    monkeypatch.chdir(src)  # `split .` in the source folder: the default OUT would land inside it
    for args in ([], ["-o", "sub/tt"]):
        result = invoke(".", *args)
        assert result.exit_code == 1 and "is inside the source checkpoint" in result.stderr, result.stderr
    assert digest(src) == before and (models / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == ["data.txt"]
    assert sorted(p.name for p in models.iterdir()) == ["base", "notes.txt"]


def test_atomic_output_replaces_dot_and_files_without_leftovers(tmp_path, monkeypatch):
    from twotower_cli.checkpoint import atomic_output_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "old.txt").write_text("old")
    monkeypatch.chdir(run)
    with atomic_output_dir(Path("."), force=True) as tmp:  # "." has no name: the folder is found by its path
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in run.iterdir()) == ["new.txt"]
    (tmp_path / "out").write_text("a file where the folder goes")
    with atomic_output_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (tmp_path / "out" / "new.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


# Replaces OUT with a folder holding v.txt = "new", dying (os._exit: no handler runs) or raising
# KeyboardInterrupt at its STEP-th filesystem step (just before or just after each rename, exchange or removal);
# prints the number of steps when it ends.
REPLACE_AND_DIE = """
import os, sys
from pathlib import Path
from twotower_cli import checkpoint as C
out, at, mode, how = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if mode == "fallback":  # a system or filesystem without renameat2's RENAME_EXCHANGE
    C._exchange = lambda a, b: False
steps = 0
def hit():
    global steps
    steps += 1
    if steps == at:
        if how == "crash":
            os._exit(17)
        raise KeyboardInterrupt
def step(fn):
    def wrapped(*args, **kwargs):
        hit()
        result = fn(*args, **kwargs)
        hit()
        return result
    return wrapped
os.replace = step(os.replace)
for name in ("_exchange", "_remove"):
    setattr(C, name, step(getattr(C, name)))
with C.atomic_output_dir(out, force=True) as tmp:
    (tmp / "v.txt").write_text("new")
print(steps)
"""


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


@pytest.mark.parametrize("how", ["crash", "raise"])
@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_replacing_an_output_keeps_the_old_or_the_new_at_every_step(tmp_path, mode, how):
    """`atomic_output_dir(force=True)` killed (or interrupted) just before or after each of its filesystem
    steps in turn: OUT holds the old output or the new one, complete, right away (with the exchange, or
    after an exception); only a crash between the fallback's two renames leaves OUT missing, with the old one
    aside. An interrupt succeeds exactly when it comes after the new output took OUT's name (the write is
    done: exit status 0, not "interrupted"). Then `settle_output`, which the next run starts with, leaves OUT
    old or new and nothing else beside it."""
    from twotower_cli.checkpoint import _exchange, settle_output

    probe = tmp_path / "probe"
    probe.mkdir()
    (tmp_path / "probe2").mkdir()
    if mode == "exchange" and not _exchange(probe, tmp_path / "probe2"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    seen = set()
    for at in range(1, 20):
        case = tmp_path / f"step{at}"
        (case / "out").mkdir(parents=True)
        (case / "out" / "v.txt").write_text("old")
        r = subprocess.run([sys.executable, "-c", REPLACE_AND_DIE, str(case / "out"), str(at), mode, how],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        finished = r.returncode == 0
        assert finished or r.returncode == (17 if how == "crash" else -2), r.stderr  # -2: died of its SIGINT
        state = (case / "out" / "v.txt").read_text() if (case / "out").exists() else None
        beside = sorted(p.name for p in case.iterdir())
        if mode == "fallback" and how == "crash" and state is None:  # killed between the two renames
            assert len(beside) == 2 and any(n.startswith(".out.old-") for n in beside), beside
        else:
            assert state in ("old", "new"), (at, beside)
        if how == "raise":
            assert finished == (state == "new"), (at, state, r.returncode, r.stderr)
        seen.add(state)
        settle_output(case / "out")
        assert (case / "out" / "v.txt").read_text() in ("old", "new"), at
        assert sorted(p.name for p in case.iterdir()) == ["out"], (at, beside)
        if finished:
            assert (case / "out" / "v.txt").read_text() == "new" and int(r.stdout) >= at - 1
            if int(r.stdout) < at:  # step `at` never came: every step has been tried
                break
    assert "old" in seen and "new" in seen and at > 4  # the failures did fall on both sides of the swap


def test_settle_output_puts_back_or_removes_only_a_dead_writers_leftovers(tmp_path):
    """The rule, name by name: a dead process's `.OUT.old-MACHINE-PID` becomes OUT when OUT is missing, else
    goes; its `.OUT.tmp-MACHINE-PID-*` go; a live process's, another machine's (returned), other outputs'
    and the user's own files stay, and so do the names older versions gave (no MACHINE: whose is unknown)."""
    from twotower_cli.checkpoint import _machine, settle_output

    dead, live, me, other = dead_pid(), os.getppid(), _machine(), "0123456789ab"
    assert len(me) == 12 and me != other

    def folder(name, text):
        (tmp_path / name).mkdir()
        (tmp_path / name / "v.txt").write_text(text)

    folder(f".out.old-{me}-{dead}", "old")
    folder(f".out.tmp-{me}-{dead}-ab12_xyz", "unfinished")
    (tmp_path / f".out.tmp-{me}-{dead}-cd34_xyz").write_text("a file swapped out")
    foreign = [f".out.old-{other}-{dead}", f".out.tmp-{other}-{dead}-ab12_xyz", f".out.old-{dead}",
               f".out.tmp-{dead}-ab12_xyz"]
    for name in (f".out.old-{me}-{live}", f".out.tmp-{me}-{live}-ab12_xyz", f".other.old-{me}-{dead}",
                 f".out.old-{me}-{dead}.bak", f".out.old-{me}", "out.old-1", ".out.old-x", "notes", *foreign):
        folder(name, "keep")
    keep = sorted(p.name for p in tmp_path.iterdir() if (p / "v.txt").is_file() and (p / "v.txt").read_text() == "keep")
    assert sorted(p.name for p in settle_output(tmp_path / "out")) == sorted(foreign)
    assert (tmp_path / "out" / "v.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *keep])
    folder(f".out.old-{me}-{dead}", "older")  # OUT is there now: the one aside is stale
    settle_output(tmp_path / "out")
    assert (tmp_path / "out" / "v.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *keep])
    assert settle_output(tmp_path / "missing" / "out") == []  # no folder to look in: nothing to do


@pytest.fixture
def fresh_renameat2():
    """`checkpoint._renameat2` looked up again in the test, and again after it (it is cached)."""
    from twotower_cli import checkpoint

    checkpoint._renameat2.cache_clear()
    yield
    checkpoint._renameat2.cache_clear()


@pytest.mark.parametrize("platform, libc", [
    ("win32", TypeError("argument of type 'NoneType' is not iterable")),  # what ctypes.CDLL(None) raises there
    ("darwin", None),  # a C library without renameat2
    ("linux", OSError("libc not found")),
])
def test_replacing_an_output_falls_back_to_two_renames_where_there_is_no_renameat2(
        tmp_path, monkeypatch, fresh_renameat2, platform, libc):
    """Windows, macOS, a Linux libc that cannot be opened: `atomic_output_dir(force=True)` replaces OUT by its
    two renames, without an error (on Windows it raised ctypes' TypeError: 'this looks like a bug')."""
    import ctypes

    from twotower_cli.checkpoint import atomic_output_dir

    def cdll(*args, **kwargs):
        if libc is not None:
            raise libc
        return object()  # no renameat2 attribute

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(sys, "platform", platform)
    out = tmp_path / "out"
    out.mkdir()
    (out / "v.txt").write_text("old")
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "v.txt").write_text("new")
    assert (out / "v.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_settle_output_asks_after_no_process_on_windows(tmp_path, monkeypatch):
    """`os.kill(pid, 0)` is no question on Windows: signal 0 is CTRL_C_EVENT there, a Ctrl-C sent to the
    console's processes (this one among them), and its success says nothing of `pid`. There nothing is
    asked, and what another process left beside OUT is left alone (it may still be writing it)."""
    from twotower_cli.checkpoint import _machine, settle_output

    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(sys, "platform", "win32")
    dead = dead_pid()
    names = sorted([f".out.old-{_machine()}-{dead}", f".out.tmp-{_machine()}-{dead}-ab12_xyz"])
    for name in names:
        (tmp_path / name).mkdir()
    settle_output(tmp_path / "out")
    assert sent == []
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def exchange_or_skip(tmp_path: Path, mode: str, monkeypatch) -> None:
    """Replace OUT by the exchange (skipped where there is none) or by the fallback's two renames."""
    from twotower_cli import checkpoint

    if mode == "fallback":
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
        return
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe2").mkdir()
    swapped = checkpoint._exchange(tmp_path / "probe", tmp_path / "probe2")
    (tmp_path / "probe").rmdir()
    (tmp_path / "probe2").rmdir()
    if not swapped:
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_an_interrupt_while_the_old_output_is_removed_is_a_success(tmp_path, monkeypatch, mode):
    """Ctrl-C while the old OUT is removed, after the new one took its name: the write is done, so the block
    ends normally (it raised KeyboardInterrupt: "Error: interrupted", exit code 1, over a complete OUT). What
    is left of the old output stays beside OUT until the next write to OUT, in this process too."""
    from twotower_cli import checkpoint

    exchange_or_skip(tmp_path, mode, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    for i in range(3):
        (out / f"old{i}.txt").write_text("old")
    removed = []

    def remove(path):  # removes one file of the old output, then the user presses Ctrl-C
        if not removed:
            removed.append(path)
            (path / "old0.txt").unlink()
            raise KeyboardInterrupt
        real_remove(path)

    real_remove = checkpoint._remove
    monkeypatch.setattr(checkpoint, "_remove", remove)
    try:
        with checkpoint.atomic_output_dir(out, force=True) as tmp:
            (tmp / "v.txt").write_text("new")
    except KeyboardInterrupt:
        pytest.fail("the interrupt came out of a write that was done")
    assert sorted(p.name for p in out.iterdir()) == ["v.txt"] and (out / "v.txt").read_text() == "new"
    (aside,) = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert aside == removed[0] and sorted(p.name for p in aside.iterdir()) == ["old1.txt", "old2.txt"]
    with checkpoint.atomic_output_dir(out, force=True) as tmp:  # the next write settles it first
        (tmp / "v.txt").write_text("newer")
    assert (out / "v.txt").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_split_sigtermed_while_removing_the_old_output_succeeds(tmp_path):
    """`split --force` sent SIGTERM (as a scheduler does) while it removes the previous OUT: the new split is
    complete at OUT, so the command succeeds quietly (it said "Error: interrupted" and exited with 1); the
    next run removes what was left of the old OUT."""
    src = random_checkpoint(tmp_path / "src")
    before = digest(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("the previous OUT")
    code = f"""
import os, signal
from twotower_cli import checkpoint
from twotower_cli.cli import get_app
real = checkpoint._remove
def remove(path):  # the signal is handled inside the removal
    os.kill(os.getpid(), signal.SIGTERM)
    real(path)
checkpoint._remove = remove
get_app()(["split", {str(src)!r}, "-o", {str(out)!r}, "--force"], prog_name="twotower")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "Error" not in r.stderr, (r.returncode, r.stderr)
    assert_exact_split(src, out)
    assert not (out / "stale.txt").exists() and digest(src) == before
    assert invoke(str(src), "-o", str(tmp_path / "out"), "--force").exit_code == 0
    assert leftovers(tmp_path, "out") == ["out"]


# Writes OUT as a run on this host (or, with "elsewhere", on a host of that name sharing the folder) that
# dies (os._exit) halfway through.
CRASH_WHILE_WRITING = """
import os, platform, sys
if sys.argv[2] == "elsewhere":
    platform.node = lambda: "elsewhere"
from pathlib import Path
from twotower_cli.checkpoint import atomic_output_dir
with atomic_output_dir(Path(sys.argv[1]), force=True) as tmp:
    (tmp / "half.txt").write_text("half")
    os._exit(17)
"""


def test_settle_output_leaves_another_hosts_leftovers_alone(tmp_path):
    """A process id says nothing about another host sharing the folder (or another container): the
    unfinished output of a run there whose id is not running here may be in progress, and is left alone
    (and returned); the same of a dead run on this host is removed. Only the host name differs here."""
    from twotower_cli.checkpoint import settle_output

    out = tmp_path / "out"
    for host in ("elsewhere", "here"):
        r = subprocess.run([sys.executable, "-c", CRASH_WHILE_WRITING, str(out), host], capture_output=True,
                           text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 17, r.stderr
    there, here = sorted((p for p in tmp_path.iterdir()), key=lambda p: (p / "half.txt").stat().st_mtime_ns)
    assert settle_output(out) == [there]
    assert sorted(tmp_path.iterdir()) == [there] and (there / "half.txt").read_text() == "half"


# In a new PID namespace (a container's): PID 1 makes the next process id inside it LAST + 1, then that
# process writes OUT, stopping halfway until the file GO exists.
WRITE_IN_A_CONTAINER = """
import os, sys, time
from pathlib import Path
out, last, ready, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
Path("/proc/sys/kernel/ns_last_pid").write_text(last)
pid = os.fork()
if pid:
    os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
if os.getpid() != int(last) + 1:
    os._exit(3)
from twotower_cli.checkpoint import atomic_output_dir
with atomic_output_dir(out, force=True) as tmp:
    (tmp / "v.txt").write_text("from the container")
    ready.write_text(str(tmp))
    for _ in range(600):
        if go.exists():
            break
        time.sleep(0.05)
os._exit(0)
"""


def test_settle_output_leaves_a_running_containers_output_alone(tmp_path):
    """A run in another PID namespace (a container on a shared volume) writing OUT under a process id that
    no process has here: `settle_output` here leaves its temporary folder alone (it took it for a dead run's
    and removed it under it), and the run completes OUT."""
    import shutil

    from twotower_cli.checkpoint import settle_output

    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rpf", "--mount-proc", "true"], capture_output=True).returncode:
        pytest.skip("no unshare, or no user and PID namespaces for this user")
    out, ready, go = tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    out.mkdir()
    (out / "v.txt").write_text("old")
    pid = dead_pid()  # no process has it here
    writer = subprocess.Popen([unshare, "-rpf", "--mount-proc", sys.executable, "-c", WRITE_IN_A_CONTAINER,
                               str(out), str(pid - 1), str(ready), str(go)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if ready.exists() or writer.poll() is not None:
                break
            time.sleep(0.05)
        if writer.poll() == 3:
            pytest.skip("the PID namespace did not give the writer the chosen id")
        tmp = Path(ready.read_text())
        assert tmp.name.endswith(f"-{pid}-" + tmp.name.rsplit("-", 1)[1]), tmp.name  # the id, dead here
        settle_output(out)
        assert (tmp / "v.txt").read_text() == "from the container"
    finally:
        go.write_text("")
        _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert (out / "v.txt").read_text() == "from the container" and leftovers(tmp_path, "out") == ["out"]


def test_an_out_that_appears_while_writing_is_not_replaced_without_force(tmp_path):
    """Without `force`, OUT is checked before the (long) write and again as it is put in place: an OUT
    another run made meanwhile is an error, and stays as it is (it was swapped out and removed)."""
    from twotower_cli.checkpoint import atomic_output_dir

    out = tmp_path / "out"
    with pytest.raises(TwoTowerError, match="appeared while the output was written"):
        with atomic_output_dir(out) as tmp:
            (tmp / "v.txt").write_text("mine")
            out.mkdir()  # the other run finishes first
            (out / "v.txt").write_text("theirs")
    assert (out / "v.txt").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publishing_the_modes_leaves_what_links_point_at_alone(tmp_path):
    """The finished output's modes are set to the umask's, but a link in it is not followed: the file it
    points at (a source's) keeps its modes (chmod followed it and made a private file readable to all)."""
    from twotower_cli.checkpoint import atomic_output_dir

    private = tmp_path / "source" / "secret.json"
    private.parent.mkdir()
    private.write_text("{}")
    private.chmod(0o600)
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "secret.json").symlink_to(private)
        (tmp / "v.txt").write_text("new")
    assert private.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out" / "v.txt").stat().st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fd through /proc")
@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_a_replacing_output_is_on_the_disk_before_it_takes_outs_name(tmp_path, monkeypatch, mode):
    """A power loss after the swap must find the new OUT whole: every file and folder of it is fsynced before
    it is given OUT's name (with the exchange or the renames), and OUT's folder after, so that the swap
    itself is on the disk (nothing was fsynced: after a power loss OUT could name files never written)."""
    from twotower_cli import checkpoint

    events = []
    real_fsync, real_replace, real_exchange = os.fsync, os.replace, checkpoint._exchange

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("rename", str(b)))
        return real_replace(a, b)

    def exchange(a, b):
        done = mode == "exchange" and real_exchange(a, b)
        if done:
            events.append(("rename", str(b)))
        return done

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(checkpoint, "_exchange", exchange)
    out = tmp_path / "out"
    out.mkdir()
    (out / "v.txt").write_text("old")
    with checkpoint.atomic_output_dir(out, force=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "v.txt").write_text("new")
        (tmp / "sub" / "w.txt").write_text("new too")
    assert (out / "v.txt").read_text() == "new"
    swap = events.index(("rename", str(out)))
    synced = {os.path.relpath(path, tmp) for kind, path in events[:swap] if kind == "fsync"}
    assert synced >= {".", "sub", "v.txt", os.path.join("sub", "w.txt")}, events
    assert ("fsync", str(tmp_path)) in events[swap:], events


@pytest.mark.parametrize("error,message", [
    (KeyboardInterrupt(), "Error: interrupted"),
    (OSError(errno.ENOSPC, "No space left on device"), "Error: No space left on device"),
    (OSError(errno.EIO, "Input/output error"), "Error: Input/output error"),
])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, error, message):
    src = random_checkpoint(tmp_path / "src", max_shard_size="3KB")
    before = digest(src)
    calls = []
    real = RangeCopier.copy

    def flaky(self, *args):
        calls.append(1)
        if len(calls) == 10:  # a few tensors in: some output shards exist by now
            raise error
        return real(self, *args)

    monkeypatch.setattr(RangeCopier, "copy", flaky)
    result = invoke(str(src), "-o", str(tmp_path / "out"), "--max-shard-size", "4KB")
    assert result.exit_code == 1
    assert result.stderr.count("Error:") == 1 and message in result.stderr
    assert "Traceback" not in result.output
    assert leftovers(tmp_path, "out") == []
    assert digest(src) == before


def test_sigterm_mid_write_leaves_nothing(tmp_path):
    """`kill`, `timeout` and batch schedulers send SIGTERM: the split must clean up as on Ctrl-C."""
    src = random_checkpoint(tmp_path / "src", max_shard_size="3KB")
    before = digest(src)
    code = f"""
import os, signal, time
from twotower_cli.cli import get_app
from twotower_cli.split import RangeCopier
real, calls = RangeCopier.copy, []
def copy(self, *args):
    calls.append(1)
    if len(calls) == 10:  # a few tensors in, from a writer thread: the signal goes to the process
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    return real(self, *args)
RangeCopier.copy = copy
get_app()(["split", {str(src)!r}, "-o", {str(tmp_path / "out")!r}, "--max-shard-size", "4KB"], prog_name="twotower")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and "Error: interrupted" in r.stderr, (r.returncode, r.stderr)
    assert leftovers(tmp_path, "out") == []
    assert digest(src) == before


def test_sigkill_mid_copy_leaves_no_out_and_the_rerun_is_whole(tmp_path):
    """SIGKILL cleans nothing up: OUT must not exist (only a hidden temporary folder), the source is as it was,
    and the next run over the same OUT removes the leftover and writes the whole, exact output."""
    import signal

    src = random_checkpoint(tmp_path / "src", max_shard_size="3KB")
    before = digest(src)
    out = tmp_path / "out"
    code = f"""
import os, signal
from twotower_cli.cli import get_app
from twotower_cli.split import RangeCopier
real, calls = RangeCopier.copy, []
def copy(self, *args):
    calls.append(1)
    if len(calls) == 10:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args)
RangeCopier.copy = copy
get_app()(["split", {str(src)!r}, "-o", {str(out)!r}, "--max-shard-size", "4KB"], prog_name="twotower")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert not out.exists() and len(leftovers(tmp_path, "out")) == 1  # the killed run's temporary folder
    assert digest(src) == before
    result = invoke(str(src), "-o", str(out), "--max-shard-size", "4KB", "--verify")
    assert result.exit_code == 0, result.output
    assert leftovers(tmp_path, "out") == ["out"] and digest(src) == before
    assert_exact_split(src, out)


def test_truncated_source_is_refused_before_writing(tmp_path):
    src = random_checkpoint(tmp_path / "src")
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate((src / "model.safetensors").stat().st_size - 10)
    result = invoke(str(src), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1 and "truncated" in result.stderr and "twotower inspect" in result.stderr
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("args,message", [
    (["--dtype", "int8"], "unknown --dtype"),
    (["--max-shard-size", "lots"], "cannot read the size"),
    (["--max-shard-size", "inf"], "cannot read the size"),
    (["--block-size", "0"], "--block-size must be positive"),
    (["--mask-token-id", "999"], "outside the vocabulary"),
])
def test_bad_options(tmp_path, args, message):
    src = random_checkpoint(tmp_path / "src")
    result = invoke(str(src), "-o", str(tmp_path / "out"), *args)
    assert result.exit_code == 1 and message in result.stderr and result.stderr.count("Error:") == 1


def test_bad_sources(tmp_path):
    result = invoke(str(tmp_path / "missing"))
    assert result.exit_code == 1 and result.stderr.startswith("Error:")
    src = random_checkpoint(tmp_path / "src")
    assert invoke(str(src), "-o", str(tmp_path / "tt")).exit_code == 0
    result = invoke(str(tmp_path / "tt"), "-o", str(tmp_path / "tt2"))
    assert result.exit_code == 1 and "already a TwoTower checkpoint" in result.stderr
    t = random_tensors(small_config())
    del t["backbone.layers.1.mixer.q_proj.weight"]
    write_checkpoint(tmp_path / "incomplete", t, small_config().to_dict())
    result = invoke(str(tmp_path / "incomplete"), "-o", str(tmp_path / "x"))
    assert result.exit_code == 1 and "missing tensor backbone.layers.1.mixer.q_proj.weight" in result.stderr


@pytest.mark.parametrize("extra", [
    "backbone.layers.0.mixer.in_proj.bias",  # the weights have a bias the config (mamba_proj_bias false) denies
    "backbone.layers.6.norm.weight",  # a layer past the pattern
    "model.layers.1.mixer.q_proj.bias",  # transformers' module names, same thing
    "lm_head.bias",
])
def test_tensors_of_the_model_the_config_does_not_explain_are_refused(tmp_path, extra):
    """Dropping them would make a split that computes something else than the source (spec §3: an exact
    copy); inspect calls the source unsound for the same reason. Keys outside the model are dropped and named."""
    src = random_checkpoint(tmp_path / "src", extra={extra: torch.ones(16), "optimizer.step": torch.ones(1)})
    result = invoke(str(src), "-o", str(tmp_path / "x"))
    assert result.exit_code == 1, result.output
    assert f"unexpected tensor {extra} (the config does not explain it)" in result.stderr
    assert leftovers(tmp_path, "x") == []
    assert f"unexpected tensor {extra}" in " ".join(inspect_checkpoint(src).problems)
    src = random_checkpoint(tmp_path / "src2", extra={"optimizer.step": torch.ones(1)})
    result = invoke(str(src), "-o", str(tmp_path / "y"), "--dry-run")
    assert result.exit_code == 0 and "dropped 1 tensor the config does not explain" in result.stderr
    assert "optimizer.step" in result.stderr


def test_two_source_tensors_with_one_meaning_are_refused(tmp_path):
    """The legacy embedding name beside the current one: the split would silently keep one of them."""
    cfg = small_config()
    t = random_tensors(cfg)
    t["backbone.embedding.weight"] = torch.zeros_like(t["backbone.embeddings.weight"])
    write_checkpoint(tmp_path / "src", t, cfg.to_dict())
    result = invoke(str(tmp_path / "src"), "-o", str(tmp_path / "x"))
    assert result.exit_code == 1 and result.stderr.count("Error:") == 1, result.output
    assert "backbone.embedding.weight and backbone.embeddings.weight are both backbone.embeddings.weight" \
        in result.stderr
    assert any("are both backbone.embeddings.weight" in p for p in inspect_checkpoint(tmp_path / "src").problems)


def test_a_tied_source_that_also_ships_lm_head_splits_with_the_embedding_as_head(tmp_path):
    """tie_word_embeddings: transformers' head is the embedding whatever lm_head.weight holds; so is ours."""
    cfg = small_config(tie_word_embeddings=True)
    src = random_checkpoint(tmp_path / "src", cfg, extra={"lm_head.weight": torch.zeros(64, 16, dtype=torch.bfloat16)})
    out = tmp_path / "out"
    result = invoke(str(src), "-o", str(out))
    assert result.exit_code == 0, result.output
    emb = raw_bytes(src, "backbone.embeddings.weight")
    assert raw_bytes(out, "lm_head.weight") == raw_bytes(out, "context_lm_head.weight") == emb


def test_one_shard_of_a_sharded_source_is_refused_by_name(tmp_path):
    src = random_checkpoint(tmp_path / "src", max_shard_size="4KB")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    result = invoke(str(shard), "-o", str(tmp_path / "x"))
    assert result.exit_code == 1, result.output
    assert f"{shard.name} is one shard of the checkpoint in {src}" in result.stderr.replace("\n", "")
    assert "missing tensor" not in result.stderr and leftovers(tmp_path, "x") == []


def test_tied_embeddings_missing_is_a_problem_line(tmp_path):
    cfg = small_config(tie_word_embeddings=True)
    t = random_tensors(cfg)
    del t["backbone.embeddings.weight"]
    write_checkpoint(tmp_path / "tied", t, cfg.to_dict())
    result = invoke(str(tmp_path / "tied"), "-o", str(tmp_path / "x"))
    assert result.exit_code == 1 and result.stderr.count("Error:") == 1, result.stderr
    assert "missing tensor backbone.embeddings.weight" in result.stderr and "KeyError" not in result.stderr
    assert leftovers(tmp_path, "x") == []


def test_a_quantized_source_is_refused(tmp_path):
    """An FP8 checkpoint's weights mean nothing without their scale tensors, which split would drop."""
    cfg = small_config()
    t = random_tensors(cfg)
    w = "backbone.layers.0.mixer.in_proj.weight"
    t[w] = t[w].to(torch.float8_e4m3fn)
    t[w + "_scale"] = torch.ones(())
    raw = cfg.to_dict() | {"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}}
    write_checkpoint(tmp_path / "fp8", t, raw)
    result = invoke(str(tmp_path / "fp8"), "-o", str(tmp_path / "x"))
    assert result.exit_code == 1 and "is a quantized checkpoint (FP8)" in result.stderr, result.stderr
    assert leftovers(tmp_path, "x") == []


def test_default_output_and_dry_run(tmp_path, monkeypatch):
    src = random_checkpoint(tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    result = invoke(str(src), "--dry-run")
    assert result.exit_code == 0 and "my-model-twotower" in result.stderr and "nothing written" in result.stderr
    assert not (tmp_path / "my-model-twotower").exists()
    assert invoke(str(src)).exit_code == 0
    assert inspect_checkpoint(tmp_path / "my-model-twotower").problems == []


def test_the_output_may_follow_the_source_as_in_cp(tmp_path):
    """`split SRC OUT` writes what `split SRC -o OUT` writes; both given is one error line and writes nothing."""
    src = random_checkpoint(tmp_path / "src")
    assert invoke(str(src), str(tmp_path / "pos")).exit_code == 0
    assert invoke(str(src), "-o", str(tmp_path / "opt")).exit_code == 0
    assert digest(tmp_path / "pos") == digest(tmp_path / "opt")
    both = invoke(str(src), str(tmp_path / "a"), "-o", str(tmp_path / "b"))
    assert both.exit_code == 1 and both.stderr.count("\n") == 1, both.output
    assert both.stderr.startswith(f"Error: two output folders given: {tmp_path / 'a'} and -o {tmp_path / 'b'}")
    assert leftovers(tmp_path, "a") == [] and leftovers(tmp_path, "b") == []


@pytest.mark.parametrize("args", [[], ["--max-shard-size", "20KB"], ["--dtype", "fp32", "--max-shard-size", "30KB"],
                                  ["--dtype", "bf16", "--max-shard-size", "7KB"]])
def test_dry_run_shows_the_files_the_real_run_writes(tmp_path, args):
    """Shard names, tensor counts and bytes (headers included) of the dry run's table are those of the files
    the real run writes, on a mixed fp32 / fp16 / bf16 source."""
    import re

    cfg = small_config()
    t = random_tensors(cfg, fp32_router=True)
    t["lm_head.weight"] = t["lm_head.weight"].half()
    t["backbone.embeddings.weight"] = t["backbone.embeddings.weight"].float()
    write_checkpoint(tmp_path / "src", t, cfg.to_dict(), max_shard_size="3KB")
    out = tmp_path / "out"
    dry = invoke(str(tmp_path / "src"), "-o", str(out), "--dry-run", *args)
    assert dry.exit_code == 0, dry.output
    table = {m[0]: (int(m[1]), int(m[2].replace(",", "")))
             for m in re.findall(r"│ (model[\w.-]*\.safetensors) +│ +(\d+) │ +([\d,]+) B │", dry.stderr)}
    assert invoke(str(tmp_path / "src"), "-o", str(out), *args).exit_code == 0
    written = open_checkpoint(out)
    assert table == {f: (len(written.shards[f].tensors), (out / f).stat().st_size) for f in written.files}


def test_dry_run_into_an_existing_output_says_the_real_run_needs_force(tmp_path):
    """A dry run into an OUT that exists said only "dry run: nothing written", where the real run stops at
    "already exists": it warns that the real run needs --force (with --force: that it replaces OUT); OUT is
    left as it was either way."""
    src = random_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    real = invoke(str(src), "-o", str(out))
    assert real.exit_code == 1 and "already exists" in real.stderr, real.output
    dry = invoke(str(src), "-o", str(out), "--dry-run")
    assert dry.exit_code == 0 and "nothing written" in dry.stderr, dry.output
    warnings = [ln for ln in dry.stderr.splitlines() if ln.startswith("Warning:")]
    assert warnings == [f"Warning: {out} already exists: the real run needs --force to replace it "
                        "(hint: add --force, or choose another -o)"], dry.stderr
    forced = invoke(str(src), "-o", str(out), "--dry-run", "--force")
    assert forced.exit_code == 0 and "Warning" not in forced.stderr, forced.output
    assert f"the real run replaces the existing {out}" in " ".join(forced.stderr.split()), forced.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    fresh = invoke(str(src), "-o", str(tmp_path / "new"), "--dry-run")
    assert fresh.exit_code == 0 and "Warning" not in fresh.stderr and "replaces" not in fresh.stderr, fresh.output


def test_tilde_in_output_is_the_home_folder(tmp_path, monkeypatch):
    """`--output=~/x` reaches us unexpanded (shells expand ~ only at the start of a word), as sources do."""
    src = random_checkpoint(tmp_path / "src")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert invoke(str(src), "--output=~/tt").exit_code == 0
    assert inspect_checkpoint(Path("~/tt").expanduser()).problems == [] and not (tmp_path / "~").exists()
    assert (tmp_path / "home" / "tt").is_dir()


def test_bracketed_paths_are_printed_as_they_are(tmp_path, monkeypatch):
    random_checkpoint(tmp_path / "base[v2]")
    monkeypatch.chdir(tmp_path)
    result = invoke("base[v2]", "-o", "out[bold]")
    assert result.exit_code == 0, result.output
    assert "split base[v2] → out[bold]" in result.stderr and "wrote out[bold]" in result.stderr, result.stderr


def test_alias_source_from_the_cache(tmp_path, monkeypatch):
    from test_hub import fake_cache

    snap = fake_cache(tmp_path / "hf", "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16", files={})
    snap.rmdir()
    random_checkpoint(snap)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    result = invoke("nemotron-3-nano")
    assert result.exit_code == 0, result.output
    conf = json.loads((tmp_path / "nemotron-3-nano-twotower" / "config.json").read_text())
    assert conf["twotower"]["source"] == "nemotron-3-nano"


@pytest.mark.parametrize("source,kind,message", [
    ("nemotron-labs-twotower", "twotower", "already a TwoTower checkpoint"),
    ("org/Nano-FP8", "fp8", "is a quantized checkpoint (FP8)"),
    ("org/Unsound", "unsound", "the source checkpoint is not sound"),
])
def test_a_source_split_cannot_take_is_refused_before_its_download(tmp_path, downloads, online, source, kind,
                                                                   message):
    """A hub source not in the cache is planned from its headers first (read from the hub as `inspect` reads
    them): one it cannot split is refused with nothing downloaded."""
    from twotower_cli.hub import repo_id_for, resolve

    folder = tmp_path / "repo"
    shutil.copytree(resolve("tiny" if kind == "twotower" else "tiny-base"), folder)
    if kind == "fp8":
        raw = json.loads((folder / "config.json").read_text())
        raw["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8"}
        (folder / "config.json").write_text(json.dumps(raw))
    if kind == "unsound":
        with open(folder / "model.safetensors", "r+b") as f:
            f.truncate((folder / "model.safetensors").stat().st_size - 1000)
    online.repos[repo_id_for(source)] = folder
    result = invoke(source, "-o", str(tmp_path / "out"))
    assert result.exit_code == 1 and message in " ".join(result.stderr.split()), result.output
    assert downloads == [] and "twotower-headers" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_hub_source_is_planned_then_downloaded_then_split(tmp_path, downloads, online, monkeypatch):
    """The plan is printed from the headers, with the download it needs (and a warning when the disk is short
    of both), then the source is downloaded and split as a local one is."""
    import shutil as sh
    from collections import namedtuple

    from twotower_cli.hub import resolve

    online.repos["org/base"] = resolve("tiny-base")
    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: namedtuple("u", "total used free")(10**12, 0, 15 * 10**6))
    result = invoke("org/base", "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    weights = (resolve("tiny-base") / "model.safetensors").stat().st_size
    assert f"downloading {weights / 1e6:.2f} MB of weights into the Hugging Face cache" in said
    # the output alone (13.4 MB) would fit in 15 MB, not with the download beside it on the same disk
    assert f"and downloads {weights / 1e6:.2f} MB into {tmp_path / 'hf' / 'hub'}, and that disk has 15.00 MB free" in said
    assert downloads == ["org/base"]
    monkeypatch.setattr(sh, "disk_usage", real)
    local = invoke(str(resolve("tiny-base")), "-o", str(tmp_path / "local"))
    assert local.exit_code == 0
    for f in (tmp_path / "local").iterdir():
        if f.suffix == ".safetensors":
            assert f.read_bytes() == (tmp_path / "out" / f.name).read_bytes()


def test_help_lists_aliases():
    result = runner.invoke(get_app(), ["split", "--help"])
    assert result.exit_code == 0
    assert "nemotron-3-nano" in result.output and "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16" in result.output


# ---------------------------------------------------------------------------------------------- 30B

def test_sparse_nano_dry_run_plan(tmp_path):
    folder = sparse_nano(tmp_path / "nano")
    t0 = time.perf_counter()
    result = invoke(str(folder), "--dry-run", "-o", str(tmp_path / "out"))
    seconds = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()
    plan = plan_split(*load_source(folder), "5GB", "keep", 3, 16, "nano")
    parts = plan.parts()
    H, L = 2688, 52
    time_params = H * 256 + H + H * H + H + 3 * H * H + 3 * H + L * 3 * H
    assert parts["context"]["parameters"] == parts["denoiser"]["parameters"] == 31_577_940_288
    assert parts["time"]["parameters"] == time_params
    assert parts["context"]["tensors"] == parts["denoiser"]["tensors"] == 6_243
    assert parts["time"]["tensors"] == len(time_conditioning_shapes(plan_cfg(folder))) == 6 + L
    assert "31,577,940,288" in result.stderr
    assert all(s.size <= 5 * 10**9 + len(s.header) for s in plan.shards)
    # One source run per tower shard, page-aligned like its source: copy_file_range moves whole pages.
    for shard in plan.shards:
        copies = [t for t in shard.tensors if t.src is not None]
        if copies:
            assert len({t.src.file for t in copies}) == 1 and len({t.part for t in copies}) == 1
            assert (copies[0].src.start - len(shard.header)) % 4096 == 0
    assert seconds < 10, f"dry run took {seconds:.1f} s"


def plan_cfg(folder: Path):
    return load_source(folder)[1]


@pytest.mark.parametrize("verify", [False, True])
def test_execute_reports_the_phases_after_the_copy(tmp_path, monkeypatch, verify):
    """After the bytes: "verify" (with --verify), then "sync" — said before the output goes to the disk, while
    it is not yet at OUT, and with every byte copied (the progress display's last wait)."""
    from twotower_cli import checkpoint

    src = random_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    ckpt, cfg = load_source(src)
    plan = plan_split(ckpt, cfg, "4KB", "keep", 3, 16)
    copied, seen, synced = [0], [], []
    real_sync = checkpoint._sync_tree
    monkeypatch.setattr(checkpoint, "_sync_tree", lambda folder: (synced.append(len(seen)), real_sync(folder)))

    def phase(name):
        seen.append((name, out.exists(), copied[0]))

    result = execute(plan, out, verify=verify, on_bytes=lambda n: copied.__setitem__(0, copied[0] + n),
                     on_phase=phase)
    total = plan.total_bytes - sum(len(s.header) for s in plan.shards)
    assert seen == [*([("verify", False, total)] if verify else []), ("sync", False, total)]
    assert synced == [len(seen)]  # the sync came after the last phase said so
    assert out.is_dir() and (result.bytes_verified > 0) == verify


# ---------------------------------------------------------------- spec §3, checked from the spec text alone

def _spec_read(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name → (dtype, shape, bytes), parsing safetensors by hand (8-byte length, JSON, data), index or not."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for file in files:
        data = (folder / file).read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        header.pop("__metadata__", None)
        for name, e in header.items():
            begin, end = e["data_offsets"]
            out[name] = (e["dtype"], tuple(e["shape"]), data[8 + n + begin:8 + n + end])
    return out


def _spec_pattern(c: dict) -> str:
    kinds = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "moe": "E", "mlp": "-"}
    return c.get("hybrid_override_pattern") or "".join(kinds[k] for k in c["layers_block_type"])


def _spec_tower(c: dict) -> dict[str, tuple[int, ...]]:
    """Spec §1's tensor table for one tower, names after `backbone.`, sizes from config.json's keys."""
    pattern = _spec_pattern(c)
    H, V = c["hidden_size"], c["vocab_size"]
    hd = c.get("head_dim") or H // c["num_attention_heads"]
    t = {"embeddings.weight": (V, H), "norm_f.weight": (H,)}
    for i, kind in enumerate(pattern):
        p = f"layers.{i}."
        t[p + "norm.weight"] = (H,)
        if kind == "M":
            heads = c["mamba_num_heads"]
            d_inner = heads * c["mamba_head_dim"]  # never from `expand`
            conv = d_inner + 2 * c["n_groups"] * c["ssm_state_size"]
            t |= {p + "mixer.in_proj.weight": (d_inner + conv + heads, H), p + "mixer.conv1d.weight": (conv, 1, c["conv_kernel"]),
                  p + "mixer.conv1d.bias": (conv,), p + "mixer.dt_bias": (heads,), p + "mixer.A_log": (heads,),
                  p + "mixer.D": (heads,), p + "mixer.norm.weight": (d_inner,), p + "mixer.out_proj.weight": (H, d_inner)}
        elif kind == "*":
            q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
            t |= {p + "mixer.q_proj.weight": (q, H), p + "mixer.k_proj.weight": (kv, H),
                  p + "mixer.v_proj.weight": (kv, H), p + "mixer.o_proj.weight": (H, q)}
        elif kind == "E":
            E, inter, shared = c["n_routed_experts"], c["moe_intermediate_size"], c["moe_shared_expert_intermediate_size"]
            t |= {p + "mixer.gate.weight": (E, H), p + "mixer.gate.e_score_correction_bias": (E,),
                  p + "mixer.shared_experts.up_proj.weight": (shared, H),
                  p + "mixer.shared_experts.down_proj.weight": (H, shared)}
            for j in range(E):
                t |= {p + f"mixer.experts.{j}.up_proj.weight": (inter, H), p + f"mixer.experts.{j}.down_proj.weight": (H, inter)}
        else:
            t |= {p + "mixer.up_proj.weight": (c["intermediate_size"], H), p + "mixer.down_proj.weight": (H, c["intermediate_size"])}
    return t


def assert_spec_twotower(src: Path, out: Path) -> None:
    """Spec §3, read as a loader that never saw this code would: config fields, the exact set of names and
    shapes, towers and heads byte copies of the source (legacy / module names allowed there), identity time
    conditioning (t_block.1 zero, tables rows shift 0, scale 0, gate 1)."""
    import numpy as np

    c_src = json.loads((src / "config.json").read_text())
    c_out = json.loads((out / "config.json").read_text())
    assert c_out["architectures"] == ["NemotronHTwoTowerForCausalLM"] and c_out["model_type"] == "nemotron_h"
    for key, value in c_src.items():  # every source key kept (auto_map may shrink), unknown ones included
        if key not in ("architectures", "auto_map"):
            assert json.dumps(c_out.get(key)) == json.dumps(value), key
    H = c_src["hidden_size"]
    tower = _spec_tower(c_src)
    want = {f"{side}_tower.{k}": v for k, v in tower.items() for side in ("context", "denoiser")}
    want |= {"context_lm_head.weight": (c_src["vocab_size"], H), "lm_head.weight": (c_src["vocab_size"], H),
             "t_embedder.mlp.0.weight": (H, 256), "t_embedder.mlp.0.bias": (H,), "t_embedder.mlp.2.weight": (H, H),
             "t_embedder.mlp.2.bias": (H,), "t_block.1.weight": (3 * H, H), "t_block.1.bias": (3 * H,)}
    want |= {f"scale_shift_tables.{i}": (3, H) for i in range(len(_spec_pattern(c_src)))}
    got = _spec_read(out)
    assert {k: v[1] for k, v in got.items()} == want
    source = {k.replace("model.", "backbone.", 1).replace("backbone.embedding.", "backbone.embeddings."): v
              for k, v in _spec_read(src).items()}
    for name, (dtype, _shape, data) in got.items():
        if name.endswith("lm_head.weight"):
            assert (dtype, data) == source["lm_head.weight"][::2], name
        elif "_tower." in name:
            assert (dtype, data) == source["backbone." + name.split("_tower.", 1)[1]][::2], name
        elif name.startswith(("t_block.1.", "scale_shift_tables.")):
            as_f32 = {"F32": "<f4", "F16": "<f2"}
            values = (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" \
                else np.frombuffer(data, as_f32[dtype]).astype(np.float32)
            expect = np.zeros(len(values), np.float32)
            if name.startswith("scale_shift_tables."):
                expect[2 * H:] = 1.0
            assert np.array_equal(values, expect), name


@pytest.mark.parametrize("source", ["ours", "ours-sharded-legacy-mixed", "transformers"])
def test_split_output_is_spec_section_3(tmp_path, source):
    if source == "transformers":
        src = hf_written(tmp_path / "src", sharded=True)
    elif source == "ours":
        src = random_checkpoint(tmp_path / "src")
    else:  # legacy embedding name, fp32 / fp16 / bf16 tensors side by side, several shards
        cfg = small_config()
        t = random_tensors(cfg, fp32_router=True)
        t["backbone.embedding.weight"] = t.pop("backbone.embeddings.weight").float()
        t["lm_head.weight"] = t["lm_head.weight"].half()
        src = tmp_path / "src"
        write_checkpoint(src, t, cfg.to_dict(), max_shard_size="4KB")
    out = tmp_path / "out"
    result = invoke(str(src), "-o", str(out), "--max-shard-size", "30KB")
    assert result.exit_code == 0, result.output
    assert_spec_twotower(src, out)


def test_a_config_deeper_than_its_weights_is_counted_by_split_and_inspect(tmp_path):
    """A config.json of more layers than its weights: split said "(and 10 more)" of hundreds of missing
    tensors (the "... and N more" line counted as one problem) and inspect "11 problems"; both now count
    every one, and say how many layers each side holds."""
    cfg = small_config()
    src = random_checkpoint(tmp_path / "src", cfg)
    raw = json.loads((src / "config.json").read_text())
    raw["hybrid_override_pattern"] = cfg.pattern * 3
    raw["num_hidden_layers"] = 3 * len(cfg.pattern)
    (src / "config.json").write_text(json.dumps(raw))
    deep = small_config(hybrid_override_pattern=cfg.pattern * 3, num_hidden_layers=3 * len(cfg.pattern))
    want = {k: v for k, v in nemotron_h_shapes(deep).items() if k not in nemotron_h_shapes(cfg)}  # layers 6..17
    depth = f"config.json describes {3 * len(cfg.pattern)} layers where the weights hold {len(cfg.pattern)}"
    r = invoke(str(src), "-o", str(tmp_path / "out"))
    assert r.exit_code == 1 and not (tmp_path / "out").exists(), r.output
    assert f"(and {len(want) - 1} more) (hint: {depth}: use the config.json they were saved with)" in r.stderr, r.stderr
    r = CliRunner().invoke(get_app(), ["inspect", str(src)])
    text = " ".join(r.stderr.split() + r.stdout.split())
    assert r.exit_code == 1 and f"note: {depth}" in text and f"not sound: {len(want)} problems:" in text, text
    assert len(inspect_checkpoint(src).problems) == 11  # 10 named, then the count of the others


def test_a_disk_too_small_for_the_output_is_said_before_the_copy(tmp_path, monkeypatch):
    """The output is written whole beside OUT before it is renamed into place: with less free space than that on
    OUT's disk, one `Warning:` says so before the copy starts (a full disk would stop it minutes later); the
    run goes on (free space is the file system's estimate), and with room enough nothing is said."""
    import shutil
    from collections import namedtuple

    src = random_checkpoint(tmp_path / "src")
    out = tmp_path / "new" / "out"  # its folder does not exist yet: the nearest one that does is measured
    usage = namedtuple("usage", "total used free")
    seen = []

    def free_space(free):
        def disk_usage(path):
            seen.append(Path(path))
            return usage(10**12, 10**12 - free, free)
        monkeypatch.setattr(shutil, "disk_usage", disk_usage)

    free_space(1000)
    dry = invoke(str(src), "-o", str(out), "--dry-run")
    assert seen == [tmp_path] and dry.stderr.count("Warning:") == 1
    real = invoke(str(src), "-o", str(out))
    assert real.exit_code == 0 and real.stderr.count("Warning:") == 1 and inspect_checkpoint(out).problems == []
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    said = " ".join(real.stderr.split())
    assert weights < 10**5 and f"Warning: split writes {weights:,} B beside {out}, and that disk has 1,000 B free" in said
    free_space(weights)  # room for exactly what it writes
    assert "Warning" not in invoke(str(src), "-o", str(out), "--force", "--dry-run").stderr
    free_space(weights - 1)
    assert "Warning: split writes" in invoke(str(src), "-o", str(out), "--force", "--dry-run").stderr


def _one_error_writing_to(out: Path, tmp_path: Path, command: str) -> str:
    """`split` (of a random checkpoint) or `train` (of tiny) with `-o out --force`: its one Error line."""
    src = random_checkpoint(tmp_path / "src")
    (tmp_path / "corpus.txt").write_text("w3 w4 w5 w6 " * 200)
    args = (["split", str(src), "-o", str(out)] if command == "split" else
            ["train", "tiny", "--data", str(tmp_path / "corpus.txt"), "-o", str(out), "--steps", "1",
             "--seq-len", "32", "--batch", "2", "--eval-every", "0"])
    r = CliRunner().invoke(get_app(), [*args, "--force"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    return lines[0]


@pytest.mark.parametrize("command", ["split", "train"])
def test_an_output_that_is_a_file_is_refused_even_with_force(tmp_path, command):
    """`split SRC -o notes.txt --force` deleted notes.txt and wrote a checkpoint folder by its name (train too):
    --force replaces an earlier output folder, not a file that happens to sit at -o."""
    target = tmp_path / "notes.txt"
    target.write_text("my notes\n")
    assert _one_error_writing_to(target, tmp_path, command) == (
        f"Error: the output {target} is a file, not a folder: the output is a checkpoint folder, and --force "
        "replaces only an earlier output folder (hint: choose another -o)")
    assert target.read_text() == "my notes\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "corpus.txt", "notes.txt", "src"]


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_source_without_a_tokenizer_is_warned_of(tmp_path, dry_run):
    """A source without tokenizer.json split without a word, and its output then failed at generate's first
    prompt ("no tokenizer.json in …"): a Warning says so at the split, which still writes the (sound) weights."""
    extra = ["--dry-run"] if dry_run else []
    for tokenizer in (False, True):
        src = random_checkpoint(tmp_path / f"src-{tokenizer}", tokenizer=tokenizer)
        out = tmp_path / f"out-{tokenizer}"
        r = CliRunner().invoke(get_app(), ["split", str(src), "-o", str(out), *extra])
        assert r.exit_code == 0, r.output
        warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")]
        if tokenizer:
            assert warnings == [] and (dry_run or (out / "tokenizer.json").is_file()), r.stderr
        else:
            assert warnings == [f"Warning: {src} has no tokenizer.json: {out} will not generate, chat, serve or train "
                                "until one is put beside it (hint: copy the tokenizer files of the model it came "
                                "from into it)"], r.stderr
            assert out.is_dir() != dry_run


@pytest.mark.parametrize("command", ["split", "train"])
def test_an_output_that_is_a_symbolic_link_is_refused(tmp_path, command):
    """`-o ckpt` where ckpt → /scratch/ckpt: --force (and train --resume, which read through the link) put the
    new output in place of the link, on the link's disk, and left the folder it pointed to stale."""
    real = tmp_path / "scratch"
    real.mkdir()
    (real / "keep.txt").write_text("x")
    link = tmp_path / "ckpt"
    link.symlink_to(real)
    assert _one_error_writing_to(link, tmp_path, command) == (
        f"Error: the output {link} is a symbolic link (to {real}): the new output would replace the link, and what "
        f"it points to would stay as it was (hint: pass -o {real})")
    assert link.is_symlink() and sorted(p.name for p in real.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(("mask", "warned"), [(2, "end token (eos_token_id)"), (1, "beginning token (bos_token_id)"),
                                              (0, "padding token (pad_token_id)"), (3, None)])
def test_a_mask_id_that_is_a_special_token_is_warned_of(mask, warned):
    """`--mask-token-id 2` (tiny-base's </s>) split without a word: a denoiser trained on it fills blocks with
    the end token. A Warning names the clash; the split still runs (the id is the user's to choose)."""
    r = CliRunner().invoke(get_app(), ["split", "tiny-base", "-o", "never-written", "--mask-token-id", str(mask),
                                       "--dry-run"])
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")]
    if warned is None:
        assert warnings == [], warnings
    else:
        assert warnings == [f"Warning: --mask-token-id {mask} is the model's {warned}: the denoiser would treat that "
                            "token as a mask (hint: use an id the model keeps for masks (Nemotron's <mask> is 3))"]


def test_split_takes_the_dtype_spellings_the_other_commands_take(tmp_path):
    """`split --dtype float16` was "unknown --dtype" where train, eval and generate take float16 and bfloat16."""
    src = random_checkpoint(tmp_path / "src")
    from twotower_cli.split import load_source, plan_split

    for alias, short in (("float16", "fp16"), ("bfloat16", "bf16"), ("float32", "fp32")):
        a, b = plan_split(*load_source(src), dtype=alias), plan_split(*load_source(src), dtype=short)
        assert a.dtype == short and a.config == b.config and a.total_bytes == b.total_bytes
