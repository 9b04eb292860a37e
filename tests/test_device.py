"""The selector on a GPU (selector.runtime.device): the setting, its refusals, and — where torch sees a CUDA
device — the same forwards and the same selections as on the CPU. CI has no GPU, so the last tests skip there;
they were run on a lent H200 (README, issue #14)."""

import asyncio
import random

import pytest
import torch

from llm_selector.core import SelectorCore
from s2t.config import ConfigError, load_settings
from s2t.runtime import Engine, load_model
from s2t.v1 import selector_pb2 as pb

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device here")
# float64 models, but transformers computes the rotary tables in float32, whose cos/sin differ by an ulp or so
# between the CPU and CUDA libraries: 1.4e-6 at most on a lent H200 (logits of the tiny model ~0.1-1)
TOLERANCE = 1e-5


def test_device_setting_names_the_field_and_keeps_the_worker_on_the_cpu():
    assert load_settings(**{"selector.runtime.device": "cuda:1"}).selector.runtime.device == "cuda:1"
    assert load_settings().selector.runtime.device == "cpu"
    with pytest.raises(Exception, match=r"selector\.runtime\.device.*'cpu', 'cuda' or 'cuda:N'"):
        load_settings(**{"selector.runtime.device": "gpu"})
    with pytest.raises(Exception, match=r"worker\.runtime.*the worker runs on the CPU only"):
        load_settings(**{"worker.runtime.device": "cuda"})


def test_a_gpu_refuses_cpu_kernel_formats_and_a_missing_device(tiny_pair):
    with pytest.raises(ConfigError, match=r"runtime\.weight_formats = 'int8_vnni' with runtime\.device = 'cuda': "
                                          r"those formats are CPU kernels"):
        load_model(str(tiny_pair[1]), tiny_pair[1].parent, "int8_vnni", device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"runtime\.device = 'cuda': this torch .* sees no CUDA device"):
            load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native", device="cuda")
    else:
        with pytest.raises(ConfigError, match=r"CUDA device\(s\)"):
            load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native", device=f"cuda:{torch.cuda.device_count()}")


@needs_cuda
def test_forwards_on_a_gpu_equal_the_cpu_ones(tiny_pair):
    """Prefill in chunks, a rollback, a batch of ragged sequences and batch-1 decode steps: the float64 tiny model
    on the GPU gives the CPU's logits (returned on the CPU) and keeps its caches on the GPU."""
    cpu = Engine(load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native"))
    gpu = Engine(load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native", device="cuda"))
    assert gpu.device.type == "cuda" and gpu.lm.describe()["device"].startswith("cuda")
    rng = random.Random(5)
    seqs = [[rng.randrange(259) for _ in range(n)] for n in (7, 19, 3)]
    caches = {e: [e.new_cache() for _ in seqs] for e in (cpu, gpu)}
    outs = {e: e.forward(caches[e], [s[:-2] for s in seqs], [list(range(len(s) - 2)) for s in seqs]) for e in caches}
    for a, b in zip(outs[cpu], outs[gpu]):
        assert b.device.type == "cpu" and b.dtype == a.dtype
        torch.testing.assert_close(b, a, rtol=0, atol=TOLERANCE)
    assert caches[gpu][0].keys[0].device.type == "cuda"
    for e in caches:
        caches[e][1].crop(10)
    outs = {e: e.forward(caches[e], [s[-2:] if i != 1 else s[10:] for i, s in enumerate(seqs)],
                         [[1], [0, 3], [0, 1]]) for e in caches}
    for a, b in zip(outs[cpu], outs[gpu]):
        torch.testing.assert_close(b, a, rtol=0, atol=TOLERANCE)
    for _ in range(4):  # batch-1 steps (the direct decode path) after a fork
        token = rng.randrange(259)
        step = {e: e.forward([caches[e][0]], [[token]], [[0]])[0] for e in caches}
        torch.testing.assert_close(step[gpu], step[cpu], rtol=0, atol=TOLERANCE)
    fork = caches[gpu][2].fork(caches[gpu][2].length - 1, room=4)
    assert fork.keys[0].device.type == "cuda"
    with pytest.raises(ValueError, match="S2T-Local scoring runs on the CPU"):
        gpu.forward_tree(fork, [1], [], None)


@needs_cuda
def test_a_selector_on_a_gpu_selects_as_on_the_cpu(make_settings, tiny_pair):
    settings = make_settings(**{"selector.log_enabled": False})
    cores = [SelectorCore(Engine(load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native", device=d)),
                          settings.selector) for d in ("cpu", "cuda")]
    assert cores[1].info().device.startswith("cuda") and cores[0].info().device == "cpu"
    rng = random.Random(7)
    requests = []
    for i in range(4):
        context = [rng.randrange(259) for _ in range(5 + 3 * i)]
        positions = []
        for p in range(3, len(context) + 1):
            ids = rng.sample(range(259), 16)  # 6 candidates and a support of 10 more (the KL trigger's)
            weights = sorted((rng.random() for _ in ids), reverse=True)
            probs = [w / sum(weights) for w in weights]
            positions.append(pb.CandidatePosition(position=p, candidate_ids=ids[:6], candidate_probs=probs[:6],
                                                  support_ids=ids[6:], support_probs=probs[6:]))
        requests.append(pb.SelectRequest(session_id=f"g{i}", step=0, prefix_length=0, token_ids=context,
                                         positions=positions, trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_KL,
                                                                                          kl_rate=0.1)))

    async def all_at_once(core):
        return await asyncio.gather(*[core.handle(r, "select") for r in requests])

    on_cpu, on_gpu = (asyncio.run(all_at_once(c)) for c in cores)
    for a, b in zip(on_cpu, on_gpu):
        assert b.outcome == a.outcome and b.session_length == a.session_length
        assert [(s.position, s.index) for s in b.selections] == [(s.position, s.index) for s in a.selections]
    # blocks of 5-14 tokens: the GPU selector's forwards were replays of its CUDA graphs, over its KV pool
    assert cores[0].engine.graphed is None and cores[1].engine.graphed.replays >= 1
    assert cores[1].engine.kv_pool.slots == settings.selector.max_sessions


class _Records:
    """A stand-in selection log that keeps what it is given."""

    healthy = True

    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record.model_copy(update={"ts": 0.0}))


def test_reading_log_probs_on_the_device_answers_and_logs_as_on_the_host(make_settings, tiny_pair):
    """A GPU selector reads its Selects' log-probabilities where the logits are (Engine.forward_logprobs); the
    same reading, forced on the CPU, gives the same replies and selection-log records as the host's: KL and
    worker triggers, takeover, positions after a divergence (logged only), a prefill without positions batched
    with the rest."""
    settings = make_settings(**{"selector.log_enabled": False})
    lm = load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native")
    cores = [SelectorCore(Engine(lm), settings.selector) for _ in range(2)]
    cores[1].read_on_device = True
    for c in cores:
        c.log = _Records()
    rng = random.Random(11)
    requests = []
    for i in range(5):
        context = [rng.randrange(259) for _ in range(4 + 3 * i)]
        positions = []
        for p in range(2, len(context) + 1) if i != 2 else ():
            ids = rng.sample(range(259), 12)
            weights = sorted((rng.random() for _ in ids), reverse=True)
            probs = [w / sum(weights) for w in weights]
            positions.append(pb.CandidatePosition(position=p, candidate_ids=ids[:4], candidate_probs=probs[:4],
                                                  support_ids=ids[4:], support_probs=probs[4:],
                                                  worker_triggered=rng.random() < 0.3))
        kind = (pb.SELECT_TRIGGER_KL, pb.SELECT_TRIGGER_WORKER)[i % 2]
        requests.append(pb.SelectRequest(session_id=f"d{i}", step=0, prefix_length=0, token_ids=context,
                                         positions=positions, takeover=i == 3,
                                         trigger=pb.SelectTriggerSpec(kind=kind, kl_rate=0.1)))

    async def all_at_once(core):
        return await asyncio.gather(*[core.handle(r, "select") for r in requests])

    host, device = (asyncio.run(all_at_once(c)) for c in cores)
    assert [r.SerializeToString() for r in device] == [r.SerializeToString() for r in host]
    assert any(r.outcome == pb.SELECT_OUTCOME_DIVERGED for r in host)
    assert len(cores[1].log.records) == len(requests) and cores[1].log.records == cores[0].log.records
    # a batch of nothing but a prefill (no positions: nothing to read)
    alone = pb.SelectRequest(session_id="p", step=0, prefix_length=0, token_ids=[5, 6, 7],
                             trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_KL, kl_rate=0.1))
    host, device = (asyncio.run(c.handle(alone, "select")) for c in cores)
    assert device == host and device.session_length == 3


def test_a_ray_serve_replica_asks_for_the_gpu_its_model_runs_on(make_settings):
    """Ray hides every GPU from an actor that asks for none, and shows a replica only its own, as cuda:0."""
    from llm_selector import serve_app

    def gpus(device: str) -> float:
        deployment = serve_app.build_app(make_settings(**{"selector.runtime.device": device}))._bound_deployment
        return deployment.ray_actor_options["num_gpus"]

    assert gpus("cpu") == 0 and gpus("cuda") == 1 and gpus("cuda:0") == 1
    with pytest.raises(ConfigError, match=r"selector\.runtime\.device = 'cuda:1': under Ray Serve each replica"):
        gpus("cuda:1")
