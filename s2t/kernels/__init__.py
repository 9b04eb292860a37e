"""The project's own CPU kernels, compiled on first use with torch's extension builder (ninja + the system C++
compiler) and cached under torch's extensions directory (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), so later processes load them in a fraction of a second.

Six builds of four kernels, serving four weight formats (s2t/weight_formats.py):
- `int8_linear` (int8_gemv.cpp): weight-only int8 matrix-vector products for decode steps on x86 CPUs with
  AVX2 and FMA, the format `int8_avx2`;
- `int8_vnni_linear` (int8_vnni.cpp): int8 weights times activations quantised to int8 per block of 128
  inputs, the format `int8_vnni`, built twice from one source: with AVX-512 VNNI's integer dot products where
  the CPU has them, else with AVX2's (`vpmaddubsw`). The two give bit-identical outputs, so the format means
  the same numbers on either kind of machine; `S2T_INT8_VNNI_KERNEL=avx2` makes a VNNI machine use the AVX2
  build (to measure it), `avx512_vnni` refuses the fallback;
- `int4_vnni_linear` (int4_vnni.cpp): 4-bit weights on an affine grid per 32 inputs times the same int8
  activations, the format `int4_vnni`, built twice the same way (AVX-512 VNNI, else AVX2 with F16C; the two
  bit-identical); `S2T_INT4_VNNI_KERNEL` picks a build as `S2T_INT8_VNNI_KERNEL` does for int8_vnni.
- `int8_amx_linear` (int8_amx.cpp): int8_vnni's weights and activations on AMX tiles (Xeons since Sapphire
  Rapids), the format `int8_amx`: 16 weight rows times 16 activation rows per instruction, so a forward of
  a few to a few dozen rows costs about what one row does;
Activation quantisation is shared (act_quant.h), and so is the AMX tile state (amx_tiles.h, with the bench probe bench/kernels/amx_b_layout.cpp).
One more build serves no weight format: `decode_ops` (decode_ops.cpp, AVX2 and FMA), the small float32
operations of a one-sequence decode step (residual add + RMSNorm, rotary + cache write + attention, silu * up) as
one call each, for `Engine._decode_compiled`; `load_decode_ops()` returns the module or None.
A machine without the instructions, a compiler or ninja simply lacks that format: `load_int8_linear()` /
`load_int8_vnni_linear()` return None and `unavailable_reason(name)` says why, and the other formats work
as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_lock = threading.Lock()
# per kernel: "fn" -> the compiled function, or "error" -> why it is unavailable
_loaded: dict[str, dict[str, object]] = {}


def cpu_has_avx2() -> bool:
    """torch's own dispatch level: AVX2 or AVX512 means the AVX2 + FMA instructions the kernel uses exist."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


_VNNI_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere: those kernels are then not offered)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_avx512_vnni() -> bool:
    """AVX-512 F/BW/VL and VNNI (Intel since Cascade Lake, AMD since Zen 4): the int8_vnni kernel's instructions.
    torch's dispatch level does not say (AVX512 without VNNI exists), so the kernel asks the OS."""
    return all(f in cpu_flags() for f in _VNNI_FLAGS)


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


@dataclasses.dataclass(frozen=True)
class _Kernel:
    format: str  # the weight format it serves
    module: str  # torch extension name (its build directory)
    source: str
    function: str
    flags: tuple[str, ...]
    requires: str  # said when the CPU lacks the instructions
    headers: tuple[str, ...] = ()  # included files: their hash goes into the flags, so an edit rebuilds


# -fopenmp: at::parallel_for is OpenMP in torch's CPU wheel
_AVX2 = ("-O3", "-mavx2", "-mfma", "-fopenmp")
_AVX2_F16C = (*_AVX2, "-mf16c")  # float16 steps converted in registers (every AVX2 CPU has F16C in practice)
_AVX512_VNNI = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c", "-fopenmp")
_AMX_INT8 = (*_AVX512_VNNI, "-mamx-tile", "-mamx-int8")
# by kernel name: two builds serve int8_vnni and two int4_vnni (_BUILDS orders them)
_KERNELS = {
    "int8_avx2": _Kernel("int8_avx2", "s2t_int8_gemv", "int8_gemv.cpp", "int8_linear", _AVX2, "AVX2 and FMA"),
    "int8_vnni": _Kernel("int8_vnni", "s2t_int8_vnni", "int8_vnni.cpp", "int8_vnni_linear", _AVX512_VNNI,
                         "AVX-512 (F, BW, VL) with VNNI", ("act_quant.h", "int8_args.h", "prefetch.h")),
    "int8_vnni_avx2": _Kernel("int8_vnni", "s2t_int8_vnni_avx2", "int8_vnni.cpp", "int8_vnni_linear", _AVX2,
                              "AVX2 and FMA", ("act_quant.h", "int8_args.h", "prefetch.h")),
    "int4_vnni": _Kernel("int4_vnni", "s2t_int4_vnni", "int4_vnni.cpp", "int4_vnni_linear", _AVX512_VNNI,
                         "AVX-512 (F, BW, VL) with VNNI", ("act_quant.h", "prefetch.h")),
    "int4_vnni_avx2": _Kernel("int4_vnni", "s2t_int4_vnni_avx2", "int4_vnni.cpp", "int4_vnni_linear", _AVX2_F16C,
                              "AVX2, FMA and F16C", ("act_quant.h", "prefetch.h")),
    "int8_amx": _Kernel("int8_amx", "s2t_int8_amx", "int8_amx.cpp", "int8_amx_linear", _AMX_INT8,
                        "AMX (tile, int8) and AVX-512 VNNI", ("act_quant.h", "amx_tiles.h", "int8_args.h")),
    # not a weight format: the batch-1 decode step's small operations (function "": the module itself)
    "decode_ops": _Kernel("decode_ops", "s2t_decode_ops", "decode_ops.cpp", "", _AVX2, "AVX2 and FMA"),
}
# the formats with two builds: the variable that may narrow the choice, and what it may say -> the kernels
# it allows, best first
_BUILDS = {
    "int8_vnni": ("S2T_INT8_VNNI_KERNEL", {"auto": ("int8_vnni", "int8_vnni_avx2"), "avx512_vnni": ("int8_vnni",),
                                           "avx2": ("int8_vnni_avx2",)}),
    "int4_vnni": ("S2T_INT4_VNNI_KERNEL", {"auto": ("int4_vnni", "int4_vnni_avx2"), "avx512_vnni": ("int4_vnni",),
                                           "avx2": ("int4_vnni_avx2",)}),
}


_AMX_FLAGS = ("amx_tile", "amx_int8")


def _needs_vnni(kernel: str) -> bool:
    return _KERNELS[kernel].flags in (_AVX512_VNNI, _AMX_INT8)


def _needs_amx(kernel: str) -> bool:
    return _KERNELS[kernel].flags == _AMX_INT8


def _needs_f16c(kernel: str) -> bool:
    return "-mf16c" in _KERNELS[kernel].flags and not _needs_vnni(kernel)


def _lacks_f16c() -> bool:
    flags = cpu_flags()
    return bool(flags) and "f16c" not in flags  # unreadable flags: trust torch's AVX2 (which implies it in practice)


def _cpu_supports(kernel: str) -> bool:
    if _needs_amx(kernel):
        return cpu_has_avx512_vnni() and all(f in cpu_flags() for f in _AMX_FLAGS)
    if _needs_vnni(kernel):
        return cpu_has_avx512_vnni()
    return cpu_has_avx2() and not (_needs_f16c(kernel) and _lacks_f16c())


def _missing_instructions(kernel: str) -> str:
    if _needs_vnni(kernel):
        wanted = _VNNI_FLAGS + (_AMX_FLAGS if _needs_amx(kernel) else ())
        return f"this CPU's flags lack {', '.join(f for f in wanted if f not in cpu_flags())}"
    if cpu_has_avx2() and _needs_f16c(kernel):
        return "this CPU's flags lack f16c"
    return f"torch reports this CPU as {torch.backends.cpu.get_cpu_capability()}"


def _build(kernel: _Kernel) -> Callable:
    from torch.utils.cpp_extension import load

    _ensure_ninja_on_path()
    _clear_stale_lock(kernel.module)
    # torch's builder decides whether to rebuild from the sources and flags, not from what they include
    digest = hashlib.sha256(b"".join((_HERE / h).read_bytes() for h in kernel.headers)).hexdigest()[:16]
    headers = [f"-DS2T_HEADERS_SHA256={digest}"] if kernel.headers else []
    module = load(name=kernel.module, sources=[str(_HERE / kernel.source)],
                  extra_cflags=[*kernel.flags, *headers], extra_ldflags=["-fopenmp"], verbose=False)
    # a module may need more than instructions: the AMX one needs Linux to grant the process the tile state
    # (kernels before 5.16, or a hypervisor that hides it, do not) and says so through `ready()`
    ready = getattr(module, "ready", None)
    if ready is not None and not ready():
        raise RuntimeError(f"{kernel.source} was built, but Linux did not grant this process the state its "
                           "instructions need (AMX tiles: arch_prctl ARCH_REQ_XCOMP_PERM)")
    return getattr(module, kernel.function) if kernel.function else module


def load_kernel(name: str) -> Callable | None:
    """The compiled kernel `name` (a key of _KERNELS), or None where it cannot exist here. Builds at most once
    per process (a minute the first time on a 2-core machine, then a cached load); thread-safe, and torch's
    builder locks its directory across processes."""
    state = _loaded.get(name)
    if state is not None and "fn" in state:  # every decode-step call after the first: no lock
        return state["fn"]  # type: ignore[return-value]
    with _lock:
        state = _loaded.setdefault(name, {})
        if "fn" in state or "error" in state:
            return state.get("fn")  # type: ignore[return-value]
        kernel = _KERNELS[name]
        if not _cpu_supports(name):
            state["error"] = f"the {name} kernel needs {kernel.requires}; {_missing_instructions(name)}"
            return None
        try:
            state["fn"] = _build(kernel)
        except Exception as e:  # no compiler, no ninja, a read-only cache: the format is just not offered
            detail = str(e).strip()[-600:]  # a compiler's output can run to pages; its end says what failed
            state["error"] = f"the {name} kernel could not be built: {type(e).__name__}: {detail}"
            what = f"weight format {kernel.format}" if kernel.function else "the compiled decode step"
            log.warning("%s; %s unavailable", state["error"], what)
            return None
        return state["fn"]  # type: ignore[return-value]


def _build_choices(fmt: str) -> tuple[str, ...]:
    """The kernels that may serve `fmt`, best first: both builds, or the one its variable names."""
    variable, choices = _BUILDS[fmt]
    choice = os.environ.get(variable, "auto").strip() or "auto"
    if choice not in choices:
        raise ValueError(f"{variable}={choice!r}: expected one of {', '.join(choices)}")
    return choices[choice]


def kernel_for(fmt: str) -> str | None:
    """Which kernel serves `fmt` (int8_vnni or int4_vnni) here: its AVX-512 VNNI build (the kernel named like
    the format), its AVX2 build (`<format>_avx2`), or None."""
    for name in _build_choices(fmt):
        if load_kernel(name) is not None:
            return name
    return None


def int8_vnni_kernel() -> str | None:
    """Which kernel serves the int8_vnni format here: "int8_vnni" (AVX-512 VNNI), "int8_vnni_avx2", or None."""
    return kernel_for("int8_vnni")


def load_int8_linear() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """`int8_linear(x fp32 [M, K], q int8 [N, K], scale fp32 [N]) -> fp32 [M, N]`, or None where it cannot exist."""
    return load_kernel("int8_avx2")


def load_int8_vnni_linear() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor] | None:
    """`int8_vnni_linear(x fp32 [M, K], u uint8 [N, Kp], scale fp32 [N], K) -> fp32 [M, N]` (u = q + 128, rows
    zero-padded to Kp, a multiple of 128), or None where it cannot exist: the AVX-512 VNNI build where the CPU
    has it, else the AVX2 build (S2T_INT8_VNNI_KERNEL narrows the choice)."""
    name = kernel_for("int8_vnni")
    return None if name is None else load_kernel(name)


def load_int8_amx_linear() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor] | None:
    """`int8_amx_linear(x, u, scale, K)`: int8_vnni_linear's arguments and numbers (to float rounding) on AMX
    tiles, or None where the CPU lacks AMX or Linux does not grant it."""
    return load_kernel("int8_amx")


def load_int4_vnni_linear() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int],
                                        torch.Tensor] | None:
    """`int4_vnni_linear(x fp32 [M, K], w uint8 [N, Kp / 2], d fp16 [N, Kp / 32], mn fp16 [N, Kp / 32], K) -> fp32
    [M, N]` (4-bit weights as nibbles on an affine grid d * u + mn per 32 inputs; s2t.weight_formats.int4_weight),
    or None where it cannot exist: the AVX-512 VNNI build where the CPU has it, else the AVX2 build
    (S2T_INT4_VNNI_KERNEL narrows the choice)."""
    name = kernel_for("int4_vnni")
    return None if name is None else load_kernel(name)


def load_decode_ops():
    """The one-sequence decode step's fused small operations (decode_ops.cpp: `add_rms_norm`, `rope_attend`,
    `silu_mul`, float32), or None where they cannot be built (then the step runs them as torch operations).
    S2T_DECODE_OPS=0 turns them off (to measure what they save)."""
    if os.environ.get("S2T_DECODE_OPS", "1").strip() == "0":
        return None
    return load_kernel("decode_ops")


def unavailable_reason(fmt: str = "int8_avx2") -> str | None:
    """Why the kernel of format `fmt` is None (None if it has not been tried or succeeded); for a format with two
    builds, the reasons of every build it was allowed to use."""
    names = _build_choices(fmt) if fmt in _BUILDS else (fmt,)
    reasons = [_loaded.get(n, {}).get("error") for n in names]
    if any(r is None for r in reasons):
        return None
    return "; ".join(reasons)  # type: ignore[arg-type]
