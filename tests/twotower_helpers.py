"""Builders for two-tower tests: random tiny TwoTower checkpoints written by hand from the spec §3 layout
(independently of `split`), and a character tokenizer that fits a tiny vocabulary."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

from twotower_cli.checkpoint import write_checkpoint
from twotower_cli.config import NemotronHConfig
from twotower_cli.model.init import init_nemotron_h
from twotower_cli.model.nemotron_h import NemotronHForCausalLM
from twotower_cli.towers import TowerBackend

CHARS = list("abcdefghijklmnopqrstuvwxyz .,!?'\n")


def tiny_cfg(pattern: str = "M*EM-E*M", vocab: int = 48, **kw) -> NemotronHConfig:
    base = dict(hidden_size=32, vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=8,
                intermediate_size=48, moe_intermediate_size=24, moe_shared_expert_intermediate_size=32,
                n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=2.5, eos_token_id=2,
                bos_token_id=1, pad_token_id=0, time_step_limit=[0.0, {"__float__": "Infinity"}])
    base.update(kw)
    return NemotronHConfig.build(pattern, **base)


def write_char_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<mask>": 3}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "unk_token": "<unk>", "pad_token": "<unk>"}))


def random_base(cfg: NemotronHConfig, seed: int = 0) -> NemotronHForCausalLM:
    model = NemotronHForCausalLM(cfg)
    init_nemotron_h(model, torch.Generator().manual_seed(seed), std=0.1)
    return model.eval()


def twotower_tensors(base: NemotronHForCausalLM, time_conditioning: str = "identity", seed: int = 1,
                     denoiser: NemotronHForCausalLM | None = None) -> dict[str, torch.Tensor]:
    """The TwoTower tensors of spec §3 from a base model; `denoiser` (another random model) makes the
    denoiser tower differ from the context tower; time_conditioning 'identity' or 'random'."""
    cfg = base.cfg
    H = cfg.hidden_size
    g = torch.Generator().manual_seed(seed)
    sd = base.state_dict()
    dsd = (denoiser or base).state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith("backbone."):
            out["context_tower." + k[len("backbone."):]] = v.clone()
            out["denoiser_tower." + k[len("backbone."):]] = dsd[k].clone()
    out["context_lm_head.weight"] = sd["lm_head.weight"].clone()
    out["lm_head.weight"] = dsd["lm_head.weight"].clone()
    out["t_embedder.mlp.0.weight"] = torch.randn(H, 256, generator=g) * 0.02
    out["t_embedder.mlp.0.bias"] = torch.zeros(H)
    out["t_embedder.mlp.2.weight"] = torch.randn(H, H, generator=g) * 0.02
    out["t_embedder.mlp.2.bias"] = torch.zeros(H)
    if time_conditioning == "identity":
        out["t_block.1.weight"] = torch.zeros(3 * H, H)
        out["t_block.1.bias"] = torch.zeros(3 * H)
        for i in range(cfg.num_hidden_layers):
            out[f"scale_shift_tables.{i}"] = torch.tensor([[0.0], [0.0], [1.0]]).expand(3, H).clone()
    else:
        out["t_embedder.mlp.0.weight"] *= 50
        out["t_embedder.mlp.2.weight"] *= 20
        out["t_block.1.weight"] = torch.randn(3 * H, H, generator=g) * 0.3
        out["t_block.1.bias"] = torch.randn(3 * H, generator=g) * 0.1
        for i in range(cfg.num_hidden_layers):
            out[f"scale_shift_tables.{i}"] = torch.randn(3, H, generator=g) * 0.2 + torch.tensor([[0.0], [0.0], [1.0]])
    return out


def write_twotower(folder: Path, base: NemotronHForCausalLM, time_conditioning: str = "identity",
                   denoiser: NemotronHForCausalLM | None = None, tokenizer: bool = True) -> Path:
    raw = base.cfg.to_dict()
    raw["architectures"] = ["NemotronHTwoTowerForCausalLM"]
    raw["twotower"] = {"mask_token_id": 3, "block_size": 4, "format_version": 1}
    write_checkpoint(folder, twotower_tensors(base, time_conditioning, denoiser=denoiser), raw)
    if tokenizer:
        write_char_tokenizer(folder)
    return folder


def write_random_twotower(folder: Path, seeds: tuple[int, int] = (11, 12), pattern: str = "M*EM-E*M") -> Path:
    """A TwoTower checkpoint of the tiny config with two random towers (context tower seeds[0], denoiser
    seeds[1]) and random time conditioning: a model whose denoiser differs from its context tower."""
    cfg = tiny_cfg(pattern)
    return write_twotower(folder, random_base(cfg, seeds[0]), "random", denoiser=random_base(cfg, seeds[1]))


def write_base(folder: Path, base: NemotronHForCausalLM, tokenizer: bool = True) -> Path:
    write_checkpoint(folder, base.state_dict(), base.cfg.to_dict())
    if tokenizer:
        write_char_tokenizer(folder)
    return folder


# ------------------------------------------------------------------------------------------- chat

CHAT_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set turns = messages %}
{%- endif %}
{{ bos_token }}<|im_start|>system
{{ system }}{% if tools is defined %}{{ tools | tojson }}{% endif %}<|im_end|>
{% for m in turns %}
    {%- if m.role not in ['user', 'assistant'] %}
        {{- raise_exception('roles must alternate user and assistant, not ' + m.role) }}
    {%- endif %}
<|im_start|>{{ m.role }}
{{ m.content | trim }}<|im_end|>
{% if loop.last %}{% break %}{% endif %}
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think></think>{% else %}<think>
{% endif %}
{%- endif %}
"""
TOOL_TEMPLATE = "{{ bos_token }}tools {{ tools | tojson }}{% for m in messages %}|{{ m.content }}{% endfor %}"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def add_chat(folder, where="jinja"):
    """The char tokenizer plus ChatML special tokens (ids 37-40, inside the tiny vocabulary) and a chat
    template: in chat_template.jinja, as tokenizer_config.json's string, or in its named list (with a
    "tool_use" template, which transformers picks for a conversation given tools)."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if where == "jinja":
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    elif where == "config":
        config["chat_template"] = CHAT_TEMPLATE
    else:
        config["chat_template"] = [{"name": "tool_use", "template": TOOL_TEMPLATE},
                                   {"name": "default", "template": CHAT_TEMPLATE}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 38]}))
    return folder


class Widths(TowerBackend):
    """A sampler backend that notes how many rows its cache holds at every denoiser forward (`widths`)."""

    def __init__(self, model):
        super().__init__(model)
        self.widths = []

    def denoise(self, *args, **kw):
        self.widths.append(self.cache.batch)
        return super().denoise(*args, **kw)


def reshard(folder: Path, out: Path, shards: int = 6) -> Path:
    """`folder`'s checkpoint rewritten as about `shards` safetensors files with an index (the other files copied)."""
    from twotower_cli.checkpoint import open_checkpoint, write_checkpoint

    ckpt = open_checkpoint(folder)
    extra = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".safetensors"
             and p.name not in ("config.json", "model.safetensors.index.json")]
    write_checkpoint(out, dict(ckpt.iter_tensors(list(ckpt.tensors))), ckpt.config_raw, extra,
                     max_shard_size=ckpt.total_bytes // shards + 1)
    assert len(open_checkpoint(out).files) > 2
    return out


def with_nan(folder: Path, out: Path, names: tuple[str, ...]) -> Path:
    """A copy of the single-file checkpoint `folder` at `out` whose tensors `names` hold a NaN (their first
    element), as a training run that diverged would leave them."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(folder, out)
    with safe_open(out / "model.safetensors", "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for name in names:
        tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, out / "model.safetensors", metadata=metadata)
    return out


def stop_inside(text: str) -> str:
    """The shortest text that first occurs past the first third of `text`: a stop text whose cut (before its
    first occurrence) leaves some text and takes some away."""
    for n in (1, 2, 3):
        for i in range(len(text) // 3, len(text) - n):
            if text.find(text[i:i + n]) == i:
                return text[i:i + n]
    raise AssertionError(f"no stop text to take from {text!r}")


def fed_through_a_pipe(path: Path, text: str) -> Path:
    """A named pipe at `path` that a thread fills with `text` once, as the shell's `<(zcat corpus.txt.gz)` is."""
    os.mkfifo(path)
    threading.Thread(target=lambda: path.write_text(text), daemon=True).start()
    return path
