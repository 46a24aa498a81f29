"""Builds meprop._C: the CPU kernels always; the CUDA kernels when a CUDA toolkit and a CUDA build of torch
are present. Environment switches:

- ``MEPROP_CUDA``: ``1`` forces the CUDA build (and fails if it cannot), ``0`` skips it; unset = automatic.
- ``MEPROP_CPU_KERNELS``: ``0`` leaves out the CPU kernels (csrc/cpu); only the CUDA compile check
  (.ci/cuda_check.sh) uses it, to spend its time on csrc/cuda.
- ``MEPROP_MARCH``: the ``-march`` of the CPU kernels (default ``native``: the extension is built on the
  machine that runs it); ``MEPROP_MARCH=`` (empty) leaves the compiler's default.
"""

import glob
import importlib
import os
import sys
import types

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    flag = os.environ.get("MEPROP_CUDA", "").strip()
    if flag == "0":
        return False
    import torch

    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1":
        if not possible:
            raise RuntimeError(
                "MEPROP_CUDA=1 but the CUDA build is impossible: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
            )
        return True
    return possible and bool(glob.glob("csrc/cuda/*.cu"))


def _cxx_standard() -> str:
    """The C++ standard torch's headers need: C++20 from torch 2.14 on, C++17 before."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


GENERATED = os.path.join("build", "generated")


def _write_op_list() -> None:
    """Write GENERATED/meprop_ops.inc, the MEPROP_OP(name, signature) lines of meprop/opdefs.py's table.

    The table is imported without running meprop/__init__.py (which loads the extension being built).
    """
    package = types.ModuleType("meprop")
    package.__path__ = [os.path.abspath("meprop")]
    saved = {
        name: sys.modules.pop(name) for name in list(sys.modules) if name == "meprop" or name.startswith("meprop.")
    }
    sys.modules["meprop"] = package
    try:
        opdefs = importlib.import_module("meprop.opdefs")
        lines = [f'MEPROP_OP({op.name}, "{op.signature}")\n' for op in opdefs.OPS.values()]
    finally:
        for name in [n for n in sys.modules if n == "meprop" or n.startswith("meprop.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    os.makedirs(GENERATED, exist_ok=True)
    path = os.path.join(GENERATED, "meprop_ops.inc")
    text = "".join(lines)
    if not os.path.exists(path) or open(path).read() != text:  # unchanged: keep the timestamp (no rebuild)
        with open(path, "w") as f:
            f.write(text)


def _extension():
    march = os.environ.get("MEPROP_MARCH", "native")
    std = _cxx_standard()
    # -fopenmp: at::parallel_for is a header template that only runs in parallel when the including
    # translation unit is compiled with OpenMP (torch's CPU builds use the OpenMP backend).
    cxx = ["-O3", std, "-fopenmp"] + ([f"-march={march}"] if march else [])
    _write_op_list()
    include_dirs = [os.path.abspath(GENERATED)]
    sources = ["csrc/meprop.cpp"]
    if os.environ.get("MEPROP_CPU_KERNELS", "").strip() != "0":
        sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", std, "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "meprop._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "meprop._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
    )


setup(
    # triton_kernels/ installs as `meprop_triton`, a name no other project's Triton kernels use.
    packages=find_packages(include=["meprop", "meprop.*", "al", "al.*"]) + ["meprop_triton"],
    package_dir={"meprop_triton": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
