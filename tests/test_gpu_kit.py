"""scripts/gpu_kit.py's pieces that run without a GPU: splitting causal-conv1d's CUDA files into one
translation unit per explicit instantiation (so that its build uses every core of a lent GPU host)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gpu_kit  # noqa: E402

FWD = """#include "k.h"
template<typename T> struct Traits { static T f(T x) { return x + x; } };
template<typename T> T twice(T x) { return Traits<T>::f(x); }
template<typename T> T thrice(T x) { return twice(x) + x; }

template int twice<int>(int x);
template double twice<double>(double x);
template int thrice<int>(int x);
"""


def test_split_units_put_each_instantiation_in_its_own_unit(tmp_path):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "k_fwd.cu").write_text(FWD)
    units = gpu_kit.split_units(csrc, ("k_fwd.cu",))
    assert [u.name for u in units] == ["k_fwd_00.cu", "k_fwd_01.cu", "k_fwd_02.cu"]
    impl = (csrc / "k_fwd_impl.cuh").read_text()
    assert "template int" not in impl and "template double" not in impl and "struct Traits" in impl
    assert [u.read_text().splitlines() for u in units] == [
        ['#include "k_fwd_impl.cuh"', line] for line in FWD.splitlines() if line.startswith("template int")
        or line.startswith("template double")]
    with pytest.raises(ValueError, match="no explicit instantiations"):
        (csrc / "plain.cu").write_text("int f();\n")
        gpu_kit.split_units(csrc, ("plain.cu",))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile and link the units")
def test_split_units_compile_and_link_into_one_program(tmp_path):
    """Compiled as C++ (the host-side analogue of nvcc's units), the units and a caller link: every
    instantiation is defined exactly once, none is lost."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "k.h").write_text("#pragma once\ntemplate<typename T> T twice(T x);\ntemplate<typename T> T thrice(T x);\n")
    (csrc / "k_fwd.cu").write_text(FWD)
    units = gpu_kit.split_units(csrc, ("k_fwd.cu",))
    main = tmp_path / "main.cpp"
    main.write_text('#include "k.h"\n#include <cstdio>\n'
                    'int main() { std::printf("%d %g %d\\n", twice(21), twice(1.25), thrice(5)); }\n')
    objs = []
    for src in [*units, main]:
        obj = tmp_path / (src.stem + ".o")
        subprocess.run(["g++", "-x", "c++", "-c", "-I", str(csrc), str(src), "-o", str(obj)], check=True)
        objs.append(str(obj))
    exe = tmp_path / "prog"
    subprocess.run(["g++", *objs, "-o", str(exe)], check=True)
    assert subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout == "42 2.5 15\n"
