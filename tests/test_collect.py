"""`s2t collect` on the tiny pair: SLM rollouts of GSM8K train problems, every position labelled and logged by a
real selector over gRPC, resumable, and readable as training groups."""

import json

import pytest

from s2t.collect import collect
from s2t.runtime import Engine, load_model
from s2t.selection_log import closed_segments
from servers import gsm8k_train_available, plain_selector

HAVE_TRAIN = gsm8k_train_available()


@pytest.mark.skipif(not HAVE_TRAIN, reason="GSM8K train split not available (../shared/data/gsm8k)")
async def test_collect_labels_every_rollout_position_and_resumes(make_settings, tmp_path):
    settings = make_settings(**{"selector.max_positions": 16})
    core, server, port = await plain_selector(settings)
    try:
        engine = Engine(load_model(settings.worker.model, settings.cache_dir, "native"))
        out = tmp_path / "collect"
        first = await collect(engine, f"127.0.0.1:{port}", "", out, problems=2, k=4, max_new_tokens=20,
                              max_positions=16, batch=2)
        again = await collect(engine, f"127.0.0.1:{port}", "", out, problems=3, k=4, max_new_tokens=20,
                              max_positions=16, batch=2)
    finally:
        await server.stop(0)
        core.close()
    assert first["problems"] == 2 and first["positions"] == first["tokens"] > 0
    assert again["this_run"]["problems"] == 1 and again["problems"] == 3  # resumed: only the new problem ran
    progress = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert sorted(r["idx"] for r in progress) == [0, 1, 2]
    assert closed_segments(settings.selection_log_dir())
    from distill.groups import read_groups

    groups = list(read_groups(settings.selection_log_dir()))
    assert len(groups) == again["positions"]  # every generated position of every rollout is a labelled group
    assert all(len(g.candidate_ids) == 4 and not g.diverged for g in groups)
    assert {g.session_id for g in groups} == {f"collect-train-{i}" for i in range(3)}


def test_continuous_batching_rollouts_equal_decoding_each_prompt_alone(tiny_pair, tiny_models):
    """greedy_rollouts keeps up to batch_size prompts decoding and refills a finished slot at the next step;
    each trajectory equals plain greedy decoding of its prompt alone (float64: exactly)."""
    import random

    import torch

    from s2t.calibration import greedy_rollouts, greedy_trajectories

    engine = Engine(load_model(str(tiny_pair[0]), tiny_pair[0].parent, "native", threads=1))
    rng = random.Random(3)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(3, 30))] for _ in range(5)]
    caps = 12

    def alone(p, stops):
        seq = list(p)
        with torch.no_grad():
            while len(seq) - len(p) < caps:
                seq.append(int(tiny_models[0](torch.tensor([seq])).logits[0, -1].argmax()))
                if seq[-1] in stops:
                    break
        return seq[len(p):]

    stops = {alone(prompts[0], set())[3]}  # so that at least one rollout stops early and its slot is refilled
    expected = [alone(p, stops) for p in prompts]
    finished = [(i, gen) for i, gen, _ in greedy_rollouts(engine, prompts, caps, stops, batch_size=2)]
    assert sorted(i for i, _ in finished) == list(range(5))
    assert {i: gen for i, gen in finished} == dict(enumerate(expected))
    assert [g for g, _ in greedy_trajectories(engine, prompts, caps, stops, batch_size=2)] == expected
    assert any(len(g) < caps for g in expected) and any(len(g) == caps for g in expected)
