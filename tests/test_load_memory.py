"""bench/load_memory.py on a tiny bf16 model: what the formats hold, counted exactly, beside the process's RSS."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import load_memory  # noqa: E402
from tiny import make_tiny_model  # noqa: E402

from s2t.weight_formats import available_formats  # noqa: E402


def test_formats_bytes_are_counted_exactly_and_rss_is_read(tmp_path):
    path = tmp_path / "model"
    model = make_tiny_model(seed=5, dtype=torch.bfloat16)
    model.save_pretrained(path)
    from tiny import make_tokenizer

    make_tokenizer().save_pretrained(path)
    fmt = "fp32" if "fp32_packed" not in available_formats() else "fp32_packed"
    payload = load_memory.main(["--name", "lm", "--models", str(path), "--weight-formats", ",".join([fmt] * 5),
                                "--threads", "1", "--cache-dir", str(tmp_path), "--results-dir", str(tmp_path / "r")])
    (row,) = payload["rows"]
    # fp32 everywhere (the lm_head is untied here) but the q/k/v biases, which the formatted layers keep in the
    # checkpoint's bf16 (they are added to bf16 or fp32 outputs exactly as before: see test_runtime)
    biases = sum(p.numel() for name, p in model.named_parameters() if name.endswith(".bias"))
    expected = (sum(p.numel() for p in model.parameters()) - biases) * 4 + biases * 2
    assert row["formats_bytes"] == expected
    assert row["peak_rss_gib"] >= row["rss_gib"] > 0 and row["s2t_from"]
    assert json.loads((tmp_path / "r" / "lm.json").read_text())["rows"] == payload["rows"]
    assert "| " + str(path) + " |" in (tmp_path / "r" / "lm.md").read_text()
