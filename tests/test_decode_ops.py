"""The batch-1 decode step's compiled small operations (s2t/kernels/decode_ops.cpp) against the torch operations
they replace, and the compiled step (`Engine._decode_one_compiled`) against transformers' forward."""

import random

import pytest
import torch

from s2t import kernels
from s2t.runtime import Engine, load_model
from s2t.weight_formats import available_formats, row_function

from kernel_helpers import built, needs_avx2
from tiny import make_tiny_model_dir

pytestmark = needs_avx2


@pytest.fixture(scope="module")
def ops():
    return built("decode_ops")


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def test_add_rms_norm_adds_in_place_and_normalises(ops):
    g = torch.Generator().manual_seed(0)
    hidden, delta, weight = (torch.randn(1, 96, generator=g) for _ in range(3))
    weight = weight[0].contiguous()
    expect_hidden = hidden + delta
    ref = weight * (expect_hidden * torch.rsqrt(expect_hidden.pow(2).mean(-1, keepdim=True) + 1e-6))
    out = ops.add_rms_norm(hidden, delta, weight, 1e-6)
    torch.testing.assert_close(hidden, expect_hidden, rtol=0, atol=0)  # the residual add, in place
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    before = hidden.clone()
    torch.testing.assert_close(ops.add_rms_norm(hidden, None, weight, 1e-6), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden, before, rtol=0, atol=0)  # no delta: hidden untouched


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (6, 6, 8), (14, 2, 64)])
def test_rope_attend_equals_rotary_cache_write_and_sdpa(ops, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(heads * dim)
    cap, t = 40, 29
    keys, values = torch.randn(kv_heads, cap, dim, generator=g), torch.randn(kv_heads, cap, dim, generator=g)
    qkv = torch.randn(1, (heads + 2 * kv_heads) * dim, generator=g)
    angle = torch.rand(dim // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    ref_keys, ref_values = keys.clone(), values.clone()
    h = qkv.view(heads + 2 * kv_heads, dim)
    q, k, v = h[:heads], h[heads:heads + kv_heads], h[heads + kv_heads:]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    ref_keys[:, t], ref_values[:, t] = k, v
    kk = ref_keys[:, :t + 1].repeat_interleave(heads // kv_heads, 0)
    vv = ref_values[:, :t + 1].repeat_interleave(heads // kv_heads, 0)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, None], kk, vv, scale=0.3).reshape(1, heads * dim)
    out = ops.rope_attend(qkv, cos, sin, keys, values, t, 0.3, heads)
    torch.testing.assert_close(keys, ref_keys, rtol=1e-6, atol=1e-6)  # position t written, the rest untouched
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_silu_mul(ops):
    gate_up = torch.randn(1, 2 * 50, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.functional.silu(gate_up[:, :50]) * gate_up[:, 50:]
    torch.testing.assert_close(ops.silu_mul(gate_up), ref, rtol=1e-6, atol=1e-6)


def test_bad_shapes_and_dtypes_are_refused_with_the_reason(ops):
    keys = torch.zeros(2, 8, 16)
    cos = sin = torch.zeros(16)
    with pytest.raises(RuntimeError, match="position 8 outside the cache's capacity 8"):
        ops.rope_attend(torch.zeros(1, 8 * 16), cos, sin, keys, keys.clone(), 8, 1.0, 4)
    with pytest.raises(RuntimeError, match="qkv has"):
        ops.rope_attend(torch.zeros(1, 7 * 16), cos, sin, keys, keys.clone(), 0, 1.0, 4)
    with pytest.raises(RuntimeError, match="float32"):
        ops.add_rms_norm(torch.zeros(1, 4, dtype=torch.float64), None, torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="even number"):
        ops.silu_mul(torch.zeros(1, 5))


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """A float32 tiny Qwen2 (the compiled step is float32 only; the float64 models keep the torch step)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny32") / "slm", seed=1, dtype=torch.float32)


@pytest.mark.parametrize("fmt", ["native", "int8_vnni"])
def test_compiled_step_equals_the_model_forward(tiny32, fmt):
    """Token after token, across a cache regrowth and a rollback, with a tap: the compiled step gives the
    model forward's next tokens, and its logits, keys/values and tap to float32 rounding."""
    if fmt not in available_formats():
        pytest.skip(f"{fmt} is not available here")
    eng = Engine(load_model(str(tiny32), tiny32.parent, weight_formats=fmt))
    assert eng._ops is not None and eng.fast_decode
    rng = random.Random(7)
    prompt = [rng.randrange(259) for _ in range(6)]
    eng.set_tap(1)
    runs = {}
    try:
        for compiled in (True, False):
            ops = eng._ops
            eng._ops, eng.fast_decode = (ops, True) if compiled else (None, False)
            cache = eng.new_cache()
            logits = [eng.forward([cache], [prompt], [[len(prompt) - 1]])[0]]
            for i in range(75):  # past the cache's first capacity (64)
                if i == 40:
                    cache.crop(cache.length - 5)
                logits.append(eng.forward([cache], [[int(logits[-1][0].argmax())]], [[0]])[0])
            runs[compiled] = (cache, logits)
            eng._ops, eng.fast_decode = ops, True
    finally:
        eng.set_tap(None)
    (fast, lf), (slow, ls) = runs[True], runs[False]
    assert fast.length == slow.length
    for a, b in zip(lf, ls):
        assert int(a[0].argmax()) == int(b[0].argmax())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    n = fast.length
    for layer in range(len(fast.keys)):
        torch.testing.assert_close(fast.keys[layer][:, :n], slow.keys[layer][:, :n], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast.values[layer][:, :n], slow.values[layer][:, :n], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.tap[:n], slow.tap[:n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["native", "int8_vnni", "int4_vnni"])
def test_row_function_is_the_layers_own_product(tiny32, fmt):
    if fmt not in available_formats():
        pytest.skip(f"{fmt} is not available here")
    eng = Engine(load_model(str(tiny32), tiny32.parent, weight_formats=fmt))
    layer = eng.base.layers[0]
    for module in (layer.self_attn.o_proj, eng._fused[0][0], layer.mlp.down_proj):
        x = torch.randn(1, module.in_features)
        torch.testing.assert_close(row_function(module)(x), module(x), rtol=0, atol=0)
    assert row_function(torch.nn.Linear(4, 4).double()) is None


def test_the_step_keeps_torch_operations_when_the_ops_are_turned_off(tiny32, monkeypatch):
    monkeypatch.setenv("S2T_DECODE_OPS", "0")
    eng = Engine(load_model(str(tiny32), tiny32.parent, weight_formats="native"))
    assert eng.fast_decode and eng._ops is None
    assert kernels.load_decode_ops() is None
