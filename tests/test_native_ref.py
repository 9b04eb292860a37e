"""bench/native_ref.py: the weight bytes a decode step reads (checked against a real tiny model in the engine's
formats), the streaming-read measurement, and the llama.cpp runners' parsing and failure handling (on stand-in
executables that print what llama.cpp prints; llama.cpp itself is not a dependency)."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import native_ref  # noqa: E402
from tiny import make_tiny_model  # noqa: E402

from s2t.weight_formats import FormatPlan, FormattedLinear, apply_plan  # noqa: E402


def qwen_config(model) -> dict:
    return json.loads(model.config.to_json_string())


def test_linear_shapes_are_the_models_linear_layers_in_order():
    model = make_tiny_model(seed=1, dtype=torch.bfloat16, layers=3)
    expected = [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert native_ref.linear_shapes(qwen_config(model)) == expected


@pytest.mark.parametrize("fmt", ["int8", "bf16", "fp32_packed", "native"])
def test_engine_bytes_per_token_is_what_the_formatted_model_holds_for_one_row(fmt):
    model = make_tiny_model(seed=1, dtype=torch.bfloat16, layers=2)
    config = qwen_config(model)
    small = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                if p.dim() == 1)  # biases and norms, read every step
    row = model.model.embed_tokens.weight[0]
    apply_plan(model, FormatPlan.uniform(fmt))
    matrices = 0
    for m in model.modules():
        if isinstance(m, FormattedLinear):
            held = m.weights[fmt]
            parts = held if isinstance(held, tuple) else (held,)
            if fmt == "fp32_packed":  # an opaque oneDNN handle: its size is the fp32 matrix's
                matrices += m.in_features * m.out_features * 4
            else:
                matrices += sum(t.numel() * t.element_size() for t in parts)
        elif isinstance(m, torch.nn.Linear) and fmt == "native":
            matrices += m.weight.numel() * m.weight.element_size()
    expected = matrices + small + row.numel() * row.element_size()
    assert native_ref.engine_bytes_per_token(config, fmt) == expected


def test_one_row_format_reads_plans_as_configured_and_as_described():
    assert native_ref.one_row_format("int8,int8,int8,fp32_packed,fp32_packed") == "int8"
    assert native_ref.one_row_format("1-1 rows: bf16; 2-4 rows: int8; 17-∞ rows: fp32") == "bf16"
    assert native_ref.one_row_format("auto") == "auto"


def test_stream_read_measures_a_plain_read_in_a_fresh_process():
    r = native_ref.stream_read(1, None, gib=0.01, repeats=2)
    assert r["threads"] == 1 and r["cpus"] == "all"
    assert r["bytes"] == int(0.01 * (1 << 30)) // 4 * 4 and r["gb_per_s"] > 0


def fake_tool(path: Path, script: str) -> Path:
    path.write_text("#!" + sys.executable + "\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


LLAMA_BENCH = """
import json, sys
args = sys.argv[1:]
assert args[args.index("-p") + 1] == "0" and args[args.index("-o") + 1] == "json"
blob = bytearray(64 << 20)  # a peak RSS above the interpreter's own
print(json.dumps([{"avg_ts": 31.5, "stddev_ts": 0.4, "samples_ts": [31.1, 31.5, 31.9], "build_commit": "abc",
                   "n_gen": int(args[args.index("-n") + 1]), "cpu_info": "fake"}]))
"""

SPECULATIVE = """
import sys
print("draft:\\n\\nencoded   70 tokens in    0.3 seconds, speed:  233.3 t/s", file=sys.stderr)
print("decoded  128 tokens in    9.142 seconds, speed:   14.001 t/s", file=sys.stderr)
print("n_draft   = 8\\nn_predict = 128\\nn_drafted = 120\\nn_accept  = 98\\naccept    = 81.667%", file=sys.stderr)
"""


def test_llama_bench_row_from_its_json(tmp_path):
    fake_tool(tmp_path / "llama-bench", LLAMA_BENCH)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert native_ref.find_llama_cpp(tmp_path) == tmp_path
    r = native_ref.llama_bench(tmp_path, gguf, threads=2, cpus=None, n_gen=16)
    assert r["tokens_per_s"] == 31.5 and r["tokens_per_s_sd"] == 0.4 and r["n_gen"] == 16
    assert r["threads"] == 2 and r["build"] == "abc"
    assert r["peak_rss_gb"] > 64 / 1024  # the child's own high-water mark, not ours
    assert r["command"].endswith(f"-m {gguf} -p 0 -n 16 -t 2 -r 3 -o json")


def test_llama_speculative_row_from_its_log(tmp_path):
    fake_tool(tmp_path / "llama-speculative-simple", SPECULATIVE)
    r = native_ref.llama_speculative(tmp_path, tmp_path / "t.gguf", tmp_path / "d.gguf", "a prompt", threads=2,
                                     n_gen=128, draft_max=8)
    assert (r["tokens"], r["seconds"], r["tokens_per_s"]) == (128, 9.142, 14.001)
    assert r["accept_percent"] == 81.667 and r["draft_max"] == 8
    assert "<prompt>" in r["command"] and "a prompt" not in r["command"]


def test_a_crashing_speculative_run_is_retried_without_repacking_and_never_raises(tmp_path):
    # as llama.cpp's AMX path did on a Sapphire Rapids Xeon: a crash unless --no-repack
    fake_tool(tmp_path / "llama-speculative-simple",
              "import os, signal, sys\nif '--no-repack' not in sys.argv: os.kill(os.getpid(), signal.SIGSEGV)\n"
              + SPECULATIVE)
    r = native_ref.llama_speculative_or_error(tmp_path, tmp_path / "t", tmp_path / "d", "p", 2, 128, 4)
    assert r["tokens_per_s"] == 14.001 and r["repack"] is False and r["command"].endswith("--no-repack")
    assert "exited with -11" in r["first_attempt_error"]
    fake_tool(tmp_path / "llama-speculative-simple", "import sys; sys.exit(2)")
    r = native_ref.llama_speculative_or_error(tmp_path, tmp_path / "t", tmp_path / "d", "p", 2, 128, 4)
    assert "exited with 2" in r["error"] and "tokens_per_s" not in r
    fake_tool(tmp_path / "llama-speculative-simple", SPECULATIVE)
    r = native_ref.llama_speculative_or_error(tmp_path, tmp_path / "t", tmp_path / "d", "p", 2, 128, 4)
    assert r["repack"] is True and "first_attempt_error" not in r


def test_a_failing_or_missing_llama_cpp_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no llama-bench"):
        native_ref.find_llama_cpp(tmp_path)
    fake_tool(tmp_path / "llama-bench", "import sys; print('bad model', file=sys.stderr); sys.exit(3)")
    with pytest.raises(RuntimeError, match="exited with 3: bad model"):
        native_ref.llama_bench(tmp_path, tmp_path / "m.gguf", threads=1, cpus=None, n_gen=8)
    fake_tool(tmp_path / "llama-speculative-simple", "print('no summary')")
    with pytest.raises(RuntimeError, match="no 'decoded N tokens' line"):
        native_ref.llama_speculative(tmp_path, tmp_path / "t", tmp_path / "d", "p", 1, 8, 4)
    fake_tool(tmp_path / "llama-bench", "import time; time.sleep(30)")
    with pytest.raises(RuntimeError, match="ran past 1 s"):
        native_ref.llama_bench(tmp_path, tmp_path / "m.gguf", threads=1, cpus=None, n_gen=8, timeout_s=1)


@pytest.mark.parametrize("fmt", ["int8_vnni", "int4_vnni"])
def test_engine_bytes_per_token_of_the_integer_formats(fmt):
    """int4_vnni's nibbles, steps and offsets, with the lm_head kept at int8_vnni; widths of 128 so that no row
    is padded (the embedded models' widths are multiples of 128 too)."""
    from s2t import kernels

    if not kernels.cpu_has_avx512_vnni():
        pytest.skip("int4_vnni needs AVX-512 VNNI")
    model = make_tiny_model(seed=1, dtype=torch.bfloat16, layers=2, hidden=128)
    config = qwen_config(model)
    small = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 1)
    row = model.model.embed_tokens.weight[0]
    apply_plan(model, FormatPlan.uniform(fmt))
    held = [next(iter(m.weights.values())) for m in model.modules() if isinstance(m, FormattedLinear)]
    assert model.lm_head.plan.formats[0] == "int8_vnni"
    matrices = sum(t.numel() * t.element_size() for parts in held for t in parts if isinstance(t, torch.Tensor))
    assert native_ref.engine_bytes_per_token(config, fmt) == matrices + small + row.numel() * row.element_size()
