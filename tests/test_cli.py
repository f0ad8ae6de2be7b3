"""The command line itself: a command line typer cannot parse is bad input like any other — one `Error: …`
line on stderr with a hint naming the command's help, exit code 1, nothing on stdout, no usage box."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from twotower_cli.cli import get_app

runner = CliRunner()


@pytest.mark.parametrize("args, command, needle", [
    (["generate", "--bogus", "x"], "twotower generate", "No such option: --bogus"),
    (["generate", "-n", "abc", "x"], "twotower generate", "'--max-new-tokens'"),
    (["generate", "--mode"], "twotower generate", "'--mode' requires an argument"),
    (["split", "tiny-base", "out", "more"], "twotower split", "unexpected extra argument"),
    (["inspect"], "twotower inspect", "Missing argument"),
    (["train", "--steps", "1.5"], "twotower train", "'--steps'"),
    (["serve", "--port", "http"], "twotower serve", "'--port'"),
    (["nosuch"], "twotower", "No such command 'nosuch'"),
    (["--bogus"], "twotower", "No such option: --bogus"),
])
def test_command_line_errors_are_one_error_line(args, command, needle):
    r = runner.invoke(get_app(), args)
    assert r.exit_code == 1, r.output
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: ") and needle in lines[0], lines[0]
    assert lines[0].endswith(f"(hint: {command} -h lists its arguments and options)"), lines[0]
    assert "Usage:" not in r.output and "╭" not in r.output


def test_help_version_and_no_arguments_keep_their_exit_codes():
    assert runner.invoke(get_app(), ["--version"]).exit_code == 0
    r = runner.invoke(get_app(), ["generate", "-h"])
    assert r.exit_code == 0 and "--max-new-tokens" in r.stdout
    r = runner.invoke(get_app(), [])
    # the help, as click does (exit code 2 from click 8.2 on, 0 before)
    assert r.exit_code in (0, 2) and "generate" in r.output and "Error" not in r.output


@pytest.mark.parametrize("command", ["eval", "inspect", "split", "env", "chat", "serve", "generate"])
def test_a_commands_help_text_flows_as_paragraphs(command):
    """Each paragraph of a command's help is one flowing text that the terminal wraps: typer 0.29 kept the
    docstring's line breaks, so `eval -h` broke mid-sentence ("... (a plain NemotronH checkpoint:" / "the
    model) ...") at any width. On a wide terminal each paragraph is one line, whole."""
    import inspect as pyinspect

    info = next(c for c in get_app().registered_commands if (c.name or c.callback.__name__) == command)
    paragraphs = [" ".join(p.split()) for p in pyinspect.cleandoc(info.help or info.callback.__doc__).split("\n\n")]
    r = runner.invoke(get_app(), [command, "-h"], env={"COLUMNS": "2000"})
    lines = [" ".join(ln.split()) for ln in r.stdout.splitlines()]
    assert r.exit_code == 0 and len(paragraphs) >= 1
    for p in paragraphs:
        assert p in lines, (p, r.stdout)


@pytest.mark.parametrize("command", [[], *([c.name or c.callback.__name__] for c in get_app().registered_commands)],
                         ids=lambda c: " ".join(["twotower", *c]))
def test_help_shows_flags_without_a_value_and_options_with_theirs(command):
    """A flag's line in -h shows no value: typer 0.29 printed `<bool>` beside every flag (--json, --chat,
    even --help), which reads as an option that wants true or false. Options that take a value keep their
    type; a repeatable one shows the value it takes each time (`--stop <int>`, not `<list[int]>`, which reads
    as one option taking a list)."""
    r = runner.invoke(get_app(), [*command, "-h"], env={"COLUMNS": "2000"})
    assert r.exit_code == 0, r.output
    rows = {ln.split()[1]: ln.split()[2:] for ln in r.stdout.splitlines() if ln.startswith("│ --")}
    assert rows["--help"][:2] == ["-h", "Show"], rows["--help"]  # (it was: -h <bool> Show …)
    for name, rest in rows.items():
        assert "<bool>" not in rest and "BOOLEAN" not in rest, (name, rest)
        assert not rest or not rest[0].startswith("<list["), (name, rest)
    if command == ["generate"]:
        assert rows["--max-new-tokens"][:2] in (["-n", "<int>"], ["-n", "INTEGER"]), rows["--max-new-tokens"]
        assert rows["--stop"][0] == "<int>" and rows["--stop-text"][0] == "<str>", (rows["--stop"], rows["--stop-text"])
        assert rows["--json"][0] == "One", rows["--json"]


def test_the_installed_command_reports_command_line_errors_in_one_line():
    """Through the real entry point (`python -m twotower_cli`), not only the test runner."""
    p = subprocess.run([sys.executable, "-m", "twotower_cli", "generate", "--top-k", "many", "hi"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("Error: ") and "'--top-k'" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_a_gpu_out_of_memory_is_said_as_such_not_as_a_bug(monkeypatch):
    """torch's out-of-memory error on a GPU is a RuntimeError (not Python's MemoryError): it was reported as
    "OutOfMemoryError: CUDA out of memory. Tried … (and the allocator's paragraph)" with the hint "this looks
    like a bug". Now: its first sentences and what to do about it."""
    import torch

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "79.10 GiB of which 1.20 GiB is free. Including non-PyTorch memory, this "
                                     "process has 77.80 GiB memory in use.")

    monkeypatch.setattr("twotower_cli.runtime.open_runtime", full)
    r = runner.invoke(get_app(), ["generate", "hello", "--no-live"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: CUDA out of memory. Tried to allocate 2.00 GiB (hint: use a smaller --dtype"), lines
    assert "bug" not in lines[0] and "Including" not in lines[0]


@pytest.mark.parametrize(("args", "named"), [
    (["generate", "-m", "", "hi", "--no-live"], "'--model' / '-m'"),  # ran the embedded tiny model
    (["generate", "--context-device", "", "hi", "--no-live"], "'--context-device'"),  # the default device
    (["generate", "--prompt-file", "", "--no-live"], "'--prompt-file'"),  # "prompt file . is a folder"
    (["eval", "--data", "{t}", "--data", ""], "'--data'"),  # "data file . is a folder"
    (["train", "", "--data", "{t}", "-o", "{o}"], "'CKPT'"),  # "no safetensors weights in ."
    (["train", "tiny", "--data", "{t}", "-o", ""], "'--out' / '--output' / '-o'"),  # "the output folder ."
    (["tokenize", "tiny", "{t}", "", "-o", "{o}.npy"], "'FILE'"),
    (["split", ""], "'source'"),
    (["split", "tiny-base", ""], "'out'"),
    (["inspect", ""], "'checkpoint'"),
    (["serve", "--host", ""], "'--host'"),  # listened on every interface, its address shown blank
])
def test_an_empty_path_model_device_or_host_is_refused_not_read_as_a_default(tmp_path, args, named):
    """An empty value (`-m "$MODEL"` with MODEL unset) names nothing: it is refused before any work, with the
    option named, instead of meaning the current folder or the default."""
    (tmp_path / "t.txt").write_text("some text\n")
    r = runner.invoke(get_app(), [a.format(t=tmp_path / "t.txt", o=tmp_path / "o") for a in args])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and r.stdout == "", r.output
    assert lines[0].startswith(f"Error: Invalid value for {named}: an empty value names nothing"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_torch_running_out_of_host_memory_is_said_as_such_not_as_a_bug(monkeypatch):
    """torch's CPU allocator fails with a RuntimeError ("[enforce fail at alloc_cpu.cpp] … DefaultCPUAllocator:
    can't allocate memory: you tried to allocate N bytes"), not Python's MemoryError: it was reported whole,
    with the hint "this looks like a bug". Now: how much, in GiB, and what to do about it."""
    import torch

    def huge(*args, **kwargs):
        return torch.empty(3 << 50, dtype=torch.uint8)  # 3 PiB: no host has it

    monkeypatch.setattr("twotower_cli.runtime.open_runtime", huge)
    r = runner.invoke(get_app(), ["generate", "hello", "--no-live"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.stderr
    assert lines[0] == ("Error: out of host memory: tried to allocate 3.00 PiB (hint: try a smaller --dtype, "
                        "fewer tokens or another device)"), lines


@pytest.mark.parametrize("args", [
    ["generate", "--model", "{d}", "hi", "--no-live"],
    ["chat", "--model", "{d}"],
    ["serve", "--model", "{d}"],
    ["bench", "--model", "{d}"],
    ["eval", "--model", "{d}", "--data", "{d}/text.txt"],
])
def test_a_folder_that_is_no_checkpoint_is_said_to_be_one(tmp_path, args):
    """A folder without config.json was reported by whichever file a command looked for first: "no
    tokenizer.json in …" (hint: copy the tokenizer files) from generate, chat and serve, "no safetensors
    weights" from eval and bench. Every command now says what the folder is not."""
    (tmp_path / "text.txt").write_text("some held-out text\n")
    r = runner.invoke(get_app(), [a.format(d=tmp_path) for a in args])
    lines = r.stderr.splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith(f"Error: {tmp_path} is not a checkpoint folder: no config.json in it"), lines[0]


def test_the_commands_that_write_take_out_and_output_alike(tmp_path):
    """split's option was --output, train's and tokenize's --out: each took only its own spelling (and -o)."""
    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth.\n" * 40)
    runs = {
        "split": ["split", "tiny", "--out", str(tmp_path / "split")],
        "tokens.npy": ["tokenize", "tiny", "--data", str(text), "--output", str(tmp_path / "tokens.npy")],
        "train": ["train", "tiny", "--data", str(text), "--output", str(tmp_path / "train"), "--seq-len", "32",
                  "--batch", "2", "--steps", "1", "--warmup", "0", "--eval-every", "0", "--device", "cpu"],
    }
    for made, args in runs.items():
        r = runner.invoke(get_app(), args)
        assert r.exit_code == 0, (args, r.output)
        assert (tmp_path / made).exists(), args
    assert (tmp_path / "split" / "config.json").is_file() and (tmp_path / "train" / "config.json").is_file()


def test_an_output_that_cannot_be_made_is_refused_before_any_work(tmp_path, monkeypatch):
    """A file where -o's folder should be, or a folder this process may not write in, was found only when
    writing: after the whole training (train), after the plan (split), and said as "File exists" or
    "Permission denied: .../.out.tmp-…" (a temporary name). Now one error line naming the folder, before any
    work: no step is trained, no plan printed, nothing written."""
    from twotower_cli import checkpoint

    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth.\n" * 40)
    (tmp_path / "f").write_text("x")
    train_args = ["--data", str(text), "--seq-len", "32", "--batch", "2", "--steps", "1", "--warmup", "0",
                  "--eval-every", "0", "--device", "cpu"]
    runs = [["split", "tiny", "-o"], ["tokenize", "tiny", "--data", str(text), "-o"], ["train", "tiny", *train_args, "-o"]]
    for args, name in zip(runs, ("out", "x.npy", "out"), strict=True):
        r = runner.invoke(get_app(), [*args, str(tmp_path / "f" / name)])
        assert r.exit_code == 1 and r.stderr == (f"Error: {tmp_path / 'f'} is a file, not a folder: {tmp_path / 'f' / name} "
                                                 f"cannot be made under it (hint: choose another -o, e.g. -o "
                                                 f"{tmp_path / name})\n"), r.output
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(checkpoint, "_can_write", lambda folder: folder != locked)  # (root may write anywhere)
    for args, name in zip(runs, ("out", "x.npy", "out"), strict=True):
        r = runner.invoke(get_app(), [*args, str(locked / "new" / name)])
        assert r.exit_code == 1 and r.stderr.startswith(f"Error: cannot write in {locked} (no permission)"), r.output
        assert "Plan" not in r.output and "step" not in r.output and not any(locked.iterdir())


def test_every_error_the_package_raises_names_a_hint():
    """Bad input is one `Error: …` line *with a hint*: every `TwoTowerError(...)` in the source passes one
    (six of train's and eval's option checks passed None and printed the bare message)."""
    import ast
    from pathlib import Path

    import twotower_cli

    bare = []
    for path in sorted(Path(twotower_cli.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "TwoTowerError":
                hint = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "hint"), None)
                if hint is None or (isinstance(hint, ast.Constant) and not hint.value):
                    bare.append(f"{path.name}:{node.lineno}")
    assert bare == []


@pytest.mark.parametrize("args, hint", [
    (["--seq-len", "0"], "leave it out for 512"),
    (["--block", "0"], "leave it out for the checkpoint's block size"),
    (["--eval-every", "-1"], "0 turns it off"),
    (["--train", "some"], "leave it out to train the whole denoiser (all)"),
    (["--stop-after", "9", "--steps", "3"], "stop after a step of the schedule, or leave it out to run all of it"),
    (["--compute-dtype", "fp8"], "leave it out for fp32 (bf16 needs --fsdp)"),
])
def test_train_option_errors_say_what_to_do(tmp_path, args, hint):
    data = tmp_path / "d.txt"
    data.write_text("text\n")
    r = runner.invoke(get_app(), ["train", "tiny", "--data", str(data), "-o", str(tmp_path / "o"), *args])
    lines = r.stderr.splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].endswith(f"(hint: {hint})"), r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("args", "suggested"), [
    (["generate", "hi", "--temp", "0.5"], "--temperature"),  # offered --steps, --stop, --system
    (["generate", "hi", "--max", "3"], "--max-new-tokens"),
    (["train", "--grad", "2"], "--grad-accum, --gradient-checkpointing"),
    (["generate", "hi", "--temprature", "0.5"], "--temperature"),  # a typo: click's own suggestion, as before
])
def test_an_unknown_option_that_begins_a_real_one_suggests_it(args, suggested):
    r = runner.invoke(get_app(), args)
    lines = r.stderr.splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert f"(Possible options: {suggested})" in lines[0], lines


def test_a_permission_error_hints_at_permissions_not_disk_space(monkeypatch):
    """A folder that cannot be searched made every path under it "Permission denied" (a file that is not even
    there, such as the index), with the hint "check paths, permissions and free disk space"."""
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/ckpt/model.safetensors.index.json")

    monkeypatch.setattr("twotower_cli.runtime.open_runtime", denied)
    r = runner.invoke(get_app(), ["generate", "hello", "--no-live"])
    assert r.exit_code == 1 and r.stderr.strip() == (
        "Error: Permission denied: /data/ckpt/model.safetensors.index.json (hint: check the permissions of that path "
        "and of the folders above it)"), r.stderr
