"""bench/batched_decode.py (issue #14, item 4): batched decode throughput per format and batch size, on a tiny
model, and the reading of llama-batched-bench's table."""

import json
import sys
from pathlib import Path

import pytest

from tiny import make_tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import batched_decode  # noqa: E402

LLAMA_TABLE = """
llama_batched_bench: n_kv_max = 512, n_batch = 2048, n_ubatch = 512, flash_attn = -1, n_threads = 1

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|     8 |      4 |    1 |     12 |    0.608 |    13.17 |    0.374 |    10.70 |    0.981 |    12.23 |
|     8 |      4 |    2 |     24 |    0.330 |    48.45 |    0.473 |    16.91 |    0.803 |    29.88 |
"""


def test_reads_the_generation_speed_of_each_batch_size():
    rows = batched_decode.parse_batched_bench(LLAMA_TABLE)
    assert [(r["batch"], r["tokens_per_s"], r["prompt_tokens"], r["n_gen"]) for r in rows] == [
        (1, 10.70, 8, 4), (2, 16.91, 8, 4)]
    with pytest.raises(ValueError, match="no llama-batched-bench table"):
        batched_decode.parse_batched_bench("error: model not found")


def test_times_every_format_and_batch_size_and_writes_the_table(tmp_path):
    model = make_tiny_model_dir(tmp_path / "tiny", seed=1)
    out = tmp_path / "results"
    payload = batched_decode.main(["--models", str(model), "--formats", "fp32,int8", "--batches", "1,3",
                                   "--block", "1,4", "--steps", "2", "--rounds", "1", "--prompt-tokens", "5,9",
                                   "--threads", "1", "--results-dir", str(out), "--name", "t"])
    rows = payload["rows"]
    assert sorted((r["prompt_tokens"], r["weight_formats"], r["batch"], r["tokens_per_session"]) for r in rows) == sorted(
        (c, f, b, k) for c in (5, 9) for f in ("fp32", "int8") for b in (1, 3) for k in (1, 4))
    for r in rows:  # new tokens per second counts every session's every new token (ms rounded to 0.01, tokens/s too)
        new, ms = r["batch"] * r["tokens_per_session"], r["ms_per_step_median"]
        assert new / ((ms + 0.005) / 1e3) - 0.005 <= r["tokens_per_s"] <= new / (max(ms - 0.005, 1e-9) / 1e3) + 0.005
    assert json.loads((out / "t.json").read_text())["rows"] == rows
    assert "| sessions |" in (out / "t.md").read_text()


def test_a_format_at_model_forward_is_the_same_weights_through_transformers_forward(tmp_path):
    model = make_tiny_model_dir(tmp_path / "tiny", seed=1)
    common = ["--models", str(model), "--batches", "1,2", "--steps", "1", "--rounds", "1", "--prompt-tokens", "5",
              "--threads", "1", "--results-dir", str(tmp_path / "results"), "--name", "t"]
    payload = batched_decode.main(common + ["--formats", "fp32,fp32@model-forward"])
    assert sorted((r["weight_formats"], r["batch"]) for r in payload["rows"]) == [
        ("fp32", 1), ("fp32", 2), ("fp32@model-forward", 1), ("fp32@model-forward", 2)]
    with pytest.raises(SystemExit, match="unknown path 'fast'"):
        batched_decode.main(common + ["--formats", "fp32@fast"])
