"""distill.packing and distill.train: prefix-shared rows score what naive re-encoding scores; training learns;
the exported adapter serves the trained scores; checkpoints resume exactly."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import pytest
import torch

from tiny import make_tiny_model_dir

from distill.packing import pack_groups
from distill.train import (ADAPTER_NAME, GroupBatch, RowRunner, TrainConfig, _TextKL, evaluate, initial_bin_weight, load_base,
                           selection_losses, spearman, train)
from s2t.rerank import (attach_lora, bin_scores, install, load_adapter, lora_wrappers, reserved_bin_ids,
                        set_active_adapter)
from s2t.runtime import Engine, load_model

VOCAB_ROWS = 288
BINS = list(range(272, 288))
K = 8
GOOD = (10, 20, 30, 40)  # the synthetic teacher's favourite tokens


def group(session, step, position, seq, candidates, teacher, slm_probs=None, **extra) -> dict:
    """A group as distill.groups.write_groups writes it (the trainer takes these dicts or Group objects).
    slm_probs default to uniform: the SLM prior then ranks nothing."""
    return dict(session_id=session, step=step, position=position, context=list(seq[max(0, position - 511):position]),
                candidate_ids=list(candidates), slm_probs=list(slm_probs or [1.0 / len(candidates)] * len(candidates)),
                teacher_probs=list(teacher), target=max(range(len(teacher)), key=list(teacher).__getitem__), **extra)


def synthetic_groups(seed: int, sessions: int, per_session: int = 8, length: int = 40, others: int = 64) -> list[dict]:
    """Random sessions; at each labelled position exactly one of the K candidates is one of GOOD tokens and
    the teacher prefers it; the other K-1 come from `others` further tokens and get random lower
    probabilities. Learnable from the candidate alone."""
    rng = random.Random(seed)
    pool = [t for t in range(256) if t not in GOOD][:others]
    out = []
    for s in range(sessions):
        seq = [rng.randrange(256) for _ in range(length)]
        for step, position in enumerate(sorted(rng.sample(range(4, length), per_session))):
            candidates = rng.sample(pool, K - 1)
            best = rng.randrange(K)
            candidates.insert(best, rng.choice(GOOD))
            teacher = [rng.uniform(0.0, 0.3) for _ in candidates]
            teacher[best] = 1.0
            total = sum(teacher)
            out.append(group(f"{seed}-{s}", step, position, seq, candidates, [t / total for t in teacher]))
    return out


def informative_slm_groups(seed: int, sessions: int, per_session: int = 6, length: int = 24) -> list[dict]:
    """Random candidates (nothing to learn from the tokens) with random, peaked SLM probabilities; the
    teacher always prefers the SLM's top candidate. Only the SLM prior can rank these."""
    rng = random.Random(seed)
    out = []
    for s in range(sessions):
        seq = [rng.randrange(256) for _ in range(length)]
        for step, position in enumerate(sorted(rng.sample(range(4, length), per_session))):
            candidates = rng.sample(range(256), K)
            weights = [rng.expovariate(1.0) ** 2 for _ in candidates]
            slm = [w / sum(weights) * 0.9 for w in weights]
            best = max(range(K), key=slm.__getitem__)
            teacher = [rng.uniform(0.0, 0.3) for _ in candidates]
            teacher[best] = 1.0
            out.append(group(f"{seed}-{s}", step, position, seq, candidates, [t / sum(teacher) for t in teacher],
                             slm_probs=slm))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def slm_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("distill") / "slm64", seed=1, vocab_rows=VOCAB_ROWS)


def naive_scores(model, context, candidates, bin_weight) -> torch.Tensor:
    with torch.no_grad():
        hidden = torch.stack([model.model(torch.tensor([list(context) + [c]])).last_hidden_state[0, -1]
                              for c in candidates])
    return bin_scores(hidden, bin_weight)


# ---------------------------------------------------------------------------------------------- packing


def test_packing_shares_prefixes_and_splits_where_contexts_disagree():
    seq = list(range(100, 160))
    draft = seq[:30] + [1, 2, 3, 4, 5]  # a rejected draft after position 30
    groups = [group("s", 0, 10, seq, [1, 2], [0.9, 0.1]),
              group("s", 1, 25, seq, [3, 4, 5], [0.2, 0.5, 0.3]),
              group("s", 2, 33, draft, [6, 7], [0.4, 0.6]),  # disagrees with seq at 30..32
              group("s", 3, 40, seq, [8, 9], [0.7, 0.3]),
              group("s", 4, 45, seq, [8], [1.0]),  # one candidate: nothing to learn
              group("s", 5, 46, seq, [8, 9], [0.5, 0.5]),  # uniform teacher: nothing to learn
              group("t", 0, 5, [7] * 20, [1, 2], [0.3, 0.7])]
    rows, stats = pack_groups(groups, row_tokens=64, min_context=20)
    assert stats["dropped_single_candidate"] == 1 and stats["dropped_uniform_teacher"] == 1
    assert stats["packed_groups"] == 5 and stats["rows"] == 3 and stats["max_candidates"] == 3
    by_first = {(r.session_id, r.branches[0].group_index): r for r in rows}
    a = by_first[("s", 0)]  # groups 0, 1 and the draft group 2 agree up to 30: one row, continued by the draft
    assert a.start == 0 and a.tokens == draft[:33]
    assert [(b.pos, b.group_index) for b in a.branches] == [(10, 0), (25, 1), (33, 2)]
    c = by_first[("s", 3)]  # back on seq, which the open row contradicts at 30-32: a new row with
    assert c.start == 20 and c.tokens == seq[20:40] and c.branches[0].pos == 20  # min_context=20 tokens
    assert by_first[("t", 6)].tokens == [7] * 5
    assert stats["context_tokens"] == 33 + 20 + 5 and stats["candidate_tokens"] == 2 + 3 + 2 + 2 + 2
    # every candidate sees exactly the tokens before its position in its own context
    for row in rows:
        for br in row.branches:
            g = groups[br.group_index]
            assert row.tokens[:br.pos] == g["context"][len(g["context"]) - br.pos:]
    # row_tokens bounds a row: with 24 tokens, group 1 (position 25) no longer fits the row starting at 0
    rows, _ = pack_groups(groups[:2], row_tokens=24, min_context=20)
    assert [len(r.branches) for r in rows] == [1, 1]


def test_packing_uses_full_session_sequences_when_given():
    seq = list(range(1, 701))
    groups = [group("s", 0, 600, seq, [1, 2], [0.8, 0.2], in_session_sequence=True)]
    assert len(groups[0]["context"]) == 511
    rows, _ = pack_groups(groups, sessions={"s": seq}, row_tokens=1024, min_context=600)
    assert rows[0].tokens == seq[:600] and rows[0].branches[0].pos == 600
    rows, _ = pack_groups(groups, row_tokens=1024, min_context=600)  # no sessions: the logged tail only
    assert rows[0].tokens == seq[89:600]


# ---------------------------------------------------------------------------------------------- the tree rows


@pytest.mark.parametrize("lora_layers", [None, 1])
def test_row_scores_equal_naive_reencoding(slm_dir, lora_layers):
    model, tokenizer = load_base(slm_dir, "float64")
    assert reserved_bin_ids(tokenizer, VOCAB_ROWS) == BINS
    total = model.config.num_hidden_layers
    lower = 0 if lora_layers is None else total - lora_layers
    attach_lora(model, rank=4, alpha=8, layers=range(lower, total), name=ADAPTER_NAME)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [p for w in lora_wrappers(model).values() for p in w.weights(ADAPTER_NAME)]:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    bin_weight = torch.randn(16, 64, generator=gen, dtype=torch.float64)
    groups = synthetic_groups(seed=3, sessions=2, per_session=5)
    rows, _ = pack_groups(groups, row_tokens=64, min_context=16)
    runner = RowRunner(model, bin_weight, BINS, ADAPTER_NAME, lower, TrainConfig(kl_positions=0))
    set_active_adapter(model, ADAPTER_NAME)
    for key, row in enumerate(rows):
        for _ in range(2):  # the second pass reads the lower layers from the cache
            scores, _, _ = runner.forward(key, row, with_reference=False)
            k0 = 0
            for b in row.branches:
                want = naive_scores(model, row.tokens[:b.pos], b.candidate_ids, bin_weight)
                torch.testing.assert_close(scores[k0:k0 + len(b.candidate_ids)].detach(), want, rtol=0, atol=1e-10)
                k0 += len(b.candidate_ids)
    assert len(runner.lower_cache) == (len(rows) if lower else 0)


def test_chunked_text_kl_matches_autograd_and_excludes_the_bins():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    excluded = torch.tensor([3, 9])
    got = _TextKL.apply(hidden, ref, weight, excluded, 3)
    (grad,) = torch.autograd.grad(got * 2.5, hidden)
    keep = [i for i in range(11) if i not in (3, 9)]
    logp = torch.log_softmax(hidden @ weight[keep].T, -1)
    logq = torch.log_softmax(ref @ weight[keep].T, -1)
    want = (logq.exp() * (logq - logp)).sum()
    (want_grad,) = torch.autograd.grad(want * 2.5, hidden)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-12)


def test_selection_losses_over_padded_groups_and_spearman():
    flat = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.1], dtype=torch.float64)  # groups of 3 and 2 candidates
    groups = GroupBatch.of([3, 2], [[1, 6, 3], [0.2, 0.6]], [1, 1], torch.float64)
    ce, kl, hinge, hits = selection_losses(groups.scores(flat), groups, temperature=0.5, hinge_margin=1.0)
    want_ce = want_kl = want_hinge = 0.0
    for s, t, target in ((flat[:3], torch.tensor([0.1, 0.6, 0.3]), 1), (flat[3:], torch.tensor([0.25, 0.75]), 1)):
        logq = torch.log_softmax(s / 0.5, -1)
        t = t.double()
        want_ce += -float(logq[target])
        want_kl += float((t * (t.log() - logq)).sum())
        want_hinge += max(0.0, 1.0 - float(s[target] - torch.cat([s[:target], s[target + 1:]]).max()))
    assert float(ce) == pytest.approx(want_ce) and float(kl) == pytest.approx(want_kl)
    assert float(hinge) == pytest.approx(want_hinge) and hits == 1  # group 2's argmax is candidate 0
    assert spearman([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254037844387)  # ties take average ranks
    assert spearman([1, 1, 1], [1, 2, 3]) is None


# ---------------------------------------------------------------------------------------------- training


def test_training_learns_a_candidate_property(tmp_path):
    """Held-out agreement@1 goes from about 1/K to above 0.9 on a task learnable from the candidate token."""
    slm = make_tiny_model_dir(tmp_path / "slm32", seed=1, vocab_rows=VOCAB_ROWS, dtype=torch.float32)
    t0 = time.perf_counter()
    config = TrainConfig(epochs=4, lr=1e-2, rank=8, alpha=16, batch_rows=4, kl_positions=8, checkpoint_every=0,
                         progress=False, threads=1, base_weights_sha256="sha-tiny")
    summary = train(synthetic_groups(1, 160, per_session=6, length=24), synthetic_groups(2, 16, per_session=6, length=24),
                    slm, tmp_path / "run", config)
    assert summary["metrics_before"]["agreement_at_1"] < 0.3
    assert summary["metrics"]["agreement_at_1"] > 0.9, summary["eval_curve"]
    assert summary["metrics"]["spearman"] > summary["metrics_before"]["spearman"]
    assert summary["stopped"] == "done" and summary["steps"] == 4 * 40
    assert len(summary["curves"]["bin_peak"]) == 160 and all(1 / 16 <= x <= 1 for x in summary["curves"]["bin_peak"])
    assert time.perf_counter() - t0 < 60
    manifest = json.loads((Path(summary["adapter"]) / "s2t-adapter.json").read_text())
    assert manifest["metrics"]["agreement_at_1"] == summary["metrics"]["agreement_at_1"]
    assert manifest["K"] == K and manifest["bin_ids"] == BINS and manifest["base_weights_sha256"] == "sha-tiny"
    assert summary["data"]["train"]["paper_layout_tokens"] > 10 * (summary["data"]["train"]["context_tokens"]
                                                                    + summary["data"]["train"]["candidate_tokens"])


def test_the_prior_weight_learns_to_trust_an_informative_slm(tmp_path):
    """From w = 0 (the paper's score), the learned SLM-prior weight grows until the ranking follows the SLM,
    which is the only signal in these groups; with w frozen at 0 nothing ranks them."""
    slm = make_tiny_model_dir(tmp_path / "slm32", seed=1, vocab_rows=VOCAB_ROWS, dtype=torch.float32)
    config = dict(epochs=3, lr=1e-3, rank=4, alpha=8, batch_rows=4, kl_positions=4, checkpoint_every=0,
                  progress=False, threads=1, base_weights_sha256="sha-tiny", lora_layers=1, prior_weight_init=0.0,
                  prior_lr=5e-2)
    train_groups, eval_groups = informative_slm_groups(1, 64), informative_slm_groups(2, 12)
    learned = train(train_groups, eval_groups, slm, tmp_path / "learned", TrainConfig(**config))
    assert learned["metrics_before"]["agreement_at_1"] < 0.4
    assert learned["metrics"]["agreement_at_1"] > 0.9, learned["eval_curve"]
    assert learned["metrics"]["slm_top1_agreement"] == 1.0
    assert learned["prior_weight"] > 0.1 and learned["curves"]["prior_weight"][-1] == learned["prior_weight"]
    assert load_adapter(Path(learned["adapter"]), "sha-tiny", BINS).prior_weight == pytest.approx(learned["prior_weight"])
    frozen = train(train_groups, eval_groups, slm, tmp_path / "frozen",
                   TrainConfig(**dict(config, prior_weight_trainable=False, epochs=1)))
    assert frozen["prior_weight"] == 0.0 and frozen["metrics"]["agreement_at_1"] < 0.5


def small_config(**kw) -> TrainConfig:
    base = dict(epochs=2, lr=1e-2, rank=4, alpha=8, dropout=0.05, batch_rows=2, kl_positions=6, dtype="float64",
                checkpoint_every=2, progress=False, threads=1, base_weights_sha256="sha-tiny", lora_layers=1)
    base.update(kw)
    return TrainConfig(**base)


def test_exported_adapter_serves_the_trained_scores(slm_dir, tmp_path):
    # informative SLM probabilities, so that the learned prior weight moves and the served score must add it
    train_groups, eval_groups = informative_slm_groups(4, 4, per_session=4), informative_slm_groups(5, 2, per_session=4)
    summary = train(train_groups, eval_groups, slm_dir, tmp_path / "run", small_config())
    adapter_dir = Path(summary["adapter"])
    # the trained model, rebuilt from the last checkpoint (not from the export)
    final = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))[-1]
    payload = torch.load(final, weights_only=True)
    trained, _ = load_base(slm_dir, "float64")
    attach_lora(trained, 4, 8, layers=[1], name=ADAPTER_NAME)
    with torch.no_grad():
        for name, (A, B) in payload["lora"].items():
            a, b = lora_wrappers(trained)[name].weights(ADAPTER_NAME)
            a.copy_(A)
            b.copy_(B)
    set_active_adapter(trained, ADAPTER_NAME)
    # served: a fresh Engine with the exported adapter, scoring through forward_tree with a scorer cache
    engine = Engine(load_model(str(slm_dir), slm_dir.parent, weight_formats="native", threads=1))
    reranker = load_adapter(adapter_dir, "sha-tiny", BINS)
    install(engine.lm.model, reranker)
    torch.testing.assert_close(reranker.bin_weight, payload["bin_weight"], rtol=0, atol=0)
    w = float(payload["prior_weight"])
    assert reranker.prior_weight == pytest.approx(w, abs=1e-6) and w != pytest.approx(1.0)  # learned from its init
    for g in eval_groups[:4]:
        cache = engine.new_cache()
        (hidden,) = engine.forward_tree(cache, g["context"], [(g["position"], g["candidate_ids"])],
                                        adapter=reranker.version)
        want = naive_scores(trained, g["context"], g["candidate_ids"], payload["bin_weight"])
        torch.testing.assert_close(reranker.scores(hidden), want, rtol=0, atol=1e-10)
        logp = torch.log(torch.tensor(g["slm_probs"], dtype=want.dtype))
        torch.testing.assert_close(reranker.scores(hidden, g["slm_probs"]), want + reranker.prior_weight * logp,
                                   rtol=0, atol=1e-10)
    # and the stand-alone evaluation of the export reproduces the trainer's final metrics
    metrics = evaluate(eval_groups, slm_dir, adapter_dir, TrainConfig(dtype="float64"), check_base=False)
    assert metrics["agreement_at_1"] == summary["metrics"]["agreement_at_1"]
    assert metrics["spearman"] == pytest.approx(summary["metrics"]["spearman"], abs=1e-12)


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(slm_dir, tmp_path):
    from safetensors.torch import load_file

    train_groups, eval_groups = synthetic_groups(6, 4, per_session=4), synthetic_groups(7, 1, per_session=4)
    whole = train(train_groups, eval_groups, slm_dir, tmp_path / "whole", small_config())
    first = train(train_groups, eval_groups, slm_dir, tmp_path / "split", small_config(max_steps=3))
    assert first["stopped"] == "max_steps" and first["steps"] == 3
    second = train(train_groups, eval_groups, slm_dir, tmp_path / "split", small_config())
    assert second["resumed_from"].endswith("step-00000003.pt") and second["steps"] == whole["steps"] == 4
    a = load_file(str(Path(whole["adapter"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(second["adapter"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second["curves"]["loss"] == whole["curves"]["loss"]
    with pytest.raises(ValueError, match="other data or settings"):
        train(train_groups, eval_groups, slm_dir, tmp_path / "split", small_config(lr=1e-3))
    other_data = [dict(g, teacher_probs=list(reversed(g["teacher_probs"]))) for g in train_groups]
    with pytest.raises(ValueError, match="other data or settings"):
        train(other_data, eval_groups, slm_dir, tmp_path / "split", small_config())


def test_max_minutes_stops_early_and_still_exports(slm_dir, tmp_path):
    summary = train(synthetic_groups(8, 2, per_session=3), [], slm_dir, tmp_path / "run", small_config(max_minutes=0))
    assert summary["stopped"] == "max_minutes" and summary["steps"] == 0
    assert (Path(summary["adapter"]) / "adapter_model.safetensors").is_file()
    assert summary["peak_rss_mb"] > 0 and summary["wall_s"] > 0


def test_frozen_lora_trains_only_the_bins_and_the_prior(slm_dir, tmp_path):
    """--freeze-lora, the control that measures what the LoRA adds: the exported LoRA is still the base model
    (B = 0) while the bin rows and the prior weight moved."""
    from safetensors.torch import load_file

    train_groups, eval_groups = informative_slm_groups(4, 4, per_session=4), informative_slm_groups(5, 2, per_session=4)
    frozen = train(train_groups, eval_groups, slm_dir, tmp_path / "frozen", small_config(lora_trainable=False))
    trained = train(train_groups, eval_groups, slm_dir, tmp_path / "trained", small_config())
    lora = {k: load_file(str(Path(s["adapter"]) / "adapter_model.safetensors")) for k, s in
            (("frozen", frozen), ("trained", trained))}
    b_keys = [k for k in lora["frozen"] if k.endswith("lora_B.weight")]
    a_keys = [k for k in lora["frozen"] if k.endswith("lora_A.weight")]
    assert b_keys and all(torch.count_nonzero(lora["frozen"][k]) == 0 for k in b_keys)
    assert any(torch.count_nonzero(lora["trained"][k]) > 0 for k in b_keys)
    # the same seed initialises A in both runs; only the trained run moved it
    assert all(not torch.equal(lora["frozen"][k], lora["trained"][k]) for k in a_keys)
    base, _ = load_base(slm_dir, "float64")
    initial_bins = base.get_output_embeddings().weight[BINS]
    for summary in (frozen, trained):
        bins = load_adapter(Path(summary["adapter"]), "sha-tiny", BINS).bin_weight
        assert not torch.allclose(bins.to(initial_bins.dtype), initial_bins)
        assert summary["prior_weight"] != pytest.approx(1.0)
    assert frozen["config"]["lora_trainable"] is False
    assert set(frozen["curves"]["lm_kl"]) == {0.0} and max(trained["curves"]["lm_kl"]) > 0  # no drift to measure


def test_identical_bin_rows_leave_the_lora_without_gradient_until_noised(slm_dir):
    """Qwen2.5's reserved rows are one vector: every bin logit is equal, so the selection loss has no gradient
    with respect to the hidden states and the LoRA learns nothing from it. bin_init_std gives the rows a
    seeded spread, and the LoRA its gradient from the first step."""
    model, _ = load_base(slm_dir, "float64")
    total = model.config.num_hidden_layers
    attach_lora(model, rank=4, alpha=8, layers=range(total - 1, total), name=ADAPTER_NAME)
    set_active_adapter(model, ADAPTER_NAME)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0, so that A's gradient would show too
        for p in [p for w in lora_wrappers(model).values() for p in w.weights(ADAPTER_NAME)]:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    head = model.get_output_embeddings().weight.detach().clone()
    head[BINS] = head[BINS[0]].clone()  # as in Qwen2.5: the padding rows are identical
    rows, _ = pack_groups(synthetic_groups(seed=3, sessions=1, per_session=5), row_tokens=64, min_context=16)
    lora = [p for w in lora_wrappers(model).values() for p in w.weights(ADAPTER_NAME)]

    def lora_grad_norm(cfg: TrainConfig) -> float:
        bins = initial_bin_weight(head, BINS, cfg)
        runner = RowRunner(model, bins, BINS, ADAPTER_NAME, total - 1, cfg)
        for p in lora:
            p.grad = None
            p.requires_grad_(True)
        loss, parts = runner.row_loss("row", rows[0], group_norm=1, kl_norm=1)
        loss.backward()
        peaks.append(parts["bin_peak"] / parts["groups"])
        return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in lora))

    peaks: list[float] = []

    plain = TrainConfig(kl_positions=0, lm_kl_weight=0.0, teacher_kl_weight=0.1, prior_weight_init=0.0)
    noised = TrainConfig(**dict(dataclasses.asdict(plain), bin_init_std=0.05))
    assert torch.equal(initial_bin_weight(head, BINS, plain), head[BINS])
    assert torch.equal(initial_bin_weight(head, BINS, noised), initial_bin_weight(head, BINS, noised))  # seeded
    assert lora_grad_norm(plain) < 1e-12
    assert lora_grad_norm(noised) > 1e-4
    assert peaks[0] == pytest.approx(1 / 16) and peaks[1] > 1 / 16 + 1e-3  # what the bin-peak curve shows
