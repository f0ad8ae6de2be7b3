"""hub.resolve: local paths as they are, embedded models, aliases and hub ids through a fake HF cache
(HF_HOME in tmp, HF_HUB_OFFLINE=1): never the network."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from twotower_cli import hub
from twotower_cli.errors import TwoTowerError

NANO_BASE = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"


def fake_cache(home: Path, repo_id: str, files: dict[str, str] | None = None, sha: str = "0123abcd") -> Path:
    """A snapshot in huggingface_hub's cache layout: hub/models--owner--name/{refs/main, snapshots/<sha>/}."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for name, text in ({"config.json": "{}", "model.safetensors": ""} if files is None else files).items():
        (snap / name).write_text(text)
    return snap


@pytest.fixture
def offline(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_local_folder_and_file_are_returned_as_is(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    assert hub.resolve(tmp_path) == tmp_path
    assert hub.resolve(str(f)) == f


def test_bad_local_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(TwoTowerError, match="neither a checkpoint folder"):
        hub.resolve(tmp_path / "notes.txt")
    with pytest.raises(TwoTowerError, match="does not exist"):
        hub.resolve(str(tmp_path / "nope"))
    with pytest.raises(TwoTowerError, match="not a local path, a known model name or a hub repo id"):
        hub.resolve("no such model")


def test_alias_resolves_through_the_cache_offline(offline):
    snap = fake_cache(offline, NANO_BASE)
    assert hub.resolve("nemotron-3-nano") == snap
    assert hub.resolve("Nemotron-3-Nano") == snap
    assert hub.resolve(NANO_BASE) == snap


def test_hf_hub_cache_env_wins(tmp_path, monkeypatch, offline):
    snap = fake_cache(tmp_path / "elsewhere", "org/m")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere" / "hub"))
    assert hub.resolve("org/m") == snap


def test_legacy_huggingface_hub_cache_env_is_read(tmp_path, monkeypatch, offline):
    """huggingface_hub still honours HUGGINGFACE_HUB_CACHE; a cache there must be found, not downloaded again."""
    snap = fake_cache(tmp_path / "legacy", "org/m")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy" / "hub"))
    assert hub.resolve("org/m") == snap
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub.hub_cache_dir() == tmp_path / "new"  # the newer name wins, as in huggingface_hub


def test_not_cached_offline_is_a_clean_error(offline):
    with pytest.raises(TwoTowerError) as e:
        hub.resolve("nemotron-labs-twotower")
    assert "nvidia/Nemotron-Labs-TwoTower-30B-A3B-Base-BF16 is not in the Hugging Face cache" in e.value.message
    assert "HF_HUB_OFFLINE" in e.value.hint


def test_allow_download_false_never_goes_online(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def fake(repo_id, **kw):
        calls.append(kw)
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    with pytest.raises(TwoTowerError, match="downloads are off") as e:
        hub.resolve("org/model", allow_download=False)
    assert calls[0]["local_files_only"] is True
    # HF_HUB_OFFLINE is not set: the hint must not send the user to unset it, and a typed `org/model`
    # may have been meant as a local folder.
    assert "HF_HUB_OFFLINE" not in e.value.hint and "hf download org/model" in e.value.hint
    assert e.value.message.endswith("and downloads are off (and there is no folder org/model here)")


@pytest.mark.parametrize("raised,message", [
    ("LocalEntryNotFoundError", "cannot download org/model: the hub is not reachable"),
    ("RepositoryNotFoundError", "org/model was not found on the Hugging Face hub"),
])
def test_a_typed_owner_name_may_have_been_a_folder(tmp_path, monkeypatch, raised, message):
    """`twotower split models/nano` with no such folder here reads as a hub id: say both."""
    from huggingface_hub import errors

    def fake(repo_id, **kw):
        cls = getattr(errors, raised)
        if raised == "LocalEntryNotFoundError":
            raise cls("nope")
        raise cls("nope", response=SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(TwoTowerError) as e:
        hub.resolve("org/model")
    assert e.value.message == f"{message} (and there is no folder org/model here)"
    with pytest.raises(TwoTowerError) as e:
        hub.resolve("nemotron-3-nano")  # an alias is no folder name: nothing to add
    assert "no folder" not in e.value.message


def test_download_fetches_only_checkpoint_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = {}

    def fake(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    assert hub.resolve("nemotron-3-nano-instruct") == tmp_path
    assert seen["repo_id"] == "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
    assert seen["local_files_only"] is False
    assert Path(seen["cache_dir"]) == tmp_path / "home" / "hub"
    patterns = set(seen["allow_patterns"])
    assert {"config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
            "chat_template.jinja"} <= patterns
    assert not any(p.endswith((".py", ".bin", ".pt", "*")) and p != "*.safetensors" for p in patterns)
    assert seen["endpoint"] == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")  # read now, not at huggingface_hub's import
    hub.resolve("nemotron-3-nano-instruct")
    assert seen["endpoint"] == "https://hf-mirror.example"


def test_embedded_models(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "ASSETS", tmp_path)
    with pytest.raises(TwoTowerError, match="embedded model 'tiny' is not in this installation"):
        hub.resolve("tiny")
    for folder in ("tiny-twotower", "tiny-base"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text("{}")
    assert hub.resolve("tiny") == tmp_path / "tiny-twotower"
    assert hub.resolve("tiny", base=True) == tmp_path / "tiny-base"
    assert hub.resolve("tiny-base") == tmp_path / "tiny-base"


def test_aliases_help_lists_every_alias():
    text = hub.aliases_help()
    for alias, repo in hub.ALIASES.items():
        assert alias in text and repo in text
    assert "tiny" in text
    assert hub.ALIASES["nemotron-3-nano"] == NANO_BASE


def test_display_name(tmp_path):
    (tmp_path / "my-ckpt").mkdir()
    assert hub.display_name(str(tmp_path / "my-ckpt")) == "my-ckpt"
    assert hub.display_name("nemotron-3-nano") == "nemotron-3-nano"
    assert hub.display_name("org/Foo-7B") == "Foo-7B"


def test_display_name_reads_tilde_as_resolve_does(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "nano").mkdir()
    (tmp_path / "nano" / "model.safetensors").write_bytes(b"")
    assert hub.resolve("~/nano/model.safetensors") == tmp_path / "nano" / "model.safetensors"
    assert hub.display_name("~/nano/model.safetensors") == "nano"  # not "model.safetensors"


def test_display_name_of_a_hub_cache_snapshot(tmp_path):
    """A snapshot folder (or a file in it, a link to blobs/<hash>) is named after its repo, not after the
    revision hash or `blobs`: split's default output is then `Tiny-NemotronH-twotower`."""
    repo = tmp_path / "hub" / "models--acme--Tiny-NemotronH"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0a1b2c").write_bytes(b"")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(Path("..", "..", "blobs", "0a1b2c"))
    assert hub.display_name(str(snap)) == "Tiny-NemotronH"
    assert hub.display_name(str(snap / "model.safetensors")) == "Tiny-NemotronH"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "model.safetensors").symlink_to(repo / "blobs" / "0a1b2c")
    assert hub.display_name(str(tmp_path / "plain" / "model.safetensors")) == "plain"


def test_a_cached_snapshot_without_weights_says_so_offline(offline, monkeypatch):
    """After `tokenize` (text files only) the cache holds the repo without weights: offline, that is said
    with what to do, not 'no safetensors weights in <snapshot>'; the text files still resolve."""
    snap = fake_cache(offline, "org/m", files={"config.json": "{}", "tokenizer.json": "{}"})
    with pytest.raises(TwoTowerError) as e:
        hub.resolve("org/m")
    assert e.value.message == f"org/m is in the Hugging Face cache at {offline / 'hub'} without its weights"
    assert "unset HF_HUB_OFFLINE" in e.value.hint
    assert hub.resolve("org/m", weights=False) == snap
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(TwoTowerError, match="without its weights") as e:
        hub.resolve("org/m", allow_download=False)
    assert "hf download org/m" in e.value.hint


def test_a_revision_after_the_name(tmp_path, monkeypatch):
    """`owner/name@rev` and `alias@rev` name a branch, tag or commit: snapshot_download gets it as `revision`,
    the default output folder is named without it, and a revision the hub does not have is one error line."""
    from huggingface_hub import errors

    assert hub.split_revision("org/m@refs/pr/1") == ("org/m", "refs/pr/1")
    assert hub.split_revision("org/m") == ("org/m", None) and hub.split_revision("org/m@") == ("org/m@", None)
    assert hub.repo_id_for("nemotron-3-nano@v1") == "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16@v1"
    assert hub.repo_id_for("tiny@v1") is None
    assert hub.display_name("org/Model-7B@v1.0") == "Model-7B"
    assert hub.display_name("nemotron-3-nano@0123abc") == "nemotron-3-nano"
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = []

    def fake(repo_id, **kw):
        seen.append((repo_id, kw["revision"]))
        if kw["revision"] == "nope":
            raise errors.RevisionNotFoundError("404", response=SimpleNamespace(headers={}, request=None))
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    assert hub.resolve("org/model@v1") == tmp_path and hub.resolve("org/model") == tmp_path
    assert seen == [("org/model", "v1"), ("org/model", None)]
    with pytest.raises(TwoTowerError) as e:
        hub.resolve("nemotron-3-nano@nope")
    assert e.value.message == "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16 has no revision 'nope' on the Hugging Face hub"
    assert "after the @" in e.value.hint


def test_a_gated_repository_says_so(tmp_path, monkeypatch):
    """GatedRepoError is a RepositoryNotFoundError to huggingface_hub; "not found" would send the user to check the
    spelling of a name that is right."""
    from huggingface_hub import errors

    def fake(repo_id, **kw):
        raise errors.GatedRepoError("403", response=SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(TwoTowerError) as e:
        hub.resolve("org/model")
    assert e.value.message == "org/model is gated on the Hugging Face hub and this account may not read it"
    assert "hf auth login" in e.value.hint


@pytest.mark.parametrize("name", ["tiny@main", "tiny-base@v1", "TINY@main"])
def test_an_embedded_model_with_a_revision_says_it_has_none(name):
    """`-m tiny@main` said "'tiny@main' is not a local path, a known model name or a hub repo id", though tiny is a
    known name: the embedded models have no revisions."""
    with pytest.raises(TwoTowerError) as err:
        hub.resolve(name)
    assert err.value.message == f"{name!r}: the embedded model {name.split('@')[0]!r} has no revisions"
    assert err.value.hint == f"leave out the @…: -m {name.split('@')[0]}"
