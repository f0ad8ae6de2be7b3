"""The live unmasking view, drawn from a real sampler's events (the same stream `generate` feeds it)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from tests.twotower_helpers import random_base, tiny_cfg, write_twotower

from twotower_cli import sampler as S
from twotower_cli.display import LiveUnmasking, finite_json, number
from twotower_cli.text import Tokenizer
from twotower_cli.towers import TowerBackend, load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(backend, tokenizer) of a tiny TwoTower whose denoiser is unlike its context tower."""
    cfg = tiny_cfg()
    folder = write_twotower(tmp_path_factory.mktemp("tt") / "tt", random_base(cfg, 11), "random",
                            denoiser=random_base(cfg, 12))
    return TowerBackend(load_model(folder, need_denoiser=True).twotower), Tokenizer(folder)


def text_of(renderable) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_live_view_shows_masks_commits_and_the_steps_of_a_short_last_block(tiny):
    backend, tok = tiny
    settings = S.SamplingConfig(block_size=4, threshold=0.99, max_new_tokens=10)  # blocks of 4, 4, 2
    view = LiveUnmasking(tok.decode, ["hello"], n_blocks=3, steps=4, mode="mask_diffusion", mask_id=3)
    seen_masked = False
    for ev in S.generate(backend, [tok.encode("hello")], settings):
        view.handle(ev)
        if isinstance(ev, S.Step):
            shown = text_of(view.render())
            masked = int((ev.tokens[0] == 3).sum())
            assert shown.count(LiveUnmasking.MASK_GLYPH) == masked
            seen_masked |= masked > 0
            steps_of_block = 2 if ev.block == 2 else 4
            assert f"block {ev.block + 1}/3  step {ev.step + 1}/{steps_of_block}  NFE {ev.nfe}" in shown
        if isinstance(ev, S.Finished):
            final = text_of(view.render())
            assert final.startswith("hello" + tok.decode(ev.generations[0].token_ids))
    assert seen_masked
    view.__exit__(None, None, None)  # the last frame keeps the status line unless told not to
    assert "block 3/3" in text_of(view.render())
    quiet = LiveUnmasking(tok.decode, [""], n_blocks=1, steps=4, mode="mask_diffusion", mask_id=3, keep_status=False)
    with quiet:
        assert "NFE" in text_of(quiet.render())
    assert "NFE" not in text_of(quiet.render())


@pytest.mark.parametrize("mode", ["ar", "mock_ar"])
def test_live_view_counts_tokens_not_blocks_in_the_one_token_modes(tiny, mode):
    """ar and mock_ar commit one token per forward: the status line counts tokens of -n ("token 3/5"), where
    it said "block 3/5" of blocks that do not exist in those modes."""
    backend, tok = tiny
    settings = S.SamplingConfig(mode=mode, block_size=4, max_new_tokens=5)
    view = LiveUnmasking(tok.decode, ["hello"], n_blocks=5, steps=1, mode=mode, mask_id=3)
    for ev in S.generate(backend, [tok.encode("hello")], settings):
        view.handle(ev)
        if isinstance(ev, S.Step):
            assert text_of(view.render()).rstrip().endswith(f"{mode}  token {ev.block + 1}/5  NFE {ev.nfe}")


def test_follow_draws_a_live_view_or_hands_events_on(tiny, monkeypatch):
    """display.follow: live, the events are drawn on a terminal console; otherwise they go to `on_event`.
    Either way it returns the run's Finished event."""
    from twotower_cli import display

    backend, tok = tiny
    settings = S.SamplingConfig(block_size=4, threshold=0.5, max_new_tokens=8)
    want = S.run(backend, [tok.encode("hello")], settings)
    terminal = Console(file=io.StringIO(), force_terminal=True, width=200)
    monkeypatch.setattr(display, "err_console", lambda: terminal)
    got = display.follow(S.generate(backend, [tok.encode("hello")], settings), tok.decode, ["hello"], settings,
                         live=True, keep_status=False)
    assert got.generations[0].token_ids == want.generations[0].token_ids
    drawn = terminal.file.getvalue()  # redraws are throttled: the first frame and the last one are certain
    last = drawn.rsplit("\x1b[2K", 1)[-1]
    assert "block 1/2" in drawn and tok.decode(want.generations[0].token_ids) in last and "NFE" not in last
    seen = []
    got = display.follow(S.generate(backend, [tok.encode("hello")], settings), tok.decode, ["hello"], settings,
                         live=False, on_event=seen.append)
    assert seen[-1] is got and sum(isinstance(e, S.BlockDone) for e in seen) == 2


def test_live_view_ends_on_the_text_as_generated_not_past_its_end_id(tiny):
    """A stop id inside a block: the last frame shows the generation cut there (what --no-live prints), not
    the rest of the block the sampler filled after it."""
    backend, tok = tiny
    prompt = tok.encode("hello")
    free = S.run(backend, [prompt], S.SamplingConfig(block_size=4, threshold=0.5, max_new_tokens=12))
    ids = free.generations[0].token_ids
    # a stop id whose first use is not the last of its block, so the block holds tokens after it
    stop = next(t for i, t in enumerate(ids) if ids.index(t) == i and i % 4 != 3 and tok.decode(ids[i + 1:(i // 4 + 1) * 4]))
    settings = S.SamplingConfig(block_size=4, threshold=0.5, max_new_tokens=12, stop_ids=(stop,))
    want = S.run(backend, [prompt], settings).generations[0]
    assert want.finish_reason == "eos" and want.token_ids == ids[:ids.index(stop)]
    view = LiveUnmasking(tok.decode, ["hello"], n_blocks=3, steps=4, mode="mask_diffusion", mask_id=3)
    for ev in S.generate(backend, [prompt], settings):
        view.handle(ev)
    shown = text_of(view.render()).rsplit("\n\nmask_diffusion  block", 1)[0]
    assert shown == "hello" + tok.decode(want.token_ids)


def test_live_view_ends_on_the_final_text_it_is_given(tiny):
    """`final` (generate's --stop-text cut): the last frame shows that text, not the ids decoded, while the
    frames before it show the blocks as they unmask."""
    backend, tok = tiny
    settings = S.SamplingConfig(block_size=4, threshold=0.5, max_new_tokens=8)
    view = LiveUnmasking(tok.decode, ["hello"], n_blocks=2, steps=4, mode="mask_diffusion", mask_id=3,
                         final=lambda ids: f"<{len(ids)} ids>")
    for ev in S.generate(backend, [tok.encode("hello")], settings):
        view.handle(ev)
        if isinstance(ev, S.BlockDone):
            assert "ids>" not in text_of(view.render())
    assert text_of(view.render()).startswith("hello<8 ids>\n")


def test_a_block_settled_at_a_stop_id_draws_no_mask_placeholder_as_text(tiny):
    """A block whose text a stop id decided before it was filled keeps masked slots after the stop id
    (`sampler.fill_block`); the frames after it draw the committed text, not the mask token's text."""
    backend, tok = tiny
    prompt = tok.encode("hello")
    free = S.run(backend, [prompt], S.SamplingConfig(block_size=4, threshold=0.99, max_new_tokens=12))
    ids = free.generations[0].token_ids
    seen = 0
    for stop in dict.fromkeys(ids):  # each id as the stop id, in order of first use
        settings = S.SamplingConfig(block_size=4, threshold=0.99, max_new_tokens=12, stop_ids=(stop,))
        view = LiveUnmasking(tok.decode, ["hello"], n_blocks=3, steps=4, mode="mask_diffusion", mask_id=3)
        for ev in S.generate(backend, [prompt], settings):
            view.handle(ev)
            if isinstance(ev, S.BlockDone) and 3 in ev.tokens[0].tolist():
                seen += 1
                assert tok.decode([3]) not in text_of(view.render())
                assert text_of(view.render()).startswith("hello" + tok.decode(ids[:ids.index(stop)]))
    assert seen  # some stop id settled its block early


def test_a_sequence_that_ended_draws_no_more_blocks_while_the_batch_goes_on(tiny):
    """Two prompts, one ending at a stop id in its first block: the other's later blocks are drawn step by
    step, the ended one's not (its blocks take no steps and their slots stay masked: no mask glyphs after its
    text)."""
    backend, tok = tiny
    prompts = [tok.encode("hello"), tok.encode("the quick brown fox")]
    free = S.run(backend, prompts, S.SamplingConfig(block_size=4, threshold=0.99, max_new_tokens=12))
    first = free.generations[0].token_ids
    stop = next(t for t in first[:4] if t not in free.generations[1].token_ids)  # ends row 0 only
    settings = S.SamplingConfig(block_size=4, threshold=0.99, max_new_tokens=12, stop_ids=(stop,))
    view = LiveUnmasking(tok.decode, ["A:", "B:"], n_blocks=3, steps=4, mode="mask_diffusion", mask_id=3)
    later = 0
    for ev in S.generate(backend, prompts, settings):
        view.handle(ev)
        if isinstance(ev, S.Step) and ev.block > 0:  # every glyph drawn is one of B's masked slots
            later += 1
            assert text_of(view.render()).count(LiveUnmasking.MASK_GLYPH) == int((ev.tokens[1] == 3).sum())
            assert ev.committed[0] == []  # A's block takes no commits
    assert later


@pytest.mark.parametrize("width", [60, 24])  # 24: the status line wraps
def test_live_frames_fit_a_short_terminal_and_keep_the_block_in_view(tiny, width):
    """A text taller than the terminal: every frame fits its height and still shows the block being unmasked
    and the status line (rich's Live cut such a frame at the bottom, under a "..."); the last frame is all
    the text."""
    backend, tok = tiny
    settings = S.SamplingConfig(block_size=4, threshold=0.99, max_new_tokens=40)
    terminal = Console(file=io.StringIO(), width=width, height=10, color_system=None)
    prompt = "".join(f"line {i}\n" for i in range(12))  # taller than the terminal by itself
    view = LiveUnmasking(tok.decode, [prompt], n_blocks=10, steps=4, mode="mask_diffusion", mask_id=3)
    tall = 0
    for ev in S.generate(backend, [tok.encode(prompt)], settings):
        view.handle(ev)
        if isinstance(ev, S.Step):
            with terminal.capture() as frame:
                terminal.print(view.render())
            lines = frame.get().splitlines()
            with terminal.capture() as whole:
                terminal.print(view.render(whole=True))
            tall += len(whole.get().splitlines()) > terminal.height
            assert len(lines) <= terminal.height, lines
            assert sum(ln.count(LiveUnmasking.MASK_GLYPH) for ln in lines) == int((ev.tokens[0] == 3).sum())
            status = f"mask_diffusion  block {ev.block + 1}/10  step {ev.step + 1}/4  NFE {ev.nfe}"
            assert " ".join(" ".join(lines[-3:]).split()).endswith(" ".join(status.split()))
        if isinstance(ev, S.Finished):
            final = text_of(view.render(whole=True))
            assert final.startswith(prompt + tok.decode(ev.generations[0].token_ids))
    assert tall > 0  # the text did outgrow the terminal


def test_finite_json_nulls_every_nan_and_infinity_at_any_depth_and_keeps_the_rest():
    nan, inf = float("nan"), float("inf")
    value = {"a": nan, "b": [1.5, -inf, {"c": inf, "d": (2, nan)}], "e": "nan", "f": 0, "g": None, "h": True}
    assert finite_json(value) == {"a": None, "b": [1.5, None, {"c": None, "d": [2, None]}], "e": "nan", "f": 0,
                                  "g": None, "h": True}
    assert finite_json(nan) is None and finite_json(3.0) == 3.0


def test_number_formats_finite_values_and_shows_a_dash_for_nan_and_infinity():
    assert (number(1.23456, ".2f"), number(2.5, ".2f", "×"), number(0.0, ".3f")) == ("1.23", "2.50×", "0.000")
    assert [number(x, ".4f", "×") for x in (float("nan"), float("inf"), float("-inf"))] == ["-", "-", "-"]
