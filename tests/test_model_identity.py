"""s2t.vocab.weights_sha256: a model's weights by hash, cached in its manifest, filled in by load_model."""

import hashlib
import json

import pytest

import s2t.vocab as vocab
from s2t.model_store import MANIFEST
from s2t.vocab import weights_sha256


def reference_hash(files):
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def test_hash_covers_every_safetensors_shard_in_name_order(tmp_path):
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"second shard")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"first shard")
    (tmp_path / "config.json").write_text("{}")  # not weights: not hashed
    got = weights_sha256(tmp_path)
    assert got == reference_hash(list(tmp_path.glob("*.safetensors")))
    (tmp_path / "config.json").write_text('{"x": 1}')
    assert weights_sha256(tmp_path) == got
    # moving a byte across the shard boundary changes the hash (each shard is framed by name and size)
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"first shards")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"econd shard")
    assert weights_sha256(tmp_path) != got
    assert not (tmp_path / MANIFEST).exists()  # no manifest: nothing cached, nothing created


def test_hash_is_cached_in_the_manifest_and_read_back(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / MANIFEST).write_text(json.dumps({"name": "m", "vocab_sha256": "v"}))
    digest = weights_sha256(tmp_path)
    assert digest == reference_hash([tmp_path / "model.safetensors"])
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest == {"name": "m", "vocab_sha256": "v", "weights_sha256": digest}

    def rehash(_dir):
        raise AssertionError("a model with a cached hash must not be read again")

    monkeypatch.setattr(vocab, "hash_weight_files", rehash)
    assert weights_sha256(tmp_path) == digest


def test_a_directory_without_weights_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        weights_sha256(tmp_path)


def test_load_model_fills_in_the_weights_hash(tiny_pair):
    from s2t.runtime import load_model

    slm_dir, llm_dir = tiny_pair
    lm = load_model(str(llm_dir), llm_dir.parent, "native")
    assert lm.weights_sha256 == reference_hash(list(llm_dir.glob("*.safetensors")))
    assert lm.weights_sha256 != weights_sha256(slm_dir)
