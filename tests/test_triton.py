"""What is particular to the Triton backend (``meprop_triton``): its registration with torch.library, its
fallback without ``triton_op``, its availability rules, and its kernels lowering to GPU code.

The kernels' results are tested with every other backend's in test_conformance.py and test_properties.py
(under Triton's interpreter on CPU tensors where there is no GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conformance import assert_matches, oracle

import meprop
from meprop.opdefs import OP_NAMES

mt = pytest.importorskip("meprop_triton", reason="triton is not installed")
HAS_CUDA = torch.cuda.is_available()


# --- registration and availability ------------------------------------------------------------------------


def test_ops_are_registered_with_torch_library():
    backend = meprop.backends.get("triton")
    for name in OP_NAMES:
        op = getattr(torch.ops.meprop_triton, name).default
        assert mt.OPS[name] is op and getattr(backend, name) is op
        assert str(op._schema) == "meprop_triton::" + meprop.opdefs.OPS[name].schema


def _run_python(code: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=env
    )


def test_custom_op_fallback_without_triton_op():
    # An older torch without torch.library.triton_op gets plain custom ops with fake implementations.
    result = _run_python(
        """
        import torch
        del torch.library.triton_op
        import meprop_triton as mt
        from meprop import reference
        from meprop_triton import _runtime
        assert not _runtime.HAS_TRITON_OP
        dy = torch.randn(6, 11)
        idx = reference.topk_unified(dy, 3)
        assert torch.equal(mt.OPS["topk_unified"](dy, 3), idx)
        w = torch.randn(11, 4)
        got = mt.OPS["linear_input_grad_unified"](dy, w, idx)
        torch.testing.assert_close(got, reference.linear_input_grad_unified(dy, w, idx))
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            vals, i = torch.ops.meprop_triton.topk_rows(torch.empty(5, 9), 2)
            assert vals.shape == (5, 2) and i.dtype == torch.long
        print("ok")
        """,
        interpret=True,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


def test_cpu_tensors_without_interpreter():
    # Without TRITON_INTERPRET, CPU-only use never imports triton, and the Triton ops refuse CPU tensors.
    result = _run_python(
        """
        import sys
        import torch
        import meprop
        assert "triton" not in meprop.backends.available("cpu")
        assert "triton" not in sys.modules
        import meprop_triton as mt
        try:
            mt.OPS["topk_rows"](torch.randn(2, 5), 2)
        except ValueError as exc:
            assert "take CUDA tensors" in str(exc), exc
        else:
            raise AssertionError("CPU tensors accepted by compiled Triton kernels")
        # torch.library.triton_op infers the schema from the launcher's annotations: it must be the table's.
        from meprop.opdefs import OPS
        for name, opdef in OPS.items():
            got = getattr(torch.ops.meprop_triton, name).default._schema
            want = torch._C.parse_schema(f"meprop_triton::{name}{opdef.signature}")
            assert [(a.name, str(a.type)) for a in got.arguments] == [(a.name, str(a.type)) for a in want.arguments], name
            assert [str(r.type) for r in got.returns] == [str(r.type) for r in want.returns], name
        print("ok")
        """,
        interpret=False,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


def test_meprop_imports_without_triton():
    result = _run_python(
        """
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        import torch
        import meprop
        assert "triton" not in meprop.backends.available("cpu")
        assert "cannot be imported" in meprop.backends.get("triton").error
        try:
            meprop.Linear(4, 6, k=2, backend="triton")(torch.randn(3, 4, requires_grad=True))
        except RuntimeError as exc:
            assert "cannot be imported" in str(exc)
        else:
            raise AssertionError("backend 'triton' should be unavailable")
        print("ok")
        """,
        interpret=True,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


def test_kernels_compile_for_hopper():
    # Without a GPU the compiled path never runs here: at least lower every kernel (its first GPU config; float32,
    # and bfloat16 for the tensor-core GEMMs) to sm_90 code, catching what the interpreter accepts but the
    # compiler rejects.
    result = _run_python(
        """
        import triton
        if "nvidia" not in triton.backends.backends:
            raise SystemExit("skip: this triton has no CUDA backend")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from meprop_triton import ops, rows_kernels, topk_kernels, unified_kernels

        def compile_first_config(kernel, pointers, constexprs=()):
            config = kernel.configs[0]
            constexprs = {**dict(constexprs), **config.kwargs}
            names = kernel.fn.arg_names
            signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
            source = ASTSource(kernel.fn, signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

        p = "*fp32"
        plan = dict(ops._topk_plan(8192, 32), WRITE_VALS=True)
        compile_first_config(topk_kernels.topk_kernel, dict(src_ptr=p, vals_ptr=p, idx_ptr="*i64"), plan)
        compile_first_config(topk_kernels.column_abs_sum_kernel, dict(dy_ptr=p, partial_ptr="*fp32"))
        compile_first_config(rows_kernels.input_grad_kernel, dict(vals_ptr=p, idx_ptr="*i64", w_ptr=p, dx_ptr=p))
        segments = dict(vals_ptr=p, order_ptr="*i64", starts_ptr="*i64", ends_ptr="*i64", x_ptr=p, dw_ptr=p)
        compile_first_config(rows_kernels.weight_grad_kernel, segments)
        compile_first_config(rows_kernels.scatter_rows_kernel, dict(rows_ptr=p, pos_ptr="*i64", out_ptr=p))
        for p in ("*fp32", "*bf16"):
            gemm = dict(dy_ptr=p, w_ptr=p, x_ptr=p, dx_ptr=p, out_ptr=p, idx_ptr="*i64")
            compile_first_config(unified_kernels.input_grad_kernel, gemm, dict(DOT_UPCAST=False))
            compile_first_config(unified_kernels.weight_grad_kernel, gemm, dict(DOT_UPCAST=False))
        print("ok")
        """,
        interpret=False,
    )
    if "skip: " in result.stderr:
        pytest.skip(result.stderr.strip().rpartition("skip: ")[2])
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# --- GPU only ---------------------------------------------------------------------------------------------


needs_compiled_cuda = pytest.mark.skipif(
    not HAS_CUDA or mt.INTERPRETED, reason="needs CUDA and compiled Triton kernels"
)


@needs_compiled_cuda
def test_compile_traces_triton_ops():
    gen = torch.Generator().manual_seed(0)
    dy = torch.randn(256, 1000, generator=gen).cuda()
    w = torch.randn(1000, 300, generator=gen).cuda()

    def backward(dy, w):
        idx = torch.ops.meprop_triton.topk_unified(dy, 32)
        return torch.ops.meprop_triton.linear_input_grad_unified(dy, w, idx)

    compiled = torch.compile(backward, fullgraph=True)
    idx = oracle("topk_unified", dy, 32)
    assert_matches(compiled(dy, w), oracle("linear_input_grad_unified", dy, w, idx), torch.float32, "cuda")
