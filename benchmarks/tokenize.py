"""`twotower tokenize` on a plain-text corpus: the text read and encoded whole (`Tokenizer.encode` of
`read()`: the baseline) vs read in pieces (`Tokenizer.encode_stream`, what tokenize and train do), each in a
fresh process, one run: seconds, peak resident memory, and whether the ids are the same.

The corpus is generated (seeded words and punctuation in lines and paragraphs, about `--mb` MB of UTF-8).
`--tokenizer prepend` uses the embedded tokenizer with a normalizer that puts a space before every text,
which allows no cut anywhere: the streamed column then holds the whole text too, and shows what the piece
search costs on top of encoding whole.

    python benchmarks/tokenize.py                       # embedded tiny tokenizer, 8 MB
    python benchmarks/tokenize.py --mb 32 --tokenizer prepend
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

WORDS = ("the king and queen of France, my lord; Hélène’s letter — said: “Go!” ROMEO. well, 42 times? ay... "
         "(aside) [Exit] naïve thou art not what thou seem'st good night sweet prince").split()


def corpus(path: Path, mb: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    target, size = int(mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 18)))
            line += "\n\n" if rng.random() < 0.15 else "\n"
            f.write(line)
            size += len(line.encode())


def tokenizer_folder(kind: str, where: Path) -> Path:
    from twotower_cli.hub import resolve

    tiny = resolve("tiny")
    if kind == "tiny":
        return tiny
    spec = json.loads((tiny / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Prepend", "prepend": " "}
    folder = where / "tok-prepend"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return folder


def measure(how: str, folder: str, path: str) -> None:
    """In the child process: encode `path` `how` (whole | streamed); one JSON line on stdout."""
    from twotower_cli.text import Tokenizer

    tok = Tokenizer(Path(folder))
    t0 = time.perf_counter()
    digest, n = hashlib.sha256(), 0
    with open(path, encoding="utf-8") as f:
        parts = [tok.encode(f.read())] if how == "whole" else tok.encode_stream(f)
        for ids in parts:
            digest.update(array("q", ids).tobytes())  # the ids, not how they are split into lists
            n += len(ids)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux → GiB
    print(json.dumps({"seconds": seconds, "peak_gb": peak, "tokens": n, "ids": digest.hexdigest()[:16]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=8.0, help="corpus size in MB")
    ap.add_argument("--tokenizer", choices=("tiny", "prepend"), default="tiny")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        measure(*args.child)
        return
    work = Path(tempfile.mkdtemp(prefix="twotower-tokenize-bench-"))
    try:
        text = work / "corpus.txt"
        corpus(text, args.mb)
        folder = tokenizer_folder(args.tokenizer, work)
        runs = {}
        for how in ("whole", "streamed"):
            out = subprocess.run([sys.executable, __file__, "--child", how, str(folder), str(text)],
                                 capture_output=True, text=True, check=True)
            runs[how] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    w, s = runs["whole"], runs["streamed"]
    print(f"{args.mb:g} MB of text, {args.tokenizer} tokenizer, {w['tokens']:,} tokens, one run each, fresh processes")
    print(f"{'':10} {'seconds':>8} {'peak GB':>8}")
    for how, r in runs.items():
        print(f"{how:10} {r['seconds']:8.2f} {r['peak_gb']:8.2f}")
    print(f"streamed / whole: {s['seconds'] / w['seconds']:.2f}× the time, {s['peak_gb'] / w['peak_gb']:.2f}× the "
          f"peak memory · ids {'identical' if s['ids'] == w['ids'] and s['tokens'] == w['tokens'] else 'DIFFER'}")


if __name__ == "__main__":
    main()
