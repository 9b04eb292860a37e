"""The int4_vnni format (s2t/kernels/int4_vnni.cpp, s2t.weight_formats.int4_weight): the 4-bit layout and its
rounding rule, the kernel's exact integer arithmetic (both builds: AVX-512 VNNI and AVX2) against a float64
reference on the same quantised weights and activations, batch invariance, the two builds bit-identical,
which build serves the format, its absence, and `auto` never choosing it."""

import pytest
import torch
from torch import nn

from kernel_helpers import built, builds, needs_avx2, needs_vnni, quantised_rows, threads

from s2t import kernels
from s2t.weight_formats import (AUTO_CANDIDATES, INT4_GROUP, FormatPlan, FormattedLinear, _prepare,
                                available_formats, int4_dequantised, int4_weight, measure_plan,
                                plan_for_layer)


@pytest.fixture(scope="module", params=builds("int4_vnni"))
def int4_linear(request):
    return built(request.param)


@pytest.fixture(scope="module")
def format_kernel():
    """The build that serves the format here."""
    fn = kernels.load_int4_vnni_linear()
    if fn is None:
        pytest.skip(f"no build of int4_vnni here: {kernels.unavailable_reason('int4_vnni')}")
    return fn


def test_layout_and_rounding():
    """Per group of 32 the grid runs from its min to its max in 15 steps; every entry within half a step of it,
    padding inputs zero; nibble j of a 64-input chunk's low half is input j."""
    torch.manual_seed(0)
    w = torch.randn(7, 300) * 0.05
    w[0, :32] += 1.0  # a group far from zero: the offset carries it
    packed, d, mn = int4_weight(w, rows_per_pass=3)  # several passes
    kp = 384
    assert packed.shape == (7, kp // 2) and packed.dtype == torch.uint8
    assert d.shape == mn.shape == (7, kp // INT4_GROUP) and d.dtype == mn.dtype == torch.float16
    back = int4_dequantised(packed, d, mn, 300)
    step = d.float().repeat_interleave(INT4_GROUP, dim=1)[:, :300]
    bottom = mn.float().repeat_interleave(INT4_GROUP, dim=1)[:, :300]
    assert ((back - w).abs() <= step / 2 + 1e-4 * w.abs()).all()  # float16 rounding of d and mn aside
    g = w[:, :288].reshape(7, 9, 32)
    assert torch.allclose(mn[:, :9].float(), g.amin(-1), rtol=1e-3)
    assert torch.allclose(d[:, :9].float(), (g.amax(-1) - g.amin(-1)) / 15, rtol=1e-3)
    # input 0 in the low nibble of byte 0, input 32 in its high nibble
    u = torch.round((w[0, [0, 32]] - mn[0, [0, 1]].float()) / d[0, [0, 1]].float()).clamp(0, 15)
    assert packed[0, 0].item() == int(u[0]) | (int(u[1]) << 4)
    # the padding (inputs 300..383) is u = 0 with a zero step and offset for its whole groups
    assert torch.equal(d[:, 10:], torch.zeros(7, 2, dtype=torch.float16)) and not mn[:, 10:].any()


@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("n,k", [(4, 128), (130, 70), (3, 896), (257, 300), (5, 1), (9, 8960)])
def test_kernel_matches_float64_reference(int4_linear, thread_count, n, k):
    with threads(thread_count):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05
        w[:, :min(k, 40)] += 0.3  # groups off zero: the offsets' term matters
        packed, d, mn = int4_weight(w)
        ref_w = int4_dequantised(packed, d, mn, k).double()
        for m in (1, 2, 3, 5, 17):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
            got = int4_linear(x, packed, d, mn, k)
            ref = quantised_rows(x) @ ref_w.t()
            assert got.shape == (m, n) and got.dtype == torch.float32
            assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), (m, n, k)


def test_each_output_depends_on_its_own_row_only(int4_linear):
    packed, d, mn = int4_weight(torch.randn(70, 896) * 0.05)
    x = torch.randn(41, 896)
    x[5] *= 1000
    together = int4_linear(x, packed, d, mn, 896)
    alone = torch.cat([int4_linear(x[i:i + 1], packed, d, mn, 896) for i in range(41)])
    assert torch.equal(alone, together)


def test_kernel_rejects_wrong_dtypes_and_shapes(int4_linear):
    packed, d, mn = int4_weight(torch.randn(8, 128))
    with pytest.raises(RuntimeError, match="x must be float32"):
        int4_linear(torch.randn(1, 128, dtype=torch.bfloat16), packed, d, mn, 128)
    with pytest.raises(RuntimeError, match="d and mn must be float16"):
        int4_linear(torch.randn(1, 128), packed, d, mn.float(), 128)
    with pytest.raises(RuntimeError, match="do not match"):
        int4_linear(torch.randn(1, 127), packed, d, mn, 128)


@needs_vnni
@needs_avx2
def test_the_two_builds_are_bit_identical():
    """The AVX2 build's int32 lanes are dpbusd's and its float steps the same operations in the same order: the
    same numbers, so a 4-bit layer's results do not depend on which of the two CPUs ran them."""
    vnni, avx2 = kernels.load_kernel("int4_vnni"), kernels.load_kernel("int4_vnni_avx2")
    for n, k in [(4, 128), (130, 70), (257, 300), (1, 129), (33, 8960)]:
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05
        w[:, :min(k, 40)] += 0.3
        packed, d, mn = int4_weight(w)
        for m in (1, 2, 3, 17):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) * 3
            x[0, :7] = 0
            x[-1, :] = x[-1].abs()  # all-positive activations: pair sums up to their maximum (2 * 15 * 127)
            assert torch.equal(vnni(x, packed, d, mn, k), avx2(x, packed, d, mn, k)), (n, k, m)


def test_the_format_in_a_layer(format_kernel):
    """A layer in int4_vnni is the kernel on int4_weight's layout plus the bias, and near the float layer; a
    model's lm_head stays at 8 bits."""
    assert "int4_vnni" in available_formats()
    torch.manual_seed(0)
    lin = nn.Linear(300, 40, bias=True)
    packed, d, mn, k, kernel = _prepare(lin.weight.detach(), "int4_vnni")
    assert k == 300 and kernel is format_kernel
    layer = FormattedLinear(lin, FormatPlan.uniform("int4_vnni"))
    x = torch.randn(2, 3, 300)
    got = layer(x)
    assert torch.equal(got.reshape(6, 40), format_kernel(x.reshape(6, 300), packed, d, mn, 300) + lin.bias)
    ref = lin(x)
    assert (got - ref).norm() <= 0.1 * ref.norm()
    plan = FormatPlan(("int4_vnni",) * 4 + ("fp32",))
    assert plan_for_layer(plan, "lm_head").formats == ("int8_vnni",) * 4 + ("fp32",)
    assert plan_for_layer(plan, "model.layers.0.mlp.down_proj") == plan
    assert plan_for_layer(FormatPlan.uniform("int8"), "lm_head") == FormatPlan.uniform("int8")


def test_auto_never_picks_it(monkeypatch):
    """4 bits change the model's numbers more than 8 do: a quality decision for the user, not a speed one."""
    assert "int4_vnni" not in AUTO_CANDIDATES
    plan, timings = measure_plan(128, 64, repeats=1)
    assert "int4_vnni" not in timings and "int4_vnni" not in plan.formats


@needs_avx2
def test_without_vnni_the_avx2_build_serves_the_format(monkeypatch):
    """A CPU with AVX2 and F16C but not AVX-512 VNNI has int4_vnni through the AVX2 build; S2T_INT4_VNNI_KERNEL
    picks a build or refuses the fallback."""
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "f16c", "avx512f"})
    assert kernels.kernel_for("int4_vnni") == "int4_vnni_avx2"
    assert kernels.load_int4_vnni_linear() is kernels.load_kernel("int4_vnni_avx2")
    assert "int4_vnni" in available_formats() and kernels.unavailable_reason("int4_vnni") is None
    monkeypatch.setenv("S2T_INT4_VNNI_KERNEL", "avx512_vnni")
    assert kernels.load_int4_vnni_linear() is None
    assert "lack avx512bw" in kernels.unavailable_reason("int4_vnni")
    monkeypatch.setenv("S2T_INT4_VNNI_KERNEL", "avx2")
    assert kernels.kernel_for("int4_vnni") == "int4_vnni_avx2"
    assert kernels.kernel_for("int8_vnni") is not None  # the other format's variable is its own
    monkeypatch.setenv("S2T_INT4_VNNI_KERNEL", "sse")
    with pytest.raises(ValueError, match="S2T_INT4_VNNI_KERNEL='sse'.*avx2"):
        kernels.load_int4_vnni_linear()


def test_without_the_instructions_the_format_is_absent_and_named(monkeypatch):
    """Neither VNNI nor F16C (an AVX2 CPU without it would need the kernel's float16 steps converted another
    way): no kernel, a reason naming both builds' lack, the format refused with it."""
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    monkeypatch.setattr(kernels, "cpu_has_avx2", lambda: True)
    assert kernels.load_int4_vnni_linear() is None
    reason = kernels.unavailable_reason("int4_vnni")
    assert "lack avx512bw" in reason and "lack f16c" in reason
    assert "int4_vnni" not in available_formats()
    with pytest.raises(ValueError, match="int4_vnni is not available here: .*VNNI.*F16C"):
        FormattedLinear(nn.Linear(8, 8), FormatPlan.uniform("int4_vnni"))


def test_asking_for_one_format_builds_only_its_kernel(monkeypatch):
    """A worker started with `int8_vnni` must not compile the int4 or int8_avx2 kernels (a minute each)."""
    from s2t.runtime import resolve_plan

    asked = []
    monkeypatch.setattr(kernels, "load_kernel", lambda name: asked.append(name))  # returns None: "unavailable"
    with pytest.raises(ValueError, match="int8_vnni"):
        resolve_plan("int8_vnni")
    assert set(asked) <= {"int8_vnni", "int8_vnni_avx2"} and asked
    asked.clear()
    assert resolve_plan("bf16,bf16,fp32,fp32,fp32").formats == ("bf16", "bf16", "fp32", "fp32", "fp32")
    assert asked == []
