"""A selector's short forwards on a GPU as replays of captured CUDA graphs, over a preallocated KV pool.

On a GPU the selector's forwards are bound by the host, not the device: a Select of 8 new tokens on the 1.5B's
shape kept an H200 busy 8.7 ms of the ~38 it took (bench/results/gpu-forward-probe-h200.md), the rest being
Python launching a few dozen small kernels per layer. A CUDA graph replays the whole launch sequence in one call.
A graph reads and writes fixed addresses, so:

- every sequence that uses the graphs keeps its keys/values in a *slot* of one pool tensor per layer
  ([slots + 1, kv heads, max_len, head dim]; the last slot is scratch for a batch's padding rows), and a graph
  takes the slots it works on as an index tensor;
- the shapes are bucketed: sequences per forward (BATCHES), new tokens per sequence (WIDTHS) and keys attended
  (powers of two up to max_len); a forward is padded up to its bucket, and each bucket's graph is captured on
  first use and replayed after.

A forward that fits no bucket (a prefill, a sequence past max_len, more sequences than the largest batch, a
sequence without a slot) takes the engine's ordinary path; a pooled cache works there too (its per-layer
tensors are views of its slot). The graphs compute what Engine._decode_one does, for [batch, width] queries:
tests/test_cuda_graphs.py checks them against the ordinary path (eagerly on the CPU; captured on a GPU).
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch
from torch.nn.attention import sdpa_kernel

from s2t.runtime import KVCache

log = logging.getLogger(__name__)

BATCHES = (1, 2, 4, 8, 16, 32, 64)  # sequences per graphed forward, padded up to the next of these
WIDTHS = (1, 2, 4, 8, 16)  # new tokens per sequence (a Select block), padded up to the next of these
MIN_KEYS = 256  # the smallest bucket of keys attended; then powers of two up to the pool's max_len


class KVPool:
    """Keys and values of up to `slots` sequences of at most `max_len` tokens each, one tensor per layer and kind.

    Invariant: a slot index is either in `free` or held by exactly one live PooledKVCache; the scratch slot
    (index `slots`) is never handed out, and only padding rows of a graphed forward write to it."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, slots: int, max_len: int):
        if slots < 1 or max_len < 1:
            raise ValueError(f"a KV pool needs at least one slot of at least one token, not {slots} × {max_len}")
        shape = (slots + 1, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.max_len, self.scratch = slots, max_len, slots
        self.free = list(range(slots - 1, -1, -1))  # taken from the end: slot 0 first
        self.slot_bytes = self.slot_size(num_layers, num_kv_heads, head_dim, dtype, max_len)

    @staticmethod
    def slot_size(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, max_len: int) -> int:
        """Bytes of one slot: the keys and values of max_len tokens in every layer."""
        return 2 * num_layers * num_kv_heads * max_len * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.slot_bytes * (self.slots + 1)

    def take(self) -> int | None:
        return self.free.pop() if self.free else None

    def give(self, slot: int) -> None:
        self.free.append(slot)


class PooledKVCache(KVCache):
    """A KVCache whose per-layer tensors are views of one slot of a KVPool: room for the pool's max_len tokens,
    which a graphed forward reads and writes by slot index. Growing past max_len moves it to buffers of its own
    (and gives the slot back); so does nothing else. The slot returns to the pool when the cache is collected."""

    __slots__ = ("pool", "slot", "_release", "__weakref__")

    def __init__(self, pool: KVPool, slot: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__(num_layers, num_kv_heads, head_dim, dtype, device=device)
        self.pool: KVPool | None = pool
        self.slot: int | None = slot
        self.keys = [k[slot] for k in pool.keys]
        self.values = [v[slot] for v in pool.values]
        self.capacity = pool.max_len
        self._release = weakref.finalize(self, pool.give, slot)

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        # past the slot's room: the same tokens in growable buffers of this cache's own, then free the slot
        keys, values, length = self.keys, self.values, self.length
        self.keys, self.values, self.capacity = [], [], 0
        super().reserve(total)
        for src, dst in ((keys, self.keys), (values, self.values)):
            for s, d in zip(src, dst):
                d[:, :length] = s[:, :length]
        self.slot = self.pool = None
        self._release()

    @property
    def nbytes(self) -> int:
        # a slot holds its max_len tokens' memory whatever the length; what the session store budgets
        return self.pool.slot_bytes if self.pool is not None else super().nbytes


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if n <= b), None)


class GraphedForward:
    """Engine.forward for up to BATCHES[-1] pooled sequences of up to WIDTHS[-1] new tokens each, as one replay
    of a graph captured for its bucket (`capture`; a CUDA device), or the same computation run eagerly (on any
    device: what the tests compare with the ordinary path)."""

    def __init__(self, engine, pool: KVPool, capture: bool):
        if capture and engine.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.engine, self.pool, self.capture = engine, pool, capture
        keys, length = [], MIN_KEYS
        while length < pool.max_len:
            keys.append(length)
            length *= 2
        self.key_buckets = (*keys, pool.max_len)
        # per (batch, width, keys) bucket: (graph or None, its packed input [batch, 2 * width + 1], its output)
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph | None, torch.Tensor, torch.Tensor]] = {}
        self._mempool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0

    def accepts(self, caches: list[KVCache], counts: list[int]) -> bool:
        if not counts:
            return False
        width = _bucket(max(counts), WIDTHS)
        return (width is not None and len(caches) <= BATCHES[-1]
                and all(isinstance(c, PooledKVCache) and c.pool is self.pool and c.length + width <= self.pool.max_len
                        for c in caches))

    @torch.inference_mode()
    def forward(self, caches: list[PooledKVCache], tokens: list[list[int]], want: list[list[int]]) -> list[torch.Tensor]:
        """Append tokens[b] to caches[b] (all accepted) and return the logits at offsets want[b], as
        Engine.forward does."""
        counts = [len(t) for t in tokens]
        batch, width = _bucket(len(caches), BATCHES), _bucket(max(counts), WIDTHS)
        starts = [c.length for c in caches]
        keys = _bucket(max(starts) + width, self.key_buckets)
        # One host tensor, copied to the device in one go: per row its tokens, positions and slot. A sequence's
        # padding tokens sit at the positions after its last one (inside its slot, past its length, so they are
        # overwritten before anything reads them); padding rows are the scratch slot's.
        packed = torch.zeros(batch, 2 * width + 1, dtype=torch.long)
        packed[:, width:2 * width] = torch.arange(width)
        packed[:, 2 * width] = self.pool.scratch
        for b, (cache, t, s) in enumerate(zip(caches, tokens, starts)):
            packed[b, :len(t)] = torch.tensor(t, dtype=torch.long)
            packed[b, width:2 * width] += s
            packed[b, 2 * width] = cache.slot
        graph, inputs, out = self._graph(batch, width, keys)
        inputs.copy_(packed, non_blocking=False)
        if graph is not None:
            graph.replay()
            self.replays += 1
        else:
            out = self._body(inputs, width, keys)
        for c, s, n in zip(caches, starts, counts):
            c.length = s + n
        rows = [b for b, w in enumerate(want) for _ in w]
        cols = [i for w in want for i in w]
        engine = self.engine
        if not rows:
            return [engine._no_logits(out.dtype) for _ in caches]
        logits = engine._output_logits(engine.head(out[rows, cols]))
        return list(logits.split([len(w) for w in want]))

    def capture_all(self, max_batch: int) -> int:
        """Make every bucket's graph for forwards of up to `max_batch` sequences now (at start-up), so that no
        request waits for a capture: a first use otherwise costs a capture, ~3 forwards' worth of host time (rounds
        of the 32B's shape took 290-364 ms against medians of 106-195 when their batches split into new sizes,
        bench/results/gpu-selector-grpc-h200.md). Returns how many there are."""
        from s2t.runtime import CUDA_ATTENTION

        top = _bucket(max_batch, BATCHES) or BATCHES[-1]
        with torch.inference_mode(), (sdpa_kernel(CUDA_ATTENTION) if self.capture else contextlib.nullcontext()):
            for batch in (b for b in BATCHES if b <= top):
                for width in WIDTHS:
                    for keys in self.key_buckets:
                        if keys >= width:
                            self._graph(batch, width, keys)
        return len(self._graphs)

    def _graph(self, batch: int, width: int, keys: int):
        key = (batch, width, keys)
        if key not in self._graphs:
            dev = self.engine.device
            inputs = torch.zeros(batch, 2 * width + 1, dtype=torch.long, device=dev)
            inputs[:, width:2 * width] = torch.arange(width, device=dev)
            inputs[:, 2 * width] = self.pool.scratch
            graph = out = None
            if self.capture:
                try:
                    graph, out = self._capture(inputs, width, keys)
                except RuntimeError as e:  # out of memory, say: this bucket runs eagerly, its requests are served
                    log.warning("CUDA graph capture for %d sessions × %d new tokens × %d keys failed; that shape "
                                "runs without a graph: %s", batch, width, keys, e)
                    graph = out = None
            self._graphs[key] = (graph, inputs, out)
        return self._graphs[key]

    def _capture(self, inputs: torch.Tensor, width: int, keys: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (lazy initialisations, kernel selection), then capture (torch's recipe)."""
        dev = self.engine.device
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._body(inputs, width, keys)
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            out = self._body(inputs, width, keys)
        return graph, out

    def _body(self, inputs: torch.Tensor, width: int, kv_len: int) -> torch.Tensor:
        """The decoder over inputs' rows (tokens [B, W], positions [B, W], slot [B]) attending to the first
        kv_len keys of each row's slot, writing the new keys/values into the slots; returns the final norm's
        output [B, W, hidden]. Only device operations on tensors of fixed shapes: capturable."""
        engine, pool, base = self.engine, self.pool, self.engine.base
        ids, positions, slots = inputs[:, :width], inputs[:, width:2 * width], inputs[:, 2 * width]
        batch = ids.shape[0]
        heads, kv_heads, dim = engine.num_heads, engine.num_kv_heads, engine.head_dim
        groups = heads // kv_heads
        hidden = base.embed_tokens(ids)  # [B, W, H]
        cos, sin = base.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, W, D], broadcast over heads
        # Query w of row b sees keys 0..positions[b, w]. The query heads are grouped per key/value head (as in
        # Engine._decode_one), the rows of group g being g * W + w, so the mask repeats per group.
        seen = torch.arange(kv_len, device=ids.device)[None, None, :] <= positions[:, :, None]  # [B, W, kv]
        mask = seen[:, None, None].expand(batch, 1, groups, width, kv_len).reshape(batch, 1, groups * width, kv_len)
        where = (slots[:, None, None], torch.arange(kv_heads, device=ids.device)[None, :, None], positions[:, None, :])
        for i, layer in enumerate(base.layers):
            q, k, v = engine._rotated_qkv(i, layer.input_layernorm(hidden), cos, sin)
            pool.keys[i].index_put_(where, k)  # [B, kv, W, D] at (slot, head, position)
            pool.values[i].index_put_(where, v)
            keys = pool.keys[i][:, :, :kv_len].index_select(0, slots)  # [B, kv, kv_len, D]
            values = pool.values[i][:, :, :kv_len].index_select(0, slots)
            q = q.reshape(batch, kv_heads, groups * width, dim)
            o = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                                 scale=layer.self_attn.scaling)
            hidden = engine._finish_layer(i, hidden, o.reshape(batch, heads, width, dim).transpose(1, 2)
                                          .reshape(batch, width, heads * dim))
        return base.norm(hidden)
