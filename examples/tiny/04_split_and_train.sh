#!/usr/bin/env bash
# Stage 4: split the pretrained tiny base into a TwoTower checkpoint, then teach its denoiser to fill masks.
#   examples/tiny/04_split_and_train.sh [STEPS] [PROCS]
# Needs work/tiny-base from 03_pretrain.py. Two gloo processes of one thread each use both cores of a
# 2-core machine best (one process with two threads is slower there); PROCS=1 runs without torchrun.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$here/work"
bin="$(cd "$here/../.." && pwd)/.venv/bin"
steps="${1:-1200}"
procs="${2:-2}"

"$bin/twotower" split "$work/tiny-base" -o "$work/tiny-twotower-fresh" --block-size 16 --force --verify
"$bin/twotower" inspect "$work/tiny-twotower-fresh"

# The corpus as one JSONL document per play / book, so EOS separates documents as in pretraining.
"$bin/python" - "$work" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
docs = [d for d in (work / "corpus.txt").read_text().split("\n\n\n") if d.strip()]
with open(work / "corpus.jsonl", "w") as f:
    for d in docs:
        f.write(json.dumps({"text": d}) + "\n")
print(f"{len(docs)} documents -> {work / 'corpus.jsonl'}")
PY

args=(train "$work/tiny-twotower-fresh" --data "$work/corpus.jsonl" -o "$work/tiny-twotower"
      --block 16 --seq-len 256 --batch 8 --lr 1e-3 --steps "$steps" --warmup 60
      --eval-every 100 --save-every 200 --noise-per block --resume --json)  # the shipped model's draw
export OMP_NUM_THREADS=1
if [ "$procs" -gt 1 ]; then
  "$bin/torchrun" --standalone --nproc_per_node "$procs" -m twotower_cli "${args[@]}"
else
  "$bin/twotower" "${args[@]}"
fi
