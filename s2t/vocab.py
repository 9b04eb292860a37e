"""Model identity: which vocabulary and which weights a model has.

S2T compares candidate token ids across two models, so their tokenizers must agree (`vocab_hash`). The
selection log is training data for the SLM that drafted it, so every record names the weights of the models
involved (`weights_sha256`): distill refuses logs of another SLM, and a log can be traced to the exact
selector that labelled it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from .model_store import MANIFEST

log = logging.getLogger(__name__)

WEIGHTS_HASH_KEY = "weights_sha256"  # the manifest key the weights hash is cached under


def vocab_hash(tokenizer) -> str:
    """sha256 over the token->id map and the special tokens, independent of dict order.

    Two tokenizers with the same hash map every id to the same string, which is what S2T needs: the
    selector reads its probabilities at the worker's candidate ids.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def vocab_hash_of_dir(path: Path) -> str:
    from transformers import AutoTokenizer

    return vocab_hash(AutoTokenizer.from_pretrained(str(path)))


def weight_files(model_dir: Path) -> list[Path]:
    """The files holding a model directory's weights: its *.safetensors files, or its *.bin files when it has
    none (older transformers checkpoints), sorted by name."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    return files or sorted(p for p in model_dir.glob("*.bin") if p.is_file())


def hash_weight_files(model_dir: Path) -> str:
    """sha256 over the weight files, streamed in name order. Each file is framed by its name and size, so
    moving bytes from one shard to the next changes the hash."""
    files = weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors (or *.bin) weight files to hash")
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()


def weights_sha256(model_dir: Path) -> str:
    """The model's weights hash (`hash_weight_files`), cached in the directory's s2t-manifest.json.

    Directories with a manifest are written once by `fetch_model` and never changed in place, so the hash is
    computed on first use and stored under "weights_sha256" (a 1 GB model is read once, not at every start).
    Directories without a manifest (a local checkpoint that may be retrained in place) are hashed every time.
    A read-only cache still gets the right hash, just not cached.
    """
    model_dir = Path(model_dir)
    manifest_path = model_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        return hash_weight_files(model_dir)
    cached = manifest.get(WEIGHTS_HASH_KEY)
    if isinstance(cached, str) and cached:
        return cached
    digest = hash_weight_files(model_dir)
    manifest[WEIGHTS_HASH_KEY] = digest
    # Rewritten atomically: a concurrent reader sees the old or the new manifest, never half of one; two
    # processes racing here write the same value.
    tmp = manifest_path.with_name(f"{manifest_path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, manifest_path)
    except OSError as e:
        log.warning("could not cache the weights hash in %s: %s", manifest_path, e)
        with contextlib.suppress(OSError):
            tmp.unlink()
    return digest
