"""A hub model's headers read over HTTP, before (or instead of) its download: `inspect`, `split --dry-run`, and
the checks generate, chat, serve, bench and eval make before downloading.

`fake_hub.FakeHub` plays the hub's two routes that huggingface_hub calls here, serving checkpoint folders
written by the project's writer. The reference is `inspect_checkpoint` of the same folder on disk: the remote
report must say the same, while the server sees no request for tensor data.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fake_hub import SHA
from helpers_ckpt import random_checkpoint, small_config
from twotower_cli.checkpoint import INDEX_NAME, save_tensors
from twotower_cli.cli import get_app
from twotower_cli.errors import TwoTowerError
from twotower_cli.hub import ASSETS
from twotower_cli.inspect import inspect_checkpoint, inspect_remote
from twotower_cli.remote import FIRST_READ


def comparable(report) -> dict:
    """A report's JSON without what tells where it was read from."""
    out = copy.deepcopy(report.to_json(with_tensors=True))
    for key in ("path", "remote"):
        out.pop(key)
    out["notes"] = [n for n in out["notes"] if not n.startswith("read from the Hugging Face hub")]
    if out["twotower"]:
        out["twotower"].pop("time_conditioning")
    out["text"].pop("tokens")  # read locally; a remote inspect asks only whether tokenizer.json is there
    return out


@pytest.mark.parametrize("kind", ["sharded", "single", "tiny-twotower", "tiny-base"])
def test_remote_report_is_the_local_one(tmp_path, fake_hub, kind):
    if kind in ("sharded", "single"):
        folder = random_checkpoint(tmp_path / kind, max_shard_size="3KB" if kind == "sharded" else "5GB")
    else:
        folder = ASSETS / kind
    fake_hub.repos["org/model"] = folder
    local = inspect_checkpoint(folder)
    remote = inspect_remote("org/model", endpoint=fake_hub.endpoint)
    assert comparable(remote) == comparable(local)
    assert remote.path == f"org/model@{SHA[:12]}"
    assert remote.remote["revision"] == SHA and remote.remote["requests"] == len(fake_hub.reads)
    assert remote.notes[0].startswith("read from the Hugging Face hub")
    assert fake_hub.data_read(folder) == []
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert sorted({f for f, _a, _b in fake_hub.reads if f.endswith(".safetensors")}) == shards
    if kind == "tiny-twotower":  # its bytes are not read: not "identity", not "trained"
        assert local.twotower["time_conditioning"] == "trained"
        assert remote.twotower["time_conditioning"] == "unknown"
    assert "tokenizer.json" not in {f for f, _a, _b in fake_hub.reads}  # asked whether it is there, not read
    assert remote.text["tokens"] is None and local.text["tokens"] > 0 and remote.text["tokenizer"] is True


def test_a_header_longer_than_the_first_read(tmp_path, fake_hub):
    """Past 100 kB the header takes a second range request, for exactly its remaining bytes."""
    folder = random_checkpoint(tmp_path / "c")
    tensors = _read_all(folder)
    (folder / "model.safetensors").unlink()
    save_tensors(folder, tensors, metadata={"format": "pt", "padding": "x" * 150_000})
    header_end = 8 + int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    fake_hub.repos["org/long"] = folder
    remote = inspect_remote("org/long", endpoint=fake_hub.endpoint)
    assert remote.problems == [] and comparable(remote) == comparable(inspect_checkpoint(folder))
    assert [(a, b) for f, a, b in fake_hub.reads if f == "model.safetensors"] == [(0, FIRST_READ - 1),
                                                                                (FIRST_READ, header_end - 1)]


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_a_shard_cut_short_on_the_hub_is_truncated(tmp_path, fake_hub):
    folder = random_checkpoint(tmp_path / "c", max_shard_size="3KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    fake_hub.repos["org/cut"] = folder
    remote = inspect_remote("org/cut", endpoint=fake_hub.endpoint)
    local = inspect_checkpoint(folder)
    assert any(p.startswith(f"{shard.name} is truncated") for p in local.problems)
    assert remote.problems == local.problems
    row = next(r for r in remote.to_json()["shards"] if r["file"] == shard.name)
    assert row == {"file": shard.name, "tensors": row["tensors"], "bytes": shard.stat().st_size, "status": "truncated"}


def test_messages_name_the_repository_not_a_temporary_folder(tmp_path, fake_hub):
    folder = random_checkpoint(tmp_path / "c")
    (folder / "generation_config.json").write_text('{"eos_token_id": "two"}')
    fake_hub.repos["org/bad"] = folder
    remote = inspect_remote("org/bad", endpoint=fake_hub.endpoint)
    assert remote.problems == ["eos_token_id 'two' in org/bad/generation_config.json is not a token id or a list "
                               "of them"]


def test_errors(tmp_path, fake_hub):
    with pytest.raises(TwoTowerError) as e:
        inspect_remote("org/missing", endpoint=fake_hub.endpoint, as_path=True)
    assert e.value.message == "org/missing was not found on the Hugging Face hub (and there is no folder org/missing here)"
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text("{}")
    fake_hub.repos["org/text"] = tmp_path / "text"
    with pytest.raises(TwoTowerError, match="holds no safetensors weights"):
        inspect_remote("org/text", endpoint=fake_hub.endpoint)
    with pytest.raises(TwoTowerError, match="cannot reach the Hugging Face hub") as e:
        inspect_remote("org/text", endpoint="http://127.0.0.1:9")  # nothing listens on the discard port
    assert e.value.hint


# ---------------------------------------------------------------------------------------------- the command

def invoke(*args: str):
    return CliRunner().invoke(get_app(), ["inspect", *args])


def test_command_reads_an_uncached_model_from_the_hub(tmp_path, online):
    folder = random_checkpoint(tmp_path / "c", max_shard_size="3KB")
    online.repos["nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"] = folder  # what the alias names
    result = invoke("nemotron-3-nano", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["remote"]["revision"] == SHA and data["sound"] and data["tensors"] == 55
    human = invoke("nemotron-3-nano")
    assert human.exit_code == 0 and "read from the Hugging Face hub" in human.stderr
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors*"))
    assert online.data_read(folder) == []


def test_command_prefers_the_cache_unless_remote(tmp_path, online):
    from test_hub import fake_cache

    snap = fake_cache(tmp_path / "hf", "org/model", files={})
    snap.rmdir()
    random_checkpoint(snap)
    online.repos["org/model"] = random_checkpoint(tmp_path / "other", small_config("M*"))
    cached = json.loads(invoke("org/model", "--json").stdout)
    assert cached["remote"] is None and cached["pattern"] == "M*E-ME" and online.api_calls == []
    fresh = json.loads(invoke("org/model", "--json", "--remote").stdout)
    assert fresh["remote"]["repo_id"] == "org/model" and fresh["pattern"] == "M*"


def test_command_errors(tmp_path, online, monkeypatch):
    result = invoke("org/missing")
    assert result.exit_code == 1 and result.stderr.count("Error:") == 1
    assert "org/missing was not found on the Hugging Face hub (and there is no folder org/missing here)" in result.stderr
    folder = random_checkpoint(tmp_path / "c")
    result = invoke(str(folder), "--remote")
    assert result.exit_code == 1 and "is a local checkpoint" in result.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    online.repos["org/model"] = folder
    online.api_calls.clear()
    result = invoke("org/model")
    assert result.exit_code == 1 and "not in the Hugging Face cache" in result.stderr
    assert "--remote" in invoke("org/model", "--remote").stderr
    assert online.api_calls == []  # offline: the hub was never asked
    assert "Traceback" not in result.output


def test_a_corrupt_index_on_the_hub(tmp_path, fake_hub):
    folder = random_checkpoint(tmp_path / "c", max_shard_size="3KB")
    (folder / INDEX_NAME).write_text('{"weight_map": 3}')
    fake_hub.repos["org/idx"] = folder
    report = inspect_remote("org/idx", endpoint=fake_hub.endpoint)  # a problem of the report, as locally
    assert "model.safetensors.index.json has no weight_map" in report.problems


def test_command_reads_the_hub_when_the_cache_holds_only_text_files(tmp_path, online):
    """After `twotower tokenize`, the cache holds the model's config and tokenizer without its weights."""
    from test_hub import fake_cache

    fake_cache(tmp_path / "hf", "org/model", files={"config.json": "{}", "tokenizer.json": "{}"})
    online.repos["org/model"] = random_checkpoint(tmp_path / "c")
    result = invoke("org/model", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["remote"]["repo_id"] == "org/model"


def test_a_mirror_that_ignores_ranges(tmp_path, fake_hub):
    """A plain HTTP mirror (HF_ENDPOINT) answers a range request with the whole file: the header is taken from
    its first bytes and the connection dropped, not 64 MB of weights read."""
    folder = random_checkpoint(tmp_path / "c")
    shard = folder / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(64 << 20)  # a sparse tail: bytes after the last tensor, said alike by both reports
    fake_hub.repos["org/mirror"] = folder
    fake_hub.ignore_ranges = True
    remote = inspect_remote("org/mirror", endpoint=fake_hub.endpoint)
    assert comparable(remote) == comparable(inspect_checkpoint(folder))
    assert any("after the last tensor" in p for p in remote.problems)
    deadline = time.monotonic() + 30
    while not (sent := [last + 1 for f, _first, last in fake_hub.reads if f == shard.name]):
        assert time.monotonic() < deadline, "the server never saw the client hang up"
        time.sleep(0.05)
    print(f"sent {sent[0]:,} of {64 << 20:,} bytes")
    assert len(sent) == 1 and sent[0] < (32 << 20)


def test_split_dry_run_plans_from_the_hub_headers(tmp_path, online, monkeypatch):
    """`split --dry-run` of a hub model not in the cache prints the plan it would print after the download."""
    from test_hub import fake_cache

    folder = random_checkpoint(tmp_path / "c", max_shard_size="3KB")
    (folder / "special_tokens_map.json").write_text("{}")
    online.repos["org/model"] = folder
    out = tmp_path / "out"
    remote = CliRunner().invoke(get_app(), ["split", "org/model", "--dry-run", "-o", str(out)])
    assert remote.exit_code == 0, remote.output
    assert not out.exists() and not (tmp_path / "hf").exists()
    assert online.data_read(folder) == []
    shards = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    said = " ".join(remote.stderr.split())  # rich wraps lines at the terminal's width
    planned = re.search(r"• planned from the hub's headers \(([\d,]+) B read\): the real run first downloads "
                        r"([\d,]+) B of weights into the Hugging Face cache ", said)
    assert planned and int(planned[2].replace(",", "")) == shards
    assert int(planned[1].replace(",", "")) == sum(last + 1 - first for _f, first, last in online.reads)
    # The reference: the same model in the cache, planned as before.
    snap = fake_cache(tmp_path / "hf", "org/model", files={})
    snap.rmdir()
    shutil.copytree(folder, snap)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache alone (the fake hub serves no downloads)
    cached = CliRunner().invoke(get_app(), ["split", "org/model", "--dry-run", "-o", str(out)])
    assert cached.exit_code == 0, cached.output
    assert "planned from the hub" not in cached.stderr
    assert said.replace(planned[0], "") == " ".join(cached.stderr.split())
    assert "special_tokens_map.json" in cached.stderr and "tokenizer.json" in cached.stderr


def test_split_dry_run_from_the_hub_counts_the_download_on_the_same_disk(tmp_path, online, monkeypatch):
    import shutil
    from collections import namedtuple

    folder = random_checkpoint(tmp_path / "c")
    online.repos["org/model"] = folder
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(10**9, 10**9 - 5000, 5000))
    out = tmp_path / "out"
    result = CliRunner().invoke(get_app(), ["split", "org/model", "--dry-run", "-o", str(out)])
    assert result.exit_code == 0, result.output
    weights = (folder / "model.safetensors").stat().st_size
    said = " ".join(result.stderr.split())
    assert result.stderr.count("Warning:") == 1
    assert re.search(rf"Warning: split writes [\d,]+ B beside {re.escape(str(out))} and downloads {weights:,} B "
                     rf"into {re.escape(str(tmp_path / 'hf' / 'hub'))}, and that disk has 5,000 B free", said)


# ---------------------------------------------------------------------------------------------- before a download

def run(*args: str):
    return CliRunner().invoke(get_app(), list(args))


def test_a_model_that_cannot_load_fails_before_its_download(tmp_path, online, downloads, monkeypatch):
    """generate, serve, chat, bench and eval read an uncached hub model's headers first and make the load's checks on
    them: a NemotronH where mask_diffusion needs a TwoTower, weights unlike their config.json, no room on the
    device — each one `Error:` line in seconds, and nothing downloaded."""
    from twotower_cli import towers

    online.repos["org/base"] = ASSETS / "tiny-base"
    online.repos["org/tt"] = ASSETS / "tiny-twotower"
    deep = tmp_path / "deep"
    shutil.copytree(ASSETS / "tiny-twotower", deep)
    config = json.loads((deep / "config.json").read_text())
    config["hybrid_override_pattern"] += "M"
    config["num_hidden_layers"] += 1
    (deep / "config.json").write_text(json.dumps(config))
    online.repos["org/deep"] = deep

    r = run("generate", "-m", "org/base", "-n", "4", "--no-live", "ROMEO.")
    assert r.exit_code == 1 and r.stderr.count("Error:") == 1, r.output
    assert "twotower-headers" not in r.stderr  # the repository is named, not the temporary folder
    assert "org/base is not a TwoTower checkpoint" in r.stderr and "nothing was downloaded" in r.stderr
    r = run("serve", "-m", "org/base", "--port", "0")
    assert r.exit_code == 1 and "org/base is not a TwoTower checkpoint" in r.stderr, r.output
    r = run("chat", "-m", "org/deep")
    assert r.exit_code == 1 and "checkpoint at org/deep does not match the model" in " ".join(r.stderr.split())
    assert "config.json describes 9 layers where the weights hold 8" in " ".join(r.stderr.split())
    free_bytes = towers.free_bytes
    monkeypatch.setattr(towers, "free_bytes", lambda device: 1000)
    r = run("bench", "-m", "org/tt", "-n", "4")
    assert r.exit_code == 1 and "the model needs" in r.stderr and "GiB on cpu" in r.stderr, r.output
    (tmp_path / "held.txt").write_text("ROMEO. " * 200)  # eval checks its data before the model's headers
    r = run("eval", "-m", "org/base", "--data", str(tmp_path / "held.txt"))
    assert r.exit_code == 1 and "the model needs" in r.stderr, r.output
    # a model that would load and a data file that is not there: said before the download (it came after)
    monkeypatch.setattr(towers, "free_bytes", free_bytes)
    r = run("eval", "-m", "org/tt", "--data", str(tmp_path / "none.txt"))
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: data file {tmp_path / 'none.txt'} does not exist")
    assert downloads == []


def test_a_model_that_loads_is_downloaded_after_the_check(tmp_path, online, downloads):
    online.repos["org/tt"] = ASSETS / "tiny-twotower"
    r = run("generate", "-m", "org/tt", "-n", "16", "--no-live", "ROMEO.")
    assert r.exit_code == 0, r.output
    assert downloads == ["org/tt"] and len(online.api_calls) == 1
    assert r.stdout == run("generate", "-m", "tiny", "-n", "16", "--no-live", "ROMEO.").stdout
    online.api_calls.clear()
    r = run("generate", "-m", "org/tt", "--dtype", "fp8", "ROMEO.")
    assert r.exit_code == 1 and "unknown dtype 'fp8'" in r.stderr and online.api_calls == []  # options first


def test_train_refuses_a_hub_model_that_is_no_twotower_before_its_download(tmp_path, downloads, online):
    online.repos["org/base"] = ASSETS / "tiny-base"
    (tmp_path / "d.txt").write_text("ROMEO. Hello.")
    r = run("train", "-m", "org/base", "--data", str(tmp_path / "d.txt"), "-o", str(tmp_path / "o"))
    assert r.exit_code == 1 and "org/base is not a TwoTower checkpoint" in r.stderr, r.output
    assert "nothing was downloaded" in " ".join(r.stderr.split()) and downloads == []


def test_inspect_a_revision_of_a_hub_model(tmp_path, online):
    from fake_hub import sha_of

    online.repos["org/model"] = random_checkpoint(tmp_path / "head")
    online.repos["org/model@v1"] = random_checkpoint(tmp_path / "v1", small_config("M*"))
    data = json.loads(invoke("org/model@v1", "--json").stdout)
    assert data["pattern"] == "M*" and data["remote"]["revision"] == sha_of("org/model@v1")
    assert data["path"] == f"org/model@{sha_of('org/model@v1')[:12]}"
    assert json.loads(invoke("org/model", "--json").stdout)["pattern"] == "M*E-ME"
    r = invoke("org/model@nope")
    assert r.exit_code == 1 and "org/model has no revision 'nope' on the Hugging Face hub" in r.stderr


def test_values_need_the_weights_on_this_machine(tmp_path, online):
    """`inspect --values` of a hub model not in the cache (or with --remote) is one error line naming the
    download, with the revision asked for; nothing is read from the hub."""
    online.repos["org/model"] = random_checkpoint(tmp_path / "c")
    for args, where in ((["org/model@v1"], "not in the Hugging Face cache"), (["org/model", "--remote"], "--remote")):
        result = invoke(*args, "--values")
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
        assert result.stderr.startswith(f"Error: --values reads every byte of the weights, and {args[0]} is ")
        assert where in result.stderr
    assert "`hf download org/model --revision v1`" in invoke("org/model@v1", "--values").stderr
    assert online.api_calls == [] and online.reads == []
