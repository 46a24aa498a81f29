#!/usr/bin/env bash
# CUDA compile check for a machine without a GPU (design notes §4): builds meprop._C with its CUDA
# kernels (not the CPU ones: the CPU build covers those) against the CUDA build of torch in a separate
# venv, into a scratch folder (never in place: the tree's meprop/_C*.so is the CPU build), loads the
# built library and checks that every op has a CUDA kernel. Exits 0 without building, saying why, only where nvcc is absent; any failure is non-zero.
#
# Settings (environment): MEPROP_CUDA_VENV (default .venv-cuda, reused when present), MEPROP_CUDA_TORCH
# (default torch==2.14.1), MEPROP_CUDA_BUILD (default build/cuda-check; kept, so a rerun recompiles only
# what changed), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1; then
  echo "cuda_check: SKIPPED: nvcc is not on PATH, so the CUDA kernels cannot be compiled on this machine"
  exit 0
fi

venv="${MEPROP_CUDA_VENV:-.venv-cuda}"
build="${MEPROP_CUDA_BUILD:-build/cuda-check}"
if ! "$venv/bin/python" -c "import torch, ninja, setuptools; assert torch.version.cuda" >/dev/null 2>&1; then
  echo "cuda_check: setting up $venv (CUDA build of torch)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "${MEPROP_CUDA_TORCH:-torch==2.14.1}" numpy ninja pybind11 setuptools wheel
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# nvcc on PATH may be a wrapper script: ask nvcc itself where it lives.
nvcc_bin="$(nvcc -dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p')"
export CUDA_HOME="$(cd "$nvcc_bin/.." && pwd)"
# The toolkit here lacks the cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h includes; torch's
# nvidia wheels carry them.
for inc in "$site"/nvidia/cu*/include; do
  [ -d "$inc" ] && export CPATH="$inc${CPATH:+:$CPATH}"
done
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export MEPROP_CUDA=1
# The CPU kernels are compiled (and tested) by the CPU build; here only csrc/cuda is at stake.
export MEPROP_CPU_KERNELS=0

echo "cuda_check: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') at $CUDA_HOME," \
  "torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'), arch $TORCH_CUDA_ARCH_LIST"
start=$SECONDS
"$venv/bin/python" setup.py -q build_ext --build-lib "$build/lib" --build-temp "$build/temp"
echo "cuda_check: built in $((SECONDS - start)) s"

"$venv/bin/python" - "$build/lib" build/generated/meprop_ops.inc <<'PY'
"""Loads the built library (by path, so the tree's CPU build cannot be picked up) and checks that every op
of the table (meprop/opdefs.py, as setup.py wrote it for this build) has a CUDA kernel."""
import glob
import importlib.util
import re
import sys

import torch

(path,) = glob.glob(f"{sys.argv[1]}/meprop/_C*.so")
spec = importlib.util.spec_from_file_location("meprop._C", path)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
ops = re.findall(r"^MEPROP_OP\((\w+),", open(sys.argv[2]).read(), flags=re.M)
if not ops:
    sys.exit(f"cuda_check: FAILED: no ops in {sys.argv[2]}")
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"meprop::{op}", "CUDA")]
if missing:
    sys.exit(f"cuda_check: FAILED: {path} lacks CUDA kernels for: {', '.join(missing)}")
print(f"cuda_check: OK: {path} loads and has CUDA kernels for all {len(ops)} ops: {', '.join(ops)}")
PY
