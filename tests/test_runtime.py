"""The model runtime: ragged batched forwards with per-sequence caches equal a full recomputation."""

import random

import pytest
import torch
from torch import nn

from s2t.weight_formats import BUCKETS, FormatPlan, FormattedLinear, available_formats, measure_plan
from s2t.runtime import Engine, _padding_groups, load_model


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


def test_forward_rejects_bad_offsets_and_empty_feeds(engine):
    with pytest.raises(ValueError):
        engine.forward([engine.new_cache()], [[]], [[0]])
    with pytest.raises(IndexError):
        engine.forward([engine.new_cache()], [[1, 2]], [[2]])


def test_padding_groups_separate_prefills_from_decodes():
    groups = _padding_groups([1] * 30 + [150, 140])
    assert sorted(map(sorted, groups)) == [list(range(30)), [30, 31]]
    assert _padding_groups([4, 4, 5]) == [[0, 1, 2]]


@pytest.mark.parametrize("fmt", [f for f in ("bf16", "fp32", "fp32_packed", "int8") if f in available_formats()])
def test_formatted_linear_matches_float_reference(fmt):
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=True).float()
    x = torch.randn(3, 5, 64)
    ref = lin(x)
    got = FormattedLinear(lin, FormatPlan.uniform(fmt))(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    tol = {"bf16": 3e-2, "fp32": 1e-5, "fp32_packed": 1e-5, "int8": 3e-2}[fmt]
    assert (got - ref).abs().max() <= tol * ref.abs().max()


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
    for rows, fmt in zip((1, 4, 8, 16, 128), plan.formats):
        assert timings[fmt][rows] == min(t[rows] for t in timings.values())


def test_model_with_non_native_plan_stays_close(tiny_pair):
    lm = load_model(str(tiny_pair[0]), tiny_pair[0].parent, weight_formats="fp32")
    eng = Engine(lm)
    seq = [1, 2, 3, 4, 5]
    got = eng.forward([eng.new_cache()], [seq], [[4]])[0][0]
    ref = full_logits(load_model(str(tiny_pair[0]), tiny_pair[0].parent, "native").model, seq)[-1]
    assert lm.compute_dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
