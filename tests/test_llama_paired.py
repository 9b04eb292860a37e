"""bench/llama_paired.py: the paired ratio's direction, its arguments and its table (the servers it starts and the
llama-bench it runs are split_cores' and native_ref's)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import llama_paired  # noqa: E402


def test_the_paired_speed_is_ours_over_llama_cpp_round_by_round():
    # ours 20 % faster in every round, whatever the round's own speed (a slow spell slows both)
    p = llama_paired.paired_speed([12.0, 24.0, 6.0], [10.0, 20.0, 5.0])
    assert p["n"] == 3 and p["geomean"] == pytest.approx(1.2) and p["ci95"] == pytest.approx([1.2, 1.2])
    p = llama_paired.paired_speed([9.0, 11.0, 10.0, 10.5], [10.0, 10.0, 10.0, 10.0])
    lo, hi = p["ci95"]
    assert lo < p["geomean"] < hi and lo < 1 < hi


def test_one_round_is_refused():
    with pytest.raises(SystemExit):
        llama_paired.parse_args(["--rounds", "1"])
    args = llama_paired.parse_args(["--shape", "shared", "--set", "worker.block_size=4"])
    assert (args.shape, args.rounds, args.set) == ("shared", 8, ["worker.block_size=4"])


def test_the_table_gives_both_models_means_and_the_paired_ratio():
    def row(label, mode, cpus, ours, decode, theirs):
        return {"label": label, "ours": mode, "cpus": cpus, "ours_tokens_per_s": ours,
                "ours_decode_tokens_per_s": decode, "llama_tokens_per_s": theirs,
                "paired": llama_paired.paired_speed(ours, theirs),
                "paired_decode": llama_paired.paired_speed(decode, theirs)}

    rows = [row("0.5b (m)", "greedy", [0], [30.0, 28.0], [32.0, 30.0], [20.0, 20.0]),
            row("1.5b (m)", "llm", [1], [9.0, 9.0], [10.0, 10.0], [10.0, 10.0])]
    payload = {"name": "t", "command": "python bench/llama_paired.py", "date": "d", "commit": "c",
               "machine": {"cpu": "cpu"}, "shape": "split", "max_new_tokens": 128, "rows": rows, "notes": ["n"]}
    md = llama_paired.markdown(payload)
    assert "| 0.5b (m) | `greedy` (CPUs [0]) | llama-bench tg128 | 2 | 29.00 (31.00) | 20.00 | **1.449**" in md
    assert ("| 1.5b (m) | `llm` (CPUs [1]) | llama-bench tg128 | 2 | 9.00 (10.00) | 10.00 | **0.900** (0.900–0.900) "
            "| **1.000** (1.000–1.000) |") in md


async def test_streamed_speed_counts_the_tokens_after_the_first_delta_over_the_time_after_it():
    from s2t.modes import Mode
    from s2t.v1 import generation_pb2 as pb

    class Stub:
        def __init__(self, mode_used):
            self.mode_used, self.sent = mode_used, []

        async def GenerateStream(self, request):
            self.sent.append(request)
            for ids in ([1] * 16, [], [2] * 16, [3] * 8):  # mode llm: a chunk first; an empty delta counts for nothing
                yield pb.GenerateStreamResponse(delta=pb.TextDelta(text="x", token_ids=ids))
            yield pb.GenerateStreamResponse(final=pb.GenerateResponse(
                stats=pb.GenerationStats(completion_tokens=40, mode_used=self.mode_used)))

    stub = Stub(pb.MODE_LLM)
    timed = await llama_paired.stream_one(stub, Mode.LLM, "q", 40)
    assert (timed.tokens, timed.first_tokens) == (40, 16) and timed.after_first_s >= 0 and timed.latency_s > 0
    assert stub.sent[0].options.mode == pb.MODE_LLM and stub.sent[0].options.max_new_tokens == 40
    assert llama_paired.Streamed(40, 5.0, 16, 2.0).decode_tokens_per_s == 12.0
    with pytest.raises(RuntimeError, match="first delta"):  # a request shorter than one Decode chunk
        llama_paired.Streamed(8, 1.0, 8, 0.0).decode_tokens_per_s
    with pytest.raises(RuntimeError, match="degraded"):  # a row that fell back to the SLM measures the wrong model
        await llama_paired.stream_one(Stub(pb.MODE_GREEDY), Mode.LLM, "q", 40)
