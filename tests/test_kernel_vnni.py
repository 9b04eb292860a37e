"""The int8_vnni kernel (s2t/kernels/int8_vnni.cpp), both builds (AVX-512 VNNI and AVX2), and int8_amx's kernel
on the same arguments: exact integer arithmetic on per-block quantised activations, against a float64
reference that quantises the same way; batch invariance; the two builds bit-identical; which build serves the
format; its absence."""

import pytest
import torch
from torch import nn

from kernel_helpers import built, builds, needs_amx, needs_avx2, needs_vnni, quantised, quantised_rows, threads

from s2t import kernels
from s2t.weight_formats import VNNI_BLOCK, FormatPlan, FormattedLinear, _prepare, available_formats, vnni_weight


# int8_amx (int8_amx.cpp) computes the same numbers from the same arguments on AMX tiles (to float rounding):
# every test of the kernel's arithmetic runs on it too
@pytest.fixture(scope="module", params=builds("int8_vnni") + [pytest.param("int8_amx", marks=needs_amx)])
def vnni_linear(request):
    return built(request.param)


def _reference(x, q, scale):
    return (quantised_rows(x) @ q.double().t()) * scale.double()


@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("n,k", [(4, 128), (130, 70), (3, 896), (257, 300), (5, 1), (1, 129)])
def test_kernel_matches_float64_reference(vnni_linear, thread_count, n, k):
    """Row counts across the 3-, 2- and 1-row tiles, K off the 128-input blocks (zero-padded), N off the
    4-row blocks."""
    with threads(thread_count):
        q, scale = quantised(n, k)
        u = vnni_weight(q)
        assert u.shape == (n, -(-k // VNNI_BLOCK) * VNNI_BLOCK) and u.dtype == torch.uint8
        for m in list(range(1, 8)) + [17, 64]:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
            got = vnni_linear(x, u, scale, k)
            ref = _reference(x, q, scale)
            assert got.shape == (m, n) and got.dtype == torch.float32
            # integer dot products are exact; what is left is float32 rounding of the block sums
            assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), (m, n, k)


def test_each_output_depends_on_its_own_row_only(vnni_linear):
    """Batch invariance: a row's outputs are bit-identical alone or among 40 others, at any thread count."""
    q, scale = quantised(70, 896)
    u = vnni_weight(q)
    x = torch.randn(41, 896)
    x[5] *= 1000  # one loud row must not change the others' activation scales
    together = vnni_linear(x, u, scale, 896)
    for count in (1, 2):
        with threads(count):
            alone = torch.cat([vnni_linear(x[i:i + 1], u, scale, 896) for i in range(41)])
        assert torch.equal(alone, together)


def test_zero_rows_and_an_all_zero_block(vnni_linear):
    q, scale = quantised(9, 256)
    u = vnni_weight(q)
    assert vnni_linear(torch.zeros(0, 256), u, scale, 256).shape == (0, 9)
    x = torch.randn(2, 256)
    x[:, :128] = 0  # a block whose scale would be 0/127
    got = vnni_linear(x, u, scale, 256)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), _reference(x, q, scale), rtol=1e-5, atol=1e-6)


def test_kernel_rejects_wrong_dtypes_and_shapes(vnni_linear):
    q, scale = quantised(8, 128)
    u = vnni_weight(q)
    with pytest.raises(RuntimeError, match="x must be float32"):
        vnni_linear(torch.randn(1, 128, dtype=torch.bfloat16), u, scale, 128)
    with pytest.raises(RuntimeError, match="u must be uint8"):
        vnni_linear(torch.randn(1, 128), q, scale, 128)
    with pytest.raises(RuntimeError, match="do not match"):
        vnni_linear(torch.randn(1, 127), u, scale, 128)


def test_int8_vnni_format_holds_the_int8_formats_weights():
    """The same quantised weights as `int8` and `int8_avx2`, offset by 128; a layer in this format is close to
    the float layer, and the plan offers the format on this machine."""
    if kernels.int8_vnni_kernel() is None:
        pytest.skip("neither build of int8_vnni exists on this CPU")
    assert "int8_vnni" in available_formats()
    torch.manual_seed(0)
    lin = nn.Linear(300, 40, bias=True)
    qa, sa = _prepare(lin.weight.detach(), "int8_avx2")
    u, sv, k, kernel = _prepare(lin.weight.detach(), "int8_vnni")
    assert k == 300 and kernel is kernels.load_int8_vnni_linear()
    assert torch.equal(sa, sv) and torch.equal(u[:, :300].to(torch.int16) - 128, qa.to(torch.int16))
    assert (u[:, 300:] == 128).all()
    layer = FormattedLinear(lin, FormatPlan.uniform("int8_vnni"))
    x = torch.randn(2, 3, 300)
    ref = lin(x)
    got = layer(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


@needs_vnni
@needs_avx2
def test_the_two_builds_are_bit_identical():
    """The AVX2 build starts each int32 lane at its share of the +128 offset and reduces the same 16 float lanes
    in the same order as the AVX-512 one: the same numbers, so a linear layer's results do not depend on which
    of the two CPUs ran them."""
    vnni, avx2 = kernels.load_kernel("int8_vnni"), kernels.load_kernel("int8_vnni_avx2")
    for n, k in [(4, 128), (130, 70), (257, 300), (1, 129), (33, 8960)]:
        q, scale = quantised(n, k)
        u = vnni_weight(q)
        for m in (1, 2, 3, 17):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) * 3
            x[0, :7] = 0  # zero activations: sign(x, q) and the offset lanes at their edge
            assert torch.equal(vnni(x, u, scale, k), avx2(x, u, scale, k)), (n, k, m)


def test_without_vnni_the_avx2_build_serves_the_format(monkeypatch):
    """A CPU with AVX2 but not AVX-512 VNNI (most AVX2-only x86 machines) still has int8_vnni, through the AVX2
    build; S2T_INT8_VNNI_KERNEL picks a build or refuses the fallback."""
    if not kernels.cpu_has_avx2():
        pytest.skip("needs AVX2")
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    assert kernels.int8_vnni_kernel() == "int8_vnni_avx2"
    assert kernels.load_int8_vnni_linear() is kernels.load_kernel("int8_vnni_avx2")
    assert "int8_vnni" in available_formats() and kernels.unavailable_reason("int8_vnni") is None
    monkeypatch.setenv("S2T_INT8_VNNI_KERNEL", "avx512_vnni")
    assert kernels.load_int8_vnni_linear() is None
    assert "lack avx512bw" in kernels.unavailable_reason("int8_vnni")
    monkeypatch.setenv("S2T_INT8_VNNI_KERNEL", "avx2")
    assert kernels.int8_vnni_kernel() == "int8_vnni_avx2"
    monkeypatch.setenv("S2T_INT8_VNNI_KERNEL", "sse")
    with pytest.raises(ValueError, match="S2T_INT8_VNNI_KERNEL='sse'.*avx2"):
        kernels.int8_vnni_kernel()


def test_without_the_instructions_the_format_is_absent_and_named(monkeypatch):
    """A CPU with neither AVX-512 VNNI nor AVX2 (or failed builds): no kernel, a reason naming both builds' lack,
    no int8_vnni among the formats, a plan that asks for it refused with that reason."""
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"sse4_2", "avx512f"})
    monkeypatch.setattr(kernels, "cpu_has_avx2", lambda: False)
    assert kernels.load_int8_vnni_linear() is None
    reason = kernels.unavailable_reason("int8_vnni")
    assert "VNNI" in reason and "lack avx512bw" in reason and "AVX2" in reason
    assert "int8_vnni" not in available_formats()
    with pytest.raises(ValueError, match="int8_vnni is not available here: .*VNNI"):
        FormattedLinear(nn.Linear(8, 8), FormatPlan.uniform("int8_vnni"))


def test_all_positive_activations_lose_little_to_the_offset_correction(vnni_linear):
    """All-positive rows make the +128 offset's correction as large as it gets (sum_k 128 * xq ~ 2e6 per
    block) beside a small true dot product: float32 cancellation must stay far below the int8 rounding."""
    q, scale = quantised(64, 1536)
    u = vnni_weight(q)
    x = torch.rand(5, 1536) + 1.0
    got = vnni_linear(x, u, scale, 1536).double()
    ref = _reference(x, q, scale)
    assert ((got - ref).abs() / ref.abs().max()).max() < 1e-5
