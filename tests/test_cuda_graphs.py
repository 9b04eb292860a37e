"""Graphed forwards over a KV pool (s2t.cuda_graphs; a selector on a GPU): the same logits as the engine's ordinary
path, ragged batches and padding included; slots taken, given back, and left when a sequence outgrows them.
On the CPU the graphs' computation runs eagerly; where torch sees a CUDA device it is captured and replayed
(those tests skip in CI, which has no GPU; they were run on a lent H200)."""

import gc
import random

import pytest
import torch

from s2t import cuda_graphs
from s2t.cuda_graphs import PooledKVCache
from s2t.runtime import Engine, KVCache, load_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device here")


@pytest.fixture(scope="module")
def llm(tiny_pair):
    return load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native")


def _pair(llm, slots=8, max_len=96, device_lm=None, capture=False):
    """(the ordinary engine, an engine over a pool) on the same weights."""
    plain = Engine(llm)
    pooled = Engine(device_lm or llm)
    pooled.use_kv_pool(slots, max_len, capture=capture)
    return plain, pooled


def _same(engines, caches, tokens, want, atol):
    outs = [e.forward(c, tokens, want) for e, c in zip(engines, caches)]
    for a, b in zip(*outs):
        assert b.device.type == "cpu" and b.dtype == a.dtype and b.shape == a.shape
        torch.testing.assert_close(b, a, rtol=0, atol=atol)
    return outs


def _conversation(engines, atol, rng):
    """Prefills, ragged Select-sized blocks (every width bucket, padded rows and columns), a rollback, one-token
    steps: both engines give the same logits, and the pooled one ran its graphed path for the short forwards."""
    plain, pooled = engines
    caches = [[e.new_cache() for _ in range(3)] for e in engines]
    assert all(isinstance(c, PooledKVCache) for c in caches[1])
    prompts = [[rng.randrange(259) for _ in range(n)] for n in (21, 5, 40)]
    _same(engines, caches, prompts, [[len(p) - 1] for p in prompts], atol)  # 21 and 40 tokens: ordinary path
    assert pooled.graphed.replays == 0
    for counts in ([3, 8, 1], [16, 2, 5], [1, 1, 1], [4, 9, 2]):
        blocks = [[rng.randrange(259) for _ in range(n)] for n in counts]
        want = [list(range(n)) if b != 1 else [0, n - 1] for b, n in enumerate(counts)]
        _same(engines, caches, blocks, want, atol)
    for e, c in zip(engines, caches):
        c[0].crop(c[0].length - 3)  # a rollback: the next block overwrites its keys in the slot
    _same(engines, [c[:1] for c in caches], [[7, 8]], [[0, 1]], atol)
    for _ in range(3):
        _same(engines, [c[1:2] for c in caches], [[rng.randrange(259)]], [[0]], atol)  # batch 1, one token
    _same(engines, [c[1:] for c in caches], [[1, 2], [3]], [[], []], atol)  # no logits wanted
    assert [c.length for c in caches[0]] == [c.length for c in caches[1]]
    return caches


def test_graphed_forwards_equal_the_ordinary_path(llm, monkeypatch):
    plain, pooled = _pair(llm)
    calls = []
    inner = pooled.graphed.forward
    monkeypatch.setattr(pooled.graphed, "forward", lambda *a: calls.append(len(a[0])) or inner(*a))
    _conversation((plain, pooled), 1e-10, random.Random(3))
    assert len(calls) == 9 and calls[:4] == [3, 3, 3, 3]


def test_slots_are_taken_given_back_and_left_past_their_room(llm):
    plain, pooled = _pair(llm, slots=2, max_len=32)
    a, b = pooled.new_cache(), pooled.new_cache()
    assert {a.slot, b.slot} == {0, 1} and not pooled.kv_pool.free
    c = pooled.new_cache()  # the pool is empty: a cache of its own, the ordinary path
    assert type(c) is KVCache and not pooled.graphed.accepts([c], [1])
    assert a.nbytes == pooled.kv_pool.slot_bytes
    del b
    gc.collect()
    assert pooled.kv_pool.free == [1]
    rng = random.Random(4)
    ref = plain.new_cache()
    seq = [rng.randrange(259) for _ in range(30)]
    _same((plain, pooled), [[ref], [a]], [seq], [[29]], 1e-10)
    assert not pooled.graphed.accepts([a], [4])  # 30 + a width of 4 is past the slot's 32 tokens
    slot = a.slot
    _same((plain, pooled), [[ref], [a]], [[1, 2, 3, 4]], [[0, 3]], 1e-10)  # grows past the slot: moves out
    assert a.slot is None and a.pool is None and a.capacity >= 34 and slot in pooled.kv_pool.free
    _same((plain, pooled), [[ref], [a]], [[5]], [[0]], 1e-10)
    again = pooled.new_cache()  # a freed slot is taken again
    assert isinstance(again, PooledKVCache) and again.slot in (0, 1)
    with pytest.raises(ValueError, match="at least one slot"):
        cuda_graphs.KVPool(1, 1, 1, torch.float32, torch.device("cpu"), 0, 8)


def test_capture_needs_a_gpu(llm):
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        Engine(llm).use_kv_pool(2, 32, capture=True)


@needs_cuda
def test_captured_graphs_on_a_gpu_equal_the_cpu_path(tiny_pair, llm):
    gpu_lm = load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native", device="cuda")
    plain, pooled = _pair(llm, device_lm=gpu_lm, capture=True)
    # float64 models; the rotary tables are float32 and differ by an ulp between the CPU and CUDA (test_device.py)
    _conversation((plain, pooled), 1e-5, random.Random(3))
    assert pooled.graphed.replays == 9
    assert pooled.kv_pool.keys[0].device.type == "cuda"


def test_a_reset_session_takes_its_own_slot_again(llm):
    from llm_selector.sessions import SessionStore

    _, pooled = _pair(llm, slots=1, max_len=32)
    store = SessionStore(pooled, max_sessions=4, idle_ttl_s=60.0, kv_budget_bytes=1 << 30)
    session = store.create("a")
    assert isinstance(session.cache, PooledKVCache)
    store.reset(session)  # a full-context restart: the old cache's slot is given back before the new one is made
    assert isinstance(session.cache, PooledKVCache) and not pooled.kv_pool.free


def test_a_failed_capture_leaves_that_shape_to_run_without_a_graph(llm, monkeypatch, caplog):
    """A capture that fails (out of memory, say) costs that bucket its graph, not its requests."""
    plain, pooled = _pair(llm)
    graphed = pooled.graphed
    graphed.capture = True  # as on a GPU, where this capture fails

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(graphed, "_capture", out_of_memory)
    rng = random.Random(6)
    caches = [[e.new_cache() for _ in range(2)] for e in (plain, pooled)]
    _same((plain, pooled), caches, [[rng.randrange(259) for _ in range(n)] for n in (20, 30)], [[19], [29]], 1e-10)
    for _ in range(2):
        _same((plain, pooled), caches, [[1, 2, 3], [4, 5]], [[0, 2], [1]], 1e-10)
    assert "CUDA graph capture for 2 sessions × 4 new tokens × 96 keys failed" in caplog.text  # max_len 96
    assert graphed.replays == 0 and caplog.text.count("capture for") == 1  # tried once per shape


def test_graphs_made_at_start_up_serve_every_later_forward(llm):
    """capture_all makes every bucket's graph a batch of up to max_batch sequences can use; the forwards after
    it use them and add none."""
    plain, pooled = _pair(llm)
    assert pooled.graphed.capture_all(3) == 3 * len(cuda_graphs.WIDTHS)  # batches of 1, 2, 4; keys up to 96
    made = set(pooled.graphed._graphs)
    _conversation((plain, pooled), 1e-10, random.Random(8))
    assert set(pooled.graphed._graphs) == made
