"""Stage 2 of the tiny-model recipe: train a byte-level BPE tokenizer on the stage-1 corpus.

The special tokens sit where Nemotron's do, so the project's default mask id 3 holds:

    0 <unk> (also the pad token)   1 <s> (bos)   2 </s> (eos)   3 <mask>

Byte-level pre-tokenizer and decoder with no normaliser and no prefix space, so decoding returns the
exact input text; no BOS/EOS is added by ``encode`` (the training and generation code places them).

Writes a Hugging Face tokenizer folder ``WORK/tokenizer/``: ``tokenizer.json``,
``tokenizer_config.json`` and ``special_tokens_map.json``. Prints the vocabulary size, the token
counts of ``corpus.txt`` and ``eval.txt``, and the average characters per token on ``eval.txt``.
The training is skipped when ``tokenizer.json`` exists (``--force`` retrains).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECIALS = ["<unk>", "<s>", "</s>", "<mask>"]  # ids 0, 1, 2, 3
SPECIAL_MAP = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "mask_token": "<mask>",
}
ROUND_TRIP = "ROMEO.\nO Juliet!"
DOC_SEP = "\n\n\n"  # between documents in corpus.txt / eval.txt (stage 1)


def train(corpus: Path, vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    return tok


def save_hf_folder(tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **SPECIAL_MAP,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, s in enumerate(SPECIALS)
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_MAP, indent=2) + "\n")


def count_tokens(tok, path: Path) -> tuple[int, int]:
    """(tokens, chars) of a text file. Encoded one document at a time, each but the first carrying the
    "\\n\\n\\n" separator in front, which yields the same pre-tokens as encoding the file whole."""
    text = path.read_text(encoding="utf-8")
    docs = text.split(DOC_SEP)
    pieces = docs[:1] + [DOC_SEP + d for d in docs[1:]]
    n = sum(len(e.ids) for e in tok.encode_batch(pieces, add_special_tokens=False))
    return n, len(text)


def check(tok) -> None:
    for i, s in enumerate(SPECIALS):
        got = tok.token_to_id(s)
        if got != i:
            raise SystemExit(f"special token {s!r} has id {got}, expected {i}")
    ids = tok.encode(ROUND_TRIP, add_special_tokens=False).ids
    back = tok.decode(ids, skip_special_tokens=False)
    if back != ROUND_TRIP:
        raise SystemExit(f"round trip failed: {ROUND_TRIP!r} -> {ids} -> {back!r}")
    print(f"round trip ok: {ROUND_TRIP!r} -> {[tok.id_to_token(i) for i in ids]} -> {ids}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=HERE / "work", help="working folder (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=4096, help="including the 4 special tokens")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="tokenizers worker threads (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="retrain even if tokenizer.json exists")
    args = p.parse_args()
    # tokenizers sizes its rayon pool from this variable; it must be set before the first import.
    os.environ.setdefault("RAYON_RS_NUM_CPUS", str(args.threads))
    from tokenizers import Tokenizer

    corpus, evalf = args.work / "corpus.txt", args.work / "eval.txt"
    if not corpus.exists():
        raise SystemExit(f"{corpus} not found: run examples/tiny/01_corpus.py first")
    out = args.work / "tokenizer"
    t0 = time.perf_counter()
    if (out / "tokenizer.json").exists() and not args.force:
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        print(f"reusing {out / 'tokenizer.json'} (--force to retrain)")
    else:
        tok = train(corpus, args.vocab_size, args.min_frequency)
        save_hf_folder(tok, out)
        print(f"trained in {time.perf_counter() - t0:.1f} s -> {out}")
    check(tok)
    print(f"vocab size: {tok.get_vocab_size()}")
    t1 = time.perf_counter()
    for path in (corpus, evalf):
        n, chars = count_tokens(tok, path)
        print(f"{path.name}: {n:,} tokens, {chars:,} chars, {chars / n:.2f} chars/token")
    print(f"time: {time.perf_counter() - t0:.1f} s (counting {time.perf_counter() - t1:.1f} s)")


if __name__ == "__main__":
    main()
