"""Vocabulary identity: S2T compares candidate token ids across two models, so their tokenizers must agree."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


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
