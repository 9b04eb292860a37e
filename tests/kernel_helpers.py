"""Shared by the kernel tests (test_kernels.py, test_kernel_vnni.py): random int8 weights with scales, and a
thread count held for a block."""

from __future__ import annotations

import contextlib

import torch


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
