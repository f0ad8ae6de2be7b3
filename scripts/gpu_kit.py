"""Get the mamba-ssm and causal-conv1d kernels onto a GPU machine that cannot reach PyPI, in minutes.

mamba-ssm publishes no wheels on PyPI and a full source build (its selective-scan CUDA extension, for a
dozen architectures) takes far longer than a short lease on a lent GPU. twotower needs none of that
extension: its three mamba-ssm kernels (mamba_chunk_scan_combined, selective_state_update, the gated
RMSNorm) are Triton, and ops/kernels.py imports them without the package's __init__. causal-conv1d is a
CUDA extension of three .cu files, 45 explicit template instantiations; compiled as they are, the backward
file alone outlasted 170 s on a 16-core GPU host, so the build splits them into one unit per instantiation
(`split_units`). It can also be compiled here, where nvcc and the GPU machine's Python exist (`prebuild`).

    # where PyPI is reachable (a CPU machine is fine); writes .gpu-kit/ (~250 KB, ignored by git)
    python scripts/gpu_kit.py prepare
    # optional, here: the conv extension for that machine's torch / Python / GPU (+2.2 MB in .gpu-kit/)
    python scripts/gpu_kit.py prebuild [--torch 2.11.0] [--python python3.12] [--arch 9.0]
    # on the GPU machine (needs torch with CUDA, nvcc matching it, ninja, triton, einops), offline
    python scripts/gpu_kit.py install [--site /tmp/twotower-kit] [--conv-timeout 300] [--keep $OUT]
    PYTHONPATH=/tmp/twotower-kit:src python scripts/gpu_check.py

`prepare` builds mamba-ssm's pure-Python wheel from its sdist (MAMBA_SKIP_CUDA_BUILD=TRUE, with
MAMBA_FORCE_BUILD=TRUE so that setup.py does not try to download a prebuilt wheel) and downloads the
causal-conv1d sdist. `install` installs the wheel into --site, copies causal-conv1d's Python package there
and uses a prebuilt extension from .gpu-kit/ that loads with the torch there, or else JIT-compiles it
(`causal_conv1d_cuda`) with torch.utils.cpp_extension for the local GPU's architecture only; if that fails
or outlasts --conv-timeout it removes the package again, and twotower runs the conv in torch and the rest on
the mamba-ssm kernels. Versions are pinned to the ones
ops/kernels.py was checked against (its docstring).

Without a GPU, `interpret` checks the mamba-ssm kernels themselves on this CPU: it installs Triton (~1 GB)
and the wheel into .triton-cpu/ (git-ignored) and runs `pytest -m gpu tests/test_kernels.py` under Triton's
interpreter (TRITON_INTERPRET=1; the test-side patches are in tests/triton_interpret.py), ~10 minutes:

    python scripts/gpu_kit.py prepare && python scripts/gpu_kit.py interpret

A user with network access does not need this: `pip install mamba-ssm causal-conv1d --no-build-isolation`
(or, without the CUDA compiler time, `MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install
mamba-ssm --no-build-isolation`) — see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import glob
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".gpu-kit"
MAMBA = "mamba-ssm==2.3.2.post1"
TRITON = "triton==3.9.0"  # the interpreter version tests/triton_interpret.py was checked with
CONV = "causal-conv1d==1.7.0"
# causal-conv1d's own nvcc flags (its setup.py), minus the architecture list: torch adds the local GPU's.
NVCC_FLAGS = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math"]


def run(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})}, timeout=timeout)


def prepare(args: argparse.Namespace) -> None:
    KIT.mkdir(exist_ok=True)
    for old in [*KIT.glob("*.whl"), *KIT.glob("*.tar.gz")]:  # prebuilt extensions (*.so.xz) stay
        old.unlink()
    pip = [sys.executable, "-m", "pip"]
    # --no-build-isolation: both setup.py files import torch (the one installed here) even to build metadata
    run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-binary", ":all:", "-w", str(KIT), MAMBA],
        env={"MAMBA_SKIP_CUDA_BUILD": "TRUE", "MAMBA_FORCE_BUILD": "TRUE"})
    run(pip + ["download", "--no-deps", "--no-build-isolation", "--no-binary", ":all:", "-d", str(KIT), CONV],
        env={"CAUSAL_CONV1D_SKIP_CUDA_BUILD": "TRUE"})
    for f in sorted(KIT.iterdir()):
        print(f"{f.relative_to(ROOT)}  {f.stat().st_size / 1e3:.0f} kB")


EXPLICIT = re.compile(r"template\s+[^<\s].*;\s*$")  # `template void f<a, b>(...);`, not `template<...>`
CONV_UNITS = ("causal_conv1d_fwd.cu", "causal_conv1d_bwd.cu", "causal_conv1d_update.cu")


def split_units(csrc: Path, names: tuple[str, ...] = CONV_UNITS) -> list[Path]:
    """One translation unit per explicit instantiation: each of `names` (in `csrc`) is all templates and ends
    in `template void f<in_t, w_t>(...);` lines (45 in causal-conv1d 1.7). Its body without those lines becomes
    `<stem>_impl.cuh`, and each line a `<stem>_NN.cu` that includes it. ninja then compiles 45 small units on
    all cores instead of three large ones on three (the backward file alone outlasted 170 s on an H100 host's
    16 cores). Returns the new units."""
    units = []
    for name in names:
        lines = (csrc / name).read_text().splitlines()
        inst = [ln for ln in lines if EXPLICIT.match(ln)]
        if not inst:
            raise ValueError(f"{name}: no explicit instantiations to split")
        impl = csrc / f"{Path(name).stem}_impl.cuh"
        impl.write_text("#pragma once\n" + "\n".join(ln for ln in lines if not EXPLICIT.match(ln)) + "\n")
        for i, line in enumerate(inst):
            unit = csrc / f"{Path(name).stem}_{i:02d}.cu"
            unit.write_text(f'#include "{impl.name}"\n{line}\n')
            units.append(unit)
    return units


def build_conv(src: Path, site: Path, build: Path) -> None:
    """Compile causal_conv1d_cuda from the sdist's csrc/ for the visible GPU (or TORCH_CUDA_ARCH_LIST); runs in
    a child process."""
    from torch.utils.cpp_extension import load

    sources = [str(src / "csrc" / "causal_conv1d.cpp")] + [str(u) for u in split_units(src / "csrc")]
    load(name="causal_conv1d_cuda", sources=sources, extra_cflags=["-O3"], extra_cuda_cflags=NVCC_FLAGS,
         extra_include_paths=[str(src / "csrc")], build_directory=str(build), verbose=False)
    (so,) = glob.glob(str(build / "causal_conv1d_cuda*.so"))
    shutil.copy2(so, site / Path(so).name)


def conv_imports(site: Path) -> bool:
    """Whether causal_conv1d_cuda in `site` loads with this machine's torch (a child process: a bad .so can abort)."""
    code = "import torch, causal_conv1d_cuda"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def unpack(sdist: Path, into: Path) -> Path:
    """The causal-conv1d sdist unpacked into `into`: its top folder."""
    with tarfile.open(sdist) as tar:
        tar.extractall(into, filter="data")
    (src,) = into.glob("causal_conv1d-*")
    return src


def build_conv_in(python: str, src: Path, site: Path, build: Path, env: dict | None = None,
                  timeout: float | None = None) -> None:
    """`build_conv` in a child process of `python` (the torch it builds against), on all cores."""
    code = (f"import sys, pathlib; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import gpu_kit; "
            f"gpu_kit.build_conv(pathlib.Path({str(src)!r}), pathlib.Path({str(site)!r}), "
            f"pathlib.Path({str(build)!r}))")
    run([python, "-c", code], env={"MAX_JOBS": str(os.cpu_count() or 2), **(env or {})}, timeout=timeout)


def pack(so: Path, dest: Path) -> None:
    """An extension packed for .gpu-kit/ (xz: 39 MB → 3 MB)."""
    dest.write_bytes(lzma.compress(so.read_bytes(), preset=6))


def conv_tag(python: str, arch: str | None = None) -> str:
    """torch{version}-py{X.Y}-sm{arch}: what a causal_conv1d_cuda build is for (`arch`: TORCH_CUDA_ARCH_LIST's
    form, e.g. 9.0; default the visible GPU's)."""
    code = ("import sys, torch; cc = {arch!r} or '.'.join(map(str, torch.cuda.get_device_capability())); "
            "print(f'torch{torch.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}-sm' + cc.replace('.', ''))")
    out = subprocess.run([python, "-c", code.replace("{arch!r}", repr(arch))], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().replace("+", "_")


def prebuild(args: argparse.Namespace) -> None:
    """causal_conv1d_cuda built here, for a GPU machine that cannot reach PyPI: its torch version, its Python,
    its GPU architecture. Needs PyPI (torch==VERSION with its CUDA libraries goes into a venv of --python),
    the CUDA compiler that torch was built with (--cuda-home) and no GPU. Writes
    .gpu-kit/causal_conv1d_cuda-torch{V}-py{X.Y}-sm{A}.so.xz (about 2 MB; 39 MB unpacked), which `install`
    unpacks and uses when it loads there. 2026-11-27 on this 2-core machine: torch 2.11.0 (cu130), Python
    3.12, sm 9.0, CUDA 13.0: 5 min 20 s of compiling."""
    sdists = sorted(KIT.glob("causal_conv1d-*.tar.gz"))
    if not sdists:
        sys.exit(f"Error: {KIT.relative_to(ROOT)}/ has no causal-conv1d sdist. "
                 "Hint: run `python scripts/gpu_kit.py prepare` first.")
    cuda_home = Path(args.cuda_home)
    if not (cuda_home / "bin" / "nvcc").exists():
        sys.exit(f"Error: no nvcc in {cuda_home}/bin. Hint: pass --cuda-home, the CUDA toolkit torch was built with.")
    venv = Path(args.venv)
    vpy = venv / "bin" / "python"
    if not vpy.exists():
        run([args.python, "-m", "venv", str(venv)])
    run([str(vpy), "-m", "pip", "install", "-q", f"torch=={args.torch}", "ninja"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        src = unpack(sdists[-1], Path(tmp))
        site, build = Path(tmp) / "site", Path(tmp) / "build"
        site.mkdir()
        build.mkdir()
        build_conv_in(str(vpy), src, site, build, env={
            "TORCH_CUDA_ARCH_LIST": args.arch, "CUDA_HOME": str(cuda_home),
            "PATH": f"{cuda_home / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"})
        (so,) = site.glob("causal_conv1d_cuda*.so")
        out = KIT / f"causal_conv1d_cuda-{conv_tag(str(vpy), args.arch)}.so.xz"
        pack(so, out)
    print(f"{out.relative_to(ROOT)}  {out.stat().st_size / 1e6:.1f} MB  (built in {time.perf_counter() - t0:.0f} s)")


def install(args: argparse.Namespace) -> None:
    site = Path(args.site).resolve()
    site.mkdir(parents=True, exist_ok=True)
    wheels = sorted(KIT.glob("mamba_ssm-*.whl"))
    sdists = sorted(KIT.glob("causal_conv1d-*.tar.gz"))
    if not wheels or not sdists:
        sys.exit(f"Error: {KIT.relative_to(ROOT)}/ lacks the mamba-ssm wheel or the causal-conv1d sdist. "
                 "Hint: run `python scripts/gpu_kit.py prepare` where PyPI is reachable, and carry .gpu-kit.")
    t0 = time.perf_counter()
    run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
         "--target", str(site), str(wheels[-1])])
    print(f"mamba-ssm (Triton kernels) installed in {time.perf_counter() - t0:.1f} s", flush=True)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        src = unpack(sdists[-1], Path(tmp))
        pkg = site / "causal_conv1d"
        shutil.rmtree(pkg, ignore_errors=True)
        shutil.copytree(src / "causal_conv1d", pkg)
        build = Path(tmp) / "build"
        build.mkdir()
        so_path = site / "causal_conv1d_cuda.so"
        for so in site.glob("causal_conv1d_cuda*.so"):
            so.unlink()
        found = None
        for packed in sorted(KIT.glob("causal_conv1d_cuda-*.so.xz")):  # from `prebuild` or an earlier --keep
            so_path.write_bytes(lzma.decompress(packed.read_bytes()))
            if conv_imports(site):
                found = packed
                break
            so_path.unlink()
        try:
            if found:
                print(f"causal-conv1d extension: {found.name} from {KIT.name}/ (loads with this torch; not built)",
                      flush=True)
            else:
                build_conv_in(sys.executable, src, site, build, timeout=args.conv_timeout)
                print(f"causal-conv1d extension built in {time.perf_counter() - t0:.0f} s", flush=True)
                if args.keep:  # e.g. the device tool's $OUT: put it in .gpu-kit/ to skip the build next time
                    Path(args.keep).mkdir(parents=True, exist_ok=True)
                    kept = Path(args.keep) / f"causal_conv1d_cuda-{conv_tag(sys.executable)}.so.xz"
                    pack(so_path, kept)
                    print(f"kept {kept} ({kept.stat().st_size / 1e6:.1f} MB)", flush=True)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            shutil.rmtree(pkg, ignore_errors=True)
            for so in site.glob("causal_conv1d_cuda*.so"):
                so.unlink()
            print(f"causal-conv1d NOT installed ({type(e).__name__} after {time.perf_counter() - t0:.0f} s): "
                  "the conv runs in torch, the other Mamba ops on the mamba-ssm kernels", flush=True)

    probe = ("from twotower_cli.ops import kernels; print('kernels:', kernels.describe())")
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    run([sys.executable, "-c", probe], env=env)
    print(f"next: PYTHONPATH={site}:src python scripts/gpu_check.py")


def interpret(args: argparse.Namespace) -> None:
    """mamba-ssm's Triton kernels on this CPU, through Triton's interpreter: the `gpu` kernel tests."""
    wheels = sorted(KIT.glob("mamba_ssm-*.whl"))
    if not wheels:
        sys.exit(f"Error: {KIT.relative_to(ROOT)}/ has no mamba-ssm wheel. "
                 "Hint: run `python scripts/gpu_kit.py prepare` first.")
    site = Path(args.site).resolve()
    if not (site / "triton").is_dir() or not (site / "mamba_ssm").is_dir():
        run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site), TRITON, "einops"])
        run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(site),
             str(wheels[-1])])
    env = {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-ra", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_kernels.py"), *args.pytest_args]
    print("$ " + " ".join(f"{k}={v}" for k, v in env.items() if k != "PYTHONPATH") + " " + " ".join(cmd),
          flush=True)
    sys.exit(subprocess.run(cmd, env={**os.environ, **env}, cwd=ROOT).returncode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="build/download the kit into .gpu-kit/ (needs PyPI)")
    p = sub.add_parser("install", help="install the kit on this GPU machine (offline)")
    p.add_argument("--site", default="/tmp/twotower-kit", help="target folder to put on PYTHONPATH")
    p.add_argument("--conv-timeout", type=float, default=300, help="seconds allowed for the causal-conv1d build")
    p.add_argument("--keep", default=None, help="copy the causal-conv1d extension it builds into this folder")
    p = sub.add_parser("prebuild", help="build causal-conv1d's extension here for a GPU machine's torch (needs PyPI)")
    p.add_argument("--torch", default="2.11.0", help="that machine's torch version (default 2.11.0, seen there)")
    p.add_argument("--python", default="python3.12", help="a Python of that machine's version (default python3.12)")
    p.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST (default 9.0: H100, H200)")
    p.add_argument("--cuda-home", default="/usr/local/cuda", help="the CUDA toolkit torch was built with")
    p.add_argument("--venv", default="/tmp/twotower-prebuild", help="where the venv with that torch goes")
    p = sub.add_parser("interpret", help="run the gpu kernel tests on this CPU under Triton's interpreter")
    p.add_argument("--site", default=str(ROOT / ".triton-cpu"), help="where to install triton and the wheel")
    p.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --), e.g. -- -k chunk_scan")
    args = ap.parse_args()
    {"prepare": prepare, "install": install, "prebuild": prebuild, "interpret": interpret}[args.cmd](args)


if __name__ == "__main__":
    main()
