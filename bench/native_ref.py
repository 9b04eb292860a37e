"""What the box could do otherwise, measured in the same run as the project's rows (issue #14): llama.cpp on the
project's own GGUF files, and a plain streaming read of memory (how far both are from the physical limit).

llama.cpp is not a dependency of the project: the benchmark uses a build the user points it at (--llama-cpp DIR,
the folder holding `llama-bench` and `llama-speculative-simple`). bench/build_llama_cpp.sh builds one from the
llama-cpp-python sdist with native flags. The GGUF files are the pinned, verified ones the model store
assembles (s2t.model_store.fetch_gguf), so both engines read the same weights.

Bytes per token: every weight matrix is read once per decode step at batch 1, so
  - for llama.cpp it is the GGUF file's tensor data (Qwen2.5 0.5B and 1.5B tie the output matrix to the token
    embeddings, so that table is read in full every step; the file's metadata is a few MB and counted too, an
    overestimate under 1 %), and
  - for the project's engine it is what `engine_bytes_per_token` computes from the model's config and the
    weight format its plan uses for one row (the lm_head is a separate matrix there: the loader unties it).
Both leave out the KV cache (a few MB at these lengths). GB/s = bytes per token × tokens/s.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9  # bandwidths and bytes per token in decimal GB, as memory bandwidth is usually quoted
GIB = 1 << 30

# Bytes per stored weight element of each format at decode time; int8 adds a bf16 scale per output row,
# int8_avx2, int8_vnni and int8_amx an fp32 one (int8_vnni's and int8_amx's rows are padded to a multiple of
# 128 inputs, which the embedded models' widths already are).
FORMAT_ELEMENT_BYTES = {"bf16": 2, "fp32": 4, "fp32_packed": 4, "int8": 1, "int8_avx2": 1, "int8_vnni": 1,
                        "int8_amx": 1,
                        "int4_vnni": 0.5 + 4 / 32}  # int4_vnni: a nibble, and a float16 step and offset per 32 inputs
FORMAT_ROW_SCALE_BYTES = {"int8": 2, "int8_avx2": 4, "int8_vnni": 4, "int8_amx": 4}


DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


def linear_shapes(config: dict) -> list[tuple[int, int]]:
    """(out, in) of every linear layer a Qwen2-style model runs per decode step: q, k, v, o, gate, up, down of
    each layer, then the lm_head (a matrix of its own in the engine even where the checkpoint ties it)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads) * config.get("head_dim", h // heads)
    q = heads * config.get("head_dim", h // heads)
    return [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)] * layers + [
        (config["vocab_size"], h)]


def engine_bytes_per_token(config: dict, fmt: str) -> int:
    """Weight bytes the project's engine reads per decode step at batch 1: every linear layer in format `fmt`
    (`native`: the checkpoint's dtype), plus the q/k/v biases, the norms and one embedding row in that dtype."""
    stored = DTYPE_BYTES[config.get("torch_dtype") or config.get("dtype") or "bfloat16"]
    shapes = linear_shapes(config)

    def matrix_bytes(out: int, inp: int, f: str) -> float:
        per_elem = stored if f == "native" else FORMAT_ELEMENT_BYTES[f]
        return out * inp * per_elem + out * FORMAT_ROW_SCALE_BYTES.get(f, 0)

    # a 4-bit plan keeps the lm_head (the last shape) at 8 bits (s2t.weight_formats.INT4_KEEP_8BIT)
    head = "int8_vnni" if fmt == "int4_vnni" else fmt
    matrices = round(sum(matrix_bytes(out, inp, fmt) for out, inp in shapes[:-1]) + matrix_bytes(*shapes[-1], head))
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    q_out, kv_out = shapes[0][0], shapes[1][0]
    small = ((q_out + 2 * kv_out) + 2 * h) * layers + h + h  # qkv biases, 2 norms a layer, final norm, a row
    return matrices + small * stored


def one_row_format(weight_formats: str) -> str:
    """The format of the 1-row bucket: from a plan as configured (`int8,int8,...`) or as described
    (`1-1 rows: int8; 2-4 rows: ...`)."""
    described = re.match(r"\s*1-1 rows:\s*(\w+)", weight_formats)
    return described.group(1) if described else weight_formats.split(",")[0].strip()


# ---- a streaming read ---------------------------------------------------------------------------------------

STREAM_CODE = """
import json, sys, time, torch
threads, gib, repeats = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
x.sum()
best = min((lambda t0: (x.sum(), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(repeats))
print(json.dumps({"bytes": x.numel() * 4, "best_s": best}))
"""


def stream_read(threads: int, cpus: tuple[int, ...] | None, gib: float = 1.0, repeats: int = 7) -> dict:
    """GB/s of summing a `gib` GiB float32 tensor (a pure streaming read) with `threads` torch threads, in a fresh
    process (pinned to `cpus` when given); the best of `repeats`."""
    pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
    out = subprocess.run([*pin, sys.executable, "-c", STREAM_CODE, str(threads), str(gib), str(repeats)],
                         capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    return {"threads": threads, "cpus": list(cpus) if cpus else "all", "bytes": m["bytes"],
            "gb_per_s": round(m["bytes"] / m["best_s"] / GB, 2),
            "method": f"torch float32 sum over {gib:g} GiB, best of {repeats}"}


# ---- llama.cpp ----------------------------------------------------------------------------------------------


def run_measured(cmd: list[str], timeout_s: float) -> tuple[str, str, int, float]:
    """Run a command; its stdout, stderr, peak RSS in bytes (its own ru_maxrss, from wait4) and wall seconds."""
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # reaps the child: Popen must not wait on it again
        finally:
            timer.cancel()
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if wall >= timeout_s:
        raise RuntimeError(f"{cmd[0]} ran past {timeout_s:.0f} s and was killed")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {stderr[-2000:]}")
    return stdout, stderr, usage.ru_maxrss * 1024, wall


def llama_bench(bin_dir: Path, gguf: Path, threads: int, cpus: tuple[int, ...] | None, n_gen: int,
                repeats: int = 3, timeout_s: float = 900) -> dict:
    """llama.cpp's own decode benchmark (`llama-bench -p 0 -n N`, batch 1, tg<N>) on a GGUF: mean and sd of its
    repeats' tokens/s."""
    pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
    cmd = [*pin, str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(n_gen), "-t", str(threads),
           "-r", str(repeats), "-o", "json"]
    out, _, peak, wall = run_measured(cmd, timeout_s)
    results = json.loads(out)
    if len(results) != 1:
        raise RuntimeError(f"llama-bench printed {len(results)} results, expected 1")
    r = results[0]
    return {"tokens_per_s": r["avg_ts"], "tokens_per_s_sd": r["stddev_ts"], "samples_ts": r.get("samples_ts"),
            "n_gen": r["n_gen"], "threads": threads, "repeats": repeats, "wall_s": round(wall, 1),
            "peak_rss_gb": round(peak / GIB, 3),
            "command": " ".join(cmd[len(pin):]), "build": r.get("build_commit"), "cpu_info": r.get("cpu_info")}


_SPEC_DECODED = re.compile(r"decoded\s+(\d+)\s+tokens\s+in\s+([\d.]+)\s+seconds,\s+speed:\s+([\d.]+)\s+t/s")
_SPEC_ACCEPT = re.compile(r"accept\s*=\s*([\d.]+)%")


def llama_speculative(bin_dir: Path, target: Path, draft: Path, prompt: str, threads: int, n_gen: int,
                      draft_max: int, timeout_s: float = 900, repack: bool = True) -> dict:
    """llama.cpp's speculative decoding (`llama-speculative-simple`): the draft GGUF proposes up to draft_max
    tokens, the target verifies, greedy; tokens/s and acceptance as it reports them. repack=False passes
    --no-repack (weights stay in the GGUF's layout: no AMX / repacked CPU buffers)."""
    cmd = [str(bin_dir / "llama-speculative-simple"), "-m", str(target), "-md", str(draft), "-p", prompt,
           "-n", str(n_gen), "-t", str(threads), "-td", str(threads), "--spec-type", "draft-simple",
           "--spec-draft-n-max", str(draft_max), "--temp", "0", "-c", "4096", *([] if repack else ["--no-repack"])]
    out, err, peak, wall = run_measured(cmd, timeout_s)
    text = out + err
    decoded = _SPEC_DECODED.search(text)
    if not decoded:
        raise RuntimeError(f"llama-speculative-simple: no 'decoded N tokens' line in its output: {text[-2000:]}")
    accept = _SPEC_ACCEPT.search(text)
    return {"tokens": int(decoded.group(1)), "seconds": float(decoded.group(2)),
            "tokens_per_s": float(decoded.group(3)), "accept_percent": float(accept.group(1)) if accept else None,
            "draft_max": draft_max, "threads": threads, "repack": repack, "wall_s": round(wall, 1),
            "peak_rss_gb": round(peak / GIB, 3),
            "command": " ".join(cmd[:6] + ["<prompt>"] + cmd[7:])}


def llama_speculative_or_error(bin_dir: Path, target: Path, draft: Path, prompt: str, threads: int, n_gen: int,
                               draft_max: int, timeout_s: float = 900) -> dict:
    """llama_speculative, once more with --no-repack if it fails, and a row with `error` if that fails too: a
    reference row that cannot run must not stop the benchmark around it. Seen on a 2-core Sapphire Rapids
    Xeon: llama.cpp 0.3.36's AMX matmul on the repacked weights crashed (SIGSEGV, in
    ggml_backend_amx_mul_mat) under llama-speculative-simple; llama-bench ran."""
    args = (bin_dir, target, draft, prompt, threads, n_gen, draft_max, timeout_s)
    try:
        return llama_speculative(*args)
    except RuntimeError as e:
        first = str(e)[-500:]
    try:
        return {**llama_speculative(*args, repack=False), "first_attempt_error": first}
    except RuntimeError as e:
        return {"error": str(e)[-500:], "first_attempt_error": first, "draft_max": draft_max, "threads": threads}


def find_llama_cpp(path: Path) -> Path:
    """The folder holding llama-bench (a build folder's bin/ is looked into too)."""
    for candidate in (path, path / "bin", path / "build" / "bin"):
        if (candidate / "llama-bench").is_file() and os.access(candidate / "llama-bench", os.X_OK):
            return candidate
    raise FileNotFoundError(f"no llama-bench under {path} (nor its bin/ or build/bin/); "
                            "bench/build_llama_cpp.sh builds one")
