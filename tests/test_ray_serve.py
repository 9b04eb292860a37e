"""Worker and selector over real gRPC through a real local Ray Serve (gRPC proxy, cross-session batching, routing)."""

import asyncio
import socket

import grpc
import pytest

from conftest import reference_s2t
from s2t.v1 import generation_pb2 as gen_pb
from s2t.v1 import generation_pb2_grpc as gen_grpc
from s2t.v1 import selector_pb2 as pb
from s2t.v1 import selector_pb2_grpc as sel_grpc
from slm_worker.server import Worker, serve

pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_selector(tiny_pair, tmp_path_factory):
    from llm_selector import serve_app
    from s2t.config import load_settings

    root = tmp_path_factory.mktemp("ray")
    settings = load_settings(**{
        "cache_dir": str(root / "cache"), "data_dir": str(root / "data"), "worker.model": str(tiny_pair[0]),
        "selector.model": str(tiny_pair[1]), "worker.runtime.weight_formats": "native",
        "selector.runtime.weight_formats": "native", "selector.grpc_port": free_port(),
        "selector.http_port": free_port(), "worker.port": 0, "worker.trigger": "always",
        "selector.batch_wait_timeout_s": 0.02, "selector.log_fsync_every": 1})
    settings.worker.selector_address = serve_app.start(settings)
    yield settings
    serve_app.stop()


@pytest.fixture
async def worker(ray_selector):
    w = Worker(ray_selector)
    await w.start(wait_for_selector_s=60)
    server, port = await serve(w, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield w, gen_grpc.GenerationServiceStub(channel)
    await channel.close()
    await server.stop(0)
    await w.stop()


async def test_s2t_through_ray_serve_equals_reference_for_concurrent_sessions(worker, tiny_models):
    w, stub = worker
    slm, llm = tiny_models
    prompts = ["one", "two two", "three three three"]
    stop = set(w.lm.stop_ids)
    expected = [reference_s2t(slm, llm, w.prompt_ids(gen_pb.GenerateRequest(prompt=p)), 25, 8, stop) for p in prompts]
    replies = await asyncio.gather(*[stub.Generate(gen_pb.GenerateRequest(
        prompt=p, options=gen_pb.GenerationOptions(mode=gen_pb.MODE_S2T, max_new_tokens=25, block_size=4)))
        for p in prompts])
    for reply, exp in zip(replies, expected):
        assert list(reply.token_ids) == exp
        assert reply.stats.mode_used == gen_pb.MODE_S2T and reply.stats.unverified_tokens == 0


async def test_llm_mode_through_ray_serve(worker, tiny_models):
    import torch

    w, stub = worker
    _, llm = tiny_models
    ids = w.prompt_ids(gen_pb.GenerateRequest(prompt="hi"))
    expected = llm.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20, eos_token_id=list(w.lm.stop_ids),
                            pad_token_id=256)[0, len(ids):].tolist()
    reply = await stub.Generate(gen_pb.GenerateRequest(
        prompt="hi", options=gen_pb.GenerationOptions(mode=gen_pb.MODE_LLM, max_new_tokens=20)))
    assert list(reply.token_ids) == expected and reply.stats.mode_used == gen_pb.MODE_LLM


async def test_statuses_cross_the_ray_proxy(ray_selector):
    md = [("application", ray_selector.selector.application), ("session_id", "ray-s")]
    async with grpc.aio.insecure_channel(ray_selector.worker.selector_address) as channel:
        stub = sel_grpc.SelectorServiceStub(channel)
        info = await stub.GetSelectorInfo(pb.GetSelectorInfoRequest(), metadata=md)
        assert info.vocab_size == 272 and info.max_candidates == ray_selector.selector.max_candidates
        position = pb.CandidatePosition(position=3, candidate_ids=[4, 5])
        always = pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_ALWAYS)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Select(pb.SelectRequest(session_id="ray-s", step=1, prefix_length=2, token_ids=[3],
                                               positions=[position], trigger=always), metadata=md)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "unknown session" in e.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Select(pb.SelectRequest(session_id="ray-s", step=0, prefix_length=0, token_ids=[1, 2, 3],
                                               positions=[pb.CandidatePosition(position=3)], trigger=always),
                              metadata=md)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("positions[0].candidate_ids")
        ok = pb.SelectRequest(session_id="ray-s", step=0, prefix_length=0, token_ids=[1, 2, 3], positions=[position],
                              trigger=always)
        first = await stub.Select(ok, metadata=md)
        assert await stub.Select(ok, metadata=md) == first  # a retry through the proxy replays
        closed = await stub.CloseSession(pb.CloseSessionRequest(session_id="ray-s"), metadata=md)
        assert closed.existed
