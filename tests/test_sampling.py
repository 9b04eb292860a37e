"""Sampling in mode greedy (GenerationOptions.temperature / top_p / seed): the distribution, determinism by seed
independent of batching, greedy unchanged at temperature 0, and the validation contract."""

import asyncio
import math

import grpc
import pytest
import torch

from s2t.v1 import generation_pb2 as pb
from servers import Stack
from slm_worker.sampling import Sampler, distribution, nucleus

PROMPT = "What is 2 + 3?"


def binomial_ok(count: int, n: int, p: float, z: float = 5.0) -> bool:
    """count is within z standard deviations (+1 for discreteness) of n*p: loose, so a correct sampler fails it
    with negligible probability (z = 5: < 1e-6 per token), a wrong distribution by a few points does not pass."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


# ---- the sampler alone -----------------------------------------------------------------------------------

def test_nucleus_keeps_the_shortest_prefix_reaching_top_p_with_ties_to_the_lower_id():
    probs = torch.tensor([0.125, 0.5, 0.125, 0.25], dtype=torch.float64)  # dyadic: sums are exact
    assert nucleus(probs, 0.75).tolist() == [0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75]  # .5 + .25 reaches .75: two
    # past 0.75 a third token is needed; of the two at 0.125 the lower id (0) ranks first
    assert nucleus(probs, 0.8).tolist() == [0.125 / 0.875, 0.5 / 0.875, 0.0, 0.25 / 0.875]
    assert nucleus(probs, 1e-9).tolist() == [0.0, 1.0, 0.0, 0.0]  # always the most probable token
    for off in (0.0, 1.0):
        assert nucleus(probs, off).tolist() == probs.tolist()


def full_sort_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The definition, by a stable sort of the whole vocabulary (what `nucleus` did before it probed the top)."""
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p
    keep[0] = True
    kept = torch.zeros_like(probs)
    kept[order[keep]] = probs[order[keep]]
    return kept / kept.sum()


def test_nucleus_probing_the_top_equals_sorting_the_whole_vocabulary(monkeypatch):
    """The probe of the most probable tokens gives bit-for-bit the full sort's nucleus: a small nucleus, one
    larger than the probe, and ties straddling the probe's edge (where only the full sort knows the lower ids)."""
    from slm_worker import sampling

    monkeypatch.setattr(sampling, "NUCLEUS_PROBE", 8)
    g = torch.Generator().manual_seed(3)
    cases = []
    for scale in (0.5, 3.0, 12.0):  # flat (nucleus >> probe) to peaked (a few tokens)
        cases.append(torch.softmax(torch.randn(500, generator=g, dtype=torch.float64) * scale, 0))
    tied = torch.full((40,), 0.01, dtype=torch.float64)
    tied[[30, 35]] = 0.2  # two clear leaders, then 38 equal tokens across the probe's edge: lower ids must win
    cases.append(tied / tied.sum())
    dyadic = torch.tensor([0.125, 0.5, 0.125, 0.25] + [0.0] * 12, dtype=torch.float64)
    cases.append(dyadic)
    for probs in cases:
        for top_p in (1e-9, 0.3, 0.5, 0.75, 0.8, 0.95, 0.999999):
            assert torch.equal(nucleus(probs, top_p), full_sort_nucleus(probs, top_p)), (top_p, probs[:6])


def test_distribution_is_the_temperature_softmax_and_survives_extreme_temperatures():
    logits = torch.tensor([1.0, 3.0, -2.0, 2.5])
    for t in (0.3, 1.0, 7.0):
        assert torch.allclose(distribution(logits, t, 0.0), torch.softmax(logits.double() / t, -1), atol=1e-15)
    assert distribution(logits, 1e-30, 0.0).tolist() == [0.0, 1.0, 0.0, 0.0]
    flat = distribution(logits, 1e30, 0.0)
    assert torch.allclose(flat, torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="temperature"):
        distribution(logits, 0.0, 0.0)


def test_sampler_rejects_what_it_cannot_sample_with():
    for temperature, top_p, seed in ((0.0, 0.5, 1), (-1.0, 0.5, 1), (math.nan, 0.5, 1), (math.inf, 0.5, 1),
                                     (1.0, 1.5, 1), (1.0, -0.1, 1), (1.0, 0.5, -1), (1.0, 0.5, 2**64)):
        with pytest.raises(ValueError):
            Sampler(temperature, top_p, seed)
    Sampler(1.0, 0.5, 2**64 - 1)  # the largest uint64 seed is a valid torch seed


def test_same_seed_same_draws_different_seed_different_draws():
    logits = torch.linspace(-1.0, 1.0, 50)
    draws = lambda seed: [s.sample(logits) for s in [Sampler(1.0, 0.0, seed)] for _ in range(40)]  # noqa: E731
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_sampled_frequencies_match_the_truncated_tempered_softmax(tiny_models):
    """The first token over many seeds, on the tiny SLM's real logits: frequencies within a binomial bound of
    softmax(logits / T) restricted to the top-p nucleus, and never a token outside it."""
    slm, _ = tiny_models
    with torch.no_grad():
        logits = slm(torch.tensor([[60, 61, 62, 63, 10, 32]])).logits[0, -1]
    temperature, top_p, n = 0.8, 0.9, 4000
    expected = distribution(logits, temperature, top_p)
    reference = torch.softmax(logits.double() / temperature, -1)
    kept = expected > 0
    assert 10 < int(kept.sum()) < 200, "the check needs a nucleus of several tokens, not the whole vocabulary"
    # the nucleus is the top of the tempered softmax, and its probabilities are those renormalised
    order = torch.argsort(reference, descending=True, stable=True)
    assert kept[order[:int(kept.sum())]].all()
    assert torch.allclose(expected[kept], reference[kept] / reference[kept].sum(), atol=1e-15)
    counts = torch.bincount(torch.tensor([Sampler(temperature, top_p, seed).sample(logits)
                                          for seed in range(1, n + 1)]), minlength=logits.shape[0])
    assert int(counts[~kept].sum()) == 0
    bad = [(t, int(counts[t]), n * float(expected[t])) for t in range(logits.shape[0])
           if not binomial_ok(int(counts[t]), n, float(expected[t]))]
    assert not bad, bad


# ---- through the worker ----------------------------------------------------------------------------------

async def first_tokens(stack, seeds, **options) -> list[int]:
    async def one(seed):
        final = await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=1, seed=seed, **options)
        assert final.stats.seed == seed
        return final.token_ids[0]
    return list(await asyncio.gather(*[one(s) for s in seeds]))


async def test_worker_samples_the_first_token_from_the_tempered_nucleus(make_settings, tiny_models):
    """Many seeds at once (batched forwards): each first token is exactly what a Sampler with that seed draws
    from the reference logits, and together they follow the distribution."""
    slm, _ = tiny_models
    temperature, top_p, n = 0.5, 0.7, 240
    async with Stack(make_settings()) as stack:
        ids = stack.worker.prompt_ids(pb.GenerateRequest(prompt=PROMPT))
        got = await first_tokens(stack, range(1, n + 1), temperature=temperature, top_p=top_p)
    with torch.no_grad():
        logits = slm(torch.tensor([ids])).logits[0, -1]
    assert got == [Sampler(temperature, top_p, seed).sample(logits) for seed in range(1, n + 1)]
    expected = distribution(logits, temperature, top_p)
    assert 2 <= int((expected > 0).sum()) <= 8
    counts = torch.bincount(torch.tensor(got), minlength=logits.shape[0])
    assert int(counts[expected == 0].sum()) == 0
    assert all(binomial_ok(int(counts[t]), n, float(expected[t])) for t in torch.nonzero(expected).flatten().tolist())


async def test_same_seed_same_tokens_alone_and_batched_with_others(make_settings):
    async with Stack(make_settings()) as stack:
        ask = lambda seed, prompt=PROMPT, **kw: stack.generate(  # noqa: E731
            prompt, mode=pb.MODE_GREEDY, max_new_tokens=24, temperature=1.0, top_p=0.95, seed=seed, **kw)
        alone = await ask(1234)
        again = await ask(1234)
        others = [ask(1234 + i, prompt=f"Question {i}: what is {i} + {i}?") for i in range(1, 7)]
        greedy = stack.generate("Another prompt", mode=pb.MODE_GREEDY, max_new_tokens=24)
        batched, *rest = await asyncio.gather(ask(1234), *others, greedy)
        other_seed = await ask(1235)
    assert list(alone.token_ids) == list(again.token_ids) == list(batched.token_ids)
    assert alone.stats.completion_tokens == 24 and alone.stats.seed == 1234
    assert list(other_seed.token_ids) != list(alone.token_ids)
    assert all(r.stats.completion_tokens > 0 for r in rest)


async def test_tiny_top_p_is_greedy_and_temperature_zero_is_the_greedy_path(make_settings):
    async with Stack(make_settings()) as stack:
        greedy = await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=30)
        nucleus_of_one = await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=30, temperature=5.0,
                                              top_p=1e-6, seed=99)
        # top_p and seed mean nothing without a temperature: plain greedy, no seed reported
        ignored = await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=30, top_p=0.5, seed=99)
    assert list(nucleus_of_one.token_ids) == list(greedy.token_ids)
    assert nucleus_of_one.stats.seed == 99
    assert list(ignored.token_ids) == list(greedy.token_ids) and ignored.stats.seed == 0 == greedy.stats.seed


async def test_seed_zero_is_picked_reported_and_replays(make_settings):
    async with Stack(make_settings()) as stack:
        first = await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=20, temperature=1.0)
        seed = first.stats.seed
        replay = await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=20, temperature=1.0, seed=seed)
        second = await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=20, temperature=1.0)
    assert 0 < seed < 2**64 and second.stats.seed not in (0, seed)
    assert list(replay.token_ids) == list(first.token_ids)


BAD_SAMPLING = [
    ("options.temperature", dict(mode=pb.MODE_GREEDY, temperature=-0.5)),
    ("options.temperature", dict(mode=pb.MODE_GREEDY, temperature=math.nan)),
    ("options.temperature", dict(mode=pb.MODE_GREEDY, temperature=math.inf)),
    ("options.top_p", dict(mode=pb.MODE_GREEDY, temperature=0.7, top_p=1.5)),
    ("options.top_p", dict(mode=pb.MODE_GREEDY, temperature=0.7, top_p=-0.1)),
    ("options.top_p", dict(mode=pb.MODE_GREEDY, temperature=0.7, top_p=math.nan)),
    ("options.top_p", dict(mode=pb.MODE_GREEDY, top_p=2.0)),  # out of range even where it would be ignored
    # sampling in the verified modes (and llm) would change what the selection means
    ("options.temperature", dict(mode=pb.MODE_S2T, temperature=0.7)),
    ("options.temperature", dict(mode=pb.MODE_S2T_LOCAL, temperature=0.7)),
    ("options.temperature", dict(mode=pb.MODE_TAKEOVER, temperature=0.7)),
    ("options.temperature", dict(mode=pb.MODE_LLM, temperature=0.7)),
    ("options.temperature", dict(temperature=0.7)),  # the worker's default mode here is s2t
]


async def test_bad_sampling_options_get_invalid_argument_naming_the_field(make_settings):
    async with Stack(make_settings()) as stack:
        for field, options in BAD_SAMPLING:
            request = pb.GenerateRequest(prompt=PROMPT, options=pb.GenerationOptions(max_new_tokens=4, **options))
            stream = stack.stub.GenerateStream(pb.GenerateStreamRequest.FromString(request.SerializeToString()))
            for attempt in ("unary", "stream"):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    if attempt == "unary":
                        await stack.stub.Generate(request)
                    else:
                        async for _ in stream:
                            pass
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (options, e.value.details())
                assert e.value.details().startswith(field), (options, e.value.details())
        assert not stack.worker.scheduler.active and stack.worker.active == 0
