"""Run by tests/test_train.py under torchrun: `twotower train` (the arguments after the script), in which rank
FAIL_RANK raises a RuntimeError (as a device out of memory would) in its FAIL_CALL-th call of `add_noise`
(one call per micro-batch, after one for the first evaluation): one rank of the job failing on its own. With
FAIL_AT=load it fails loading the model instead, with a TwoTowerError (a check of its own GPU)."""

from __future__ import annotations

import os
import sys

from twotower_cli import train as T
from twotower_cli.cli import main

if int(os.environ["RANK"]) == int(os.environ["FAIL_RANK"]) and os.environ.get("FAIL_AT") == "load":
    from twotower_cli.errors import TwoTowerError

    def failing_load(*args, **kwargs):  # as the memory check of a GPU that is full on this rank only
        raise TwoTowerError("not enough free memory on this rank's GPU (simulated)", "free some")

    T.load_for_training = failing_load
elif int(os.environ["RANK"]) == int(os.environ["FAIL_RANK"]):
    add_noise, calls = T.add_noise, [0]

    def failing_add_noise(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(os.environ["FAIL_CALL"]):
            raise RuntimeError("out of memory on this rank (simulated)")
        return add_noise(*args, **kwargs)

    T.add_noise = failing_add_noise
sys.argv = ["twotower", *sys.argv[1:]]
main()
