"""`twotower train --fsdp`: the trained part and the frozen context tower sharded over the ranks with
PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`), for models whose denoiser, gradients and AdamW state
do not fit one device (Nemotron-Labs-TwoTower-30B: about 16 bytes per trained parameter).

- **Units.** Each layer of each tower is one FSDP unit (its norm and its mixer, the two modules the
  training forward calls); the rest of the trained part (embeddings, final norm, `lm_head`, time
  conditioning) belongs to the root unit `BlockDenoiser`, and the context tower's embeddings to the root
  unit `ContextPass`. A unit's parameters are gathered for its forward (and backward) and sharded again
  after it, so a rank holds 1/world of every tower plus one gathered layer at a time. `context_lm_head`
  is never loaded: training does not use it, and the checkpoints written copy its bytes from the source.
- **Loading.** The model is built on the meta device; then one unit at a time is read from the checkpoint
  into host memory (`load_state`, the loader inference uses, with the same name checks) and handed to
  `fully_shard`, which moves it to the device, keeps this rank's shard and frees the rest. Host and device
  memory peak at one full layer above the shards, whatever the model's size.
- **Derived tensors.** FSDP gathers a parameter into the same storage at every forward without advancing
  its version counter, so `model.derived`'s inference store (a router's fp64 weight, a Mamba layer's A)
  would serve stale values in the evaluations between steps: training with FSDP runs under
  `derived.no_reuse()`.
- **Numerics.** As without FSDP: trained parameters are fp32 masters and compute in fp32; the context tower
  runs in `--dtype`. Gradients are reduce-scattered (averaged over ranks) every micro-batch. With
  `--compute-dtype bf16` the trained part's parameters are cast to bf16 as they are gathered
  (`MixedPrecisionPolicy`: parameters are cast, not ops, so the model's explicit fp32 paths — the SSD scan,
  softmax, norms, the fp64 router — stay as they are) and gradients are reduced in fp32.
- **Checkpoints.** The weights are gathered one parameter at a time; rank 0 keeps them in host memory, in
  the checkpoint's dtypes (the trained part only: about 63 GB for Nano in bf16), and writes them in NVIDIA's
  layout exactly as the unsharded path does. The optimizer state and the fp32 masters stay sharded: every rank
  writes its shards with `torch.distributed.checkpoint` into `trainer_shards/` beside the weights, inside
  the same atomic replacement of OUT. A resume must use the same world size (like any resume here).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from twotower_cli.checkpoint import Checkpoint
from twotower_cli.config import NemotronHConfig
from twotower_cli.errors import TwoTowerError
from twotower_cli.model.loading import cast_, load_state
from twotower_cli.model.nemotron_h import NemotronHModel
from twotower_cli.towers import TwoTower

SHARDS = "trainer_shards"  # the sharded optimizer state and masters, beside trainer_state.pt


class ContextPass(nn.Module):
    """The frozen context tower as one module whose forward is `train.context_pass`: FSDP's root unit for it."""

    def __init__(self, tower: NemotronHModel):
        super().__init__()
        self.tower = tower

    def forward(self, ids: Tensor, block: int):
        from twotower_cli.train import context_pass

        return context_pass(self.tower, ids, block)


def _load_piece(module: nn.Module, ckpt: Checkpoint, prefix: str, dtype: torch.dtype) -> None:
    """`module`'s tensors from the checkpoint keys `prefix + name`, on the host, in `dtype` (the spec's fp32
    tensors stay fp32)."""
    load_state(module, ckpt, key_map=lambda key: prefix + key, dtype=torch.float32, device="cpu",
               allow_unused=True)
    if dtype != torch.float32:
        cast_(module, dtype)


def load_sharded(ckpt: Checkpoint, cfg: NemotronHConfig, trained: set[str], mesh, context_dtype: torch.dtype,
                 compute_dtype: torch.dtype = torch.float32):
    """(model, denoiser, context): the TwoTower with both towers sharded over `mesh`; `denoiser` is the
    FSDP root of the trained part (`train.BlockDenoiser`), `context` the FSDP root of the context tower
    (`ContextPass`). Parameters named in `trained` require grad; all others are frozen. `compute_dtype`
    other than fp32: the trained part's gathered parameters are cast to it for forward and backward
    (FSDP's `MixedPrecisionPolicy`), its gradients reduced in fp32 into the fp32 masters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from twotower_cli.train import BlockDenoiser

    mixed = MixedPrecisionPolicy() if compute_dtype == torch.float32 else MixedPrecisionPolicy(
        param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    with torch.device("meta"):
        model = TwoTower(cfg)
    model.requires_grad_(False)
    denoiser, context = BlockDenoiser(model), ContextPass(model.context_tower)

    def mark(module: nn.Module, prefix: str) -> None:
        for name, p in module.named_parameters():
            p.requires_grad_(prefix + name in trained)

    towers = (("context_tower", model.context_tower, context_dtype), ("denoiser_tower", model.denoiser_tower,
                                                                       torch.float32))
    # FSDP2 warns, at a unit's first forward (in training, long after this returns: so not only while
    # loading), that its output is a view, in case a caller changes it in place: none does
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    for name, tower, dtype in towers:
        for i, layer in enumerate(tower.layers):
            prefix = f"{name}.layers.{i}."
            _load_piece(layer, ckpt, prefix, dtype)
            mark(layer, prefix)
            fully_shard([layer.norm, layer.mixer], mesh=mesh,
                        mp_policy=mixed if name == "denoiser_tower" else MixedPrecisionPolicy())
    roots = [(model.context_tower.embeddings, "context_tower.embeddings.", context_dtype),
             (model.context_tower.norm_f, "context_tower.norm_f.", context_dtype),
             (model.denoiser_tower.embeddings, "denoiser_tower.embeddings.", torch.float32),
             (model.denoiser_tower.norm_f, "denoiser_tower.norm_f.", torch.float32),
             (model.lm_head, "lm_head.", torch.float32), (model.t_embedder, "t_embedder.", torch.float32),
             (model.t_block, "t_block.", torch.float32),
             (model.scale_shift_tables, "scale_shift_tables.", torch.float32)]
    for module, prefix, dtype in roots:
        _load_piece(module, ckpt, prefix, dtype)
        mark(module, prefix)
    fully_shard(denoiser, mesh=mesh, mp_policy=mixed)
    fully_shard(context, mesh=mesh)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and not n.startswith("context_lm_head.")]
    if left:
        raise TwoTowerError(f"{len(left)} tensor(s) were not loaded: {', '.join(left[:5])}",
                            "this looks like a bug; rerun with TWOTOWER_DEBUG=1 and report it")
    return model, denoiser, context


def gather(denoiser: nn.Module, cfg: NemotronHConfig, source: Checkpoint, is_main: bool) -> TwoTower | None:
    """On rank 0, a TwoTower whose trained part (every tensor under `denoiser`) holds the full tensors,
    each in its source dtype (the checkpoint's lm_head dtype for stacked experts), the context tower left on
    the meta device (a checkpoint copies it from the source); None on the other ranks. Collective: every
    rank must call it. One parameter is gathered at a time."""
    from twotower_cli.train import _SAFETENSORS_DTYPES

    default = _SAFETENSORS_DTYPES.get(source.tensors["lm_head.weight"].dtype, torch.float32)
    shadow = None
    if is_main:
        with torch.device("meta"):
            shadow = TwoTower(cfg)
    for name, p in denoiser.named_parameters():
        full = p.full_tensor()  # every parameter under FSDP is a sharded DTensor
        if shadow is not None:
            info = source.tensors.get(name)
            dtype = _SAFETENSORS_DTYPES.get(info.dtype, default) if info is not None else default
            owner, _, leaf = name.rpartition(".")
            setattr(shadow.get_submodule(owner), leaf, nn.Parameter(full.detach().to("cpu", dtype), requires_grad=False))
        del full
    if shadow is not None:  # buffers (the routers' score-correction biases) are whole on every rank
        for name, b in denoiser.named_buffers():
            owner, _, leaf = name.rpartition(".")
            shadow.get_submodule(owner).register_buffer(leaf, b.detach().cpu())
    return shadow


def state_to_save(denoiser: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What `torch.distributed.checkpoint` writes per rank: the optimizer state and the trained fp32 masters,
    sharded as they are."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    masters = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    return {"optimizer": get_optimizer_state_dict(denoiser, optimizer), "masters": masters}


def save_shards(tmp: Path | None, denoiser: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards into `tmp`/trainer_shards; `tmp` is rank 0's (the others pass None and
    receive it). Collective."""
    import torch.distributed.checkpoint as dcp

    where = [str(tmp) if tmp is not None else None]
    dist.broadcast_object_list(where, src=0)
    dcp.save(state_to_save(denoiser, optimizer), checkpoint_id=str(Path(where[0]) / SHARDS))


def load_shards(folder: Path, denoiser: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer state and masters saved by `save_shards` in `folder`, into this rank's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = folder / SHARDS
    if not path.is_dir():
        raise TwoTowerError(f"{folder} has no {SHARDS}/: it was not trained with --fsdp",
                            "resume without --fsdp, or pass --force to start over")
    state = state_to_save(denoiser, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(denoiser, optimizer, state["optimizer"])
