"""The project's own CPU kernels, compiled on first use with torch's extension builder (ninja + the system C++
compiler) and cached under torch's extensions directory (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), so later processes load them in a fraction of a second.

One kernel today, `int8_linear` (int8_gemv.cpp): weight-only int8 matrix-vector products for decode steps on
x86 CPUs with AVX2 and FMA, the weight format `int8_avx2` (s2t/weight_formats.py). A machine without AVX2, a
compiler or ninja simply lacks that format: `load_int8_linear()` returns None and `unavailable_reason()` says
why, and the other formats work as before.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("int8_gemv.cpp")
_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "fn" -> the kernel, or "error" -> why it is unavailable


def cpu_has_avx2() -> bool:
    """torch's own dispatch level: AVX2 or AVX512 means the AVX2 + FMA instructions the kernel uses exist."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _ensure_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` wheel puts it in the environment's bin directory,
    which is not on PATH when the environment is used without activating it (`.venv/bin/s2t ...`)."""
    try:
        import ninja  # the PyPI wheel, a declared dependency
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


_STALE_LOCK_S = 600  # a build takes about a minute on 2 cores; a lock this old belongs to a killed builder


def _clear_stale_lock(name: str) -> None:
    """torch's builder serialises processes with a lock file in the build directory and waits for it to go
    away, forever: a process killed mid-build (a server stopped during its first start) would hang every
    later start. A lock older than any build can take is removed."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            log.warning("removing %s, left %.0f s ago by a build that did not finish", lock,
                        time.time() - lock.stat().st_mtime)
            lock.unlink(missing_ok=True)
    except (ImportError, OSError):  # a private helper of torch's: without it, torch's own behaviour
        pass


def _build() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    from torch.utils.cpp_extension import load

    _ensure_ninja_on_path()
    _clear_stale_lock("s2t_int8_gemv")
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # -fopenmp: at::parallel_for is OpenMP in torch's CPU wheel
    module = load(name="s2t_int8_gemv", sources=[str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                  verbose=False)
    return module.int8_linear


def load_int8_linear() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The compiled `int8_linear(x fp32 [M, K], q int8 [N, K], scale fp32 [N]) -> fp32 [M, N]`, or None where it
    cannot exist here. Builds at most once per process (a minute the first time on a 2-core machine, then a
    cached load); thread-safe, and torch's builder locks its directory across processes."""
    fn = _loaded.get("fn")
    if fn is not None:  # every decode-step call after the first: no lock
        return fn  # type: ignore[return-value]
    with _lock:
        if "fn" in _loaded or "error" in _loaded:
            return _loaded.get("fn")  # type: ignore[return-value]
        if not cpu_has_avx2():
            _loaded["error"] = (f"the int8_avx2 kernel needs AVX2 and FMA; torch reports this CPU as "
                                f"{torch.backends.cpu.get_cpu_capability()}")
            return None
        try:
            _loaded["fn"] = _build()
        except Exception as e:  # no compiler, no ninja, a read-only cache: the format is just not offered
            detail = str(e).strip()[-600:]  # a compiler's output can run to pages; its end says what failed
            _loaded["error"] = f"the int8_avx2 kernel could not be built: {type(e).__name__}: {detail}"
            log.warning("%s; weight format int8_avx2 unavailable", _loaded["error"])
            return None
        return _loaded["fn"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why load_int8_linear() returned None (None if it has not been tried or succeeded)."""
    return _loaded.get("error")  # type: ignore[return-value]
