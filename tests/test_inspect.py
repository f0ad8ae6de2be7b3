"""inspect: exact counts on tiny checkpoints (ours and transformers-written), one problem line per
corruption and exit 1, header-only reading, TwoTower fields, the 30B-shaped sparse checkpoint."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers_ckpt import (
    hf_written,
    random_checkpoint,
    random_tensors,
    small_config,
    sparse_nano,
    write_word_tokenizer,
)
from twotower_cli.checkpoint import INDEX_NAME, save_tensors
from twotower_cli.cli import get_app
from twotower_cli.errors import TwoTowerError
from twotower_cli.inspect import inspect_checkpoint
from twotower_cli.layout import nemotron_h_shapes, time_conditioning_shapes

runner = CliRunner()


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def expected_active(cfg) -> int:
    """Independent of inspect: all parameters minus the routed experts a token skips."""
    shapes = nemotron_h_shapes(cfg)
    expert = numel(shapes["backbone.layers.2.mixer.experts.0.up_proj.weight"]) * 2
    idle = cfg.pattern.count("E") * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    return sum(numel(s) for s in shapes.values()) - idle


def invoke(*args: str):
    return runner.invoke(get_app(), ["inspect", *args])


@pytest.fixture
def sharded(tmp_path) -> Path:
    return random_checkpoint(tmp_path / "sharded", max_shard_size="3KB")


# ---------------------------------------------------------------------------------------------- counts

@pytest.mark.parametrize("shard", ["5GB", "3KB"])
def test_exact_counts_on_our_checkpoints(tmp_path, shard):
    cfg = small_config()
    folder = random_checkpoint(tmp_path / "c", cfg, max_shard_size=shard, fp32_router=True)
    shapes = nemotron_h_shapes(cfg)
    r = inspect_checkpoint(folder)
    assert r.layout == "nemotron_h" and r.problems == []
    assert r.pattern == "M*E-ME" and r.num_layers == 6
    assert r.tensors == len(shapes) == 55
    assert r.parameters == {"total": sum(numel(s) for s in shapes.values())}
    assert r.active_parameters_per_token == expected_active(cfg)
    n_fp32 = sum(1 for n in shapes if n.endswith(("A_log", ".D", "dt_bias", "gate.weight", "correction_bias")))
    assert r.dtypes == {"BF16": len(shapes) - n_fp32, "F32": n_fp32}
    assert r.bytes == sum(numel(s) * (4 if n in () else 2) for n, s in shapes.items()) + 2 * sum(
        numel(shapes[n]) for n in shapes if n.endswith(("A_log", ".D", "dt_bias", "gate.weight", "correction_bias")))
    by_kind = r.parameters_by_kind
    assert by_kind["embeddings"] == by_kind["lm_head"] == 64 * 16
    assert sum(by_kind.values()) == r.parameters["total"]
    assert by_kind["attention"] == sum(numel(s) for n, s in shapes.items() if n.startswith("backbone.layers.1."))
    assert len(r.shards) == (1 if shard == "5GB" else len(list(folder.glob("*.safetensors"))))


@pytest.mark.hf
@pytest.mark.parametrize("original_format", [True, False])
def test_exact_counts_on_transformers_checkpoints(tmp_path, original_format):
    folder = hf_written(tmp_path / "hf", sharded=True, original_format=original_format)
    cfg = small_config()
    shapes = nemotron_h_shapes(cfg)
    r = inspect_checkpoint(folder)
    assert r.layout == "nemotron_h", r.problems
    assert r.problems == []
    assert r.parameters["total"] == sum(numel(s) for s in shapes.values())
    # transformers counts parameters only; the e_score_correction_bias buffers are saved too.
    hf_count = json.loads((folder / INDEX_NAME).read_text())["metadata"]["total_parameters"]
    assert r.parameters["total"] == hf_count + cfg.pattern.count("E") * cfg.n_routed_experts == 11_408
    assert r.active_parameters_per_token == expected_active(cfg)
    n_moe = cfg.pattern.count("E")
    # save_original_format=False keeps transformers' fused [E, out, in] expert stacks: 2 tensors per layer.
    assert r.tensors == len(shapes) - (0 if original_format else n_moe * (2 * cfg.n_routed_experts - 2))
    assert r.dtypes["F32"] == r.tensors
    assert any("unfused" in n for n in r.notes) != original_format


def test_header_only(tmp_path, sharded, monkeypatch):
    """Nothing reads tensor data: safetensors is never opened and no file is read past its header."""
    def boom(*a, **k):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr("safetensors.safe_open", boom)
    monkeypatch.setattr("safetensors.torch.load_file", boom)
    monkeypatch.setattr("os.pread", boom)
    assert inspect_checkpoint(sharded).problems == []
    assert invoke(str(sharded)).exit_code == 0


# ---------------------------------------------------------------------------------------------- corruptions

def problems_of(folder: Path) -> list[str]:
    result = invoke(str(folder), "--json")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return json.loads(result.stdout)["problems"]


def edit_index(folder: Path, fn) -> None:
    idx = json.loads((folder / INDEX_NAME).read_text())
    fn(idx["weight_map"])
    (folder / INDEX_NAME).write_text(json.dumps(idx))


def test_missing_shard(sharded):
    (sharded / "model-00002-of-00016.safetensors").unlink() if (sharded / "model-00002-of-00016.safetensors").exists() \
        else sorted(sharded.glob("model-*.safetensors"))[1].unlink()
    probs = problems_of(sharded)
    assert any(p.startswith("shard model-00002-of-") and p.endswith("named in the index is missing") for p in probs)
    assert not any(p.startswith("missing tensor") for p in probs)  # said once, by the shard line


def test_tensor_listed_but_absent_from_its_shard(sharded):
    edit_index(sharded, lambda wm: wm.__setitem__("backbone.layers.0.mixer.ghost", next(iter(wm.values()))))
    probs = problems_of(sharded)
    assert any("backbone.layers.0.mixer.ghost is listed in the index under" in p and "does not hold it" in p
               for p in probs)


def test_tensor_present_but_unlisted(sharded):
    edit_index(sharded, lambda wm: wm.pop("backbone.norm_f.weight"))
    probs = problems_of(sharded)
    assert any(p.startswith("backbone.norm_f.weight is in") and "the index does not list it" in p for p in probs)


def test_tensor_in_two_shards(sharded):
    t = random_tensors(small_config())
    save_tensors(sharded, {"extra.weight": t["lm_head.weight"], "backbone.norm_f.weight": t["backbone.norm_f.weight"]})
    (sharded / "model.safetensors").rename(sharded / "model-extra.safetensors")
    edit_index(sharded, lambda wm: wm.__setitem__("extra.weight", "model-extra.safetensors"))
    probs = problems_of(sharded)
    assert any(p.startswith("backbone.norm_f.weight appears in more than one shard: model-") for p in probs)


def data_spans(f: Path) -> tuple[int, list[tuple[int, int, str]]]:
    """The data section's start and every tensor's (begin, end, name) in it, read straight from the header."""
    n = struct.unpack("<Q", f.read_bytes()[:8])[0]
    header = json.loads(f.read_bytes()[8:8 + n])
    return 8 + n, sorted((*v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_data_is_one_line(tmp_path, keep):
    folder = random_checkpoint(tmp_path / "c")
    f = folder / "model.safetensors"
    start, spans = data_spans(f)
    size = int(f.stat().st_size * keep)
    with open(f, "r+b") as fh:
        fh.truncate(size)
    cut = [name for _b, e, name in spans if e > size - start]
    assert problems_of(folder) == [
        f"model.safetensors is truncated: its tensors need {spans[-1][1]:,} data bytes, it holds {size - start:,} "
        f"({len(cut)} tensor{'s' * (len(cut) > 1)} cut short, from {cut[0]})"]


def test_bytes_that_belong_to_no_tensor(tmp_path):
    """safetensors refuses a file whose tensors do not cover its data exactly (bytes appended, say)."""
    from safetensors import safe_open

    folder = random_checkpoint(tmp_path / "c")
    f = folder / "model.safetensors"
    with open(f, "ab") as fh:
        fh.write(b"\0" * 24)
    with pytest.raises(Exception, match="not fully covered"), safe_open(str(f), "pt"):
        pass
    assert problems_of(folder) == ["model.safetensors: 24 data bytes after the last tensor belong to no tensor "
                                   "(safetensors refuses such a file)"]


def test_a_gap_between_tensors(tmp_path):
    from safetensors import safe_open

    folder = random_checkpoint(tmp_path / "c")
    f = folder / "model.safetensors"
    raw = f.read_bytes()
    start, spans = data_spans(f)
    header = json.loads(raw[8:start])
    (_b0, _e0, before), (b1, e1, gone), (_b2, _e2, after) = spans[3:6]
    del header[gone]  # its bytes stay where they are, owned by no tensor
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[start:])
    with pytest.raises(Exception, match="offset"), safe_open(str(f), "pt"):
        pass
    assert problems_of(folder) == [f"model.safetensors: data bytes {b1}..{e1} between {before} and {after} "
                                   "belong to no tensor",
                                   f"missing tensor {gone} (the config expects {list(nemotron_h_shapes(small_config())[gone])})"]


@pytest.mark.parametrize("edit", ["float offset", "string shape", "metadata list"])
def test_header_types_safetensors_refuses(tmp_path, edit):
    from safetensors import safe_open

    folder = random_checkpoint(tmp_path / "c")
    f = folder / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    entry = header["backbone.norm_f.weight"]
    if edit == "float offset":
        entry["data_offsets"] = [float(entry["data_offsets"][0]), entry["data_offsets"][1]]
    elif edit == "string shape":
        entry["shape"] = [str(s) for s in entry["shape"]]
    else:
        header["__metadata__"] = ["pt"]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(Exception, match="invalid"), safe_open(str(f), "pt"):
        pass
    probs = problems_of(folder)
    assert probs and all("model.safetensors" in p or "no tensors" in p for p in probs)


@pytest.mark.parametrize("how", ["tiny", "length"])
def test_truncated_or_corrupt_header(sharded, how):
    f = sorted(sharded.glob("model-*.safetensors"))[0]
    if how == "tiny":
        f.write_bytes(b"\x01\x02")
    else:
        data = bytearray(f.read_bytes())
        data[:8] = struct.pack("<Q", len(data) * 2)
        f.write_bytes(bytes(data))
    probs = problems_of(sharded)
    assert any(f.name in p and ("truncated" in p or "does not fit" in p) for p in probs)
    result = invoke(str(sharded), "--json")
    data = json.loads(result.stdout)
    assert result.exit_code == 1 and data["sound"] is False
    row = next(r for r in data["shards"] if r["file"] == f.name)
    assert row["status"] == "unreadable" and row["bytes"] == f.stat().st_size  # the file's size, not 0
    assert "✗ not sound: " in invoke(str(sharded)).stderr


@pytest.mark.parametrize("where", ["../elsewhere/model.safetensors", "/tmp/model.safetensors", "sub/model.safetensors"])
def test_an_index_naming_files_outside_its_folder_is_corrupt(sharded, tmp_path, where):
    """Shards are files beside the index. One elsewhere was read as if it were here (inspect: sound) and
    split then failed with 'No such file' on the basename; now both say the index is corrupt (inspect as a
    problem of its report)."""
    from twotower_cli.split import load_source

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = where
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert any(f"places tensors in {where!r}, which is not a file of" in p for p in problems_of(sharded))
    with pytest.raises(TwoTowerError, match="which is not a file of"):
        load_source(sharded)


def write_with(folder: Path, tensors: dict[str, torch.Tensor], cfg=None) -> Path:
    from twotower_cli.checkpoint import write_checkpoint

    return write_checkpoint(folder, tensors, (cfg or small_config()).to_dict())


def test_missing_unexpected_and_wrong_shape_tensors(tmp_path):
    t = random_tensors(small_config())
    del t["backbone.layers.0.mixer.A_log"]
    t["backbone.layers.3.mixer.up_proj.weight"] = torch.zeros(7, 16)
    t["backbone.layers.0.mixer.bogus.weight"] = torch.zeros(2)
    probs = problems_of(write_with(tmp_path / "c", t))
    assert "missing tensor backbone.layers.0.mixer.A_log (the config expects [4])" in probs
    assert "backbone.layers.3.mixer.up_proj.weight has shape [7, 16], the config expects [24, 16]" in probs
    assert "unexpected tensor backbone.layers.0.mixer.bogus.weight (the config does not explain it)" in probs
    assert len(probs) == 3


def test_tensors_outside_the_model_are_noted_as_split_drops_them(tmp_path):
    """A source key outside the model's namespace (a vision tower, a tied model's extra lm_head.weight) is
    dropped by split with a note, so the checkpoint splits; inspect called it a problem ("not sound", exit 1).
    Both judge it alike now; a key inside the model the config does not explain stays a problem for both."""
    cfg = small_config(tie_word_embeddings=True)
    t = random_tensors(cfg) | {"vision_tower.proj.weight": torch.zeros(4, 4), "lm_head.weight": torch.zeros(256, 16)}
    folder = write_with(tmp_path / "c", t, cfg)
    r = invoke(str(folder), "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["problems"] == []
    assert "2 tensors outside the model the config describes (e.g. lm_head.weight); split drops them" in report["notes"]
    s = runner.invoke(get_app(), ["split", str(folder), "-o", str(tmp_path / "out")])
    assert s.exit_code == 0 and "dropped 2 tensors the config does not explain" in s.stderr, s.output


def test_mtp_tensors_are_noted_not_problems(tmp_path):
    t = random_tensors(small_config()) | {"mtp.layers.0.norm.weight": torch.ones(16)}
    r = inspect_checkpoint(write_with(tmp_path / "c", t))
    assert r.problems == [] and any("mtp.layers.0.norm.weight" in n for n in r.notes)


@pytest.mark.parametrize("config,architecture,problem", [
    ([1], "?", "config.json is not a JSON object"),
    ({"architectures": "NemotronHForCausalLM"}, "NemotronHForCausalLM", None),
    ({"architectures": [1]}, "1", None),
])
def test_odd_config_json_is_reported_not_a_crash(tmp_path, config, architecture, problem):
    folder = random_checkpoint(tmp_path / "c")
    if isinstance(config, dict):
        config = json.loads((folder / "config.json").read_text()) | config
    (folder / "config.json").write_text(json.dumps(config))
    result = invoke(str(folder), "--json")
    assert "Traceback" not in result.output and "Error:" not in result.output, result.output
    report = json.loads(result.stdout)
    assert report["architecture"] == architecture
    assert report["problems"] == ([problem] if problem else [])


def test_bracketed_names_are_printed_as_they_are(tmp_path, monkeypatch):
    """Paths and names are not rich markup: `ckpt[v2]` printed as `ckpt`, `[bold]` vanished into style."""
    monkeypatch.chdir(tmp_path)
    random_checkpoint(tmp_path / "ckpt[v2]")
    (tmp_path / "ckpt[v2]" / "generation_config.json").write_text("{")  # a problem line that names the path
    result = invoke("ckpt[v2]")
    assert result.exit_code == 1
    assert "checkpoint       ckpt[v2]" in result.stderr
    assert "✗ ckpt[v2]/generation_config.json is not valid JSON" in result.stderr, result.stderr


def test_one_shard_of_a_sharded_checkpoint_says_so(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    r = inspect_checkpoint(shard)
    assert any(p.startswith("missing tensor") for p in r.problems)  # the others' tensors: missing from this file
    assert any(n.startswith(f"{shard.name} is one shard of the checkpoint") for n in r.notes), r.notes
    assert not any("is one shard" in n for n in inspect_checkpoint(sharded).notes)


def test_unknown_layout_names_its_keys(tmp_path):
    folder = write_with(tmp_path / "c", {"transformer.h.0.attn.weight": torch.zeros(2),
                                         "transformer.h.1.attn.weight": torch.zeros(2), "wte.weight": torch.zeros(2)})
    result = invoke(str(folder), "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["layout"] == "unknown"
    assert "transformer.h.* (2 tensors)" in data["unrecognised_keys"]
    assert any("transformer.h.*" in p for p in data["problems"])


def test_no_tensors_is_a_problem(tmp_path):
    """A well-formed safetensors file that holds no tensors (and an unreadable one) is not a sound checkpoint,
    and the report says so in words instead of listing an empty set of unrecognised names."""
    folder = tmp_path / "c"
    folder.mkdir()
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    result = invoke(str(folder), "--json")
    assert result.exit_code == 1
    probs = json.loads(result.stdout)["problems"]
    assert "no tensors could be read from it" in probs
    assert not any("match neither" in p for p in probs)


def test_no_config(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    save_tensors(folder, random_tensors(small_config()))
    assert any("no config.json" in p for p in problems_of(folder))


# ---------------------------------------------------------------------------------------------- output

def test_json_fields(sharded):
    result = invoke(str(sharded), "--json", "--tensors")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("layout", "pattern", "num_layers", "parameters", "active_parameters_per_token", "tensors",
                "bytes", "dtypes", "problems"):
        assert key in data
    assert data["layout"] == "nemotron_h" and data["pattern"] == "M*E-ME" and data["num_layers"] == 6
    assert data["tensors"] == 55 and data["dtypes"] == {"BF16": 55} and data["problems"] == []
    assert data["sound"] is True
    assert len(data["tensor_list"]) == 55
    assert result.stderr == ""  # --json: nothing for people


def test_human_output(sharded):
    result = invoke(str(sharded), "--tensors")
    assert result.exit_code == 0
    err = result.stderr
    for text in ("NemotronH single tower", "M Mamba-2 ×2", "* attention ×1", "E MoE ×2", "- MLP ×1",
                 "✓ sound: no problems found", "backbone.layers.0.mixer.in_proj.weight", "model-00001-of-"):
        assert text in err
    assert result.stdout == ""


def test_single_file_and_bad_input(tmp_path):
    folder = random_checkpoint(tmp_path / "c")
    assert invoke(str(folder / "model.safetensors")).exit_code == 0
    result = invoke(str(tmp_path / "nope"))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error:") and result.stderr.count("Error:") == 1
    assert "Traceback" not in result.output


def test_cached_hub_name_offline(tmp_path, monkeypatch):
    from test_hub import fake_cache

    home = tmp_path / "hf"
    snap = fake_cache(home, "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16", files={})
    snap.rmdir()
    random_checkpoint(snap)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("nemotron-3-nano", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tensors"] == 55
    assert invoke("nvidia/Some-Other-Model").exit_code == 1


def test_twotower_fields(tmp_path):
    from twotower_cli.split import execute, load_source, plan_split

    cfg = small_config()
    src = random_checkpoint(tmp_path / "src", cfg)
    plan = plan_split(*load_source(src), "5GB", "keep", 5, 8, "src-name")
    out = execute(plan, tmp_path / "out").out
    r = inspect_checkpoint(out)
    total = sum(numel(s) for s in nemotron_h_shapes(cfg).values())
    time_params = sum(numel(s) for s in time_conditioning_shapes(cfg).values())
    assert r.layout == "twotower" and r.problems == []
    assert r.parameters == {"total": 2 * total + time_params, "context_tower": total, "denoiser_tower": total,
                            "time_conditioning": time_params}
    assert r.active_parameters_per_token == 2 * expected_active(cfg) + time_params
    assert r.twotower["cross_attention"] == [{"denoiser_layer": 1, "context_layer": 1}]
    assert "bidirectional" in r.twotower["denoiser_attention"]
    assert r.twotower["time_conditioning"] == "identity"
    assert (r.twotower["mask_token_id"], r.twotower["block_size"], r.source) == (5, 8, "src-name")
    # Nudge one gate entry: now it is trained.
    info = __import__("twotower_cli.checkpoint", fromlist=["x"]).open_checkpoint(out).tensors["scale_shift_tables.3"]
    with open(out / info.file, "r+b") as f:
        f.seek(info.file_range[1] - 2)
        f.write(b"\x00\x40")
    assert inspect_checkpoint(out).twotower["time_conditioning"] == "trained"
    result = invoke(str(out))
    assert "TwoTower" in result.stderr and "1↔1" in result.stderr and "trained" in result.stderr


def test_truncated_twotower_time_conditioning_is_unknown_and_its_shard_not_ok(tmp_path):
    """A shard cut short before the time-conditioning bytes: those bytes were not read, so they are neither
    'identity' nor 'trained'; and the shard's row does not say 'ok' beside a truncation problem."""
    from twotower_cli.checkpoint import open_checkpoint
    from twotower_cli.split import execute, load_source, plan_split

    src = random_checkpoint(tmp_path / "src", small_config())
    out = execute(plan_split(*load_source(src), "5GB", "keep", 5, 8, "src-name"), tmp_path / "out").out
    ckpt = open_checkpoint(out)
    first = min(ckpt.tensors[n].file_range[0] for n in ckpt.tensors if n.startswith(("t_block.", "scale_shift")))
    f = out / ckpt.tensors["t_block.1.weight"].file
    with open(f, "r+b") as fh:
        fh.truncate(first)
    r = inspect_checkpoint(out)
    assert any("truncated" in p for p in r.problems)
    assert r.twotower["time_conditioning"] == "unknown"
    assert [s["status"] for s in r.shards if s["file"] == f.name] == ["truncated"]


# ---------------------------------------------------------------------------------------------- 30B

def test_sparse_nano_totals_under_a_second(tmp_path):
    folder = sparse_nano(tmp_path / "nano")
    best = float("inf")
    for _ in range(2):  # best of two: the machine is shared
        t0 = time.perf_counter()
        r = inspect_checkpoint(folder)
        best = min(best, time.perf_counter() - t0)
    assert r.problems == []
    assert r.parameters["total"] == 31_577_940_288
    assert r.tensors == 6_243 and len(r.shards) == 13 and r.num_layers == 52
    assert r.active_parameters_per_token == 3_580_076_352  # 2.20 B outside routed experts + 6 of 128 experts
    assert r.bytes == 2 * 31_577_940_288
    assert best < 1.0, f"inspect took {best:.2f} s"


def test_text_files(tmp_path):
    """The files generation reads beside the weights: tokenizer present or noted, the chat template's file,
    the end tokens (config.json's, then generation_config.json's), and unreadable ones as problems."""
    folder = random_checkpoint(tmp_path / "c", tokenizer=False)
    data = json.loads(invoke(str(folder), "--json").stdout)
    assert data["text"] == {"tokenizer": False, "tokens": None, "tokenizer_error": None, "chat_template": None,
                            "eos_token_ids": [2]}
    assert any("no tokenizer.json" in n for n in data["notes"]) and data["problems"] == []
    write_word_tokenizer(folder, 20)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 11]}))
    result = invoke(str(folder), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["text"] == {"tokenizer": True, "tokens": 20, "tokenizer_error": None,
                            "chat_template": "tokenizer_config.json", "eos_token_ids": [2, 11]}
    assert not any("tokenizer" in n for n in data["notes"])
    (folder / "chat_template.jinja").write_text("{{ messages }}")  # takes precedence, as in transformers
    human = invoke(str(folder))
    shown = " ".join(human.stderr.split())  # the line wraps at the test console's 80 columns
    assert "text: tokenizer.json ✓ (20 tokens) · chat template chat_template.jinja · ends on 2, 11" in shown
    (folder / "generation_config.json").write_text('{"eos_token_id": "eleven"}')
    problems = problems_of(folder)
    assert len(problems) == 1 and "generation_config.json" in problems[0]


@pytest.mark.parametrize("content", ["{}", "garbage\n", '{"version": "1.0", "model": {"type": "BPE"}}'])
def test_a_tokenizer_that_does_not_read_is_a_problem_not_a_tick(tmp_path, content):
    """inspect said `tokenizer.json ✓` for any file of that name, and "sound"; generate then stopped at "cannot
    read …/tokenizer.json". It reads the file as generate does: one that does not read is a problem."""
    folder = random_checkpoint(tmp_path / "c")
    (folder / "tokenizer.json").write_text(content)
    r = invoke(str(folder), "--json")
    data = json.loads(r.stdout)
    assert r.exit_code == 1 and data["text"]["tokenizer"] is True and data["text"]["tokens"] is None, r.output
    assert data["problems"] == [data["text"]["tokenizer_error"]], data["problems"]
    assert data["problems"][0].startswith(f"cannot read {folder / 'tokenizer.json'}: ")
    human = invoke(str(folder))
    assert "text: tokenizer.json unreadable · " in human.stderr and "not sound: 1 problem" in human.stderr


def test_a_tokenizer_larger_than_the_vocabulary_is_noted(tmp_path):
    """A tokenizer with more ids than the embeddings (vocab_size 64 here) is another model's, or text holding
    its last tokens cannot run: a note naming both sizes."""
    folder = random_checkpoint(tmp_path / "c")
    write_word_tokenizer(folder, 100)
    data = json.loads(invoke(str(folder), "--json").stdout)
    assert data["text"]["tokens"] == 100 and data["problems"] == []
    assert any("tokenizer.json has 100 tokens, more than the model's 64 (vocab_size)" in n for n in data["notes"])
    write_word_tokenizer(folder, 64)
    assert not any("tokenizer" in n for n in json.loads(invoke(str(folder), "--json").stdout)["notes"])


def test_sparse_nano_help_prints_usage_and_builds_nothing(tmp_path):
    """`python benchmarks/sparse_nano.py --help` built a 63 GB sparse checkpoint in a folder named '--help'."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sparse_nano.py"
    r = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "usage" in r.stdout.lower()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- --values

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e5m2, torch.float8_e4m3fn]


def plant(t: torch.Tensor, g: torch.Generator, nan: int, inf: int) -> torch.Tensor:
    """`t` with `nan` NaNs and `inf` ±Infs at random places, plus values that must not count: the largest
    finite value, -0.0 and a subnormal."""
    dtype = t.dtype
    flat = t.double().flatten().clone()
    where = torch.randperm(flat.numel(), generator=g)
    flat[where[:nan]] = float("nan")
    flat[where[nan:nan + inf]] = torch.tensor([float("inf"), float("-inf")], dtype=torch.float64).repeat(inf)[:inf]
    extremes = [torch.finfo(dtype).max, -0.0, torch.finfo(dtype).smallest_normal / 2]
    flat[where[nan + inf:nan + inf + 3]] = torch.tensor(extremes, dtype=torch.float64)
    return flat.to(dtype).view(t.shape)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_values_count_nan_and_inf_as_torch_does(tmp_path, monkeypatch, dtype):
    """Every floating-point dtype safetensors stores: the counts per tensor equal torch.isnan / isinf on the
    tensors written, across shards and across read chunks (16 bytes here); clean tensors are not listed."""
    import twotower_cli.inspect as I
    from twotower_cli.checkpoint import open_checkpoint

    monkeypatch.setattr(I, "_SCAN_CHUNK", 16)
    g = torch.Generator().manual_seed(1)
    t = {k: v.to(dtype) for k, v in random_tensors(small_config()).items()}
    names = sorted(t)
    planted = {names[3]: (5, 0), names[17]: (0, 3), names[40]: (2, 7)}
    if dtype == torch.float8_e4m3fn:  # no Inf in e4m3fn (torch saturates ±Inf to ±448): NaNs instead
        planted = {name: (nan + inf, 0) for name, (nan, inf) in planted.items()}
    for name, (nan, inf) in planted.items():
        t[name] = plant(t[name], g, nan, inf)
    folder = random_checkpoint(tmp_path / "c", max_shard_size="3KB", extra=t)
    want = {}
    for name, v in t.items():
        nan, inf = int(torch.isnan(v.double()).sum()), int(torch.isinf(v.double()).sum())
        if nan or inf:
            want[name] = {"nan": nan, "inf": inf}
    assert want == {name: {"nan": nan, "inf": inf} for name, (nan, inf) in planted.items()}
    r = inspect_checkpoint(folder, values=True)
    assert r.values["nonfinite"] == want
    assert r.values["tensors"] == len(t) and r.values["bytes"] == sum(v.nbytes for v in t.values())
    assert r.values["not_float"] == [] and r.values["unread"] == []
    assert r.problems == [f"{n} holds {c['nan']:,} NaN and {c['inf']:,} Inf values (of {t[n].numel():,})"
                          for n, c in sorted(want.items())]
    assert I.scan_values(open_checkpoint(folder), workers=1) == I.scan_values(open_checkpoint(folder), workers=3)


def test_values_on_the_command_line(tmp_path):
    """Without --values nothing is read and the JSON says null; with it, a clean checkpoint is sound and says
    so, and one NaN makes it unsound (exit 1) with its tensor named."""
    clean = random_checkpoint(tmp_path / "clean", max_shard_size="3KB")
    plain = invoke(str(clean), "--json")
    assert plain.exit_code == 0 and json.loads(plain.stdout)["values"] is None
    result = invoke(str(clean), "--values")
    assert result.exit_code == 0 and "values: 55 tensors" in result.stderr and "all finite" in result.stderr
    t = random_tensors(small_config())
    name = "backbone.layers.1.mixer.o_proj.weight"
    t[name][3, 4] = float("nan")
    bad = random_checkpoint(tmp_path / "bad", extra={name: t[name]})
    assert invoke(str(bad)).exit_code == 0  # the headers are sound
    result = invoke(str(bad), "--values", "--json")
    data = json.loads(result.stdout)
    assert result.exit_code == 1 and not data["sound"]
    assert data["values"]["nonfinite"] == {name: {"nan": 1, "inf": 0}}
    assert data["problems"] == [f"{name} holds 1 NaN and 0 Inf values (of {t[name].numel():,})"]
    human = invoke(str(bad), "--values")
    assert human.exit_code == 1 and "1 tensor holding NaN or Inf" in human.stderr and f"✗ {name} holds" in human.stderr


def test_values_skip_integer_tensors_and_what_a_truncated_file_lacks(tmp_path):
    """Integer tensors are listed as not checked; the tensors a truncated shard cuts short are listed as not
    read (the truncation is a problem already), the others are checked."""
    from twotower_cli.checkpoint import open_checkpoint
    from twotower_cli.inspect import scan_values

    folder = random_checkpoint(tmp_path / "c", extra={"backbone.step": torch.arange(4)})
    f = folder / "model.safetensors"
    start, spans = data_spans(f)
    size = int(f.stat().st_size * 0.7)
    with open(f, "r+b") as fh:
        fh.truncate(size)
    cut = {name for _b, e, name in spans if e > size - start}
    got = scan_values(open_checkpoint(folder, strict=False))
    assert got["not_float"] == ["backbone.step"]
    assert set(got["unread"]) == cut - {"backbone.step"} and cut
    assert got["tensors"] == len(spans) - 1 - len(got["unread"]) and got["nonfinite"] == {}


@pytest.mark.parametrize(("file", "content", "problem"), [
    ("config.json", "", "config.json is not valid JSON: "),
    ("config.json", "{bad", "config.json is not valid JSON: "),
    ("model.safetensors.index.json", "{bad", "model.safetensors.index.json is not valid JSON: "),
    ("model.safetensors.index.json", "{}", "model.safetensors.index.json has no weight_map"),
    ("model.safetensors.index.json", '{"weight_map": {"a": "../x.safetensors"}}', "places tensors in '../x"),
])
def test_an_unreadable_config_or_index_is_a_problem_of_the_report(sharded, file, content, problem):
    """These were one `Error:` line and no report: `inspect --json | jq .sound` read nothing, where a missing
    config or a truncated shard gave the report with "sound": false. Now they are problems of the report, which
    says what the shards beside them hold."""
    (sharded / file).write_text(content)
    found = problems_of(sharded)
    assert [p for p in found if p.startswith(problem) or problem in p] == [found[0]], found
    assert not any(p.startswith("no config.json") for p in found)
    report = json.loads(invoke(str(sharded), "--json").stdout)
    assert report["sound"] is False and report["tensors"] > 0
    human = invoke(str(sharded))
    assert human.exit_code == 1 and "✗ not sound" in human.stderr
