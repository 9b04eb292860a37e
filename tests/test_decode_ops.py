"""The one-sequence decode step's compiled small operations (s2t/kernels/decode_ops.cpp) against the torch
operations they replace, and the compiled step (`Engine._decode_compiled`, one token or a run of several)
against transformers' forward."""

import random

import pytest
import torch

from s2t import kernels
from s2t.runtime import COMPILED_MAX_ROWS, Engine, load_model
from s2t.weight_formats import BUCKETS, FormattedLinear, available_formats, fused_row_function, row_function

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


@pytest.mark.parametrize("heads,kv_heads,dim,rows", [(4, 2, 16, 5), (6, 6, 8, 2), (14, 2, 64, 8)])
def test_rope_attend_of_several_rows_is_causal_attention_over_the_cache_and_the_rows_before(ops, heads, kv_heads,
                                                                                            dim, rows):
    g = torch.Generator().manual_seed(heads * dim + rows)
    cap, t = 40, 23
    keys, values = torch.randn(kv_heads, cap, dim, generator=g), torch.randn(kv_heads, cap, dim, generator=g)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=g)
    angle = torch.rand(rows, dim // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    ref_keys, ref_values = keys.clone(), values.clone()
    h = qkv.view(rows, heads + 2 * kv_heads, dim)
    q, k, v = h[:, :heads], h[:, heads:heads + kv_heads], h[:, heads + kv_heads:]
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    ref_keys[:, t:t + rows], ref_values[:, t:t + rows] = k.transpose(0, 1), v.transpose(0, 1)
    kk = ref_keys[:, :t + rows].repeat_interleave(heads // kv_heads, 0)
    vv = ref_values[:, :t + rows].repeat_interleave(heads // kv_heads, 0)
    mask = torch.arange(t + rows)[None, :] <= t + torch.arange(rows)[:, None]  # row r sees 0..t+r
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask, scale=0.3)
    out = ops.rope_attend(qkv, cos, sin, keys, values, t, 0.3, heads)
    torch.testing.assert_close(keys, ref_keys, rtol=1e-6, atol=1e-6)  # positions t.. written, the rest untouched
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
    torch.testing.assert_close(out, ref.transpose(0, 1).reshape(rows, heads * dim), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (14, 2, 64)])
def test_rope_attend_batch_is_each_sequences_rope_attend_bit_for_bit(ops, heads, kv_heads, dim):
    """Three sequences with caches of their own capacities and lengths, 1, 4 and 2 rows: one call gives each
    the keys/values and output that rope_attend of its rows alone gives, exactly."""
    g = torch.Generator().manual_seed(heads + dim)
    caps, starts, counts = [40, 16, 70], [23, 0, 61], [1, 4, 2]
    width = (heads + 2 * kv_heads) * dim
    qkv = torch.randn(sum(counts), width, generator=g)
    angle = torch.rand(sum(counts), dim // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    keys = [torch.randn(kv_heads, c, dim, generator=g) for c in caps]
    values = [torch.randn(kv_heads, c, dim, generator=g) for c in caps]
    alone_keys, alone_values = [k.clone() for k in keys], [v.clone() for v in values]
    out = ops.rope_attend_batch(qkv, cos, sin, keys, values, starts, counts, 0.3, heads)
    a = 0
    for b, (t, n) in enumerate(zip(starts, counts)):
        alone = ops.rope_attend(qkv[a:a + n], cos[a:a + n], sin[a:a + n], alone_keys[b], alone_values[b], t, 0.3,
                                heads)
        assert torch.equal(out[a:a + n], alone)
        assert torch.equal(keys[b], alone_keys[b]) and torch.equal(values[b], alone_values[b])
        a += n
    with pytest.raises(RuntimeError, match="counts add up to 6, qkv has 7 rows"):
        ops.rope_attend_batch(qkv, cos, sin, keys, values, starts, [1, 4, 1], 0.3, heads)
    with pytest.raises(RuntimeError, match="sequence 1's rows 14..17 outside its cache's capacity 16"):
        ops.rope_attend_batch(qkv, cos, sin, keys, values, [23, 14, 61], counts, 0.3, heads)
    with pytest.raises(RuntimeError, match="one entry per sequence"):
        ops.rope_attend_batch(qkv, cos, sin, keys, values[:2], starts, counts, 0.3, heads)


def test_norm_and_silu_mul_of_several_rows_are_row_by_row(ops):
    g = torch.Generator().manual_seed(3)
    hidden, delta = torch.randn(5, 96, generator=g), torch.randn(5, 96, generator=g)
    weight = torch.randn(96, generator=g)
    expect = torch.stack([ops.add_rms_norm((hidden[r] + delta[r]).clone()[None], None, weight, 1e-6)[0]
                          for r in range(5)])
    torch.testing.assert_close(ops.add_rms_norm(hidden, delta, weight, 1e-6), expect, rtol=0, atol=0)
    gate_up = torch.randn(3, 2 * 50, generator=g)
    ref = torch.nn.functional.silu(gate_up[:, :50]) * gate_up[:, 50:]
    torch.testing.assert_close(ops.silu_mul(gate_up), ref, rtol=1e-6, atol=1e-6)


def test_silu_mul(ops):
    gate_up = torch.randn(1, 2 * 50, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.functional.silu(gate_up[:, :50]) * gate_up[:, 50:]
    torch.testing.assert_close(ops.silu_mul(gate_up), ref, rtol=1e-6, atol=1e-6)


def test_silu_mul_holds_over_the_whole_range_of_its_vectorised_exp(ops):
    """Gates far beyond exp's float range (where the vectorised exp clamps) and around zero, 8 lanes at a time
    and in the scalar tail (1003 features)."""
    gate = torch.cat([torch.linspace(-120, 120, 1001), torch.tensor([-1e30, 1e30])])
    up = torch.linspace(-2, 3, 1003)
    ref = torch.nn.functional.silu(gate.double()) * up.double()
    out = ops.silu_mul(torch.cat([gate, up])[None])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0].double(), ref, rtol=1e-6, atol=1e-6)


def test_bad_shapes_and_dtypes_are_refused_with_the_reason(ops):
    keys = torch.zeros(2, 8, 16)
    cos = sin = torch.zeros(16)
    with pytest.raises(RuntimeError, match="position 8 outside the cache's capacity 8"):
        ops.rope_attend(torch.zeros(1, 8 * 16), cos, sin, keys, keys.clone(), 8, 1.0, 4)
    with pytest.raises(RuntimeError, match="qkv has"):
        ops.rope_attend(torch.zeros(1, 7 * 16), cos, sin, keys, keys.clone(), 0, 1.0, 4)
    with pytest.raises(RuntimeError, match="position 8 outside the cache's capacity 8"):  # rows 6, 7, 8
        ops.rope_attend(torch.zeros(3, 8 * 16), torch.zeros(3, 16), torch.zeros(3, 16), keys, keys.clone(), 6, 1.0, 4)
    with pytest.raises(RuntimeError, match="cos/sin need 48 values"):
        ops.rope_attend(torch.zeros(3, 8 * 16), cos, sin, keys, keys.clone(), 0, 1.0, 4)
    with pytest.raises(RuntimeError, match="float32"):
        ops.add_rms_norm(torch.zeros(1, 4, dtype=torch.float64), None, torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="even number"):
        ops.silu_mul(torch.zeros(1, 5))


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """A float32 tiny Qwen2 (the compiled step is float32 only; the float64 models keep the torch step)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny32") / "slm", seed=1, dtype=torch.float32)


def compiled_and_model_forward(eng, drive):
    """drive(eng, cache) -> logits, run with the compiled step and then through transformers' model forward,
    with a tap at layer 1; returns ((cache, logits) compiled, (cache, logits) model forward)."""
    ops = eng._ops
    eng.set_tap(1)
    runs = {}
    try:
        for compiled in (True, False):
            eng._ops, eng.fast_decode = (ops, True) if compiled else (None, False)
            cache = eng.new_cache()
            runs[compiled] = (cache, drive(eng, cache))
    finally:
        eng._ops, eng.fast_decode = ops, True
        eng.set_tap(None)
    return runs[True], runs[False]


def assert_caches_close(fast, slow, tol=1e-4):
    """Same length, keys/values and tap to float32 rounding (or to `tol`)."""
    n = fast.length
    assert n == slow.length
    for layer in range(len(fast.keys)):
        torch.testing.assert_close(fast.keys[layer][:, :n], slow.keys[layer][:, :n], rtol=tol, atol=tol)
        torch.testing.assert_close(fast.values[layer][:, :n], slow.values[layer][:, :n], rtol=tol, atol=tol)
    torch.testing.assert_close(fast.tap[:n], slow.tap[:n], rtol=tol, atol=tol)


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

    def greedy(eng, cache):
        logits = [eng.forward([cache], [prompt], [[len(prompt) - 1]])[0]]
        for i in range(75):  # past the cache's first capacity (64)
            if i == 40:
                cache.crop(cache.length - 5)
            logits.append(eng.forward([cache], [[int(logits[-1][0].argmax())]], [[0]])[0])
        return logits

    (fast, lf), (slow, ls) = compiled_and_model_forward(eng, greedy)
    for a, b in zip(lf, ls):
        assert int(a[0].argmax()) == int(b[0].argmax())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert_caches_close(fast, slow)


# Formats that quantise their input rows to int8 (per block, to the nearest step): a float32 rounding difference
# upstream of a product can move one input value by a whole step, which then moves outputs by ~1 % of their
# scale, and every later layer and position that reads them. Seen: logits 0.035 apart from the model forward's
# (of ~2) with int8_amx, where every input of the product was within 7e-7.
QUANTISED_INPUTS = ("int8_vnni", "int8_amx", "int4_vnni", "int8_avx2")

# one copy of the int8 weights served by two kernels (int8_vnni for one row, int8_amx from 2); one copy of int8
# weights beside an fp32 one for longer forwards; int4 for one row, int8 beyond
MIXED_PLANS = ["int8_vnni,int8_amx,int8_amx,int8_amx,int8_amx", "int8_vnni,int8_vnni,fp32,fp32,fp32",
               "int4_vnni,int8_vnni,int8_vnni,int8_vnni,int8_vnni"]


def plan_available(spec):
    return all(f in available_formats() for f in spec.split(","))


@pytest.mark.parametrize("spec", ["native", "fp32", "int8_vnni", *MIXED_PLANS])
def test_forwards_of_several_tokens_of_one_sequence_equal_the_model_forward(tiny32, spec):
    """One sequence's forwards of 1-20 new tokens after a prompt (Select-sized blocks, single tokens), logits asked
    at some offsets or none, across a cache regrowth and a rollback, with a tap: the compiled step, with each
    product in the format the plan picks for that many rows, gives the model forward's logits, keys/values
    and tap to float32 rounding; where the plan quantises a product's inputs at some row count, to a few of
    its steps (QUANTISED_INPUTS)."""
    if not plan_available(spec):
        pytest.skip(f"{spec} is not available here")
    eng = Engine(load_model(str(tiny32), tiny32.parent, weight_formats=spec))
    rng = random.Random(11)
    feeds = [[rng.randrange(259) for _ in range(n)] for n in (40, 1, 4, 2, 1, 8, 5, 20, 3, 17, 1, 6, 9)]
    # all compiled but the 40-token prompt, which goes through the model forward in both runs
    assert eng._ops is not None and all(eng._steps_for(len(f)) is not None for f in feeds[1:])
    assert len(feeds[0]) > COMPILED_MAX_ROWS >= max(len(f) for f in feeds[1:])
    wants = [[39], [0], [0, 1, 2, 3], [], [0], [1, 4, 7], [4], list(range(20)), [2, 0], [16], [0], [0, 5], [8]]

    def blocks(eng, cache):
        logits = []
        for i, (feed, want) in enumerate(zip(feeds, wants)):
            if i == 6:
                cache.crop(cache.length - 7)
            logits.append(eng.forward([cache], [feed], [want])[0])
        return logits

    (fast, lf), (slow, ls) = compiled_and_model_forward(eng, blocks)
    tol = 0.1 if any(f in QUANTISED_INPUTS for f in spec.split(",")) else 1e-4
    assert fast.length > 64  # the cache grew past its first capacity
    for a, b, want in zip(lf, ls, wants):
        assert a.shape == b.shape == (len(want), eng.vocab_size)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert_caches_close(fast, slow, tol)
    with pytest.raises(IndexError, match="want offset 3 outside the 3 new tokens"):
        eng.forward([eng.new_cache()], [[1, 2, 3]], [[3]])


@pytest.mark.parametrize("spec", ["native", "int8_vnni", MIXED_PLANS[0]])
def test_batched_forwards_of_several_sequences_equal_the_model_forward(tiny32, spec):
    """Three sequences in one forward, each with its own cache, new tokens and offsets (one-token decodes beside
    a Select-sized block, a sequence asking for no logits), across a cache regrowth and a rollback of one of
    them, with a tap: the compiled step gives each sequence the model forward's logits, keys/values and tap."""
    if not plan_available(spec):
        pytest.skip(f"{spec} is not available here")
    eng = Engine(load_model(str(tiny32), tiny32.parent, weight_formats=spec))
    rng = random.Random(5)
    prompts = [[rng.randrange(259) for _ in range(n)] for n in (40, 9, 60)]
    steps = [([1, 1, 1], [[0], [0], [0]]), ([1, 4, 1], [[0], [1, 3], []]), ([6, 1, 2], [[5], [0], [0, 1]])] * 10
    assert all(eng._steps_for(sum(n)) is not None for n, _ in steps)

    def batches(eng, _):
        caches = [eng.new_cache() for _ in prompts]
        for c, p in zip(caches, prompts):  # prompts one at a time: over COMPILED_MAX_ROWS, the model forward
            eng.forward([c], [p], [[len(p) - 1]])
        logits = []
        for i, (counts, want) in enumerate(steps):
            if i == 13:
                caches[1].crop(caches[1].length - 6)
            feeds = [[rng.randrange(259) for _ in range(n)] for n in counts]
            logits.append(eng.forward(caches, feeds, want))
        return caches, logits

    rng_state = rng.getstate()
    ops = eng._ops
    eng.set_tap(1)
    try:
        fast_caches, fast = batches(eng, None)
        rng.setstate(rng_state)
        eng._ops, eng.fast_decode = None, False
        slow_caches, slow = batches(eng, None)
    finally:
        eng._ops, eng.fast_decode = ops, True
        eng.set_tap(None)
    tol = 0.1 if any(f in QUANTISED_INPUTS for f in spec.split(",")) else 1e-4
    assert fast_caches[2].length > 64  # grew past its first capacity
    for a, b, (_, want) in zip(fast, slow, steps):
        for x, y, w in zip(a, b, want):
            assert x.shape == y.shape == (len(w), eng.vocab_size)
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)
    for f, s in zip(fast_caches, slow_caches):
        assert_caches_close(f, s, tol)


def test_a_sequences_logits_do_not_depend_on_what_shares_its_forward(tiny32):
    """int8_vnni's products, the norms and silu * up work row by row and the attention sequence by sequence: a
    sequence decoded beside others gets bit for bit what it gets alone (so a worker's extra rows, e.g. another
    session's, change none of its drafts)."""
    if "int8_vnni" not in available_formats():
        pytest.skip("int8_vnni is not available here")
    eng = Engine(load_model(str(tiny32), tiny32.parent, weight_formats="int8_vnni"))
    rng = random.Random(3)
    prompt, other = [rng.randrange(259) for _ in range(12)], [rng.randrange(259) for _ in range(20)]
    alone, shared, company = eng.new_cache(), eng.new_cache(), eng.new_cache()
    for c, p in ((alone, prompt), (shared, prompt), (company, other)):
        eng.forward([c], [p], [[len(p) - 1]])
    for n in (1, 1, 3, 1, 5):
        feed = [rng.randrange(259) for _ in range(n)]
        a = eng.forward([alone], [feed], [list(range(n))])[0]
        b = eng.forward([company, shared], [[rng.randrange(259)] * 2, feed], [[1], list(range(n))])[1]
        assert torch.equal(a, b)
    for layer in range(len(alone.keys)):
        assert torch.equal(alone.keys[layer][:, :alone.length], shared.keys[layer][:, :shared.length])


@pytest.mark.parametrize("spec", MIXED_PLANS)
def test_fused_row_function_is_the_layers_own_products_side_by_side(tiny32, spec):
    """At every bucket's row count, the q/k/v product the compiled step calls is the three layers' own
    forwards concatenated (and its other products the layers' own), exactly: the fused copy with the plan's kernel for that row count where the formats
    share a layout, the layers one by one where they do not."""
    if not plan_available(spec):
        pytest.skip(f"{spec} is not available here")
    eng = Engine(load_model(str(tiny32), tiny32.parent, weight_formats=spec))
    layer = eng.base.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    assert all(type(m) is FormattedLinear for m in parts)
    for rows in (*BUCKETS[:-1], 23):
        x = torch.randn(rows, attn.q_proj.in_features)
        expect = torch.cat([m(x) for m in parts], dim=-1)
        torch.testing.assert_close(fused_row_function(eng._fused[0][0], parts, rows)(x), expect, rtol=0, atol=0)
        # ... and so are the products of the engine's compiled step for that many rows
        step = eng._steps_for(rows)[0]
        torch.testing.assert_close(step.qkv(x), expect, rtol=0, atol=0)
        torch.testing.assert_close(step.gate_up(x), torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1), rtol=0, atol=0)
        torch.testing.assert_close(step.o(x), attn.o_proj(x), rtol=0, atol=0)
        h = torch.randn(rows, mlp.down_proj.in_features)
        torch.testing.assert_close(step.down(h), mlp.down_proj(h), rtol=0, atol=0)


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


def test_forwards_longer_than_the_bound_go_through_the_model_forward(tiny32, monkeypatch):
    """COMPILED_MAX_ROWS (S2T_COMPILED_MAX_ROWS) bounds each sequence's new tokens in a compiled forward, and
    COMPILED_MAX_BATCH_ROWS all of them; one token of one sequence is compiled whatever the bounds."""
    import s2t.runtime as runtime

    eng = Engine(load_model(str(tiny32), tiny32.parent, weight_formats="native"))
    calls = []
    compiled = eng._decode_compiled
    monkeypatch.setattr(eng, "_decode_compiled",
                        lambda c, t, w, s: calls.append(sum(map(len, t))) or compiled(c, t, w, s))
    monkeypatch.setattr(runtime, "COMPILED_MAX_ROWS", 1)
    cache = eng.new_cache()
    for feed in ([5, 6, 7, 8], [9], [10, 11]):
        eng.forward([cache], [feed], [[len(feed) - 1]])
    assert calls == [1] and cache.length == 7
    monkeypatch.setattr(runtime, "COMPILED_MAX_BATCH_ROWS", 2)
    others = [eng.new_cache() for _ in range(2)]
    for c in others:
        eng.forward([c], [[3, 4]], [[1]])
    calls.clear()
    eng.forward([cache, others[0]], [[12], [5]], [[0], [0]])  # two sequences, a token each: compiled
    eng.forward([cache, *others], [[13], [6], [6]], [[0], [0], [0]])  # three rows: over the batch bound
    eng.forward([cache, others[0]], [[14, 15], [7]], [[1], [0]])  # two tokens of one sequence: over its bound
    assert calls == [2]
