"""The Triton backend (``meprop_triton``) against :mod:`meprop.reference`.

Triton fixes its mode when it is first imported. Without a GPU this module imports it with
``TRITON_INTERPRET=1`` (then restores the variable, so other test modules see the environment unchanged):
CPU tensors then run through Triton's interpreter at small sizes. With a GPU the compiled kernels run on
CUDA tensors at larger sizes (and the CPU cases skip unless ``TRITON_INTERPRET=1`` is set by the caller).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import meprop
from meprop import reference

HAS_CUDA = torch.cuda.is_available()


def _import_backend():
    """``meprop_triton``, imported (with triton) in the interpreter when there is no GPU and triton is not loaded."""
    if HAS_CUDA or "triton" in sys.modules:
        return pytest.importorskip("meprop_triton")
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return pytest.importorskip("meprop_triton")
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


mt = _import_backend()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (N, out, in) per device: small in the interpreter, paper-like on a GPU.
SHAPES = {
    "cpu": [(1, 3, 5), (37, 50, 45), (6, 130, 17)],
    "cuda": [(1, 3, 5), (37, 50, 45), (300, 1000, 513), (1024, 8192, 8192)],
}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))])
def device(request, monkeypatch) -> torch.device:
    if request.param == "cpu":
        if not mt.INTERPRETED:
            pytest.skip("triton runs compiled here: CPU tensors need TRITON_INTERPRET=1 before triton is imported")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # what meprop.backends checks for CPU tensors
    elif mt.INTERPRETED:
        pytest.skip("triton runs in the interpreter: the full-size CUDA tests would take hours")
    return torch.device(request.param)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(20170806)


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs allocated by the launchers start as NaN (float) or -7 (int), so unwritten elements show."""
    original = torch.Tensor.new_empty

    def new_empty(self, *size, dtype=None, **kwargs):
        out = original(self, *size, dtype=dtype, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same shape and dtype; values within the dtype's tolerance relative to the largest expected magnitude."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual, expected)
    rtol = RTOL[expected.dtype]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=rtol * max(scale, 1e-30))


def tie_free_rows(n: int, out: int, dtype, gen) -> torch.Tensor:
    """(n, out): every row a random permutation of 1..out with random signs (exact in ``dtype`` for the sizes used)."""
    mags = torch.stack([torch.randperm(out, generator=gen) + 1 for _ in range(n)]) if n else torch.zeros(0, out)
    return (mags * (torch.randint(0, 2, (n, out), generator=gen) * 2 - 1)).to(dtype)


def tie_free_columns(n: int, out: int, dtype, gen) -> torch.Tensor:
    """(n, out) with |dy[i, j]| = s_j, a random permutation of 1..out: column sums are distinct and exact."""
    mags = (torch.randperm(out, generator=gen) + 1).expand(n, out)
    return (mags * (torch.randint(0, 2, (n, out), generator=gen) * 2 - 1)).to(dtype)


def exact_limit(dtype) -> int:
    """Largest ``out`` whose integers 1..out (and their column sums here) are exact in ``dtype``."""
    return {torch.bfloat16: 256, torch.float16: 2048}.get(dtype, 1 << 20)


def k_values(out: int) -> list[int]:
    """k = 1, a middle non-power of two, out - 1 and out, each if the Triton top-k takes it (k <= 256)."""
    return sorted({k for k in (1, max(1, out // 3), out - 1, out, 256) if 1 <= k <= min(out, mt.MAX_K)})


def randn(shape, dtype, gen, device) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype).to(device)


# --- selections -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_rows_matches_reference(device, dtype, gen, poisoned):
    for n, out, _ in SHAPES[device.type]:
        if out > exact_limit(dtype):
            continue
        dy = tie_free_rows(n, out, dtype, gen).to(device)
        for k in k_values(out):
            vals, idx = mt.topk_rows(dy, k)
            ref_vals, ref_idx = reference.topk_rows(dy, k)
            assert torch.equal(idx, ref_idx), (n, out, k)
            assert torch.equal(vals, ref_vals), (n, out, k)


def test_topk_rows_many_chunks_and_k_256(device, gen):
    # out=700 spans 11 merge chunks in the interpreter (1 on a GPU); k=256 is the largest allowed.
    dy = tie_free_rows(3, 700, torch.float32, gen).to(device)
    for k in (5, 200, 256):
        vals, idx = mt.topk_rows(dy, k)
        assert torch.equal(idx, reference.topk_rows(dy, k)[1]), k
        assert torch.equal(vals, reference.topk_rows(dy, k)[0]), k


def test_topk_rows_ties_nan_inf(device, gen):
    # Small integers (many equal magnitudes, +-x ties, -0.0 vs 0.0), NaN and +-inf: the reference order exactly.
    dy = torch.randint(-3, 4, (9, 40), generator=gen).float()
    dy[0, 7] = float("nan")
    dy[0, 30] = float("nan")
    dy[1, 3] = float("inf")
    dy[1, 20] = float("-inf")
    dy[2, :] = 0.0
    dy[2, ::3] = -0.0
    dy[3, 5] = float("nan")
    dy[3, 6] = float("-inf")
    dy = dy.to(device)
    for k in (1, 2, 5, 39, 40):
        vals, idx = mt.topk_rows(dy, k)
        ref_vals, ref_idx = reference.topk_rows(dy, k)
        assert torch.equal(idx, ref_idx), k
        torch.testing.assert_close(vals, ref_vals, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_unified_matches_reference(device, dtype, gen, poisoned):
    for n, out, _ in SHAPES[device.type]:
        if out > exact_limit(dtype) or n * out >= 1 << 24:  # column sums (<= n * out) exact in float32
            continue
        dy = tie_free_columns(n, out, dtype, gen).to(device)
        for k in k_values(out):
            assert torch.equal(mt.topk_unified(dy, k), reference.topk_unified(dy, k)), (n, out, k)


def test_topk_unified_ties_nan_many_parts(device, gen):
    # 50 rows: several row parts in the column-sum stage; equal columns tie by index; a NaN column comes first.
    dy = torch.randint(-2, 3, (50, 70), generator=gen).float()
    dy[:, 10] = dy[:, 40]
    dy[:, 11] = -dy[:, 41]
    dy[17, 60] = float("nan")
    dy[3, 5] = float("inf")
    dy = dy.to(device)
    for k in (1, 3, 20, 69, 70):
        assert torch.equal(mt.topk_unified(dy, k), reference.topk_unified(dy, k)), k


def test_topk_unified_no_rows(device):
    dy = torch.zeros(0, 9, device=device)
    assert torch.equal(mt.topk_unified(dy, 4), reference.topk_unified(dy, 4))


# --- products ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_unified_products_match_reference(device, dtype, gen, poisoned):
    for n, out, n_in in SHAPES[device.type]:
        dy, x, w = randn((n, out), dtype, gen, device), randn((n, n_in), dtype, gen, device), randn((out, n_in), dtype, gen, device)
        for k in sorted({1, max(1, out // 3), out - 1, out} - {0}):
            idx = torch.randperm(out, generator=gen)[:k].to(device)
            assert_close(mt.linear_input_grad_unified(dy, w, idx), reference.linear_input_grad_unified(dy, w, idx))
            assert_close(mt.linear_weight_grad_unified(dy, x, idx), reference.linear_weight_grad_unified(dy, x, idx))


def test_unified_products_strided_inputs(device, gen):
    # Transposed views: the GEMM kernels take any strides.
    dy = torch.randn(30, 20, generator=gen).to(device).t()  # (20, 30), column-major
    w = torch.randn(17, 30, generator=gen).to(device).t()  # (30, 17)
    x = torch.randn(40, 20, generator=gen).to(device)[::2]  # (20, 40) row stride 80
    idx = torch.tensor([29, 0, 13, 7], device=device)
    assert_close(mt.linear_input_grad_unified(dy, w, idx), reference.linear_input_grad_unified(dy, w, idx))
    assert_close(mt.linear_weight_grad_unified(dy, x, idx), reference.linear_weight_grad_unified(dy, x, idx))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_products_match_reference(device, dtype, gen, poisoned):
    for n, out, n_in in SHAPES[device.type]:
        dy, x, w = randn((n, out), dtype, gen, device), randn((n, n_in), dtype, gen, device), randn((out, n_in), dtype, gen, device)
        for k in sorted({1, max(1, out // 3), out - 1, out} - {0}):
            vals, idx = reference.topk_rows(dy, k)
            assert_close(mt.linear_input_grad_rows(vals, idx, w), reference.linear_input_grad_rows(vals, idx, w))
            assert_close(
                mt.linear_weight_grad_rows(vals, idx, x, out), reference.linear_weight_grad_rows(vals, idx, x, out)
            )
            rows = torch.unique(idx)[::2].contiguous()
            assert_close(
                mt.linear_weight_grad_rows(vals, idx, x, out, rows),
                reference.linear_weight_grad_rows(vals, idx, x, out, rows),
            )


def test_rows_weight_grad_untouched_rows_and_no_examples(device, gen):
    # Every example selects the same two columns: long segments there (70 > the blocks), zero rows elsewhere.
    vals = torch.randn(70, 2, generator=gen).to(device)
    idx = torch.tensor([[4, 1]] * 70, device=device)
    x = torch.randn(70, 6, generator=gen).to(device)
    assert_close(mt.linear_weight_grad_rows(vals, idx, x, 8), reference.linear_weight_grad_rows(vals, idx, x, 8))
    rows = torch.tensor([0, 1, 4, 7], device=device)
    assert_close(mt.linear_weight_grad_rows(vals, idx, x, 8, rows), reference.linear_weight_grad_rows(vals, idx, x, 8, rows))
    empty = mt.linear_weight_grad_rows(vals[:0], idx[:0], x[:0], 8)
    assert torch.equal(empty, torch.zeros(8, 6, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_rows_matches_reference(device, dtype, gen, poisoned):
    for _, out, n_in in SHAPES[device.type]:
        for k in sorted({1, max(1, out // 3), out}):
            idx = torch.randperm(out, generator=gen)[:k].to(device)
            rows = randn((k, n_in), dtype, gen, device)
            assert torch.equal(mt.scatter_rows(rows, idx, out), reference.scatter_rows(rows, idx, out))


def test_products_with_no_rows(device):
    w, x = torch.randn(6, 4, device=device), torch.randn(0, 4, device=device)
    dy, idx = torch.randn(0, 6, device=device), torch.tensor([2, 5], device=device)
    assert mt.linear_input_grad_unified(dy, w, idx).shape == (0, 4)
    assert torch.equal(mt.linear_weight_grad_unified(dy, x, idx), torch.zeros(2, 4, device=device))
    vals, ridx = torch.zeros(0, 2, device=device), torch.zeros(0, 2, dtype=torch.long, device=device)
    assert mt.linear_input_grad_rows(vals, ridx, w).shape == (0, 4)
    assert mt.topk_rows(dy, 3)[1].shape == (0, 3)


# --- argument checks --------------------------------------------------------------------------------------


def test_bad_arguments_raise(device):
    dy = torch.randn(4, 300, device=device)
    with pytest.raises(ValueError, match="k <= 256"):
        mt.topk_rows(dy, 257)
    with pytest.raises(ValueError, match="k <= 256"):
        mt.topk_unified(dy, 300)
    with pytest.raises(ValueError, match=r"k must lie in \[1, 300\]"):
        mt.topk_rows(dy, 0)
    with pytest.raises(TypeError, match="dy must be float32"):
        mt.topk_rows(dy.double(), 3)
    w = torch.randn(300, 5, device=device)
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, 300\)"):
        mt.linear_input_grad_unified(dy, w, torch.tensor([0, 300], device=device))
    with pytest.raises(TypeError, match="weight is torch.float16"):
        mt.linear_input_grad_unified(dy, w.half(), torch.tensor([0], device=device))
    with pytest.raises(ValueError, match="distinct"):
        mt.scatter_rows(torch.randn(2, 5, device=device), torch.tensor([3, 3], device=device), 10)
    with pytest.raises(ValueError, match="same shape"):
        mt.linear_input_grad_rows(torch.randn(4, 2, device=device), torch.zeros(4, 3, dtype=torch.long, device=device), w)


# --- training through meprop.Linear -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_linear_backend_triton_trains_mlp(device, mode, gen):
    n_in, hidden, classes = 20, 48, 5
    x = torch.randn(64, n_in, generator=gen).to(device)
    y = (x[:, :classes] * torch.arange(1, classes + 1, device=device)).argmax(1)

    def mlp(backend: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            meprop.Linear(n_in, hidden, k=12, mode=mode, backend=backend),
            torch.nn.ReLU(),
            meprop.Linear(hidden, hidden, k=12, mode=mode, backend=backend),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, classes),
        ).to(device)

    model, ref_model = mlp("triton"), mlp("reference")
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for step in range(10):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 0:  # the same gradients as the reference backend
            torch.nn.functional.cross_entropy(ref_model(x), y).backward()
            for p, q in zip(model.parameters(), ref_model.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# --- registration and availability ------------------------------------------------------------------------


def test_ops_are_registered_with_torch_library():
    for name in ("topk_unified", "topk_rows", "linear_input_grad_unified", "linear_weight_grad_unified",
                 "linear_input_grad_rows", "linear_weight_grad_rows", "scatter_rows"):
        assert hasattr(torch.ops.meprop_triton, name), name
    assert meprop.backends.get("triton") is mt


def _run_python(code: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=env)


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
        assert torch.equal(mt.topk_unified(dy, 3), idx)
        w = torch.randn(11, 4)
        torch.testing.assert_close(mt.linear_input_grad_unified(dy, w, idx), reference.linear_input_grad_unified(dy, w, idx))
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
            mt.topk_rows(torch.randn(2, 5), 2)
        except ValueError as exc:
            assert "TRITON_INTERPRET=1" in str(exc), exc
        else:
            raise AssertionError("CPU tensors accepted by compiled Triton kernels")
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
        import meprop
        assert "triton" not in meprop.backends.available("cpu")
        try:
            meprop.backends.get("triton")
        except RuntimeError as exc:
            assert "unavailable" in str(exc)
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


needs_compiled_cuda = pytest.mark.skipif(not HAS_CUDA or mt.INTERPRETED, reason="needs CUDA and compiled Triton kernels")


@needs_compiled_cuda
def test_compile_traces_triton_ops():
    gen = torch.Generator().manual_seed(0)
    dy = torch.randn(256, 1000, generator=gen).cuda()
    w = torch.randn(1000, 300, generator=gen).cuda()

    def backward(dy, w):
        idx = torch.ops.meprop_triton.topk_unified(dy, 32)
        return torch.ops.meprop_triton.linear_input_grad_unified(dy, w, idx)

    compiled = torch.compile(backward, fullgraph=True)
    assert_close(compiled(dy, w), reference.linear_input_grad_unified(dy, w, reference.topk_unified(dy, 32)))


@needs_compiled_cuda
def test_opcheck_on_cuda():
    dy, x, w = torch.randn(40, 60, device="cuda"), torch.randn(40, 30, device="cuda"), torch.randn(60, 30, device="cuda")
    idx = torch.randperm(60, device="cuda")[:7]
    vals, ridx = reference.topk_rows(dy, 5)
    cases = {
        "topk_unified": (dy, 7),
        "topk_rows": (dy, 5),
        "linear_input_grad_unified": (dy, w, idx),
        "linear_weight_grad_unified": (dy, x, idx),
        "linear_input_grad_rows": (vals, ridx, w),
        "linear_weight_grad_rows": (vals, ridx, x, 60, None),
        "scatter_rows": (torch.randn(7, 30, device="cuda"), idx, 60),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.meprop_triton, name), args)
