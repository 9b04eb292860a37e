"""Shared by the kernel tests (test_kernels.py, test_kernel_vnni.py, test_kernel_int4.py): random int8 weights
with scales, a thread count held for a block, the markers and fixture parameters of a format's two builds,
and the activation rounding of the integer kernels in float64."""

from __future__ import annotations

import contextlib

import pytest
import torch

from s2t import kernels
from s2t.weight_formats import VNNI_BLOCK

needs_vnni = pytest.mark.skipif(not kernels.cpu_has_avx512_vnni(),
                                reason="the AVX-512 build is for x86 CPUs with AVX-512 VNNI")
needs_avx2 = pytest.mark.skipif(not kernels.cpu_has_avx2(), reason="the AVX2 build is for x86 CPUs with AVX2")
needs_amx = pytest.mark.skipif(not kernels._cpu_supports("int8_amx"),
                               reason="the AMX kernel is for x86 CPUs with AMX (tile, int8) and AVX-512 VNNI")


def builds(fmt: str) -> list:
    """Fixture parameters for both builds of `fmt` (its AVX-512 VNNI kernel and `<fmt>_avx2`), each skipped where
    the CPU lacks its instructions."""
    return [pytest.param(fmt, marks=needs_vnni), pytest.param(f"{fmt}_avx2", marks=needs_avx2)]


def built(name: str):
    """Kernel `name`, built; on a machine with the instructions a missing kernel is a failure, not a skip (no
    compiler or ninja), unless the OS does not grant their state (AMX before Linux 5.16)."""
    fn = kernels.load_kernel(name)
    error = kernels._loaded.get(name, {}).get("error", "")
    if fn is None and "did not grant" in error:  # the CPU has the instructions, the OS withholds their state
        pytest.skip(error)
    assert fn is not None, error
    return fn


def quantised_rows(x: torch.Tensor) -> torch.Tensor:
    """The kernels' activation rounding, in float64: per row and block of 128 inputs (the last block holds what is
    left), scale = max |x| / 127 in float32, round half to even, clamp to +-127; returns the dequantised rows."""
    m, k = x.shape
    out = torch.empty(m, k, dtype=torch.float64)
    for k0 in range(0, k, VNNI_BLOCK):
        blk = x[:, k0:k0 + VNNI_BLOCK].float()
        amax = blk.abs().amax(1, keepdim=True)
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        out[:, k0:k0 + VNNI_BLOCK] = torch.round(blk * (1 / s)).clamp(-127, 127).double() * s.double()
    return out


def quantised(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights [n, k] over the whole range the formats use (+-127) and positive per-row scales [n]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    return q, scale


@contextlib.contextmanager
def threads(count: int):
    """torch's intra-op thread count set to `count` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
