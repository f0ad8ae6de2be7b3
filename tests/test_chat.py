"""Multi-turn chat (`twotower_cli.chat`, `twotower chat`): every turn gives the tokens of a fresh run on the
whole conversation's ids (the reference: the sampler on a fresh backend), while the context tower reads only
what it does not hold."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from tests.twotower_helpers import add_chat, reshard, stop_inside, write_random_twotower
from typer.testing import CliRunner

from twotower_cli import sampler as S
from twotower_cli.chat import Conversation, PrefixReuse, chat_turn
from twotower_cli.cli import get_app
from twotower_cli.text import ChatTemplate, Tokenizer
from twotower_cli.towers import TowerBackend, load_model

USER = ["hello there, friend.", "and what now?", "tell me more, please."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A TwoTower whose denoiser differs from its context tower (as in test_generate)."""
    return write_random_twotower(tmp_path_factory.mktemp("tt") / "tt")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder, need_denoiser=True).twotower


@pytest.fixture(scope="module")
def chat_folder(folder, tmp_path_factory):
    return add_chat(shutil.copytree(folder, tmp_path_factory.mktemp("chat") / "tt"))


def talk(model, conversation, cfg, eos_ids=(2,), users=USER):
    """Run the turns through one PrefixReuse; for each, the fresh reference on the same prompt ids."""
    reuse = PrefixReuse(TowerBackend(model))
    fresh = TowerBackend(model)
    pairs = []
    for user in users:
        prompt, _ = conversation.prompt(user)
        events = list(chat_turn(reuse, conversation, user, cfg, list(eos_ids)))
        turn = conversation.turns[-1]
        assert isinstance(events[-1], S.Finished) and turn.generation.prompt_ids == prompt
        want = S.run(fresh, [prompt], cfg, list(eos_ids)).generations[0]
        pairs.append((turn, want))
    return pairs


@pytest.mark.parametrize("mode", ["mask_diffusion", "mock_ar", "ar"])
def test_running_text_turns_equal_fresh_runs_and_read_only_the_new_ids(model, folder, mode):
    cfg = S.SamplingConfig(mode=mode, block_size=4, threshold=0.3, max_new_tokens=10)
    conversation = Conversation(Tokenizer(folder), None)
    pairs = talk(model, conversation, cfg)
    for turn, want in pairs:
        assert turn.generation.token_ids == want.token_ids and turn.generation.finish_reason == want.finish_reason
    first, _ = pairs[0]
    assert first.read_tokens == first.prompt_tokens - (mode == "mock_ar")  # mock_ar's context runs one behind
    for (prev, _), (turn, _) in zip(pairs, pairs[1:], strict=False):
        # not read again: the previous prompt and what the sampler fed back of its reply: every block but the
        # last (here of 10 = 4 + 4 + 2 tokens), every token but the last (ar), but the last two (mock_ar)
        n = len(prev.generation.token_ids)
        assert prev.generation.finish_reason == "length" and n == 10
        fed_back = {"mask_diffusion": 8, "ar": n - 1, "mock_ar": n - 2}[mode]
        held = prev.prompt_tokens + fed_back
        assert turn.read_tokens == turn.prompt_tokens - held - (mode == "mock_ar"), (turn.read_tokens, held)
    # the running text: each turn's prompt is the previous prompt, its reply, a newline and the new line
    tok = Tokenizer(folder)
    prev = pairs[0][0]
    second = pairs[1][0].generation.prompt_ids
    assert tok.decode(second) == tok.decode(prev.generation.prompt_ids) + prev.reply + "\n" + USER[1]


def test_an_end_token_stays_in_the_running_text(model, folder):
    """A reply that stopped on an end token: the next prompt holds that token after the reply."""
    cfg = S.SamplingConfig(block_size=4, threshold=0.3, max_new_tokens=10)
    tok = Tokenizer(folder)
    free = S.run(TowerBackend(model), [tok.encode(USER[0])], cfg).generations[0].token_ids
    stop = free[3]
    conversation = Conversation(tok, None)
    pairs = talk(model, conversation, cfg, eos_ids=(stop,), users=USER[:2])
    first = pairs[0][0]
    assert first.generation.finish_reason == "eos" and first.generation.stop_id == stop
    n = len(first.generation.prompt_ids) + len(first.generation.token_ids)
    assert pairs[1][0].generation.prompt_ids[:n + 1] == first.generation.prompt_ids + first.generation.token_ids + [stop]
    assert all(t.generation.token_ids == w.token_ids for t, w in pairs)


VARIED = "the quick brown fox"  # a prompt the random tiny model continues with varied text (not "dj" repeated)


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_a_stop_text_ends_the_reply_and_the_running_text_keeps_it(model, folder, mode):
    """A reply cut by a stop text: the free run's text before its first occurrence (the slow reference: the
    whole reply decoded and cut by hand), the ids of that text, and the next prompt is the previous one, the
    model's tokens through the stop text, a newline (unless they end in one) and the next line."""
    from twotower_cli.text import StopTexts

    cfg = S.SamplingConfig(mode=mode, block_size=4, threshold=0.3, max_new_tokens=32)
    tok = Tokenizer(folder)
    free = S.run(TowerBackend(model), [tok.encode(VARIED)], cfg, [2]).generations[0]
    text = tok.decode(free.token_ids)
    stop = stop_inside(text)
    want = text[:text.find(stop)]
    cutter = StopTexts([stop], tok.decode, {2}, cfg.block_size)
    conversation = Conversation(tok, None)
    reuse = PrefixReuse(TowerBackend(model))
    list(chat_turn(reuse, conversation, VARIED, cfg, [2], stop_texts=cutter))
    turn = conversation.turns[0]
    assert turn.reply == want and turn.generation.finish_reason == "stop"
    assert turn.reply_ids == free.token_ids[:len(turn.reply_ids)] and tok.decode(turn.reply_ids) == want[
        :len(tok.decode(turn.reply_ids))] and not want.startswith(tok.decode(free.token_ids[:len(turn.reply_ids) + 1]))
    through = next(n for n in range(1, len(free.token_ids) + 1) if stop in tok.decode(free.token_ids[:n]))
    assert turn.written == free.token_ids[:through]
    if mode == "mask_diffusion":  # the blocks after the one the stop text ends in are not run
        assert len(turn.generation.token_ids) <= -(-through // 4) * 4 < len(free.token_ids)
    list(chat_turn(reuse, conversation, USER[1], cfg, [2], stop_texts=cutter))
    second = conversation.turns[1].generation.prompt_ids
    written = tok.decode(free.token_ids[:through])
    sep = "" if written.endswith("\n") else "\n"
    assert tok.decode(second) == VARIED + written + sep + USER[1]
    want2 = S.run(TowerBackend(model), [second], cfg, [2]).generations[0]  # and the turn is a fresh run's
    text2 = tok.decode(want2.token_ids)
    assert conversation.turns[1].reply == (text2[:text2.find(stop)] if stop in text2 else text2)


def test_a_stop_text_cuts_the_assistant_message_a_template_renders(model, chat_folder):
    from twotower_cli.text import StopTexts

    cfg = S.SamplingConfig(block_size=4, threshold=0.3, max_new_tokens=32)
    tok, template = Tokenizer(chat_folder), ChatTemplate.load(chat_folder)
    conversation = Conversation(tok, template)
    prompt, _ = conversation.prompt(VARIED)
    free = tok.decode(S.run(TowerBackend(model), [prompt], cfg, [2, 38]).generations[0].token_ids)
    stop = stop_inside(free)
    cutter = StopTexts([stop], tok.decode, {2, 38}, cfg.block_size)
    reuse = PrefixReuse(TowerBackend(model))
    list(chat_turn(reuse, conversation, VARIED, cfg, [2, 38], stop_texts=cutter))
    assert conversation.turns[0].reply == free[:free.find(stop)]
    assert conversation.messages(USER[1])[1] == {"role": "assistant", "content": free[:free.find(stop)]}


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_template_turns_equal_fresh_runs_and_resume_from_the_history_snapshot(model, chat_folder, mode):
    """The test template renders a past reply without the `<think></think>` its generation prompt wrote, so
    the live state never begins the next prompt: the snapshot at the end of the previous user turn does."""
    cfg = S.SamplingConfig(mode=mode, block_size=4, threshold=0.3, max_new_tokens=10)
    tok, template = Tokenizer(chat_folder), ChatTemplate.load(chat_folder)
    conversation = Conversation(tok, template, system="be brief.")
    pairs = talk(model, conversation, cfg, eos_ids=(2, 38))
    for turn, want in pairs:
        assert turn.generation.token_ids == want.token_ids
    messages = [{"role": "system", "content": "be brief."}]
    for i, (turn, _) in enumerate(pairs):
        messages.append({"role": "user", "content": USER[i]})
        assert turn.generation.prompt_ids == tok.encode(template.render(messages), add_special_tokens=False)
        if i:  # read: from the end of the previous turn's user message on
            before = tok.encode(template.render(messages[:-2], add_generation_prompt=False), add_special_tokens=False)
            assert turn.read_tokens == turn.prompt_tokens - len(before)
        messages.append({"role": "assistant", "content": turn.reply})


def test_batches_and_padding_are_read_from_scratch(model):
    """PrefixReuse as the backend of a padded batch gives what the plain backend gives, and forgets its state."""
    cfg = S.SamplingConfig(block_size=4, threshold=0.3, max_new_tokens=8)
    reuse = PrefixReuse(TowerBackend(model))
    reuse.remember([5, 9, 11, 7])
    prompts = [[5, 9, 11, 7, 20, 6], [8, 30]]
    got = S.run(reuse, prompts, cfg).generations
    want = S.run(TowerBackend(model), prompts, cfg).generations
    assert [g.token_ids for g in got] == [w.token_ids for w in want] and reuse.held is None
    one = S.run(reuse, [prompts[0]], cfg).generations[0]  # the snapshot still serves a single sequence
    assert one.token_ids == S.run(TowerBackend(model), [prompts[0]], cfg).generations[0].token_ids


def test_a_stopped_turn_leaves_no_trace(model, folder):
    """A turn abandoned mid-reply (Ctrl-C) is not recorded; the next turn is what it would have been (and,
    the live state holding the abandoned turn, it starts from the history, which it keeps)."""
    cfg = S.SamplingConfig(block_size=4, threshold=0.3, max_new_tokens=12)
    tok = Tokenizer(folder)
    reuse = PrefixReuse(TowerBackend(model))
    conversation = Conversation(tok, None)
    list(chat_turn(reuse, conversation, USER[0], cfg, [2]))
    stream = chat_turn(reuse, conversation, "interrupted", cfg, [2])
    for ev in stream:
        if isinstance(ev, S.BlockDone):
            break
    stream.close()
    assert len(conversation.turns) == 1
    list(chat_turn(reuse, conversation, USER[1], cfg, [2]))
    turn = conversation.turns[-1]
    assert "interrupted" not in tok.decode(turn.generation.prompt_ids)
    want = S.run(TowerBackend(model), [turn.generation.prompt_ids], cfg, [2]).generations[0]
    assert turn.generation.token_ids == want.token_ids
    assert turn.read_tokens == turn.prompt_tokens  # the state held the stopped turn: the history is read again
    assert reuse.snapshot is not None and reuse.snapshot[0] == conversation.turns[0].generation.prompt_ids + \
        conversation.turns[0].generation.token_ids
    list(chat_turn(reuse, conversation, USER[2], cfg, [2]))  # ...and from then on only the new ids
    assert conversation.turns[-1].read_tokens < conversation.turns[-1].prompt_tokens / 2


def test_a_remembered_history_holds_no_autograd_graph(model, chat_folder):
    """`start_from` reads a history outside the sampler (chat_turn, serve): the snapshot and the live state
    it leaves are plain tensors, not the ends of an autograd graph that would keep every activation of that
    read alive for as long as the snapshot is kept."""
    tok, template = Tokenizer(chat_folder), ChatTemplate.load(chat_folder)
    conversation = Conversation(tok, template)
    reuse = PrefixReuse(TowerBackend(model))
    cfg = S.SamplingConfig(block_size=4, threshold=0.3, max_new_tokens=6)
    for user in USER[:2]:  # the second turn brings the cache up to its history and keeps a snapshot there
        list(chat_turn(reuse, conversation, user, cfg, [2, 38]))
    assert reuse.snapshot is not None
    for cache in (reuse.snapshot[1], reuse.inner.cache):
        tensors = [t for c in cache.layers if c is not None for t in vars(c).values()]
        assert tensors and not any(t.requires_grad for t in tensors)


def test_restore_gives_back_the_state_it_was_given(model):
    backend = TowerBackend(model)
    backend.reset(1)
    backend.extend(torch.tensor([[5, 9, 11, 7, 20]]))
    saved = backend.state()
    logits = backend.extend(torch.tensor([[6]]))
    backend.restore(saved)
    again = backend.extend(torch.tensor([[6]]))  # the restored copy, not the saved one, is extended
    backend.restore(saved)
    assert torch.equal(logits, again) and torch.equal(backend.extend(torch.tensor([[6]])), logits)


# ------------------------------------------------------------------------------------------- the command

def invoke(*args, input=None):
    return CliRunner().invoke(get_app(), ["chat", *args], input=input)


def test_cli_chat_turns_match_generate_chat_on_the_same_conversation(chat_folder, tmp_path):
    """Turn 2 of `twotower chat` == `twotower generate --chat` on [user 1, reply 1, user 2]; /reset starts
    over; commands and empty lines are not turns."""
    common = ("--model", str(chat_folder), "--block", "4", "-n", "10", "--threshold", "0.3", "--system", "be brief.")
    r = invoke(*common, "--json", input=f"{USER[0]}\n\n/help\n{USER[1]}\n/reset\n{USER[0]}\n")
    assert r.exit_code == 0, r.output
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    assert [t["user"] for t in turns] == [USER[0], USER[1], USER[0]] and [t["turn"] for t in turns] == [1, 2, 1]
    assert turns[2]["token_ids"] == turns[0]["token_ids"] and turns[1]["read_tokens"] < turns[1]["prompt_tokens"]
    f = tmp_path / "talk.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": USER[0]},
                                          {"role": "assistant", "content": turns[0]["text"]},
                                          {"role": "user", "content": USER[1]}]}) + "\n")
    g = CliRunner().invoke(get_app(), ["generate", "--prompt-file", str(f), "--chat", "--json", *common])
    assert g.exit_code == 0, g.output
    assert json.loads(g.stdout)["token_ids"] == turns[1]["token_ids"]
    assert "/reset" in r.stderr  # the help text


def test_gather_joins_continued_lines_and_blocks():
    from twotower_cli.commands.chat import gather

    def more(*lines):
        rest = list(lines)

        def read():
            if not rest:
                raise EOFError
            return rest.pop(0)
        return read

    assert gather("plain", more("never read")) == "plain"
    assert gather("one \\", more("two\\", "three", "four")) == "one \ntwo\nthree"
    assert gather('"""', more("a", "", "  b", '"""', "after")) == "a\n\n  b"
    assert gather('"""', more("unclosed")) == "unclosed"  # the end of input closes a block
    assert gather("dangling\\", more()) == "dangling"


def test_cli_chat_multi_line_messages(folder):
    r = invoke("--model", str(folder), "--block", "4", "-n", "2", "--json",
               input='"""\nline one\nline two\n"""\nsecond \\\ncontinued\n')
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["user"] for x in r.stdout.splitlines()] == ["line one\nline two", "second \ncontinued"]


def test_cli_chat_plain_output_and_stats(folder):
    r = invoke("--model", str(folder), "--block", "4", "-n", "6", "--no-live", input="hello\nmore\n")
    assert r.exit_code == 0, r.output
    stats = [ln for ln in r.stderr.splitlines() if "tok/NFE" in ln]
    assert len(stats) == 2 and "read this turn" in stats[1]



def test_cli_chat_stats_line_is_one_line_on_a_narrow_stderr(folder, monkeypatch):
    import io

    from rich.console import Console

    from twotower_cli import display

    narrow = Console(file=io.StringIO(), width=40)
    monkeypatch.setattr(display, "err_console", lambda: narrow)
    r = invoke("--model", str(folder), "--block", "4", "-n", "6", "--no-live", input="hello\n")
    assert r.exit_code == 0, r.output
    lines = narrow.file.getvalue().splitlines()
    assert len(lines) == 1 and "tok/NFE" in lines[0] and "read this turn" in lines[0], lines


def test_cli_chat_top_k_while_greedy_warns_once_and_replies_greedily(folder):
    common = ("--model", str(folder), "--block", "4", "-n", "6", "--no-live")
    greedy = invoke(*common, input="hello\nmore\n")
    r = invoke(*common, "--top-k", "3", input="hello\nmore\n")
    assert r.exit_code == 0 and r.stdout == greedy.stdout, r.output
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")] == [
        "Warning: --top-k: no effect at --temperature 0, which decodes greedily (hint: add --temperature, e.g. "
        "--temperature 0.8)"]


def test_cli_chat_stdin_that_is_not_utf8_is_one_error_line(folder):
    r = invoke("--model", str(folder), "--block", "4", "-n", "2", "--json", input=b"hello \xff\n")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert r.stderr.startswith("Error: stdin is not UTF-8 text"), r.stderr


def test_cli_chat_block_defaults_to_the_checkpoints(folder):
    """No --block: the checkpoint's training block (write_twotower records 4); a larger --block warns."""
    common = ("--model", str(folder), "-n", "6", "--json", "--no-live")
    r = invoke(*common, input="hello\nmore\n")
    assert r.exit_code == 0 and "Warning" not in r.stderr, r.output
    assert [json.loads(x)["settings"]["block_size"] for x in r.stdout.splitlines()] == [4, 4]
    r = invoke(*common, "--block", "8", input="hello\n")
    assert r.exit_code == 0 and json.loads(r.stdout)["settings"]["block_size"] == 8, r.output
    assert "Warning: block 8 is larger than the block this denoiser was trained with (4" in r.stderr


def test_cli_chat_ar_is_not_refused_over_steps_it_does_not_use(folder):
    """--mode ar with --steps beyond the block (4): the replies of a run without it (it was an Error line)."""
    common = ("--model", str(folder), "--mode", "ar", "-n", "4", "--json")
    want = invoke(*common, input="hello\nmore\n")
    r = invoke(*common, "--steps", "9", input="hello\nmore\n")
    assert want.exit_code == 0 and r.exit_code == 0, r.output
    assert [json.loads(x)["token_ids"] for x in r.stdout.splitlines()] == [
        json.loads(x)["token_ids"] for x in want.stdout.splitlines()]


@pytest.mark.parametrize("args, text, needle", [
    (("--system", "x"), "hi\n", "chat template"),
    (("--steps", "9"), "hi\n", "steps"),
    (("--stop", "999"), "hi\n", "outside the vocabulary"),
    ((), "/nope\nhi\n", "unknown command /nope"),
])
def test_cli_chat_errors(folder, args, text, needle):
    r = invoke("--model", str(folder), "--block", "4", "-n", "4", "--no-live", *args, input=text)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], r.output
    assert "Traceback" not in r.output
    if text.startswith("/nope"):  # an unknown command is reported, and the chat goes on (piped in: exit code 1
        assert "tok/NFE" in r.stderr  # at the end, as after a failed turn; a script's line got no reply)
    assert r.exit_code == 1


def test_cli_chat_stop_text_ends_each_reply_before_it(folder):
    """`chat --stop-text`: each reply is the free reply cut before the stop text, its ids those of that text,
    finish_reason "stop", and the settings record it; the plain output prints the cut reply."""
    common = ("--model", str(folder), "--block", "4", "-n", "32", "--threshold", "0.3")
    free = json.loads(invoke(*common, "--json", input=VARIED + "\n").stdout)
    stop = stop_inside(free["text"])
    r = invoke(*common, "--json", "--stop-text", stop, input=VARIED + "\nmore\n")
    assert r.exit_code == 0, r.output
    first, second = (json.loads(x) for x in r.stdout.splitlines())
    want = free["text"][:free["text"].find(stop)]
    assert first["text"] == want and first["finish_reason"] == "stop" and first["settings"]["stop_texts"] == [stop]
    assert first["token_ids"] == free["token_ids"][:len(first["token_ids"])] and len(first["token_ids"]) < 32
    assert stop not in second["text"]
    plain = invoke(*common, "--no-live", "--stop-text", stop, input=VARIED + "\n")
    assert plain.exit_code == 0 and plain.stdout == want + "\n" and "ended at a --stop-text" in plain.stderr
    empty = invoke(*common, "--stop-text", "", input="hello\n")
    assert empty.exit_code == 1 and empty.stderr.startswith("Error: --stop-text ''") and "Traceback" not in empty.output


def test_cli_chat_no_template_ignores_the_template(chat_folder, folder):
    """--no-template: the conversation is a running text, as for a model without a template."""
    common = ("--block", "4", "-n", "6", "--json")
    a = json.loads(invoke("--model", str(chat_folder), "--no-template", *common, input="hello\n").stdout)
    b = json.loads(invoke("--model", str(folder), *common, input="hello\n").stdout)
    assert a["prompt_tokens"] == b["prompt_tokens"] and a["token_ids"] == b["token_ids"]


def test_cli_chat_sigterm_during_a_reply_ends_an_interactive_chat(folder, monkeypatch):
    """On a terminal Ctrl-C during a reply stops only that reply; SIGTERM (`kill`, a container stopping),
    which `cli.guarded` raises as Ctrl-C's KeyboardInterrupt, must still end the chat (it stopped the reply
    and waited for the next message: the process did not end)."""
    import os
    import signal
    import sys

    from twotower_cli import display
    from twotower_cli.commands import chat as chat_command

    class Terminal:  # stdin as a terminal: the interactive loop reads its lines with a prompt
        def __getattr__(self, name):
            return getattr(sys, name)

        stdin = type("Tty", (), {"isatty": staticmethod(lambda: True)})()

    real_follow, replies = display.follow, []

    def follow(*args, **kwargs):
        replies.append(1)
        os.kill(os.getpid(), signal.SIGTERM)  # while the reply runs
        time.sleep(0.5)
        return real_follow(*args, **kwargs)

    lines = iter(["hello", "more"])
    monkeypatch.setattr(chat_command, "sys", Terminal())
    monkeypatch.setattr(chat_command, "_lines", lambda interactive: lines)
    monkeypatch.setattr(display, "follow", follow)
    r = invoke("--model", str(folder), "--block", "4", "-n", "2", "--no-live")
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1] == "Error: interrupted", r.output
    assert replies == [1] and "reply stopped" not in r.stderr, r.output


@pytest.mark.parametrize("command, arg", [("chat", "messages=[]"), ("chat", "add_generation_prompt=false"),
                                          ("generate", "messages=[]")])
def test_cli_chat_arg_the_command_sets_is_one_error_line(chat_folder, command, arg):
    """--chat-arg setting what chat / generate --chat pass the template themselves (the conversation; chat's
    generation prompt) is one Error line, as serve refuses it (it was 'TypeError: render() got multiple
    values ...', reported as a bug)."""
    args = ["--model", str(chat_folder), "-n", "4", "--block", "4", "--no-live", "--chat-arg", arg]
    args = [*args, "--chat", "hi"] if command == "generate" else args
    r = CliRunner().invoke(get_app(), [command, *args], input="hi\n")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith(f"Error: --chat-arg cannot set {arg.split('=')[0]}") and "bug" not in lines[0]


def test_cli_chat_max_new_tokens_zero_hints_at_chats_own_default(folder):
    """-n 0 said "(hint: try 128)", generate's default, where chat's is 256."""
    r = invoke("--model", str(folder), "-n", "0", input="hi\n")
    assert r.exit_code == 1 and r.stderr.strip() == "Error: max-new-tokens 0 must be at least 1 (hint: try 256)", r.output


def test_cli_chat_warns_of_options_its_mode_does_not_read(folder):
    """As generate: --block/--threshold in ar (and --threshold under --policy topk) were ignored in silence;
    one Warning line each, and the same replies as without them."""
    common = ("--model", str(folder), "-n", "6", "--no-live")
    plain = invoke(*common, "--mode", "ar", input="hi\n")
    r = invoke(*common, "--mode", "ar", "--block", "8", "--threshold", "0.5", input="hi\n")
    assert r.exit_code == 0 and r.stdout == plain.stdout, r.output
    assert [ln.split(":")[1] for ln in r.stderr.splitlines() if ln.startswith("Warning:")] == [" --block", " --threshold"]
    r = invoke(*common, "--policy", "topk", "--threshold", "0.5", input="hi\n")
    assert r.exit_code == 0 and [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")] == [
        "Warning: --threshold: no effect with --policy topk (hint: leave it out, or use --policy threshold)"], r.output
    assert "Warning" not in plain.stderr


def test_cli_chat_names_a_missing_shard(folder, tmp_path):
    from twotower_cli.checkpoint import open_checkpoint

    sharded = reshard(folder, tmp_path / "sharded")
    shard = open_checkpoint(sharded).tensors["context_tower.embeddings.weight"].file
    (sharded / shard).unlink()
    r = invoke("--model", str(sharded), "-n", "4", input="hi\n")
    assert r.exit_code == 1 and r.stderr.strip() == (
        f"Error: checkpoint at {sharded} is incomplete: shard {shard} named in the index is missing (hint: "
        "re-download the checkpoint, or re-run the `twotower split` that wrote it)"), r.output


def test_cli_chat_ctrl_c_at_the_prompt_drops_the_line_and_the_chat_goes_on(folder, monkeypatch):
    """On a terminal Ctrl-C at the prompt drops what is being typed (as a shell or Python's prompt does); it
    ended the whole conversation, with exit code 0, when pressed just after a reply had ended. Ctrl-D still
    quits, SIGTERM at the prompt still ends the chat as an interrupt."""
    import sys

    from rich.console import Console

    from twotower_cli import display
    from twotower_cli.cli import Terminated
    from twotower_cli.commands import chat as chat_command

    class Terminal:  # stdin as a terminal: the interactive loop reads its lines with a prompt
        def __getattr__(self, name):
            return getattr(sys, name)

        stdin = type("Tty", (), {"isatty": staticmethod(lambda: True)})()

    def typing(*keys):
        class Typing(Console):
            def input(self, prompt="", **kw):
                key = next(keys_left)
                if isinstance(key, BaseException):
                    raise key
                return key
        keys_left = iter(keys)
        return Typing(stderr=True)

    monkeypatch.setattr(chat_command, "sys", Terminal())
    common = ("--model", str(folder), "--block", "4", "-n", "2", "--json")
    for keys, code, replies in ((["hello", KeyboardInterrupt(), "more", EOFError()], 0, ["hello", "more"]),
                                (["hello", Terminated()], 1, ["hello"])):
        console = typing(*keys)
        monkeypatch.setattr(display, "err_console", lambda console=console: console)
        r = invoke(*common)
        assert r.exit_code == code, r.output
        assert [json.loads(x)["user"] for x in r.stdout.splitlines()] == replies, r.output
    # the banner names the folder as it is, not read as rich markup ("m[bold]tt" was shown as "mtt")
    tagged = shutil.copytree(folder, folder.parent / "m[bold]tt")
    console = typing(EOFError())
    monkeypatch.setattr(display, "err_console", lambda: console)
    r = invoke("--model", str(tagged), "-n", "2")
    assert r.exit_code == 0 and "twotower chat · m[bold]tt · mask_diffusion" in r.stderr, r.output


def test_a_conversation_past_the_stated_context_is_warned_about_once(folder, tmp_path):
    """generate warns when a prompt and --max-new-tokens pass config.json's max_position_embeddings; a chat
    grows turn by turn past it without a word. Now one Warning: at the turn after which the next reply may pass
    it, naming /reset; the chat goes on."""
    short = shutil.copytree(folder, tmp_path / "short")
    raw = json.loads((short / "config.json").read_text())
    raw["max_position_embeddings"] = 40
    (short / "config.json").write_text(json.dumps(raw))
    r = CliRunner().invoke(get_app(), ["chat", "--model", str(short), "-n", "8", "--json"],
                           input="one\ntwo\nthree\nfour\nfive\nsix\n")
    assert r.exit_code == 0, r.output
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(turns) == 6
    reach = [t["prompt_tokens"] + len(t["token_ids"]) + 8 for t in turns]
    first = next(i for i, x in enumerate(reach) if x > 40)  # the turn after which the next reply may pass 40
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("Warning")]
    assert warnings == [f"Warning: with its next reply this conversation may reach {reach[first]} tokens, beyond the 40 "
                        "this checkpoint is meant for (max_position_embeddings); longer sequences run, but the model "
                        "was not trained on them (hint: /reset starts a new conversation)"], r.stderr
    r = CliRunner().invoke(get_app(), ["chat", "--model", str(folder), "-n", "8", "--json"], input="one\ntwo\n")
    assert r.exit_code == 0 and "Warning" not in r.stderr, r.output  # states no context: nothing to say
