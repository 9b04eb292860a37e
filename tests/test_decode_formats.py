"""bench/decode_formats.py on a tiny model: one row per format and thread count, the same tokens fed to every
format (a format compared with itself never differs), bytes per step from the formats, and llama.cpp rows
with their ratio when a llama.cpp build is given (stand-in llama-bench here, as in test_native_ref)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import decode_formats  # noqa: E402
import native_ref  # noqa: E402
from tiny import make_tiny_model, make_tokenizer  # noqa: E402


def _tiny_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    make_tiny_model(seed=3, dtype=torch.bfloat16).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_rows_per_format_and_thread_count(tmp_path):
    model = _tiny_dir(tmp_path)
    payload = decode_formats.main(["--models", str(model), "--formats", "fp32;fp32,fp32,fp32,fp32,fp32",
                                   "--threads", "1,2", "--steps", "5", "--rounds", "2", "--prompt-tokens", "7",
                                   "--cache-dir", str(tmp_path), "--results-dir", str(tmp_path / "r")])
    rows = payload["rows"]
    assert [(r["weight_formats"], r["threads"]) for r in rows] == [
        ("fp32", 1), ("fp32,fp32,fp32,fp32,fp32", 1), ("fp32", 2), ("fp32,fp32,fp32,fp32,fp32", 2)]
    config = json.loads((model / "config.json").read_text())
    for r in rows:
        assert r["engine"] == "s2t" and r["steps"] == 5 and r["rounds"] == 2
        assert r["tokens_per_s"] > 0 and r["ms_per_step_min"] <= r["ms_per_step_median"]
        assert r["argmax_differs_from_first_format"] == 0  # the same format twice, fed the same tokens
        assert r["weight_bytes_per_token"] == native_ref.engine_bytes_per_token(config, "fp32")
    saved = json.loads((tmp_path / "r" / "decode-formats.json").read_text())
    assert saved["rows"] == rows and "vs_llama_cpp" not in rows[0]
    assert "| fp32 | 1 |" in (tmp_path / "r" / "decode-formats.md").read_text()


def test_llama_cpp_rows_and_ratios(tmp_path, monkeypatch):
    model = _tiny_dir(tmp_path)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 1000)
    monkeypatch.setattr(decode_formats.native_ref, "find_llama_cpp", lambda p: p)
    monkeypatch.setattr("s2t.model_store.fetch_gguf", lambda name, cache_dir: gguf)
    seen = []

    def fake_bench(bin_dir, path, threads, cpus, n_gen):
        seen.append((path, threads, n_gen))
        return {"tokens_per_s": 1e6 * threads, "tokens_per_s_sd": 0.0, "n_gen": n_gen, "threads": threads}

    monkeypatch.setattr(decode_formats.native_ref, "llama_bench", fake_bench)
    payload = decode_formats.main(["--models", str(model), "--formats", "fp32", "--threads", "1,2", "--steps", "3",
                                   "--rounds", "1", "--prompt-tokens", "4", "--llama-cpp", str(tmp_path),
                                   "--n-gen", "16", "--cache-dir", str(tmp_path), "--results-dir", str(tmp_path / "r")])
    assert seen == [(gguf, 1, 16), (gguf, 2, 16)]
    native = [r for r in payload["rows"] if r["engine"] == "llama.cpp"]
    assert [r["threads"] for r in native] == [1, 2] and native[0]["weight_bytes_per_token"] == 1000
    for r in payload["rows"]:
        if r["engine"] == "s2t":
            assert r["vs_llama_cpp"] == round(r["tokens_per_s"] / (1e6 * r["threads"]), 3)


def test_both_int8_vnni_builds_in_one_run(tmp_path, monkeypatch):
    """'int8_vnni@avx2' beside 'int8_vnni@avx512_vnni': each layer keeps the build it was made with, so both are
    timed in one process, and (bit-identical builds) neither ever picks another token than the other."""
    from s2t import kernels

    if not (kernels.cpu_has_avx512_vnni() and kernels.cpu_has_avx2()):
        import pytest

        pytest.skip("needs both builds (an AVX-512 VNNI CPU)")
    monkeypatch.delenv("S2T_INT8_VNNI_KERNEL", raising=False)
    model = _tiny_dir(tmp_path)
    payload = decode_formats.main(["--models", str(model), "--formats", "int8_vnni@avx512_vnni,int8_vnni@avx2",
                                   "--threads", "1", "--steps", "5", "--rounds", "1", "--prompt-tokens", "7",
                                   "--results-dir", str(tmp_path / "out"), "--name", "builds"])
    rows = {r["weight_formats"]: r for r in payload["rows"]}
    assert set(rows) == {"int8_vnni@avx512_vnni", "int8_vnni@avx2"}
    assert all(r["plan"].startswith("1-1 rows: int8_vnni") for r in rows.values())
    assert rows["int8_vnni@avx2"]["argmax_differs_from_first_format"] == 0
    assert "S2T_INT8_VNNI_KERNEL" not in __import__("os").environ


def test_vnni_build_sets_the_kernel_choice_only_while_loading(monkeypatch):
    import os

    monkeypatch.setenv("S2T_INT8_VNNI_KERNEL", "auto")
    with decode_formats.vnni_build("int8_vnni@avx2") as plan:
        assert plan == "int8_vnni" and os.environ["S2T_INT8_VNNI_KERNEL"] == "avx2"
    assert os.environ["S2T_INT8_VNNI_KERNEL"] == "auto"
    with decode_formats.vnni_build("int8,int8,int8,fp32_packed,fp32_packed") as plan:
        assert plan == "int8,int8,int8,fp32_packed,fp32_packed" and os.environ["S2T_INT8_VNNI_KERNEL"] == "auto"
