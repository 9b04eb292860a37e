"""The int8_avx2 decode kernel (s2t/kernels/int8_gemv.cpp) against a float64 reference, and its absence."""

import pytest
import torch
from torch import nn

from kernel_helpers import quantised, threads

from s2t import kernels
from s2t.weight_formats import FormatPlan, FormattedLinear, _prepare, available_formats

needs_avx2 = pytest.mark.skipif(not kernels.cpu_has_avx2(), reason="the kernel is for x86 CPUs with AVX2")


@pytest.fixture(scope="module")
def int8_linear():
    fn = kernels.load_int8_linear()
    # on an AVX2 machine (CI's) a missing kernel is a failure, not a skip: the compiler or ninja is missing
    assert fn is not None, kernels.unavailable_reason()
    return fn


def _reference(x, q, scale):
    return (x.double() @ q.double().t()) * scale.double()


@needs_avx2
@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("n,k", [(4, 32), (130, 70), (3, 896), (257, 96), (96, 31), (1, 1)])
def test_kernel_matches_float64_reference(int8_linear, thread_count, n, k):
    """Every row count up to and past the 8-row tile, K off the 32-wide vectors, N off the 4-row blocks."""
    with threads(thread_count):
        q, scale = quantised(n, k)
        for m in list(range(1, 10)) + [17]:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            got = int8_linear(x, q, scale)
            ref = _reference(x, q, scale)
            assert got.shape == (m, n) and got.dtype == torch.float32
            assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), (m, n, k)


@needs_avx2
def test_kernel_reads_non_contiguous_inputs(int8_linear):
    q, scale = quantised(40, 64)
    x = torch.randn(64, 3).t()  # a transposed view
    assert torch.allclose(int8_linear(x, q, scale).double(), _reference(x, q, scale), rtol=1e-5, atol=1e-6)


@needs_avx2
def test_kernel_rejects_wrong_dtypes_and_shapes(int8_linear):
    q, scale = quantised(8, 32)
    with pytest.raises(RuntimeError, match="x must be float32"):
        int8_linear(torch.randn(1, 32, dtype=torch.bfloat16), q, scale)
    with pytest.raises(RuntimeError, match="q must be int8"):
        int8_linear(torch.randn(1, 32), q.float(), scale)
    with pytest.raises(RuntimeError, match="do not match"):
        int8_linear(torch.randn(1, 33), q, scale)


@needs_avx2
def test_int8_avx2_format_holds_the_int8_formats_weights(int8_linear):
    """Same quantised weights as `int8` (so the two differ only by activation and scale rounding), outputs
    close to the float layer, and the plan offers the format on this machine."""
    assert "int8_avx2" in available_formats()
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    q8, s8 = _prepare(lin.weight.detach(), "int8")
    qa, sa = _prepare(lin.weight.detach(), "int8_avx2")
    assert torch.equal(q8, qa) and sa.dtype == torch.float32 and torch.allclose(s8.float(), sa, rtol=1e-2)
    layer = FormattedLinear(lin, FormatPlan.parse("int8_avx2,int8_avx2,int8_avx2,fp32,fp32"))
    x = torch.randn(2, 3, 96)
    ref = lin(x)
    got = layer(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
    # exactly the kernel on the int8 weights, plus the bias
    assert torch.allclose(got.reshape(6, 40).double(), _reference(x.reshape(6, 96), qa, sa) + lin.bias.double(),
                          rtol=1e-5, atol=1e-6)


def test_without_the_kernel_the_format_is_absent_and_named(monkeypatch):
    """A CPU without AVX2 (or a failed build): no kernel, a reason, no int8_avx2 in the formats, and a plan
    that asks for it is refused with that reason."""
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "cpu_has_avx2", lambda: False)
    assert kernels.load_int8_linear() is None
    assert "AVX2" in kernels.unavailable_reason()
    assert "int8_avx2" not in available_formats()
    with pytest.raises(ValueError, match="int8_avx2 is not available here: .*AVX2"):
        FormattedLinear(nn.Linear(8, 8), FormatPlan.uniform("int8_avx2"))


def test_a_failed_build_is_reported_once_not_raised(monkeypatch):
    calls = []

    def broken_build(kernel):
        calls.append(1)
        raise RuntimeError("Error building extension 's2t_int8_gemv': g++: command not found")

    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "cpu_has_avx2", lambda: True)
    monkeypatch.setattr(kernels, "_build", broken_build)
    assert kernels.load_int8_linear() is None and kernels.load_int8_linear() is None
    assert len(calls) == 1
    assert "could not be built" in kernels.unavailable_reason() and "g++" in kernels.unavailable_reason()


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A builder killed mid-build leaves torch's lock file behind, and torch waits for it forever."""
    import os
    import time

    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "_get_build_directory", lambda name, verbose: str(tmp_path))
    lock = tmp_path / "lock"
    lock.write_text("")
    kernels._clear_stale_lock("s2t_int8_gemv")
    assert lock.exists()  # a build may be running in another process right now
    old = time.time() - kernels._STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    kernels._clear_stale_lock("s2t_int8_gemv")
    assert not lock.exists()
