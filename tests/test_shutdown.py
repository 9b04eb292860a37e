"""Graceful stop on SIGTERM of the real server processes (`s2t serve-worker`, `s2t serve-selector --no-ray`):
running requests finish, the selection log's open segment is closed, the process exits 0. Before, SIGTERM
killed them on the spot: streams broke off and the open segment stayed open until a later writer recovered it."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import grpc

from s2t.selection_log import closed_segments, read_segment
from s2t.v1 import generation_pb2 as gen_pb
from s2t.v1 import generation_pb2_grpc as gen_grpc
from s2t.v1 import selector_pb2 as pb
from s2t.v1 import selector_pb2_grpc as sel_grpc

ROOT = Path(__file__).resolve().parents[1]


async def start(tmp_path: Path, *args: str) -> tuple[asyncio.subprocess.Process, int]:
    """Run `s2t <args>` with tiny-model settings; returns the process and the port it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from s2t.cli import main; main()", "--set", f"cache_dir={tmp_path / 'cache'}",
        "--set", f"data_dir={tmp_path / 'data'}", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    while True:
        line = (await process.stdout.readline()).decode()
        assert line, "the server exited before it served"
        found = re.search(r"serving gRPC on [\d.]+:(\d+)", line)
        if found:
            return process, int(found.group(1))


async def test_worker_finishes_a_running_request_on_sigterm(tiny_pair, tmp_path):
    process, port = await start(
        tmp_path, "--set", f"worker.model={tiny_pair[0]}", "--set", "worker.runtime.weight_formats=native",
        "--set", "worker.port=0", "--set", "worker.selector_address=127.0.0.1:9", "serve-worker",
        "--wait-for-selector", "0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = gen_grpc.GenerationServiceStub(channel).GenerateStream(gen_pb.GenerateStreamRequest(
                prompt="count", options=gen_pb.GenerationOptions(mode=gen_pb.MODE_GREEDY, max_new_tokens=1000)))
            final, signalled = None, False
            async for message in stream:  # a stream cut off by the signal raises here
                if message.HasField("final"):
                    final = message.final
                elif not signalled:  # the request is running (this greedy one takes hundreds of steps): stop now
                    process.send_signal(signal.SIGTERM)
                    signalled = True
        assert signalled and final is not None, "the running request was answered in full"
        assert final.finish_reason in (gen_pb.FINISH_REASON_STOP, gen_pb.FINISH_REASON_LENGTH)
        assert len(final.token_ids) == final.stats.completion_tokens > 1
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_selector_closes_its_log_segment_on_sigterm(tiny_pair, tmp_path):
    process, port = await start(
        tmp_path, "--set", f"selector.model={tiny_pair[1]}", "--set", "selector.runtime.weight_formats=native",
        "--set", "selector.grpc_port=0", "--set", "selector.log_fsync_every=1", "serve-selector", "--no-ray")
    log_dir = tmp_path / "data" / "selection-logs"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await sel_grpc.SelectorServiceStub(channel).Select(pb.SelectRequest(
                session_id="shutdown-s", step=0, prefix_length=0, token_ids=[5, 6, 7],
                positions=[pb.CandidatePosition(position=3, candidate_ids=[1, 2, 3])],
                trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_ALWAYS)), timeout=60)
        assert reply.session_length == 3
        assert closed_segments(log_dir) == [], "the record sits in the open segment while the selector runs"
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    [segment] = closed_segments(log_dir)
    _, records = read_segment(segment)
    assert [(r.session_id, r.step) for r in records] == [("shutdown-s", 0)]
