"""Run by tests/test_train.py under torchrun: load a TwoTower with `sharded.load_sharded` and print, per rank,
one JSON line with the numbers of parameter elements this rank holds and their global totals, for the
trained part and for the context tower."""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from twotower_cli import sharded
from twotower_cli import train as T
from twotower_cli.checkpoint import open_checkpoint
from twotower_cli.config import NemotronHConfig
from twotower_cli.towers import TwoTower

warnings.filterwarnings("ignore")
dist.init_process_group("gloo")
ckpt = open_checkpoint(sys.argv[1])
cfg = NemotronHConfig.from_dict(ckpt.config_raw)
with torch.device("meta"):
    names = set(T.trainable_names(TwoTower(cfg), "all"))
model, denoiser, context = sharded.load_sharded(ckpt, cfg, names, init_device_mesh("cpu", (dist.get_world_size(),)),
                                                torch.float32)
out = {"rank": dist.get_rank()}
for part, module in (("trained", denoiser), ("context", context)):
    params = list(module.parameters())
    out[part] = {"local": sum(p.to_local().numel() for p in params), "total": sum(p.numel() for p in params),
                 "sharded": all(type(p).__name__ == "DTensor" for p in params)}
print(json.dumps(out), flush=True)
dist.destroy_process_group()
