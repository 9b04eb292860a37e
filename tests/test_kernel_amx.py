"""The int8_amx format (s2t/kernels/int8_amx.cpp): int8_vnni's weights and activations on AMX tiles. The
kernel's arithmetic against the float64 reference, its batch invariance and its argument checks are
test_kernel_vnni.py's (its kernel fixture covers int8_amx); here: int8_vnni's numbers to float rounding, one
copy of the weights for a layer and a model holding both formats (also after fusing), `auto` keeping both,
and its absence named."""

import pytest
import torch
from torch import nn

from kernel_helpers import built, needs_amx, quantised

from s2t import kernels
from s2t.runtime import Engine, load_model
from s2t.weight_formats import (FormatPlan, FormattedLinear, _prepare, available_formats, held_weight_bytes,
                                share_formats, vnni_weight)

MIXED = "int8_vnni,int8_amx,int8_amx,int8_amx,int8_amx"


@pytest.fixture(scope="module")
def amx_linear():
    return built("int8_amx")


@needs_amx
def test_the_numbers_of_int8_vnni_to_float_rounding(amx_linear):
    """The same integer block sums; only the order of the float sums differs from int8_vnni."""
    vnni = kernels.load_int8_vnni_linear()
    for n, k in [(64, 1536), (20, 896), (32, 8960)]:
        q, scale = quantised(n, k)
        u = vnni_weight(q)
        for m in (1, 8, 33):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k))
            a, v = amx_linear(x, u, scale, k), vnni(x, u, scale, k)
            assert (a - v).abs().max() <= 1e-5 * v.abs().max(), (n, k, m)


@needs_amx
def test_a_layer_holding_both_formats_keeps_one_copy(amx_linear):
    """int8_vnni for one row and int8_amx for more: the same tensors with two kernels, each bucket its kernel."""
    assert "int8_amx" in available_formats()
    torch.manual_seed(0)
    lin = nn.Linear(300, 40, bias=True)
    both = FormattedLinear(lin, FormatPlan.parse(MIXED))
    one = FormattedLinear(lin, FormatPlan.uniform("int8_vnni"))
    assert both.weights["int8_vnni"][0] is both.weights["int8_amx"][0]
    assert both.weights["int8_amx"][3] is amx_linear
    assert held_weight_bytes(both) == held_weight_bytes(one)
    x = torch.randn(8, 300)
    assert torch.equal(both(x[:1]), one(x[:1]))
    assert torch.equal(both(x), amx_linear(x, *both.weights["int8_amx"][:3]) + both.bias)


@needs_amx
def test_a_model_in_both_formats_holds_one_copy_also_fused(amx_linear, tiny_pair):
    """Loading with both formats costs what int8_vnni alone does, fusing q/k/v and gate/up keeps it so (the
    int8_amx weights become views of the fused tensors too), and the model computes what the int8_vnni model
    does, to float rounding."""
    path = str(tiny_pair[0])
    mixed = load_model(path, tiny_pair[0].parent, weight_formats=MIXED)
    alone = load_model(path, tiny_pair[0].parent, weight_formats="int8_vnni")
    assert mixed.weight_bytes == alone.weight_bytes
    engine = Engine(mixed)
    assert any(f for f in engine._fused)
    assert held_weight_bytes(mixed.model) == mixed.weight_bytes
    ref_engine = Engine(alone)
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    # a multi-row forward runs int8_amx, int8_vnni's numbers up to the order of float sums
    got = engine.forward([engine.new_cache()], [seq], [list(range(len(seq)))])[0]
    ref = ref_engine.forward([ref_engine.new_cache()], [seq], [list(range(len(seq)))])[0]
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    # the one-row decode step runs int8_vnni on the fused weights (on a cache the prefill's int8_amx filled)
    steps = []
    for e in (engine, ref_engine):
        cache = e.new_cache()
        e.forward([cache], [seq[:-1]], [[len(seq) - 2]])
        steps.append(e.forward([cache], [seq[-1:]], [[0]])[0][0])
    assert (steps[0] - steps[1]).abs().max() <= 1e-4 * steps[1].abs().max()


def test_share_formats_keeps_a_format_that_shares_its_copy():
    """A format in a layout the plan holds anyway costs no memory: it is not traded for a slightly slower one."""
    rows = [1, 4, 8, 16, 128]
    timings = {"int8_vnni": {1: 1.0, 4: 1.1, 8: 1.2, 16: 1.3, 128: 9.0},
               "int8_amx": {1: 1.5, 4: 1.0, 8: 1.05, 16: 1.1, 128: 3.0},
               "bf16": {1: 3.0, 4: 3.0, 8: 3.0, 16: 3.0, 128: 3.3}}
    fastest = ("int8_vnni", "int8_amx", "int8_amx", "int8_amx", "int8_amx")
    assert share_formats(fastest, timings, rows) == fastest
    # a plan with bf16 for the prefills gives it up for int8_amx, within the tolerance there
    assert share_formats(fastest[:4] + ("bf16",), timings, rows) == fastest


def test_without_amx_the_format_is_absent_and_named(monkeypatch):
    """A CPU without AMX (every AMD one, Intel before Sapphire Rapids): no kernel, a reason naming the missing
    flags, no int8_amx among the formats, a plan that asks for it refused with that reason."""
    monkeypatch.setattr(kernels, "_loaded", {})
    # no AVX-512 claimed either: the other formats' checks then build only what an AVX2 machine runs
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    assert kernels.load_int8_amx_linear() is None
    assert "amx_tile, amx_int8" in kernels.unavailable_reason("int8_amx")
    assert "int8_amx" not in available_formats()
    with pytest.raises(ValueError, match="int8_amx is not available here: .*AMX"):
        _prepare(torch.randn(8, 8), "int8_amx")
