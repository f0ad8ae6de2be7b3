"""A tour of twotower from Python, in six short steps: load a model, sample text in the three modes, watch
the denoiser unmask a block step by step, call the two towers by hand, continue several prompts at once,
and stream one. It runs in seconds on a laptop CPU with the embedded tiny model; the same lines run the 30B one.

    python examples/tour.py                       # the embedded tiny model
    python examples/tour.py --model nano-twotower-ft --device cuda
"""

from __future__ import annotations

import argparse

import torch

import twotower_cli
from twotower_cli import sampler as S


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder, hub id or alias (default: the embedded one)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    ap.add_argument("--prompt", default="ROMEO.\n")
    args = ap.parse_args()

    # 1. Load: the same loader as the commands (memory check, dtype, placement), and the tokenizer.
    rt = twotower_cli.load(args.model, device=args.device)
    cfg = rt.cfg
    print(f"1. {rt.folder.name}: {cfg.num_hidden_layers} layers {cfg.pattern!r} per tower, vocabulary "
          f"{cfg.vocab_size}, trained block {cfg.block_size}, mask id {cfg.mask_token_id}")

    # 2. Text in, text out. ar is the base model (context tower + its head), mock_ar the denoiser one token
    #    at a time, mask_diffusion fills blocks of masks, committing every token above the threshold.
    print("2. one prompt, three modes (greedy, 48 tokens):")
    for mode in ("ar", "mock_ar", "mask_diffusion"):
        c = rt.generate(args.prompt, mode=mode, max_new_tokens=48)
        print(f"   {mode:>14}: {len(c.token_ids)} tokens in {c.nfe} forwards "
              f"({len(c.token_ids) / max(c.nfe, 1):.2f} tok/NFE): {c.text[:60]!r}")

    # 3. The sampler is a generator of events: a display (or you) subscribes. Here the first block, step by
    #    step: which slots each denoiser forward commits, and how sure it was.
    settings = rt.sampling(S.SamplingConfig(max_new_tokens=cfg.block_size, threshold=0.5))
    prompt = rt.tokenizer.encode(args.prompt)
    decode = rt.tokenizer.decode
    print(f"3. block 0 of {args.prompt!r}, threshold 0.5 (· is a mask):")
    for ev in S.generate(rt.backend, [prompt], settings, rt.eos_ids):
        if isinstance(ev, S.Step):
            row = ev.tokens[0].tolist()
            shown = "".join("·" if t == settings.mask_token_id else decode([t]).replace("\n", "⏎") for t in row)
            sure = ", ".join(f"{p}:{c:.2f}" for p, c in zip(ev.committed[0], ev.confidences[0], strict=True))
            print(f"   step {ev.step}: {shown!r}  committed {sure}")

    # 4. The towers by hand. The context tower reads the prompt (its cache then holds Mamba states and
    #    keys/values); the denoiser reads a block of masks at t = 1 (all masked), attends to that cache at
    #    every layer, and predicts every slot at once. Its first slot is the next token; the AR head's next
    #    token is the base model's guess for the same place.
    backend = rt.backend
    backend.reset(1)
    with torch.no_grad():
        ar_logits = backend.extend(torch.tensor([prompt]))  # [1, V]: the next token after the prompt
        block = torch.full((1, cfg.block_size), cfg.mask_token_id)
        logits = backend.denoise(block, torch.ones(1)).float()  # [1, block, V]
    probs = logits.softmax(-1)
    probs[..., cfg.mask_token_id] = 0  # the sampler never commits the mask id
    conf, ids = probs.max(-1)
    ar_next = int(ar_logits.argmax(-1))
    print(f"4. the AR head's next token: {decode([ar_next])!r}; the denoiser on a fully masked block:")
    print("   " + " ".join(f"{decode([t])!r}:{c:.2f}" for t, c in zip(ids[0].tolist()[:8], conf[0].tolist()[:8],
                                                                         strict=True)) + " ...")

    # 5. Several prompts: continuous batching (a prompt takes the place of one that ended), a stop text.
    prompts = ["ROMEO.\n", "JULIET.\n", "HAMLET.\n", "KING HENRY.\n"]
    outs = rt.generate(prompts, max_new_tokens=64, stop_texts=["\n\n"], batch_size=2)
    print("5. four prompts, two at a time, each ending at its first blank line:")
    for p, c in zip(prompts, outs, strict=True):
        print(f"   {p.strip():>12} → {c.text!r} ({c.finish_reason})")

    # 6. Streaming: the text of one prompt as each block commits it (what a chat UI or `serve` shows).
    print("6. streamed, a block at a time:")
    for i, piece in enumerate(rt.stream(args.prompt, max_new_tokens=48)):
        print(f"   piece {i}: {piece!r}")


if __name__ == "__main__":
    main()
