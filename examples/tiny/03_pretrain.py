"""Stage 3 of the tiny-model recipe: pretrain a tiny NemotronH as an autoregressive LM on the stage-1 corpus.

The model is the project's own `NemotronHForCausalLM` (plain PyTorch, fp32, CPU), built from a config made
with `NemotronHConfig.build` and initialised by `init_nemotron_h`. All four layer kinds appear in the
pattern "M*ME-M*E" (Mamba-2, attention, MoE, MLP); the LM head is untied; about 3.2 M parameters.

Data. `corpus.txt` is cut into its documents (separated by "\\n\\n\\n"), each encoded as
`<s> text </s>`, and the documents are concatenated into one token stream. A training example is a random
window of `seq_len + 1` tokens of that stream (inputs = the first seq_len, targets = the last seq_len), so
almost every window starts mid-document: the model learns to continue text from any point, and a prompt
given *without* `<s>` (the demo feeds `ROMEO.` bare) is in distribution. `eval.txt` is encoded the same way
and scored on consecutive non-overlapping windows.

Optimisation. AdamW (weight decay on matrices only), linear warmup then cosine decay to `--min-lr-frac` of
the peak, gradient clipping. The MoE router's `e_score_correction_bias` (a buffer, not trained by gradient)
is updated the aux-loss-free way of DeepSeek-V3, as NemotronH is trained: after each step every expert's
bias moves by `--balance-rate` towards equal load (up if under-used, down if over-used).

Time budget. `--minutes M` ends the whole run (encoding, training, evaluations, saves, samples) in about M
minutes of wall time: after the warmup steps the cosine runs over *wall time*, not steps, ending at the
deadline less the time of a final evaluation and save, so a shared machine that slows down mid-run shortens
the run in steps but still completes the schedule. The first `--measure-steps` steps are timed and the
projected step count is logged. `--steps N` instead fixes the number of steps and the schedule over them
(reproducible: the data order and initialisation depend only on `--seed`).

Output (WORK = examples/tiny/work):
    WORK/tiny-base/     config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json,
                        special_tokens_map.json, generation_config.json; rewritten atomically at every
                        evaluation and at the end
    WORK/pretrain.log   train loss every --log-every steps, eval loss every --eval-every steps and at the
                        end, greedy samples (everything is also printed)

    .venv/bin/python examples/tiny/03_pretrain.py --minutes 36
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from twotower_cli.checkpoint import write_checkpoint
from twotower_cli.config import NemotronHConfig
from twotower_cli.model import NemotronHForCausalLM, Router, init_nemotron_h

HERE = Path(__file__).resolve().parent
BOS, EOS, PAD = 1, 2, 0
DOC_SEP = "\n\n\n"  # between documents in corpus.txt / eval.txt (stage 1)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SAMPLE_PROMPTS = ("ROMEO.", "And God said")

# The tiny model: every NemotronH layer kind, few layers and few experts (CPU decode speed is dominated by
# per-layer Python overhead). Hidden 192 keeps both shipped checkpoints (base + TwoTower, fp16) under the
# 25 MB the package allows. HF key names, as a NemotronH config.json has them.
PATTERN = "M*ME-M*E"
MODEL_CONFIG = dict(
    vocab_size=4096,
    hidden_size=192,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=48,
    mamba_num_heads=6,
    mamba_head_dim=32,
    n_groups=2,
    ssm_state_size=32,
    conv_kernel=4,
    chunk_size=64,
    intermediate_size=384,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=192,
    moe_shared_expert_intermediate_size=384,
    n_shared_experts=1,
    routed_scaling_factor=1.0,
    norm_topk_prob=True,
    time_step_limit=[0.0, float("inf")],
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=False,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
    torch_dtype="float32",
)


class Log:
    """Print and append to a log file (flushed at once, so `tail -f` follows a background run)."""

    def __init__(self, path: Path):
        self.file = open(path, "w")

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()


def encode_documents(tok, path: Path):
    """The file as one token stream: `<s> doc </s>` per document, concatenated. Returns a 1-D int64 tensor."""
    docs = [d for d in path.read_text().split(DOC_SEP) if d.strip()]
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.append(BOS)
        ids.extend(enc.ids)
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long), len(docs)


def build_model(seed: int):
    cfg = NemotronHConfig.build(PATTERN, **MODEL_CONFIG)
    model = NemotronHForCausalLM(cfg)
    init_nemotron_h(model, torch.Generator().manual_seed(seed))
    return cfg, model


def param_groups(model, weight_decay: float):
    """Weight decay on matrices (linear, embedding, conv, router weights); none on norms, biases, A_log, D, dt_bias."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, progress: float, peak: float, warmup: int, min_frac: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from `peak` to `min_frac * peak` as `progress` (the
    fraction of the post-warmup schedule done, in steps or in wall time) goes from 0 to 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class LoadBalancer:
    """Aux-loss-free MoE balancing (DeepSeek-V3 §2.1.2): count each router's expert choices during training
    forwards (a forward hook), then nudge `e_score_correction_bias` by ±rate towards equal load."""

    def __init__(self, model, rate: float):
        self.rate = rate
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.counts = [torch.zeros(r.n_experts) for r in self.routers]
        for i, r in enumerate(self.routers):
            r.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if module.training:
                experts = output[1]
                self.counts[i] += torch.bincount(experts.flatten(), minlength=module.n_experts).float()
        return hook

    def imbalance(self) -> list[float]:
        """Per router: the busiest expert's share over the mean share since the last reset (1.0 = balanced)."""
        return [float(c.max() / c.mean()) if c.sum() else 1.0 for c in self.counts]

    def step(self) -> None:
        with torch.no_grad():
            for r, c in zip(self.routers, self.counts, strict=True):
                if self.rate and c.sum():
                    r.e_score_correction_bias += self.rate * torch.sign(c.mean() - c)

    def reset(self) -> None:
        for c in self.counts:
            c.zero_()


def evaluate(model, stream, seq_len: int, batch: int) -> float:
    """Mean next-token cross-entropy over consecutive non-overlapping windows of the eval stream."""
    n = (len(stream) - 1) // seq_len
    x = stream[: n * seq_len].view(n, seq_len)
    y = stream[1: n * seq_len + 1].view(n, seq_len)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, batch):
            logits = model(x[i:i + batch])
            total += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten(), reduction="sum").item()
            count += y[i:i + batch].numel()
    model.train(was_training)
    return total / count


def generate(model, tok, prompt: str, max_new_tokens: int, temperature: float = 0.0, generator=None) -> str:
    """Decode with the model's cache: one prefill of the bare prompt (no <s>), then one token per forward."""
    was_training = model.training
    model.eval()
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
    cache = model.make_cache(1)
    out: list[int] = []
    with torch.no_grad():
        logits = model(ids, cache=cache)[:, -1]
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            if nxt.item() == EOS:
                break
            out.append(nxt.item())
            logits = model(nxt, cache=cache)[:, -1]
    model.train(was_training)
    return prompt + tok.decode(out, skip_special_tokens=False)


def save(model, cfg, tok_dir: Path, out: Path) -> None:
    """The checkpoint folder, replaced atomically: config, fp32 safetensors, tokenizer, generation config."""
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        gen = Path(tmp) / "generation_config.json"
        gen.write_text(json.dumps({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}, indent=2) + "\n")
        write_checkpoint(out, tensors, cfg.to_dict(), extra_files=[tok_dir / f for f in TOKENIZER_FILES] + [gen],
                         force=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=HERE / "work", help="working folder (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: WORK/tiny-base)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=36.0,
                        help="wall-time budget of the whole run; sets the step count (default: %(default)s)")
    budget.add_argument("--steps", type=int, default=None, help="fixed number of optimiser steps")
    p.add_argument("--measure-steps", type=int, default=20, help="steps timed for the throughput report")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="final lr as a fraction of the peak")
    p.add_argument("--warmup", type=int, default=60, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--balance-rate", type=float, default=1e-3,
                   help="MoE correction-bias step per optimiser step (0 disables)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=500, help="also saves the checkpoint")
    p.add_argument("--sample-tokens", type=int, default=80, help="new tokens per sample at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch and tokenizers threads (default: %(default)s)")
    args = p.parse_args()
    os.environ.setdefault("RAYON_RS_NUM_CPUS", str(args.threads))  # before tokenizers is imported

    from tokenizers import Tokenizer

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    work = args.work
    out = args.out or work / "tiny-base"
    tok_dir = work / "tokenizer"
    for f in (work / "corpus.txt", work / "eval.txt", tok_dir / "tokenizer.json"):
        if not f.exists():
            raise SystemExit(f"{f} not found: run examples/tiny/01_corpus.py and 02_tokenizer.py first")
    work.mkdir(parents=True, exist_ok=True)
    log = Log(work / "pretrain.log")

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    train_stream, n_docs = encode_documents(tok, work / "corpus.txt")
    eval_stream, n_eval_docs = encode_documents(tok, work / "eval.txt")
    log(f"data: corpus.txt {len(train_stream):,} tokens ({n_docs} documents), "
        f"eval.txt {len(eval_stream):,} tokens ({n_eval_docs} documents), "
        f"encoded in {time.perf_counter() - t_start:.1f} s")

    cfg, model = build_model(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.backbone.embeddings.weight.numel() + model.lm_head.weight.numel()
    moe = model.backbone.layers[cfg.layer_indices("E")[0]].mixer if "E" in cfg.pattern else None
    n_inactive = (0 if moe is None else len(cfg.layer_indices("E")) * (cfg.n_routed_experts - cfg.num_experts_per_tok)
                  * sum(p.numel() for p in moe.experts.parameters()) // cfg.n_routed_experts)
    log(f"model: pattern {cfg.pattern}, hidden {cfg.hidden_size}, {n_params:,} parameters "
        f"({n_params - n_embed:,} without embeddings and head; {n_params - n_inactive:,} active per token)")
    log(f"config: {json.dumps({k: v for k, v in cfg.to_dict().items() if k not in ('architectures', 'model_type')})}")

    model.train()
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    balancer = LoadBalancer(model, args.balance_rate)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    max_start = len(train_stream) - args.seq_len - 1
    offsets = torch.arange(args.seq_len + 1)
    tokens_per_step = args.batch * args.seq_len

    t0 = time.perf_counter()
    eval_loss = evaluate(model, eval_stream, args.seq_len, args.batch)
    eval_time = time.perf_counter() - t0
    log(f"step 0: eval loss {eval_loss:.4f} (ln V = {math.log(cfg.vocab_size):.4f}), eval took {eval_time:.1f} s")

    # Schedule: over steps with --steps; else over wall time, from the end of the warmup to a deadline that
    # leaves room for the final evaluation, save and samples.
    deadline = None if args.steps else t_start + args.minutes * 60 - (eval_time + 45)
    if args.steps:
        log(f"schedule: {args.steps} steps x {tokens_per_step} tokens = {args.steps * tokens_per_step / 1e6:.1f} M "
            f"tokens ({args.steps * tokens_per_step / len(train_stream):.2f} epochs)")
    else:
        log(f"schedule: warmup {args.warmup} steps, then cosine over wall time until "
            f"{(deadline - t_start) / 60:.1f} min after the start")
    measure_from = 2  # the first steps pay one-off allocation costs
    t_train = time.perf_counter()
    t_measure = t_warm_end = step_time = None
    loss_sum, loss_n, t_log = 0.0, 0, time.perf_counter()
    step, eval_step = 0, 0
    while True:
        now = time.perf_counter()
        if args.steps:
            if step >= args.steps:
                break
            progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        else:
            if step_time is not None and now + step_time > deadline:
                break
            if step == args.warmup:
                t_warm_end = now
            progress = 0.0 if t_warm_end is None else (now - t_warm_end) / max(1e-9, deadline - t_warm_end)
        lr = lr_at(step, progress, args.lr, args.warmup, args.min_lr_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, max_start + 1, (args.batch,), generator=data_gen)
        window = train_stream[starts[:, None] + offsets]  # [batch, seq_len + 1]
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip).item()
        opt.step()
        balancer.step()
        step += 1
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise SystemExit(f"step {step}: loss is {loss_value}")
        loss_sum += loss_value
        loss_n += 1
        # Recent seconds per step (train steps only), for the deadline check.
        this_step = time.perf_counter() - now
        step_time = this_step if step_time is None else 0.9 * step_time + 0.1 * this_step

        if step == measure_from:
            t_measure = time.perf_counter()
        if step == measure_from + args.measure_steps:
            measured = (time.perf_counter() - t_measure) / args.measure_steps
            msg = (f"measured {measured:.2f} s/step = {tokens_per_step / measured:,.0f} tokens/s over "
                   f"{args.measure_steps} steps")
            if deadline is not None:
                fit = step + int((deadline - time.perf_counter()) / (measured + eval_time / args.eval_every))
                msg += (f"; at this rate about {fit} steps = {fit * tokens_per_step / 1e6:.2f} M tokens "
                        f"({fit * tokens_per_step / len(train_stream):.2f} epochs) fit in {args.minutes:g} min")
            log(msg)

        if step % args.log_every == 0:
            dt = time.perf_counter() - t_log
            imb = " ".join(f"{x:.2f}" for x in balancer.imbalance())
            where = f"{step}/{args.steps}" if args.steps else f"{step} ({100 * min(1.0, progress):.0f}% of the cosine)"
            log(f"step {where}: loss {loss_sum / loss_n:.4f}  lr {lr:.2e}  grad {grad_norm:.2f}  "
                f"{loss_n * tokens_per_step / dt:,.0f} tok/s  moe max/mean load {imb}  "
                f"elapsed {(time.perf_counter() - t_start) / 60:.1f} min")
            balancer.reset()
            loss_sum, loss_n, t_log = 0.0, 0, time.perf_counter()
        if step % args.eval_every == 0:
            t0 = time.perf_counter()
            eval_loss, eval_step = evaluate(model, eval_stream, args.seq_len, args.batch), step
            save(model, cfg, tok_dir, out)
            log(f"step {step}: eval loss {eval_loss:.4f} (ppl {math.exp(eval_loss):.1f}), saved {out} "
                f"({time.perf_counter() - t0:.1f} s)")
            t_log += time.perf_counter() - t0  # keep eval time out of the train throughput

    train_time = time.perf_counter() - t_train
    if loss_n:
        log(f"step {step}: loss {loss_sum / loss_n:.4f} (last {loss_n} steps)  lr {lr:.2e}")
    if eval_step != step:
        eval_loss = evaluate(model, eval_stream, args.seq_len, args.batch)
        save(model, cfg, tok_dir, out)
        log(f"step {step}: eval loss {eval_loss:.4f} (ppl {math.exp(eval_loss):.1f}), saved {out}")
    log(f"done: {step} steps, {step * tokens_per_step / 1e6:.2f} M tokens "
        f"({step * tokens_per_step / len(train_stream):.2f} epochs) in {train_time / 60:.1f} min "
        f"({step * tokens_per_step / train_time:,.0f} tokens/s incl. evals), final eval loss {eval_loss:.4f}")

    gen = torch.Generator().manual_seed(args.seed)
    for prompt in SAMPLE_PROMPTS:
        t0 = time.perf_counter()
        text = generate(model, tok, prompt, args.sample_tokens)
        log(f"\n--- greedy, prompt {prompt!r} ({time.perf_counter() - t0:.1f} s)\n{text}")
        text = generate(model, tok, prompt, args.sample_tokens, temperature=0.8, generator=gen)
        log(f"\n--- temperature 0.8, prompt {prompt!r}\n{text}")
    log(f"\ntotal time {(time.perf_counter() - t_start) / 60:.1f} min; checkpoint {out}")


if __name__ == "__main__":
    main()
