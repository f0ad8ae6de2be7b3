"""The two-tower model (spec §3–§6): a frozen causal context tower and a block denoiser.

`TwoTower` holds modules named exactly like NVIDIA's checkpoint keys (`context_tower.*`,
`context_lm_head`, `denoiser_tower.*`, `lm_head`, `t_embedder.mlp.*`, `t_block.1`, `scale_shift_tables.*`),
so loading is strict key-for-key. Both towers are ordinary `NemotronHModel`s; the denoiser's block forward
(`denoise`) walks its layers itself to add what the spec asks for:

- adaLN-single time conditioning: per layer `(shift, scale, gate) = table_i + e(t)`; `M`/`*` layers compute
  `norm(modulate(x))`, `E`/`-` layers `modulate(norm(x))`; the residual adds `gate * mixer_out`;
- `M` layers start from the context tower's layer-i Mamba state (SSM state and conv columns) without
  writing it back (the mixer is functional), scanning the block in fp32;
- `*` layers attend bidirectionally over [context K/V of layer i ‖ the block's own K/V] with the
  denoiser's own projections ("layer-aligned cross-attention", no extra weights).

`t=None` skips time conditioning altogether (shift 0, scale 0, gate 1): that is mock-AR's "no time
conditioning"; on a fresh split (identity tables, zero `t_block`) both coincide.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from twotower_cli.checkpoint import DTYPE_BYTES, Checkpoint, open_checkpoint
from twotower_cli.config import NemotronHConfig
from twotower_cli.errors import TwoTowerError, non_finite
from twotower_cli.layout import TIME_EMBED_DIM, keep_fp32
from twotower_cli.model import attention
from twotower_cli.model.cache import KVCache, MambaState, TowerCache
from twotower_cli.model.loading import load_state, require_shards
from twotower_cli.model.nemotron_h import NemotronHForCausalLM, NemotronHModel
from twotower_cli.ops import kernels


@functools.lru_cache(maxsize=16)
def _frequencies(half: int, max_period: float, device: torch.device) -> torch.Tensor:
    """f_k = exp(-ln(max_period) k / half), k < half, fp32: made once per device, not once per denoiser step."""
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)


def timestep_embedding(t: torch.Tensor, dim: int = TIME_EMBED_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """[B] in [0, 1] → [B, dim] fp32: `[cos(1000 t f_k), sin(1000 t f_k)]`, f_k = exp(-ln(max_period) k / half).
    1000 t is computed in t's dtype, the rest in fp32 (`TimestepEmbedder` says why)."""
    freqs = _frequencies(dim // 2, max_period, t.device)
    args = (t * 1000.0).float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Linear(256, H) → SiLU → Linear(H, H); keys `t_embedder.mlp.{0,2}.*`.

    t goes in in the weights' dtype, so a bf16 model sees bf16(bf16(t) · 1000), as NVIDIA's embedder computes
    it both in its Megatron trainer (t cast to the embeddings' dtype) and in its sampler (t cast to the model
    dtype): the values the denoiser was trained on. In fp32 that is exactly 1000 t; in bf16 it rounds (t = 3/16:
    188, not 187.5), which moves the fastest frequencies by up to half a radian."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_EMBED_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        return self.mlp(timestep_embedding(t.to(device=w.device, dtype=w.dtype)).to(dtype=w.dtype))


class TwoTower(nn.Module):
    """Context tower + denoiser tower + their heads + time conditioning, named as the checkpoint."""

    def __init__(self, cfg: NemotronHConfig, router_dtype: torch.dtype = torch.float64):
        super().__init__()
        H = cfg.hidden_size
        self.cfg = cfg
        self.context_tower = NemotronHModel(cfg, router_dtype=router_dtype)
        self.context_lm_head = nn.Linear(H, cfg.vocab_size, bias=False)
        self.denoiser_tower = NemotronHModel(cfg, router_dtype=router_dtype)
        self.lm_head = nn.Linear(H, cfg.vocab_size, bias=False)
        self.t_embedder = TimestepEmbedder(H)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(H, 3 * H))
        self.scale_shift_tables = nn.ParameterList([nn.Parameter(torch.zeros(3, H)) for _ in range(cfg.num_hidden_layers)])

    # ------------------------------------------------------------------ devices
    @property
    def context_device(self) -> torch.device:
        return self.context_lm_head.weight.device

    @property
    def denoiser_device(self) -> torch.device:
        return self.lm_head.weight.device

    def place(self, context_device: str | torch.device, denoiser_device: str | torch.device) -> TwoTower:
        """One tower (with its head) per device, like NVIDIA's place_towers_on_devices."""
        self.context_tower.to(context_device)
        self.context_lm_head.to(context_device)
        for m in (self.denoiser_tower, self.lm_head, self.t_embedder, self.t_block, self.scale_shift_tables):
            m.to(denoiser_device)
        return self

    # ------------------------------------------------------------------ denoiser (spec §4–§5)
    def time_modulation(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] → e [B, 3, H] (rows: shift, scale, gate), before adding the per-layer tables."""
        e = self.t_block(self.t_embedder(t.to(self.denoiser_device)))
        return e.view(e.shape[0], 3, -1)

    def denoise(self, block: torch.Tensor, context: TowerCache, t: torch.Tensor | None,
                attention_mask: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                block_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V] (fp32) for the block `block` [B, S] at positions n..n+S-1; row j predicts the
        token AT position n+j. `context` is the context tower's cache after the n context tokens; it is only
        read. `attention_mask` (bool, broadcastable to [B, 1, S, n+S]) overrides the default (every block
        query sees every valid context key and every block key); training uses it. `rows` (bool [B, S])
        limits the head to the positions whose logits are needed (the sampler's masked slots); the other
        rows of the result are zeros. `block_valid` (bool [B, S], True for a prefix of each row): a shorter
        block right-padded to S; the padding is hidden from attention, and the denoiser's Mamba layers and
        convs are causal, so the valid positions get the logits of the shorter block alone."""
        dev = self.denoiser_device
        tower = self.denoiser_tower
        # The head's rows as indices, found where `rows` lives (the sampler's is on the host) and moved
        # before the layers are launched: a bool index on the GPU after them would wait for the GPU there.
        picked = None if rows is None else tuple(i.to(dev) for i in rows.nonzero(as_tuple=True))
        x = tower.embeddings(block.to(dev))
        B, S = block.shape
        e = self.time_modulation(t) if t is not None else None
        if attention_mask is None:
            ctx_valid = context.key_mask
            n = context.length
            if ctx_valid is None and block_valid is None:
                attention_mask = None  # everything visible: plain bidirectional attention
            else:
                ctx_valid = torch.ones(B, n, dtype=torch.bool, device=dev) if ctx_valid is None else ctx_valid.to(dev)
                keys = torch.ones(B, S, dtype=torch.bool, device=dev) if block_valid is None else block_valid.to(dev)
                attention_mask = torch.cat([ctx_valid, keys], dim=1)[:, None, None, :].expand(B, 1, S, n + S)
        mods = None if e is None else layer_modulations(self.scale_shift_tables, e, x.dtype)  # [L, B, 3, 1, H]
        for i, layer in enumerate(tower.layers):
            if mods is not None:
                shift, scale1, gate = mods[i].unbind(-3)  # each [B, 1, H]; scale1 = 1 + scale
            if layer.kind in "M*":
                h = layer.norm(torch.addcmul(shift, x, scale1) if mods is not None else x)
            else:
                h = layer.norm(x)
                if mods is not None:
                    h = torch.addcmul(shift, h, scale1)
            state = context.layers[i]
            if layer.kind == "M":
                out, _ = layer.mixer(h, state=state_on(state, dev), keep_state=False)
            elif layer.kind == "*":
                out, _, _ = layer.mixer(h, past=state_on(state, dev), causal=False, mask=attention_mask)
            else:
                out = layer.mixer(h)
            x = torch.addcmul(x, gate, out) if mods is not None else x + out
        h = tower.norm_f(x)
        if rows is None:
            return self.lm_head(h).float()
        out = torch.zeros(B, S, self.lm_head.weight.shape[0], device=dev)
        out[picked] = self.lm_head(h[picked]).float()
        return out


def layer_modulations(tables: nn.ParameterList, e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every layer's time modulation at once (spec §4), for the layer loops of `TwoTower.denoise` and
    training: `tables` L × [3, H], e [..., 3, H] → [L, ..., 3, 1, H] in `dtype`, rows (shift, 1 + scale,
    gate), summed in fp32. Per layer the modulation is then `addcmul(shift, h, scale1)` and the residual
    `addcmul(x, gate, out)`: four operators per step and two per layer, where adding a table, `1 + scale`,
    three casts and the separate multiplies and adds were about eight per layer (each a kernel launch on a
    GPU, 52 layers a denoiser step)."""
    lead = (1,) * (e.dim() - 2)
    mods = torch.stack(tuple(tables)).float().view(len(tables), *lead, *e.shape[-2:]) + e.float()
    mods[..., 1, :] += 1
    return mods.to(dtype).unsqueeze(-2)


def state_on(state: MambaState | KVCache | None, device: torch.device) -> MambaState | KVCache | None:
    """The context tower's per-layer state on the denoiser's device (a no-op on one device)."""
    if state is None:
        return None
    if isinstance(state, MambaState):
        if state.conv.device == device:
            return state
        return MambaState(conv=state.conv.to(device), ssm=state.ssm.to(device))
    if state.k.device == device:
        return state
    return KVCache(k=state.k.to(device), v=state.v.to(device))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a == b


def cache_on(cache: TowerCache, device: torch.device) -> TowerCache:
    """The context tower's cache with every layer's state (and the key mask) on `device`: what the denoiser
    reads, copied once per committed block instead of once per denoiser step (`TowerBackend.denoise`)."""
    key_mask = None if cache.key_mask is None else cache.key_mask.to(device)
    return TowerCache([state_on(state, device) for state in cache.layers], key_mask, cache.length)


# ---------------------------------------------------------------------------------------------- loading

@dataclass
class LoadedModel:
    """What `load_model` returns: the TwoTower (or None for a context-only load), the AR model for `ar`
    mode (the context tower and its head), the config and where it came from."""

    cfg: NemotronHConfig
    folder: Path
    twotower: TwoTower | None
    ar: NemotronHForCausalLM | None
    dropped: list[str]


def _config_of(ckpt: Checkpoint) -> NemotronHConfig:
    if ckpt.config_raw is None:
        raise TwoTowerError(f"no config.json in {ckpt.folder}", "a checkpoint folder needs config.json beside its weights")
    return NemotronHConfig.from_dict(ckpt.config_raw)


def is_twotower_checkpoint(ckpt: Checkpoint) -> bool:
    return "denoiser_tower.embeddings.weight" in ckpt.tensors and "context_tower.embeddings.weight" in ckpt.tensors


CONTEXT_PREFIXES = ("context_tower.", "context_lm_head.")


def tower_device_map(context_device: torch.device, denoiser_device: torch.device):
    """Module key of a TwoTower → the device its tensor is read onto: the context tower and its head on
    `context_device`, everything else (denoiser tower, its head, time conditioning) on `denoiser_device`,
    as `TwoTower.place` puts them."""
    def device_of(key: str) -> torch.device:
        return context_device if key.startswith(CONTEXT_PREFIXES) else denoiser_device
    return device_of


def load_model(path: str | Path, *, need_denoiser: bool, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", context_device: str | torch.device | None = None,
               denoiser_device: str | torch.device | None = None, check_memory: bool = False) -> LoadedModel:
    """Load a checkpoint for sampling.

    need_denoiser=True: a TwoTower checkpoint is required (mask_diffusion, mock_ar); the whole model is
    loaded, each tower on its device. need_denoiser=False (ar): only the context tower and its head are
    read from a TwoTower checkpoint, or the whole model from a plain NemotronH checkpoint.
    `check_memory`: first make sure each device has room for what will be read onto it (`check_room`).
    """
    loaded = _load_model(path, need_denoiser, dtype, device, context_device, denoiser_device, check_memory)
    assert loaded is not None
    return loaded


def check_loadable(path: str | Path, *, need_denoiser: bool | None, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu", context_device: str | torch.device | None = None,
                   denoiser_device: str | torch.device | None = None,
                   file_sizes: dict[str, int] | None = None) -> None:
    """Every check of `load_model(..., check_memory=True)` — a TwoTower where one is needed, each tensor there
    with its shape, room on each device — from the headers alone; nothing is read. `file_sizes` as
    `open_checkpoint` takes them: a hub model's headers, checked before its download. `need_denoiser=None`:
    as the checkpoint is (a TwoTower whole, a NemotronH as an AR model: bench and eval load them so)."""
    _load_model(path, need_denoiser, dtype, device, context_device, denoiser_device, True, True, file_sizes)


def _load_model(path: str | Path, need_denoiser: bool | None, dtype: torch.dtype | None, device: str | torch.device,
                context_device: str | torch.device | None, denoiser_device: str | torch.device | None,
                check_memory: bool, dry_run: bool = False,
                file_sizes: dict[str, int] | None = None) -> LoadedModel | None:
    ckpt = open_checkpoint(path, file_sizes=file_sizes)
    require_shards(ckpt)  # before the checkpoint is judged TwoTower or not by its tensors
    cfg = _config_of(ckpt)
    two = is_twotower_checkpoint(ckpt)
    need_denoiser = two if need_denoiser is None else need_denoiser
    ctx_dev = torch.device(context_device or device)
    den_dev = torch.device(denoiser_device or device)
    if need_denoiser:
        if not two:
            raise TwoTowerError(f"{ckpt.folder} is not a TwoTower checkpoint (no denoiser_tower.* tensors)",
                                "turn it into one with `twotower split`, or use --mode ar")
        with torch.device("meta"):
            model = TwoTower(cfg)
        place = tower_device_map(ctx_dev, den_dev)
        if check_memory:
            check_room(load_bytes(model, ckpt, dtype, place), dtype,
                       two_devices=physical_device(ctx_dev) != physical_device(den_dev), whole=True)
        report = load_state(model, ckpt, dtype=dtype, device=place, dry_run=dry_run)
        if dry_run:
            return None
        model.place(ctx_dev, den_dev).eval()  # a no-op: every tensor was read onto its tower's device
        return LoadedModel(cfg, ckpt.folder, model, None, list(report.dropped))
    router = torch.float64 if two else torch.float32
    with torch.device("meta"):
        ar = NemotronHForCausalLM(cfg, router_dtype=router)
    key_map = None
    if two:
        def key_map(k: str) -> str:
            return "context_lm_head.weight" if k == "lm_head.weight" else "context_tower." + k[len("backbone."):]
    if check_memory:
        check_room(load_bytes(ar, ckpt, dtype, lambda _key: ctx_dev, key_map), dtype, two_devices=True, whole=False)
    report = load_state(ar, ckpt, key_map=key_map, dtype=dtype, device=ctx_dev, allow_unused=two, dry_run=dry_run)
    if dry_run:
        return None
    return LoadedModel(cfg, ckpt.folder, None, ar.eval(), list(report.dropped))


def load_bytes(module: nn.Module, ckpt: Checkpoint, dtype: torch.dtype | None, place,
               key_map=None) -> dict[torch.device, int]:
    """Bytes `load_state` reads onto each device for `module` (built on meta): every tensor of its state dict
    in the dtype it is loaded in (fp32 for the spec's fp32 names, else `dtype`, else the file's)."""
    need: dict[torch.device, int] = {}
    for key, t in module.state_dict().items():
        info = ckpt.tensors.get(key_map(key) if key_map else key)
        size = (4 if keep_fp32(key) else dtype.itemsize if dtype is not None
                else DTYPE_BYTES[info.dtype] if info is not None else t.element_size())
        dev = torch.device(place(key))
        need[dev] = need.get(dev, 0) + t.numel() * size
    return need


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device`: CUDA's free memory; on the CPU, Linux's MemAvailable (what
    can be had without swapping, reclaimable page cache included), else all physical memory; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def physical_device(device: torch.device) -> torch.device:
    """`device` with its index: `cuda` is the current GPU (where tensors made on `cuda` go)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_room(need: dict[torch.device, int], dtype: torch.dtype | None, two_devices: bool, whole: bool) -> None:
    """One error, before any reading, when a device lacks room for its part of the model: a load past the
    free memory ends with the OOM killer (no message) or a CUDA out-of-memory halfway. `TWOTOWER_SKIP_MEMORY_CHECK=1`
    skips it."""
    if os.environ.get("TWOTOWER_SKIP_MEMORY_CHECK") == "1":
        return
    merged: dict[torch.device, int] = {}
    for dev, n in need.items():  # `cuda` and `cuda:0` (--device cuda --denoiser-device cuda:0) are one GPU
        merged[physical_device(dev)] = merged.get(physical_device(dev), 0) + n
    for dev, n in merged.items():
        free = free_bytes(dev)
        if free is None or n <= free:
            continue
        ways = []
        if dtype == torch.float32:
            ways.append("--dtype bf16 halves it")
        if dev.type == "cpu" and torch.cuda.is_available():
            ways.append("--device cuda")
        if whole and not two_devices:
            ways.append("one tower per device: --context-device D --denoiser-device D'")
        if whole:
            ways.append("--mode ar reads the context tower only")
        ways.append("TWOTOWER_SKIP_MEMORY_CHECK=1 loads anyway")
        raise TwoTowerError(f"the model needs {n / 2**30:.1f} GiB on {dev} and {free / 2**30:.1f} GiB is free there",
                            "; ".join(ways))


def causal_lm_view(model: TwoTower) -> NemotronHForCausalLM:
    """The context tower and its head as a NemotronHForCausalLM sharing the same tensors (the AR judge)."""
    with torch.device("meta"):
        ar = NemotronHForCausalLM(model.cfg, router_dtype=torch.float64)
    ar.backbone = model.context_tower
    ar.lm_head = model.context_lm_head
    return ar


def chunked_log_probs(ar: NemotronHForCausalLM, x: torch.Tensor, start: int = 1, chunk: int = 256):
    """Under an AR model, for token rows `x` [B, L] on its device: yields (logp [B, c, V] fp32, target [B, c]),
    the log-softmax at the positions predicting x[:, i] for i = start (≥ 1) … L - 1, `chunk` positions at a
    time, with those tokens. One backbone forward over x[:, :-1]; the head and softmax run per chunk, so a long
    sequence never holds [B, L, vocabulary] logits at once. Call under `torch.no_grad()`. Eager over compiled
    layers (`eager_over`): each new length would compile."""
    if x.shape[1] <= start:
        return
    with eager_over(ar.backbone):
        hidden = ar.backbone(x[:, :-1])  # position j predicts token j + 1
    for a in range(start - 1, x.shape[1] - 1, chunk):
        yield F.log_softmax(ar.lm_head(hidden[:, a:a + chunk]).float(), dim=-1), x[:, a + 1:a + 1 + chunk]


def token_log_probs(ar: NemotronHForCausalLM, ids: list[int], top: int = 0, start: int = 1,
                    chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under an AR model, for each position i ≥ `start` (≥ 1) of `ids`: the log-probability of ids[i] given
    ids[:i] [n], and the `top` most likely tokens there with theirs (ids [n, top], log-probabilities [n, top]);
    on the CPU. One forward, `chunk` positions of logits at a time (`chunked_log_probs`)."""
    x = torch.tensor([ids], device=ar.lm_head.weight.device)
    lps, top_ids, top_lps = [], [], []
    with torch.no_grad():
        for logp, target in chunked_log_probs(ar, x, start, chunk):
            lps.append(logp[0].gather(-1, target[0, :, None])[:, 0])
            if top:
                v, i = logp[0].topk(top, dim=-1)
                top_ids.append(i)
                top_lps.append(v)
    n = max(len(ids) - start, 0)

    def joined(parts: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(parts).cpu() if parts else torch.zeros(shape, dtype=dtype)

    lp = joined(lps, (n,), torch.float32)
    if bool(lp.isnan().any()):  # NaN or +Inf logits: checked on the host copy
        raise non_finite("the model's log-probabilities", "they would be noise")
    return lp, joined(top_ids, (n, top), torch.long), joined(top_lps, (n, top), torch.float32)


def sequence_log_likelihood(ar: NemotronHForCausalLM, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Per-token log-likelihood [len(continuation)] of `continuation` after `prompt` under an AR model."""
    if not continuation:
        return torch.zeros(0)
    return token_log_probs(ar, prompt + continuation, start=len(prompt))[0]


# ---------------------------------------------------------------------------------------------- sampling backend

COMPILED = "_twotower_compiled"  # set on a tower whose layers `TowerBackend.compile` compiled (in place)


def is_compiled(tower: nn.Module) -> bool:
    """Whether `TowerBackend.compile` compiled this tower's layers: in place, so for every backend over it."""
    return getattr(tower, COMPILED, False)


def eager_over(tower: nn.Module):
    """A context in which a compiled tower runs its layers eagerly (a no-op for one that is not, without
    importing dynamo): for whole sequences of any length (prompts, scoring), which are matmul-bound and whose
    every new length would compile again (the Mamba layers' chunked scan branches on the length's chunks)."""
    return torch.compiler.set_stance("force_eager") if is_compiled(tower) else contextlib.nullcontext()


def compile_regions(tower: NemotronHModel) -> list[nn.Module]:
    """The modules `TowerBackend.compile` compiles in a tower: each layer's norm and mixer, or for an MoE
    layer its norm, router and shared expert (the routed experts stay eager), and the final norm."""
    regions: list[nn.Module] = []
    for layer in tower.layers:
        regions.append(layer.norm)
        if layer.kind == "E":
            regions.append(layer.mixer.gate)
            if layer.mixer.shared_experts is not None:
                regions.append(layer.mixer.shared_experts)
        else:
            regions.append(layer.mixer)
    regions.append(tower.norm_f)
    return regions


def capture_graph(fn, device: torch.device, after_warmup=None):
    """`fn()` captured once in a CUDA graph on `device`: (replay, out), where `replay()` runs the captured
    kernels again over the same input buffers `fn` reads and writes `out`, the tensor `fn` returned. As
    PyTorch asks, `fn` runs once on a side stream first (lazy cuBLAS workspaces, Triton autotuning);
    `after_warmup()` then undoes what that run changed, for an `fn` that updates state in place. Capture
    itself runs nothing, so `replay` is called once before returning: net, `fn` ran once. The capture runs on
    that side stream too, one of `device`'s: `torch.cuda.graph`'s own is one stream per process, made on the
    device current at its first capture, so with the towers on two GPUs the other device's steps would be
    captured on a stream of the wrong device (their kernels run outside the capture).

    A capture that fails raises what `fn` raised (the operation that is not capture-safe), with the caller's
    stream current again. (`torch.cuda.graph` ends the capture before it restores the stream; after an
    operation that is not capture-safe, ending it raises too, "operation failed due to a previous error
    during capture": that error replaced `fn`'s, and the capture stream stayed current for the eager run
    that follows.)"""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        if after_warmup is not None:
            after_warmup()
        graph = torch.cuda.CUDAGraph()
        raised: list[BaseException] = []
        with torch.cuda.stream(side):  # restores the caller's stream however the capture ends
            try:
                with torch.cuda.graph(graph, stream=side):
                    try:
                        out = fn()
                    except BaseException as e:
                        raised.append(e)
                        raise
            except BaseException as e:
                if raised and e is not raised[0]:
                    raise raised[0] from None
                raise
        graph.replay()
    return graph.replay, out


@dataclass
class _BlockGraph:
    """The denoiser's forward for blocks of one shape, captured (`TowerBackend.denoise` with graphs on)."""
    key: tuple
    replay: object = None  # None: seen once (eager), captured at the next call with the same key
    out: torch.Tensor | None = None
    block: torch.Tensor | None = None
    t: torch.Tensor | None = None
    valid: torch.Tensor | None = None


@dataclass
class _StepGraph:
    """A context step of one length over the fixed-size buffers: None until captured (seen once)."""
    ids: torch.Tensor | None = None
    replay: object = None
    out: torch.Tensor | None = None


@dataclass
class _Static:
    """Fixed-size buffers for the context tower's cache (`TowerBackend` with graphs on), and the graphs
    captured over them: `kv` maps each attention layer to its key/value buffers [b, kv, capacity, d],
    `states` each Mamba layer to a state of its own, `valid` [b, capacity] is the key mask, `pos` [1] the
    next column (set before each step), `context` the view of it all that the denoiser reads (every column,
    the unused ones masked), `steps` the context steps per length and `blocks` the denoiser steps per block
    shape. `owner` is the cache whose K/V are views of these buffers and whose Mamba states are these, held
    weakly: a cache nobody holds any more needs nothing of its own when the buffers take in another."""
    capacity: int
    pos: torch.Tensor
    valid: torch.Tensor
    kv: dict
    states: dict
    context: TowerCache
    steps: dict
    blocks: dict
    masked: bool = False  # the owner has a key mask (left pads) to keep up to date
    owner: weakref.ref | None = None  # to a TowerCache

    @property
    def batch(self) -> int:
        return self.valid.shape[0]


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# Where `TowerBackend.graphs` captures steps: CUDA graphs exist there only (tests add "cpu" with a stand-in).
GRAPH_DEVICES = {"cuda"}
STATIC_MIN_CAPACITY = 256  # key/value columns of the first fixed-size buffers; they double when full
STATIC_MAX_TOKENS = 64  # context steps up to this many tokens run over them (longer ones: prompts, eagerly)
SPARE_BATCH_SIZES = 8  # buffers (and their graphs) kept for this many batch sizes (a server's batch varies)


class TowerBackend:
    """The sampler's `Backend` over a TwoTower (all modes) or a plain causal LM (`ar` only).

    With `graphs` (`--cuda-graphs`), steps are captured in CUDA graphs and replayed, without the Python and
    launch overhead of each kernel: on an H100 a 7-layer denoiser step took 11.2 ms eager and 1.7 ms
    replayed, a decode step 44.6 ms and 1.16 ms (scripts/gpu_check.py; not yet measured through this path).

    - Context steps of up to STATIC_MAX_TOKENS tokens (ar / mock_ar decode, mask_diffusion's commits) run
      over key/value buffers of a fixed number of columns (twice the cache's length when made, at least
      STATIC_MIN_CAPACITY) that hold the cache's keys and values: a step writes its keys and values at its
      columns and attends over all columns with the unused ones masked (`Attention.step_into`), and the
      Mamba layers update their states in place (`NemotronHModel.step_into`), so each step of a length
      has the same shapes. The first such step after any other change runs eagerly, the second moves the
      cache into buffers. One-token steps and steps of a width the denoiser's blocks had (commits) are
      captured the second time they come and replayed after; other lengths run over the buffers
      uncaptured. A step that does not fit doubles the buffers (everything captured again: log2 of the
      length times).
    - The denoiser's step is captured the second time a block of its shape comes and replayed after: over
      those buffers (every column, the unused masked) once they exist, so the graph outlives commits, and
      before that over the cache itself, for the steps of one block. mock_ar's denoiser steps (no t) are
      not graphed.

    Prompts, padded steps, rows joining or leaving, `restore` and `reset` take the cache out of the buffers
    (it gets tensors of its own) and drop the graph over the cache itself. The buffers and the graphs over
    them are kept (for the last SPARE_BATCH_SIZES batch sizes) for the next cache of that batch size that
    fits them, which goes into them at once, after its prompt: a second `S.run` (bench's repeats,
    `--prompt-file` batches) replays from its first block, with no capture, and a server's batch finds the
    graphs of each size it had before. A capture that fails is reported once and the backend goes on eagerly."""

    def __init__(self, twotower: TwoTower | None = None, ar: NemotronHForCausalLM | None = None):
        if twotower is None and ar is None:
            raise ValueError("need a TwoTower or a causal LM")
        self.twotower = twotower
        self.ar = ar if ar is not None else causal_lm_view(twotower)
        self.vocab_size = self.ar.lm_head.weight.shape[0]
        self.cache: TowerCache | None = None
        self._denoiser_view: TowerCache | None = None  # self.cache on the denoiser's device, while it is current
        self.graphs = False
        self.captures = 0  # graphs captured so far (tests, reports)
        self._graph: _BlockGraph | None = None
        self._static: _Static | None = None  # the buffers the cache lives in, if it does
        # buffers given up, with their graphs, per batch size (the latest SPARE_BATCH_SIZES sizes)
        self._spares: collections.OrderedDict[int, _Static] = collections.OrderedDict()
        # Context steps captured (--cuda-graphs) and compiled (--compile): one token (decode) and the widths
        # of the denoiser's blocks (commits). Other lengths (prompts, chat turns, a server's continuations)
        # run uncaptured and eagerly: a graph per length that came twice would hold a memory pool each, per
        # batch size, for lengths that rarely recur, and each new length would cost a compilation.
        self._block_widths: set[int] = set()
        self._armed = False  # the last step was a context step that could run over fixed-size buffers

    def compile(self, backend: str = "inductor") -> TowerBackend:
        """torch.compile the layers of both towers (`--compile`) for the decode and block steps, one region
        per module (`compile_regions`): every layer's norm and mixer (Mamba, attention, MLP), and of an MoE
        layer its router and shared expert. Not the whole step: the routed experts stay eager (their loop
        route has data-dependent sizes, a graph break that inside the layer loop would make dynamo skip the
        whole frame; their grouped route is two GEMMs that compilation would not shorten). Modules of one
        class share their compiled graphs, so a tower costs a few compilations (prefill, one-token decode,
        block), not one per layer. Dynamic shapes: the KV cache grows every step; no CUDA graphs
        ("reduce-overhead"), whose output buffers the next step would overwrite while the cache still
        holds them. The mamba-ssm
        kernels run outside the graphs (`kernels.prepare_compile`). Context steps of other lengths than
        one token or a denoiser block (prompts, chat turns: `_block_widths`) run eagerly: they are
        matmul-bound, and their lengths recompiled the Mamba layers' chunked scan again and again (it
        branches on the length's chunks and padding), up to dynamo's recompile limit. So do first steps
        (an empty cache: a prompt, or one joining a continuous batch), whatever their length: a one-token
        prompt compiled graphs of its own for the empty past."""
        kernels.prepare_compile()
        import torch._dynamo
        import torch.fx.experimental._config as fx_config

        # No duck sizing: dynamo gave input sizes that were equal when traced one symbol, so a batch of 4 shared
        # the Mamba conv state's kernel width (4, the Nano's too), was pinned to 4 along with it, and every
        # Mamba and attention layer recompiled at the next batch size (continuous batching: at each change).
        if hasattr(fx_config, "use_duck_shape"):
            fx_config.use_duck_shape = False
        # Attention.forward serves every kind of step of both towers (decode, commit and denoiser block, with
        # and without a padding mask, a first step's empty past, batch 1 and more): more variants than
        # dynamo's default of 8 graphs per function, past which it printed warnings and ran the rest eagerly
        # (continuous batching in mask_diffusion reached it).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if self.device.type == "cuda":  # its one-off probe, here rather than inside a trace
            attention.gqa_fused(self.device, self.ar.lm_head.weight.dtype)
        towers = [self.ar.backbone] + ([self.twotower.denoiser_tower] if self.twotower is not None else [])
        for tower in towers:
            for module in compile_regions(tower):
                module.compile(dynamic=True, backend=backend)
            setattr(tower, COMPILED, True)
        return self

    @property
    def compiled(self) -> bool:
        """Whether the context tower's layers are compiled (by this backend or another over the same towers)."""
        return is_compiled(self.ar.backbone)

    @property
    def device(self) -> torch.device:
        return self.ar.lm_head.weight.device

    def _repeating(self, L: int) -> bool:
        """Whether a context step of L tokens is of a length that recurs, which --cuda-graphs captures and
        --compile compiles: one token, or a block's width (`_block_widths`)."""
        return L == 1 or L in self._block_widths

    def _changed(self) -> None:
        """The cache changed (or was replaced): the denoiser's copy of it and the graph over it are stale, and
        the fixed-size buffers are given up (kept, with their graphs, for a next cache that fits them)."""
        self._denoiser_view = None
        self._graph = None
        self._armed = False
        if self._static is not None:
            self._release(self._static)
            self._spares.pop(self._static.batch, None)
            self._spares[self._static.batch], self._static = self._static, None
            while len(self._spares) > SPARE_BATCH_SIZES:
                self._spares.popitem(last=False)

    def reset(self, batch: int) -> None:
        self.cache = self.ar.backbone.make_cache(batch, device=self.device, dtype=self.ar.lm_head.weight.dtype)
        self._changed()

    def state(self) -> TowerCache:
        """A copy of the context tower's state, for `restore` (chat keeps one between turns)."""
        assert self.cache is not None, "reset() first"
        return self.cache.clone()

    def restore(self, state: TowerCache) -> None:
        """Continue from a state `state()` returned (copied again: extending changes a cache in place)."""
        self.cache = state.clone()
        self._changed()

    def extend(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        assert self.cache is not None, "reset() first"
        graphs = self.graphs and self.device.type in GRAPH_DEVICES
        T, L = self.cache.length, ids.shape[1]
        static = graphs and attention_mask is None and 0 < T and L <= STATIC_MAX_TOKENS
        if static and (self._static is not None or self._armed or self._spare_fits(T + L)):
            return self._static_step(ids)
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        self._changed()  # the cache changes below (in place)
        # a prompt (a first step, whatever its length) or a turn: see `compile`
        eager = T == 0 or not self._repeating(L)
        with (eager_over(self.ar.backbone) if eager else contextlib.nullcontext(),
              attention.sdpa_backends(self.device)):  # for compiled layers too (`Attention.forward`)
            hidden = self.ar.backbone(ids.to(self.device), cache=self.cache, attention_mask=mask)
        self._armed = static  # the next such step makes the buffers
        if graphs and self._spare_fits(self.cache.length + 1):  # e.g. a prompt read: on over the last buffers
            self._adopt(self.cache.length + 1)
        return self.ar.lm_head(hidden[:, -1]).float()

    def _static_step(self, ids: torch.Tensor) -> torch.Tensor:
        """A context step of L tokens over the fixed-size buffers (class docstring): the buffers hold the
        cache from the second such step in a row (or at once where the last ones fit), and are made anew with
        twice the columns when the step would not fit; a step of a length seen before with these buffers is
        captured, later ones replay. The cache's K/V are views of the buffers' first `length` columns, so
        everything that reads the cache (the denoiser, `state()`) sees what an eager step leaves there."""
        cache = self.cache
        T, L = cache.length, ids.shape[1]
        s = self._static
        if s is None or T + L > s.capacity:  # (buffers too small are dropped: the cache is copied out of them
            s = self._adopt(T + L)  # into the new ones, with nothing of its own to make first)
        self._denoiser_view = None  # the cache changes: the denoiser's copy and a graph over it are stale
        self._graph = None  # (graphs over the buffers stay: `s.blocks`)
        with attention.sdpa_backends(self.device):
            s.pos.fill_(T)
            captured = self._repeating(L)
            step = s.steps.get(L) if captured else None
            if step is None:  # uncaptured: another length, or the first step of this one with these buffers
                if captured:
                    s.steps[L] = _StepGraph()
                out = self._run_static(s, ids.to(self.device))
            elif step.replay is None:
                step.ids = ids.to(self.device).clone()
                try:
                    self._capture_static(s, step)
                except Exception as e:  # noqa: BLE001 - not capture-safe here: go on without graphs
                    self._no_graphs("a context step", e)
                    return self.extend(ids)
                self.captures += 1
                out = step.out
            else:
                step.ids.copy_(ids, non_blocking=True)
                step.replay()
                out = step.out
        T += L
        for i, (k, v) in s.kv.items():
            cache.layers[i].k, cache.layers[i].v = k[:, :, :T], v[:, :, :T]
        if s.masked:
            cache.key_mask = s.valid[:, :T]
        cache.length = T
        return out.clone()

    def _no_graphs(self, what: str, e: Exception) -> None:
        self.graphs = False
        self._changed()
        self._spares.clear()
        warnings.warn(f"CUDA graph capture of {what} failed ({type(e).__name__}: {e}); running it eagerly",
                      stacklevel=4)

    def _run_static(self, s: _Static, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.ar.backbone.step_into(ids, self.cache, s.kv, s.pos, s.valid)
        return self.ar.lm_head(hidden[:, -1]).float()

    def _spare_fits(self, need: int) -> bool:
        s = self._spares.get(self.cache.batch)
        return s is not None and s.capacity >= need

    def _adopt(self, need: int) -> _Static:
        """Put the cache into fixed-size buffers of at least `need` columns: the spare ones (their graphs kept)
        if they fit, else new ones of twice that (at least STATIC_MIN_CAPACITY). The cache's K/V, key mask
        and Mamba states are copied in; its K/V become views of the buffers, its Mamba states the buffers'.
        Spare buffers are cleared past the cache's columns: masked keys weigh 0, but 0 · inf is NaN, so an
        inf or NaN a former cache left there (a float16 overflow) would reach every later one."""
        cache = self.cache
        s = self._spares.pop(cache.batch, None)
        spare = s is not None and s.capacity >= need
        if not spare:
            s = self._new_static(max(STATIC_MIN_CAPACITY, 2 * need))
        T = cache.length
        s.valid.zero_()
        s.valid[:, :T] = cache.valid().to(s.valid.device)
        for i, (k, v) in s.kv.items():
            c = cache.layers[i]
            k[:, :, :T], v[:, :, :T] = c.k, c.v
            if spare:
                k[:, :, T:], v[:, :, T:] = 0, 0
            c.k, c.v = k[:, :, :T], v[:, :, :T]
        for i, m in s.states.items():
            m.conv.copy_(cache.layers[i].conv)
            m.ssm.copy_(cache.layers[i].ssm)
            cache.layers[i] = m
        s.masked = cache.key_mask is not None
        if s.masked:
            cache.key_mask = s.valid[:, :T]
        s.owner = weakref.ref(cache)
        self._static = s
        return s

    def _new_static(self, capacity: int) -> _Static:
        cache, dev = self.cache, self.device
        b = cache.batch
        kv, states, layers = {}, {}, []
        for i, c in enumerate(cache.layers):
            if isinstance(c, KVCache):
                kv[i] = (c.k.new_zeros(b, c.k.shape[1], capacity, c.k.shape[3]),
                         c.v.new_zeros(b, c.v.shape[1], capacity, c.v.shape[3]))
                layers.append(KVCache(*kv[i]))
            elif isinstance(c, MambaState):
                states[i] = MambaState(torch.zeros_like(c.conv), torch.zeros_like(c.ssm))
                layers.append(states[i])
            else:
                layers.append(None)
        valid = torch.zeros(b, capacity, dtype=torch.bool, device=dev)
        return _Static(capacity, torch.zeros(1, dtype=torch.long, device=dev), valid, kv, states,
                       TowerCache(layers, valid, capacity), {}, {})

    @staticmethod
    def _release(s: _Static) -> None:
        """The cache that lived in `s` gets tensors of its own (whoever still holds it, e.g. `aside`, keeps
        what it had), so that `s` can take in another. One that nobody holds (`reset`, `restore` and
        `keep_rows` have replaced it) is not copied: that was a whole cache's worth of memory and copying."""
        owner = None if s.owner is None else s.owner()
        s.owner = None
        if owner is None:
            return
        for i, (k, v) in s.kv.items():
            c = owner.layers[i]
            if isinstance(c, KVCache):
                c.k = c.k.clone() if _shares(c.k, k) else c.k
                c.v = c.v.clone() if _shares(c.v, v) else c.v
        for i, m in s.states.items():
            if owner.layers[i] is m:
                owner.layers[i] = m.clone()
        if owner.key_mask is not None and _shares(owner.key_mask, s.valid):
            owner.key_mask = owner.key_mask.clone()

    def _capture_static(self, s: _Static, step: _StepGraph) -> None:
        """Capture the step; the capture's warm-up run advances the Mamba states, which are put back before
        the capture (its final replay is the step itself)."""
        states = [c for c in self.cache.layers if isinstance(c, MambaState)]
        kept = [(m.conv.clone(), m.ssm.clone()) for m in states]

        def put_back():
            for m, (conv, ssm) in zip(states, kept, strict=True):
                m.conv.copy_(conv)
                m.ssm.copy_(ssm)

        try:
            step.replay, step.out = capture_graph(lambda: self._run_static(s, step.ids), self.device,
                                                  after_warmup=put_back)
        except BaseException:
            put_back()  # a warm-up or capture that failed part-way leaves the states as they were
            raise

    @contextlib.contextmanager
    def aside(self):
        """Build new rows in a cache of their own inside the block (`reset`, `extend`, `restore` work on it),
        then put them after the batch's rows (`TowerCache.stack`); on an error the batch is as it was."""
        assert self.cache is not None, "reset() first"
        held = self.cache
        try:
            yield
        except BaseException:
            self.cache = held
            self._changed()
            raise
        self.cache = TowerCache.stack([held, self.cache])
        self._changed()

    def join(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Add sequences to the batch: read `ids` [n, L] (left-padded where `attention_mask` is False) as
        `extend` would into a fresh cache, and put their rows after the current ones; their next-token
        logits [n, V]. Each row then sees exactly its own tokens."""
        with self.aside():
            self.reset(ids.shape[0])
            return self.extend(ids, attention_mask) if ids.shape[1] else None

    def keep_rows(self, rows: list[int]) -> None:
        """Go on with these rows of the batch only, in this order."""
        assert self.cache is not None, "reset() first"
        self.cache = self.cache.select(rows)
        self._changed()

    def denoise(self, block: torch.Tensor, t: torch.Tensor | None, rows: torch.Tensor | None = None,
                block_valid: torch.Tensor | None = None) -> torch.Tensor:
        """The sampler's denoise; `block_valid`: shorter blocks right-padded (`TwoTower.denoise`)."""
        if self.twotower is None:
            raise TwoTowerError("this checkpoint has no denoiser", "use --mode ar, or split it with `twotower split`")
        assert self.cache is not None, "reset() first"
        context = self.cache
        den = self.twotower.denoiser_device
        if not _same_device(den, self.device):  # one tower per device: the context comes over once per block
            if self._denoiser_view is None:
                self._denoiser_view = cache_on(self.cache, den)
            context = self._denoiser_view
        with attention.sdpa_backends(den):  # for compiled layers too (`Attention.forward`)
            self._block_widths.add(block.shape[1])
            if self.graphs and t is not None and den.type in GRAPH_DEVICES:
                return self._graphed(block, context, t, rows, block_valid)
            return self.twotower.denoise(block, context, t, rows=rows, block_valid=block_valid)

    def _graphed(self, block: torch.Tensor, context: TowerCache, t: torch.Tensor, rows: torch.Tensor | None,
                 block_valid: torch.Tensor | None) -> torch.Tensor:
        """`TwoTower.denoise` through the graph for blocks of this shape (class docstring): over the fixed-size
        buffers where the cache lives in them (kept with them), else over the cache (until it changes). The
        graph computes the head for every row; the rows not asked for are zeroed as the eager path leaves
        them."""
        den = self.twotower.denoiser_device
        key = (tuple(block.shape), block_valid is not None)
        static = self._static if _same_device(den, self.device) else None
        if static is not None:
            context = static.context
            g = static.blocks.get(key)
        else:
            g = self._graph if self._graph is not None and self._graph.key == key else None
        if g is None:  # the first step of its kind: eager
            if static is not None:
                static.blocks[key] = _BlockGraph(key)
            else:
                self._graph = _BlockGraph(key)
            return self.twotower.denoise(block, context, t, rows=rows, block_valid=block_valid)
        if g.replay is None:  # its second: capture
            g.block, g.t = block.to(den).clone(), t.to(den).clone()
            g.valid = None if block_valid is None else block_valid.to(den).clone()
            try:
                g.replay, g.out = capture_graph(
                    lambda: self.twotower.denoise(g.block, context, g.t, block_valid=g.valid), den)
            except Exception as e:  # noqa: BLE001 - an op that is not capture-safe: go on without graphs
                self._no_graphs("the denoiser step", e)
                return self.twotower.denoise(block, self.cache if static is not None else context, t, rows=rows,
                                             block_valid=block_valid)
            self.captures += 1
        else:
            g.block.copy_(block, non_blocking=True)
            g.t.copy_(t, non_blocking=True)
            if g.valid is not None:
                g.valid.copy_(block_valid, non_blocking=True)
            g.replay()
        out = g.out.clone()
        if rows is not None:
            out.masked_fill_(~rows.to(den, non_blocking=True)[..., None], 0.0)
        return out
