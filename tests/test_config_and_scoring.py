"""Configuration precedence, GSM8K answer scoring, trigger tables and calibration on the tiny pair."""

import math
import random

import pytest
import torch

from s2t import gsm8k
from s2t.calibration import calibrate, read_calibration, recall, thresholds, write_calibration
from s2t.config import load_settings
from s2t.runtime import Engine, load_model
from s2t.triggers import (KL_P_FLOOR, GatheredLogProbs, LocalTrigger, Proposal, ThresholdTable, VocabLogProbs, kl_on_support, kl_on_support_at,
                          propose)


def test_flags_beat_environment_beat_yaml_beat_defaults(tmp_path, monkeypatch):
    cfg = tmp_path / "s2t.yaml"
    cfg.write_text("worker:\n  block_size: 4\n  port: 1111\n  num_candidates: 6\nselector:\n  grpc_port: 9999\n")
    monkeypatch.setenv("S2T_WORKER__PORT", "2222")
    monkeypatch.setenv("S2T_WORKER__NUM_CANDIDATES", "5")
    s = load_settings(cfg, **{"worker.num_candidates": 4})
    assert s.worker.block_size == 4 and s.selector.grpc_port == 9999  # yaml over defaults
    assert s.worker.port == 2222  # environment over yaml
    assert s.worker.num_candidates == 4  # flags over environment
    assert s.worker.trigger_rate == 0.1  # default


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    from s2t.config import ConfigError

    with pytest.raises(ConfigError, match="bad setting worker.blok = 3 .*Extra inputs are not permitted"):
        load_settings(**{"worker.blok": 3})
    with pytest.raises(ConfigError, match="selector_address"):
        load_settings(**{"worker.selector_address": "no-port"})
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml")


def test_calibration_file_sits_beside_the_models(tmp_path):
    s = load_settings(**{"cache_dir": str(tmp_path)})
    assert s.calibration_file().parent == tmp_path / "calibration"
    assert "qwen2.5-coder-0.5b-instruct__qwen2.5-coder-1.5b-instruct" in s.calibration_file().name


@pytest.mark.parametrize("text,gold,ok", [
    ("so the total is \\boxed{18}.", "18", True),
    ("\\boxed{1,200} dollars", "1200", True),
    ("The answer is \\boxed{\\frac{3}{4}}", "0.75", True),
    ("first 5 then 7", "7", True),
    ("\\boxed{20}", "18", False),
    ("no number at all", "3", False),
    ("\\boxed{\\$42.00}", "42", True),
])
def test_gsm8k_scoring(text, gold, ok):
    assert gsm8k.is_correct(text, gold) is ok


def test_gsm8k_test_problems_ship_with_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("S2T_GSM8K_DIR", str(tmp_path))  # no data directory: the packaged sample serves
    test = gsm8k.load("test", 0, 2)
    assert [p["idx"] for p in test] == [0, 1] and test[0]["gold"] == "18"
    with pytest.raises(FileNotFoundError, match="S2T_GSM8K_DIR"):
        gsm8k.load("train", 0, 1)
    with pytest.raises(ValueError):
        gsm8k.load("dev")


@pytest.mark.skipif(not (gsm8k.data_dir() / "train.jsonl").is_file(), reason="GSM8K data directory not present")
def test_gsm8k_loads_train_and_test_from_the_data_directory():
    assert gsm8k.load("train", 5, 1)[0]["idx"] == 5
    assert gsm8k.load("test", 20, 1)[0]["idx"] == 20


def test_threshold_table_interpolates_and_refuses_extrapolation():
    table = ThresholdTable({0.1: 1.0, "0.2": 0.5}, "entropy")
    assert table.threshold(0.15) == pytest.approx(0.75)
    assert table.threshold(float(torch.tensor(0.1, dtype=torch.float32))) == 1.0
    with pytest.raises(ValueError, match="outside"):
        table.threshold(0.5)


def test_local_trigger_respects_warmup_and_direction():
    p = Proposal(ids=[1, 2], probs=[0.5, 0.4], entropy=2.0, margin=0.1)
    assert LocalTrigger("entropy", 1.0, 3).fires(p, 3) and not LocalTrigger("entropy", 1.0, 3).fires(p, 2)
    assert LocalTrigger("margin", 0.2, 0).fires(p, 0) and not LocalTrigger("margin", 0.05, 0).fires(p, 0)


def test_propose_reads_top64_entropy_and_margin():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * 100], dtype=torch.float64))
    (p,) = propose(logits)
    assert p.ids[:3] == [0, 1, 2] and len(p.ids) == 64
    assert p.margin == pytest.approx(0.2, abs=1e-6)
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert p.entropy == pytest.approx(float(-(probs * probs.log()).sum()), abs=1e-5)


def test_vocab_log_probs_read_the_log_softmax_at_the_ids_asked_for():
    torch.manual_seed(0)
    logits = torch.randn(5, 1000) * 4
    logits[2, 7] = logits[2, 11] = logits[2].max() + 1  # a tie: the first maximum wins, as in the log-softmax
    reference = torch.log_softmax(logits.double(), dim=-1)
    ids = [3, 999, 0, 11, 7]
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        rows = VocabLogProbs(logits.to(dtype))
        for row in range(5):
            got = rows.at(row, ids)
            assert got.dtype == torch.float64
            assert torch.allclose(got, reference[row, ids], rtol=0, atol=tolerance)
            assert rows.top1(row) == int(torch.argmax(reference[row]))
    assert VocabLogProbs(logits).top1(2) == 7
    # the KL trigger reads the same value from the ids alone as from the full row
    probs = torch.softmax(torch.randn(5).double(), -1).tolist()
    assert kl_on_support_at(probs, VocabLogProbs(logits).at(1, ids)) == pytest.approx(
        kl_on_support(ids, probs, reference[1]), rel=1e-9)


def test_gathered_log_probs_read_what_vocab_log_probs_read():
    """The GPU selector's reading (GatheredLogProbs: only the ids asked for, and the top-1, leave the device) gives
    VocabLogProbs' numbers, split into per-sequence views of consecutive rows."""
    torch.manual_seed(1)
    logits = torch.randn(5, 1000) * 4
    logits[2, 7] = logits[2, 11] = logits[2].max() + 1  # a tie: the first maximum, as VocabLogProbs
    ids = [[3, 999, 0], [11, 7], [5, 11], [], [1, 2, 3, 4]]
    for dtype in (torch.float32, torch.float64):
        full, gathered = VocabLogProbs(logits.to(dtype)), GatheredLogProbs(logits.to(dtype), ids)
        first, second = gathered.split([2, 3])
        for row, view, r in ((0, first, 0), (1, first, 1), (2, second, 0), (3, second, 1), (4, second, 2)):
            top1 = full.top1(row)
            assert view.top1(r) == top1 and (row != 2 or top1 == 7)
            asked = ids[row] + [top1] + ids[row][:1]  # any order, repeats, the top-1 whether asked for or not
            got = view.at(r, asked)
            assert got.dtype == torch.float64 and torch.equal(got, full.at(row, asked))
        with pytest.raises(KeyError, match="id 999 at row 1 was not asked for"):
            first.at(1, [999])
    with pytest.raises(ValueError, match="2 rows of ids for 5 rows"):
        GatheredLogProbs(logits, ids[:2])


def test_log_prob_tables_and_the_batched_selection_read_what_one_position_reads():
    """A Select's positions are read as one table (VocabLogProbs.table / GatheredLogProbs.table) and scored at
    once (kl_on_support_rows, the candidates' argmax): the same picks and trigger values as the per-position
    forms, with ragged K and supports, ties, and teacher probabilities under the KL floor."""
    from llm_selector.core import SelectRows, _picks_and_kl
    from s2t.v1 import selector_pb2 as pb

    torch.manual_seed(2)
    rng = random.Random(2)
    logits = torch.randn(6, 500) * 6
    logits[1, 40] = logits[1, 41] = logits[1].max() + 1  # a tie between two candidates: the first wins
    logits[4, :] = -80.0
    logits[4, 9] = 40.0  # one id takes all the mass: the rest are under KL_P_FLOOR
    positions, ids = [], []
    for row, k in enumerate((3, 5, 1, 8, 4, 2)):
        cands = [40, 41, 7][:k] if row == 1 else rng.sample(range(500), k)
        support = [i for i in rng.sample(range(500), rng.choice((0, 3, 10))) if i not in cands]
        if row == 4:
            cands, support = [9, 10, 11, 12], [13]
        probs = [rng.random() for _ in cands + support]
        probs[-1] = 0.0  # a zero student probability leaves the support too
        total = sum(probs)
        probs = [q / total for q in probs]
        positions.append(pb.CandidatePosition(position=row + 1, candidate_ids=cands, candidate_probs=probs[:len(cands)],
                                              support_ids=support, support_probs=probs[len(cands):]))
        ids.append(cands + support)
    full = VocabLogProbs(logits)
    gathered = GatheredLogProbs(logits, ids)
    table = full.table(list(range(6)), ids)
    assert torch.equal(gathered.table(list(range(6)), ids), table)
    assert torch.equal(gathered.table([2, 0], [ids[2], ids[0][::-1]]), full.table([2, 0], [ids[2], ids[0][::-1]]))
    for row, row_ids in enumerate(ids):
        assert torch.equal(table[row, :len(row_ids)], full.at(row, row_ids))
        assert torch.isneginf(table[row, len(row_ids):]).all()
    rows = SelectRows(ids, [list(p.candidate_probs) + list(p.support_probs) for p in positions],
                      [len(p.candidate_ids) for p in positions])
    [(picks, values)] = _picks_and_kl([rows], [True], [table])
    for j, pos in enumerate(positions):
        assert picks[j] == int(torch.argmax(full.at(j, list(pos.candidate_ids))))
        # the paper's statistic written out: both sides renormalised on the ids kept (teacher above the floor,
        # student above 0), then sum p_s log(p_s / p_l); 0 where nothing is kept
        p_s = list(pos.candidate_probs) + list(pos.support_probs)
        p_l = full.at(j, ids[j]).exp().tolist()
        kept = [(s_, l_) for s_, l_ in zip(p_s, p_l) if l_ > KL_P_FLOOR and s_ > 0]
        total_s, total_l = sum(s_ for s_, _ in kept), sum(l_ for _, l_ in kept)
        expected = sum(s_ / total_s * math.log((s_ / total_s) / (l_ / total_l)) for s_, l_ in kept)
        assert values[j] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert picks[1] == 0 and values[4] == 0.0  # the tie; nothing of position 4's support is kept but id 9
    assert _picks_and_kl([rows], [False], [table]) == [(picks, [])]

    # A batch (the selector scores all its requests' positions at once): requests of other widths, with and
    # without the KL trigger, a prefill (no positions) between them; each scored as it is alone.
    def part(lo: int, hi: int) -> SelectRows:
        return SelectRows(rows.ids[lo:hi], rows.probs[lo:hi], rows.candidates[lo:hi])

    spans = [(0, 2), (2, 2), (2, 3), (3, 6)]  # the rows of `logits` each request's positions are at
    parts = [part(lo, hi) for lo, hi in spans]
    tables = [full.table(list(range(lo, hi)), r.ids) if r.ids else None for (lo, hi), r in zip(spans, parts)]
    kl = [True, True, False, True]
    batch = _picks_and_kl(parts, kl, tables)
    for r, k, t, got in zip(parts, kl, tables, batch):
        assert got == (_picks_and_kl([r], [k], [t])[0] if r.ids else ([], []))
    assert [p for got in batch for p in got[0]] == picks
    assert batch[0][1] + batch[3][1] == pytest.approx(values[:2] + values[3:], rel=1e-12, abs=1e-15)
    assert batch[2][1] == [] and _picks_and_kl([SelectRows([], [], [])], [True], [None]) == [([], [])]


def test_quantile_thresholds_hit_their_rates_and_recall():
    values = [float(i) for i in range(100)]
    t = thresholds(values, high_fires=True)
    assert sum(v > t["0.1"] for v in values) == pytest.approx(10, abs=1)
    divergent = [v >= 90 for v in values]
    assert recall(values, divergent, high_fires=True)["0.1"] == 1.0
    assert recall(values, divergent, high_fires=False)["0.1"] == 0.0


def test_calibration_on_the_tiny_pair(tiny_pair, tmp_path):
    slm = Engine(load_model(str(tiny_pair[0]), tmp_path, "native"))
    llm = Engine(load_model(str(tiny_pair[1]), tmp_path, "native"))
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    result = calibrate(slm, llm, prompts, max_new_tokens=20, warmup_steps=3, log=lambda m: None)
    assert result["steps"] > 30
    ent = [result["entropy"][k] for k in sorted(result["entropy"], key=float)]
    assert ent == sorted(ent, reverse=True)  # a lower rate needs a higher entropy
    assert set(result["kl"]) == set(result["entropy"]) and 0 <= result["divergence_rate"] <= 1
    path = tmp_path / "cal.json"
    write_calibration(path, result)
    assert read_calibration(path) == result


def test_a_bad_setting_is_one_line_naming_key_value_and_source(monkeypatch, tmp_path):
    from s2t.config import ConfigError

    monkeypatch.setenv("S2T_WORKER__BLOCK_SIZE", "abc")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value) == ("bad setting worker.block_size = 'abc' (from environment variable S2T_WORKER__BLOCK_SIZE): "
                            "Input should be a valid integer, unable to parse string as an integer")
    monkeypatch.delenv("S2T_WORKER__BLOCK_SIZE")
    with pytest.raises(ConfigError, match=r"worker.auth_token = \*\*\* \(from --set worker.auth_token\)"):
        load_settings(**{"worker.auth_token": ["not", "a", "string"]})
    config = tmp_path / "s2t.yaml"
    config.write_text("selector:\n  max_candidates: 0\n")
    with pytest.raises(ConfigError, match=rf"selector.max_candidates = 0 \(from config file {config}\)"):
        load_settings(config)
