"""The model runtime: ragged batched forwards with per-sequence caches equal a full recomputation."""

import random
from pathlib import Path

import pytest
import torch
from torch import nn

from s2t.weight_formats import (BUCKETS, SHARE_TOLERANCE, FormatPlan, FormattedLinear, available_formats, fuse_outputs,
                                held_weight_bytes, measure_plan, share_formats)
from s2t.runtime import Engine, _padding_groups, load_model, load_with


@pytest.fixture(scope="module")
def engine(tiny_pair):
    return Engine(load_model(str(tiny_pair[0]), tiny_pair[0].parent, weight_formats="native"))


def full_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0]


def test_ragged_batch_chunks_and_crop_match_full_recompute(engine):
    model = engine.lm.model
    rng = random.Random(0)
    seqs = [[rng.randrange(259) for _ in range(n)] for n in (5, 17, 3, 9)]
    ref = [full_logits(model, s) for s in seqs]
    caches = [engine.new_cache() for _ in seqs]
    cuts = [2, 11, 1, 9]
    out = engine.forward(caches, [s[:c] for s, c in zip(seqs, cuts)], [list(range(c)) for c in cuts])
    for o, r, c in zip(out, ref, cuts):
        torch.testing.assert_close(o, r[:c], rtol=0, atol=1e-10)
    rest = [(i, s[c:]) for i, (s, c) in enumerate(zip(seqs, cuts)) if len(s) > c]
    out = engine.forward([caches[i] for i, _ in rest], [t for _, t in rest], [[len(t) - 1] for _, t in rest])
    for (i, _), o in zip(rest, out):
        torch.testing.assert_close(o[0], ref[i][-1], rtol=0, atol=1e-10)
    # roll back the longest sequence and feed a different continuation
    caches[1].crop(6)
    other = seqs[1][:6] + [7, 8, 9]
    o = engine.forward([caches[1]], [other[6:]], [[0, 1, 2]])[0]
    torch.testing.assert_close(o, full_logits(model, other)[6:], rtol=0, atol=1e-10)
    assert caches[1].length == len(other)


def test_cache_grows_past_its_capacity(engine):
    cache = engine.new_cache()
    seq = list(range(1, 200))
    for i in range(0, len(seq), 40):
        engine.forward([cache], [seq[i:i + 40]], [[0]])
    assert cache.length == len(seq) and cache.capacity >= len(seq)
    o = engine.forward([cache], [[5]], [[0]])[0]
    torch.testing.assert_close(o[0], full_logits(engine.lm.model, seq + [5])[-1], rtol=0, atol=1e-10)


def test_batch1_decode_step_equals_the_model_forward(engine):
    """The batch-1 fast path (one sequence, one new token) gives the logits, keys/values and tap of the
    transformers forward it replaces, token after token, across a cache regrowth and a rollback."""
    assert engine.fast_decode
    rng = random.Random(3)
    prompt = [rng.randrange(259) for _ in range(6)]
    steps = [rng.randrange(259) for _ in range(70)]  # past the cache's first capacity (64)
    engine.set_tap(1)
    try:
        caches = {}
        for fast in (True, False):
            engine.fast_decode = fast
            cache = caches[fast] = engine.new_cache()
            logits = [engine.forward([cache], [prompt], [[len(prompt) - 1]])[0]]
            for i, tok in enumerate(steps):
                if i == 40:
                    cache.crop(cache.length - 5)  # roll back, then continue from there
                logits.append(engine.forward([cache], [[tok]], [[0]])[0])
            caches[fast] = (cache, logits)
    finally:
        engine.fast_decode = True
        engine.set_tap(None)
    (fast, lf), (slow, ls) = caches[True], caches[False]
    assert fast.length == slow.length == len(prompt) + len(steps) - 5
    for a, b in zip(lf, ls):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    n = fast.length
    for layer in range(len(fast.keys)):
        torch.testing.assert_close(fast.keys[layer][:, :n], slow.keys[layer][:, :n], rtol=0, atol=1e-12)
        torch.testing.assert_close(fast.values[layer][:, :n], slow.values[layer][:, :n], rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.tap[:n], slow.tap[:n], rtol=0, atol=1e-12)
    # and both equal the model's own forward over the whole sequence
    seq = prompt + steps[:40]
    seq = seq[:-5] + steps[40:]
    torch.testing.assert_close(lf[-1][0], full_logits(engine.lm.model, seq)[-1], rtol=0, atol=1e-10)


def test_fork_copies_a_prefix_and_leaves_the_original_alone(engine):
    """A branch's cache: the first n tokens of another, continued on its own."""
    model = engine.lm.model
    seq = list(range(3, 40))
    cache = engine.new_cache()
    engine.forward([cache], [seq], [[0]])
    fork = cache.fork(20, room=5)
    assert fork.length == 20 and cache.length == len(seq) and fork.capacity >= 25
    branch = seq[:20] + [7, 8]
    o = engine.forward([fork], [[7, 8]], [[0, 1]])[0]
    torch.testing.assert_close(o, full_logits(model, branch)[20:], rtol=0, atol=1e-10)
    # the original still continues its own tokens, in one batch with the fork
    o, b = engine.forward([cache, fork], [[5], [9]], [[0], [0]])
    torch.testing.assert_close(o[0], full_logits(model, seq + [5])[-1], rtol=0, atol=1e-10)
    torch.testing.assert_close(b[0], full_logits(model, branch + [9])[-1], rtol=0, atol=1e-10)
    assert cache.fork(0).length == 0
    with pytest.raises(ValueError, match="fork length"):
        cache.fork(cache.length + 1)


def test_forward_rejects_bad_offsets_and_empty_feeds(engine):
    with pytest.raises(ValueError):
        engine.forward([engine.new_cache()], [[]], [[0]])
    with pytest.raises(IndexError):
        engine.forward([engine.new_cache()], [[1, 2]], [[2]])


def test_padding_groups_separate_prefills_from_decodes():
    groups = _padding_groups([1] * 30 + [150, 140])
    assert sorted(map(sorted, groups)) == [list(range(30)), [30, 31]]
    assert _padding_groups([4, 4, 5]) == [[0, 1, 2]]


@pytest.mark.parametrize("fmt", [f for f in ("bf16", "fp32", "fp32_packed", "int8", "int8_avx2", "int8_vnni")
                                 if f in available_formats()])
def test_formatted_linear_matches_float_reference(fmt):
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=True).float()
    x = torch.randn(3, 5, 64)
    ref = lin(x)
    got = FormattedLinear(lin, FormatPlan.uniform(fmt))(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    tol = {"bf16": 3e-2, "fp32": 1e-5, "fp32_packed": 1e-5, "int8": 3e-2, "int8_avx2": 2e-2, "int8_vnni": 3e-2}[fmt]
    assert (got - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("fmt", [f for f in ("native", "fp32", "int8", "int8_avx2", "int8_vnni", "int4_vnni")
                                 if f == "native" or f in available_formats()])
def test_fused_outputs_share_the_layers_weights_and_compute_what_they_did(fmt):
    """q/k/v-shaped layers (one with its own bias, of different sizes) fused for one-row inputs: the fused layer
    gives the concatenated outputs, and each layer, now reading a view of its rows, gives what it gave before."""
    torch.manual_seed(0)
    linears = [nn.Linear(256, n, bias=b).float() for n, b in ((96, True), (32, False), (32, True))]
    layers = linears if fmt == "native" else [
        FormattedLinear(l, FormatPlan.parse(",".join([fmt] + ["fp32_packed" if "fp32_packed" in available_formats()
                                                              else "fp32"] * (len(BUCKETS) - 1))))
        for l in linears]
    x = torch.randn(1, 1, 256)
    before = [l(x) for l in layers]
    big = torch.randn(20, 256)
    before_big = [l(big) for l in layers]  # the other buckets' formats are left alone
    fused = fuse_outputs(layers, rows=1)
    assert fused is not None and fused.out_features == 160
    torch.testing.assert_close(fused(x), torch.cat(before, dim=-1), rtol=0, atol=1e-5)
    for layer, b, bb in zip(layers, before, before_big):
        torch.testing.assert_close(layer(x), b, rtol=0, atol=0)
        torch.testing.assert_close(layer(big), bb, rtol=0, atol=0)
    # shared, not copied: every layer's one-row weight lies inside the fused layer's storage
    part = lambda w: w if isinstance(w, torch.Tensor) else w[0]  # noqa: E731
    fused_w = part(fused.weights[fmt])
    for layer in layers:
        w = layer.weight if fmt == "native" else part(layer.weights[fmt])
        assert w.untyped_storage().data_ptr() == fused_w.untyped_storage().data_ptr()


def test_layers_that_cannot_be_fused_are_left_alone():
    torch.manual_seed(0)
    a, b = nn.Linear(64, 32).float(), nn.Linear(48, 32).float()
    assert fuse_outputs([a, b]) is None  # different inputs
    if "fp32_packed" in available_formats():  # oneDNN's blocked layout is not row by row
        packed = [FormattedLinear(nn.Linear(64, 32).float(), FormatPlan.uniform("fp32_packed")) for _ in range(2)]
        assert fuse_outputs(packed) is None


def test_batch1_decode_step_with_fused_int8_layers_equals_the_model_forward(tiny_pair):
    """The direct step over a weight-format plan (q/k/v and gate/up fused) against transformers' forward on the
    same weights: the same next tokens, logits within the format's rounding."""
    fmt = "int8_vnni" if "int8_vnni" in available_formats() else "int8"
    eng = Engine(load_model(str(tiny_pair[0]), tiny_pair[0].parent, weight_formats=fmt))
    assert eng.fast_decode and all(qkv is not None and gu is not None for qkv, gu in eng._fused)
    rng = random.Random(5)
    prompt = [rng.randrange(259) for _ in range(6)]
    runs = {}
    for fast in (True, False):
        eng.fast_decode = fast
        cache = eng.new_cache()
        out = [eng.forward([cache], [prompt], [[len(prompt) - 1]])[0]]
        for _ in range(20):
            out.append(eng.forward([cache], [[int(out[-1][0].argmax())]], [[0]])[0])
        runs[fast] = out
    for a, b in zip(runs[True], runs[False]):
        assert int(a[0].argmax()) == int(b[0].argmax())
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_plan_dispatches_by_row_count_and_parses():
    plan = FormatPlan.parse("int8,int8,fp32,fp32_packed,fp32_packed")
    assert [plan.format_for(r) for r in (1, 3, 8, 9, 10_000)] == ["int8", "int8", "fp32", "fp32_packed", "fp32_packed"]
    assert FormatPlan.parse("bf16").formats == ("bf16",) * len(BUCKETS)
    with pytest.raises(ValueError):
        FormatPlan.parse("int8,fp32")
    with pytest.raises(ValueError):
        FormatPlan.parse("fp8")


def test_measure_plan_picks_a_measured_format_per_bucket():
    plan, timings = measure_plan(64, 128, candidates=("fp32", "bf16"), repeats=1)
    assert set(plan.formats) <= {"fp32", "bf16"}
    for rows, fmt in zip((1, 4, 8, 16, 128), plan.formats):  # the fastest, or one shared within the tolerance
        assert timings[fmt][rows] <= min(t[rows] for t in timings.values()) * (1 + SHARE_TOLERANCE)


def test_measure_plan_is_not_fooled_by_a_slow_spell(monkeypatch):
    """A slow spell while the formats are timed (a process beside it loading its model) must not pick the
    slower format: the rounds interleave the formats and each keeps its fastest round."""
    from s2t import weight_formats

    cost = {"fp32": 1.0, "bf16": 1.3}  # ms per call at every row count (made up): bf16 beyond the tolerance
    now, calls = [0.0], [0]
    # timed one format after the other, fp32 (first) would take the first 5 buckets x (2 + 3 x 6) = 100
    # calls of the 200: the spell is as long as that, 3x slower
    spell = 100

    def apply(fmt, w, x, bias):
        now[0] += cost[fmt] * (3.0 if calls[0] < spell else 1.0) / 1e3
        calls[0] += 1

    monkeypatch.setattr(weight_formats, "format_available", lambda fmt: fmt in cost)
    monkeypatch.setattr(weight_formats, "_prepare", lambda w, fmt: fmt)
    monkeypatch.setattr(weight_formats, "_apply", apply)
    plan, timings = measure_plan(8, 8, candidates=("fp32", "bf16"), repeats=3, clock=lambda: now[0])
    assert calls[0] == 2 * spell
    assert plan.formats == ("fp32",) * len(BUCKETS)
    assert timings == {fmt: {rows: pytest.approx(c) for rows in (1, 4, 8, 16, 128)} for fmt, c in cost.items()}


def test_share_formats_drops_a_copy_that_buys_little():
    rows = (1, 4, 8, 16, 128)
    timings = {"int8_avx2": {1: 1.0, 4: 2.0, 8: 4.0, 16: 8.0, 128: 60.0},
               "fp32_packed": {1: 4.0, 4: 4.2, 8: 4.5, 16: 5.0, 128: 20.0},
               "fp32": {1: 4.1, 4: 4.3, 8: 4.6, 16: 5.2, 128: 19.0}}
    fastest = ["int8_avx2", "int8_avx2", "int8_avx2", "fp32_packed", "fp32"]
    # fp32 wins the open bucket by 5 %: not worth a second fp32 copy of every matrix
    assert share_formats(fastest, timings, rows) == ("int8_avx2", "int8_avx2", "int8_avx2", "fp32_packed",
                                                      "fp32_packed")
    # (int8_avx2 stayed: it is 4x faster at one row than any other format the plan holds)
    # with no tolerance every bucket keeps its fastest format
    assert share_formats(fastest, timings, rows, tolerance=0.0) == tuple(fastest)
    # fp32 now twice as fast in the open bucket: it stays there, and the 9-16 bucket moves to it instead
    timings["fp32"][128] = 10.0
    assert share_formats(fastest, timings, rows) == ("int8_avx2", "int8_avx2", "int8_avx2", "fp32", "fp32")
    # with the tolerance wide enough, everything shares the format that is best summed over the buckets moved
    assert share_formats(fastest, timings, rows, tolerance=10.0) == ("int8_avx2",) * 5


def test_held_weight_bytes_counts_every_format_copy_once(tiny_pair):
    native = load_model(str(tiny_pair[0]), tiny_pair[0].parent, weight_formats="native")
    params = {n: p for n, p in native.model.named_parameters()}
    assert native.weight_bytes == sum(p.numel() * p.element_size() for p in params.values())  # float64, untied
    linears = {n.removesuffix(".weight") for n, m in native.model.named_modules() for n in [f"{n}.weight"]
               if isinstance(m, nn.Linear)}
    weights = sum(params[f"{n}.weight"].numel() for n in linears)
    biases = sum(params[f"{n}.bias"].numel() for n in linears if f"{n}.bias" in params)
    rest = sum(p.numel() for n, p in params.items() if n.rsplit(".", 1)[0] not in linears)
    # two formats: each linear weight held in both (bf16: 2 bytes, fp32: 4); the biases as loaded (float64
    # here), the rest (embeddings, norms) in the fp32 compute dtype
    two = load_model(str(tiny_pair[0]), tiny_pair[0].parent, weight_formats="bf16,bf16,fp32,fp32,fp32")
    assert two.weight_bytes == weights * (2 + 4) + biases * 8 + rest * 4
    # fusing q/k/v and gate/up concatenates each format into one tensor the parts are views of: no new bytes
    engine = Engine(two)
    assert any(f for f in engine._fused)
    assert held_weight_bytes(two.model) == two.weight_bytes


def test_model_with_non_native_plan_stays_close(tiny_pair):
    lm = load_model(str(tiny_pair[0]), tiny_pair[0].parent, weight_formats="fp32")
    eng = Engine(lm)
    seq = [1, 2, 3, 4, 5]
    got = eng.forward([eng.new_cache()], [seq], [[4]])[0][0]
    ref = full_logits(load_model(str(tiny_pair[0]), tiny_pair[0].parent, "native").model, seq)[-1]
    assert lm.compute_dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_a_mixed_plan_loads_from_the_checkpoint_dtype_exactly_as_from_fp32(tmp_path):
    """load_model builds the formats from the bf16 checkpoint (no fp32 copy of the whole model at the peak);
    the result must be the very model the old path built from an fp32 load: same formats, same logits, and
    nothing left in bf16 but what the formats themselves hold."""
    from transformers import AutoModelForCausalLM

    from s2t.weight_formats import apply_plan
    from tiny import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path / "bf16", seed=3, dtype=torch.bfloat16)
    spec = ",".join(f for f in ("int8", "int8", "int8", "fp32_packed", "fp32_packed"))
    if not {"int8", "fp32_packed"} <= set(available_formats()):
        spec = "fp32,fp32,fp32,fp32,fp32"
    plan = FormatPlan.parse(spec)
    lm = load_model(str(path), tmp_path, weight_formats=spec)
    old = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa").eval()
    apply_plan(old, plan)
    assert lm.compute_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    for (name, new_buf), (_, old_buf) in zip(lm.model.named_buffers(), old.named_buffers()):
        assert new_buf.dtype == old_buf.dtype and torch.equal(new_buf, old_buf), name
    new_linear = {n: m for n, m in lm.model.named_modules() if isinstance(m, FormattedLinear)}
    old_linear = {n: m for n, m in old.named_modules() if isinstance(m, FormattedLinear)}
    assert new_linear.keys() == old_linear.keys() and new_linear
    for name, m in new_linear.items():
        assert m.out_dtype == torch.float32 and set(m.weights) == set(old_linear[name].weights)
        if "int8" in m.weights:
            for a, b in zip(m.weights["int8"], old_linear[name].weights["int8"]):
                assert torch.equal(a, b), name
    for rows in (1, 12):  # the int8 bucket and the packed-fp32 one
        ids = torch.tensor([[(7 * i + 3) % 259 for i in range(rows)]])
        with torch.no_grad():
            assert torch.equal(lm.model(ids).logits, old(ids).logits)


def test_apply_plan_frees_each_replaced_weight_before_formatting_the_next(monkeypatch):
    """Peak memory: at any moment at most the matrix being formatted is held twice (old weight and formats)."""
    import weakref

    from s2t import weight_formats
    from tiny import make_tiny_model

    model = make_tiny_model(seed=4, dtype=torch.float32, layers=3)
    replaced: list[weakref.ref] = []
    alive_when_formatting: list[int] = []
    real_init = FormattedLinear.__init__

    def init(self, linear, plan, out_dtype=None):
        alive_when_formatting.append(sum(ref() is not None for ref in replaced))
        replaced.append(weakref.ref(linear.weight))
        real_init(self, linear, plan, out_dtype)

    monkeypatch.setattr(FormattedLinear, "__init__", init)
    count = weight_formats.apply_plan(model, FormatPlan.uniform("fp32"))
    assert count == len(replaced) == 3 * 7 + 1
    assert alive_when_formatting == [0] * count  # none of the earlier weights outlived its replacement


def test_page_out_never_changes_what_a_tensor_holds(tmp_path):
    from s2t.weight_formats import page_out

    anon = torch.arange(3 * 4096, dtype=torch.float32)
    page_out(anon)
    assert torch.equal(anon, torch.arange(3 * 4096, dtype=torch.float32))
    path = tmp_path / "weights.bin"
    torch.arange(5 * 4096, dtype=torch.float32).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=5 * 4096, dtype=torch.float32)  # a private file mapping
    page_out(mapped[100:])  # unaligned start: only whole pages inside are advised
    assert torch.equal(mapped, torch.arange(5 * 4096, dtype=torch.float32))
    page_out(torch.empty(0))


def _mapping_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    lines, inside = open("/proc/self/smaps").read().splitlines(), False
    for line in lines:
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_weights_on_huge_pages_move_every_storage_of_a_page_and_change_no_number():
    """q/k/v-shaped int8 layers fused (a weight storage over the 2 MB huge page, shared by four tensors, and their
    scales'), a layer of 64 KB and one of 2 KB, and a native one: every format storage of at least a 4 KB page
    moves into the one huge-page mapping, packed (the 64 KB layer too: under a huge page, it shares one with its
    neighbours), shared as before, every output the same bit for bit; the 2 KB weight and the native one stay."""
    from s2t.weight_formats import HUGE_PAGE, MOVE_MIN_BYTES, format_tensors, weights_on_huge_pages

    fmt = "int8_vnni" if "int8_vnni" in available_formats() else "int8"
    torch.manual_seed(0)
    layers = [FormattedLinear(nn.Linear(1024, n, bias=False), FormatPlan.uniform(fmt)) for n in (2048, 512, 512)]
    fused = fuse_outputs(layers, rows=1)
    small = FormattedLinear(nn.Linear(256, 256, bias=False), FormatPlan.uniform(fmt))
    tiny = FormattedLinear(nn.Linear(64, 16, bias=False), FormatPlan.uniform(fmt))
    native = nn.Linear(1024, 1024, bias=False)  # 4 MB, but possibly a view of a checkpoint's mapping: not moved
    part = lambda layer: layer.weights[fmt][0]  # noqa: E731
    assert part(fused).untyped_storage().nbytes() >= HUGE_PAGE > part(small).untyped_storage().nbytes() >= MOVE_MIN_BYTES
    assert part(tiny).untyped_storage().nbytes() < MOVE_MIN_BYTES
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for m in (fused, small) for t in format_tensors(m) if t.untyped_storage().nbytes() >= MOVE_MIN_BYTES}
    x = torch.randn(3, 1024)
    before = [m(x) for m in (fused, *layers)] + [small(x[:, :256]), tiny(x[:, :64])]
    tiny_at, native_at = part(tiny).data_ptr(), native.weight.data_ptr()
    moved = weights_on_huge_pages([fused, *layers, small, tiny, native])
    # the fused weight, its scales, the 64 KB weight (its 1 KB scales stay), each from a cache line
    assert moved == sum(-(-n // 64) * 64 for n in storages.values()) and len(storages) == 3
    after = [m(x) for m in (fused, *layers)] + [small(x[:, :256]), tiny(x[:, :64])]
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    mapping = part(fused).untyped_storage().data_ptr()
    assert {t.untyped_storage().data_ptr() for m in (fused, *layers, small) for t in format_tensors(m)
            if t.untyped_storage().nbytes() >= MOVE_MIN_BYTES} == {mapping}
    assert part(fused).untyped_storage().nbytes() == moved + HUGE_PAGE  # the mapping: its bytes + room to align
    assert part(fused).data_ptr() % HUGE_PAGE == 0  # the mapping's first huge page starts the first storage
    assert part(tiny).data_ptr() == tiny_at and native.weight.data_ptr() == native_at
    if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():  # a kernel with THP: the hint is set
        assert "hg" in _mapping_flags(part(fused).data_ptr())
        assert "hg" in _mapping_flags(part(small).data_ptr())
    assert weights_on_huge_pages([tiny, native]) == 0


def test_load_with_takes_every_runtime_setting(tiny_pair):
    """A role's runtime settings reach the load whole: formats, threads, device and huge pages."""
    from s2t.config import RuntimeSettings

    runtime = RuntimeSettings(weight_formats="fp32", threads=1, huge_pages=False)
    threads = torch.get_num_threads()
    try:
        lm = load_with(str(tiny_pair[0]), tiny_pair[0].parent, runtime)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert lm.plan.formats == ("fp32",) * len(BUCKETS)
    assert not lm.huge_pages
    assert next(lm.model.parameters()).device.type == "cpu"
    assert load_with(str(tiny_pair[0]), tiny_pair[0].parent, RuntimeSettings(weight_formats="fp32")).huge_pages


def test_an_engine_moves_its_model_once_and_only_when_asked(tiny_pair):
    """The real move on the tiny model: every formatted weight of a 4 KB page or more, the fused layers'
    included, ends in one mapping, the forwards are bit for bit those of an engine that did not move its model,
    a second engine over the model moves nothing, and huge_pages False moves nothing."""
    import s2t.weight_formats as wf

    fmt = "int8_vnni" if "int8_vnni" in available_formats() else "int8"

    def big_storages(engine: Engine) -> set[int]:
        layers = [m for m in engine.lm.model.modules() if isinstance(m, FormattedLinear)]
        layers += [layer for pair in engine._fused for layer in pair if layer is not None]
        return {t.untyped_storage().data_ptr() for layer in layers for t in wf.format_tensors(layer)
                if t.untyped_storage().nbytes() >= wf.MOVE_MIN_BYTES}

    lm = load_model(str(tiny_pair[0]), tiny_pair[0].parent, weight_formats=fmt)
    assert lm.huge_pages
    moved = Engine(lm)
    assert moved._fused and len(big_storages(moved)) == 1
    pointers = [t.data_ptr() for m in lm.model.modules() if isinstance(m, FormattedLinear) for t in wf.format_tensors(m)]
    Engine(lm)  # a second engine over the same model: moved already
    assert [t.data_ptr() for m in lm.model.modules() if isinstance(m, FormattedLinear)
            for t in wf.format_tensors(m)] == pointers
    kept = Engine(load_model(str(tiny_pair[0]), tiny_pair[0].parent, weight_formats=fmt, huge_pages=False))
    assert len(big_storages(kept)) > 1
    prompt, caches = list(range(3, 12)), [moved.new_cache(), kept.new_cache()]  # a prefill, then a one-row step
    for feed, want in ((prompt, list(range(len(prompt)))), ([7], [0])):
        a, b = (engine.forward([cache], [feed], [want])[0] for engine, cache in zip((moved, kept), caches))
        assert torch.equal(a, b)
