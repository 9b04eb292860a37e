"""The selector on a GPU (`selector.runtime.device: cuda`): what one selector replica answers per second.

The paper's selector is a large model on GPUs serving many edge workers. This measures `SelectorCore` (the
selector's whole logic: admission, batching, the forward, the KL trigger and the candidates' argmax, the
session cut; with `--transport grpc` its gRPC server too, the workers played by a process of its own) on a CUDA device, for models of two shapes with random bf16 weights: the
embedded selector's (Qwen2.5-Coder-1.5B) and the paper's (Qwen2.5-32B). Random weights decide nothing a user
would read, but a forward reads and computes the same bytes whatever the weights are, so the timings are the
shapes'. For each count of sessions: every session is prefilled with `--context` tokens (a Select without
positions, all at once), then `--rounds` rounds in which every session sends one Select of `--block` new
tokens, each a position with `--k` candidates and a 64-id KL support, the KL trigger at rate 0.1 (a worker's
default request), all at once so that the selector batches them as it batches concurrent workers.

    python bench/gpu_selector.py --name gpu-selector-h200 --shapes 1.5b,32b --sessions 1,4,16,64

Per shape and session count: the round's wall time (the batch's latency, what each worker waits), the
forward's share of it (Engine.forward, its logits copied back to the host), Selects and positions per second,
and the GPU memory at its peak. With random weights the KL trigger fires and the pick differs almost everywhere,
so nearly every Select diverges at its first position: the forward is the same work as with real weights (every
new token is computed), but the host's reading after it stops at the first divergence, so the "rest" column is
a lower bound of what real requests cost there. Writes <out>/<name>.json and .md (default bench/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Shapes from the models' config.json (Qwen/Qwen2.5-Coder-1.5B-Instruct, Qwen/Qwen2.5-32B-Instruct).
SHAPES = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    # for a check of this script on a machine without a GPU (--device cpu --shapes tiny)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
}
KL_RATE = 0.1
SUPPORT = 64  # the worker's top-64 for the KL trigger: the K candidates and the rest as support_ids


@contextlib.contextmanager
def attention_backends(cudnn: bool):
    """Within: the engine's attention on a GPU as its own (s2t.runtime.CUDA_ATTENTION, without cuDNN's), or with
    cuDNN's allowed too, which is torch's default choice (and how the engine ran before commit bafdb36)."""
    from torch.nn.attention import SDPBackend

    from s2t import runtime

    own = runtime.CUDA_ATTENTION
    if cudnn:
        runtime.CUDA_ATTENTION = [SDPBackend.CUDNN_ATTENTION, *own]
    try:
        yield
    finally:
        runtime.CUDA_ATTENTION = own


def random_model(shape: str, device: str, seed: int):
    """A Qwen2 causal LM of `shape` with random bf16 weights, built on `device`, wrapped as a LoadedModel."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from s2t.runtime import LoadedModel
    from s2t.weight_formats import FormatPlan, held_weight_bytes

    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.eval().requires_grad_(False)
    with torch.no_grad():  # drawn here, whatever the constructor left (it may skip initialisation)
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return LoadedModel(name=f"random-qwen2-{shape}", path=Path("/dev/null"), model=model, tokenizer=None,
                       vocab_sha256="random", plan=FormatPlan.uniform("bf16"), compute_dtype=torch.bfloat16,
                       stop_ids=(), load_s=time.perf_counter() - t0, weight_bytes=held_weight_bytes(model))


def select_request(pb, session: str, step: int, length: int, tokens: list[int], k: int, vocab: int,
                   rng: random.Random):
    positions = []
    for i in range(len(tokens)):
        support = rng.sample(range(vocab), SUPPORT)
        weights = sorted((rng.random() ** 3 for _ in support), reverse=True)
        total = sum(weights)
        probs = [w / total for w in weights]
        positions.append(pb.CandidatePosition(position=length + i + 1, candidate_ids=support[:k],
                                              candidate_probs=probs[:k], support_ids=support[k:],
                                              support_probs=probs[k:]))
    return pb.SelectRequest(session_id=session, step=step, prefix_length=length, token_ids=tokens,
                            positions=positions, trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_KL,
                                                                              kl_rate=KL_RATE))


def _round_requests(pb, state: dict, block_tokens: int, with_positions: bool, k: int, vocab: int,
                    rng: random.Random) -> list:
    """One Select per session: `block_tokens` new tokens, each a position (or none: a prefill)."""
    requests = []
    for sid, (length, step) in state.items():
        tokens = [rng.randrange(vocab) for _ in range(block_tokens)]
        requests.append(select_request(pb, sid, step, length, tokens, k, vocab, rng) if with_positions else
                        pb.SelectRequest(session_id=sid, step=step, prefix_length=length, token_ids=tokens,
                                         trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_KL, kl_rate=KL_RATE)))
    return requests


def _rounds(send, pb, sessions: int, context: int, block: int, k: int, rounds: int, vocab: int, seed: int):
    """The prefill round, a warm-up round and `rounds` measured ones, each every session's Select at once through
    `send` (a list of requests -> their replies); returns (prefill seconds, measured walls, their
    time.monotonic() windows)."""
    rng = random.Random(seed)
    state = {f"s{i}": [0, 0] for i in range(sessions)}  # session -> [length, next step]

    async def one_round(block_tokens: int, with_positions: bool) -> tuple[float, float]:
        requests = _round_requests(pb, state, block_tokens, with_positions, k, vocab, rng)
        t = time.monotonic()
        replies = await send(requests)
        end = time.monotonic()
        for sid, reply in zip(state, replies):
            state[sid] = [reply.session_length, state[sid][1] + 1]
        return t, end

    async def all_rounds():
        t, end = await one_round(context, False)
        await one_round(block, True)  # warm-up: first use of this batch shape
        windows = [await one_round(block, True) for _ in range(rounds)]
        return end - t, [b - a for a, b in windows], windows

    return all_rounds()


def _grpc_clients(port: int, sessions: int, context: int, block: int, k: int, rounds: int, vocab: int, seed: int,
                  conn) -> None:
    """A process of its own playing `sessions` workers, one gRPC channel each, against the selector on `port`."""
    import grpc

    from s2t.v1 import selector_pb2 as pb
    from s2t.v1 import selector_pb2_grpc as pb_grpc

    async def main():
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(sessions)]
        stubs = [pb_grpc.SelectorServiceStub(c) for c in channels]

        async def send(requests):
            return await asyncio.gather(*[stub.Select(r) for stub, r in zip(stubs, requests)])

        try:
            return await _rounds(send, pb, sessions, context, block, k, rounds, vocab, seed)
        finally:
            for c in channels:
                await c.close()

    conn.send(asyncio.run(main()))
    conn.close()


def measure(lm, sessions: int, context: int, block: int, k: int, rounds: int, seed: int, cudnn: bool = False,
            graphs: bool = True, max_len: int = 1024, read_on_device: bool = True, kl_threshold: float = 0.5,
            transport: str = "in-process", profile: Path | None = None) -> dict:
    """One shape and session count; with `profile`, cProfile's top functions of the measured rounds' host work
    are written to that file."""
    import torch

    from llm_selector.core import SelectorCore
    from s2t.config import load_settings
    from s2t.runtime import Engine
    from s2t.v1 import selector_pb2 as pb

    # max_sessions bounds the KV pool of the graphed path (as many sessions as fit the budget at max_len tokens)
    settings = load_settings(**{"selector.log_enabled": False, "selector.max_batch_size": max(sessions, 1),
                                "selector.max_sessions": sessions + 8, "selector.kv_budget_mb": 1 << 17,
                                "selector.runtime.cuda_graphs": graphs, "selector.runtime.cuda_graph_max_len": max_len,
                                "selector.max_queued_requests": 4 * sessions + 64,
                                "selector.kl_thresholds": {KL_RATE: kl_threshold}})
    engine = Engine(lm)
    forward_s: list[tuple[float, float]] = []  # (time.monotonic() at its start, seconds)
    inner = engine.forward

    def timed_forward(*args):
        t = time.monotonic()
        out = inner(*args)
        if engine.device.type == "cuda":  # logits read on the device stay there: wait for the device's work
            torch.cuda.synchronize(engine.device)
        forward_s.append((t, time.monotonic() - t))
        return out

    engine.forward = timed_forward
    started = time.monotonic()
    core = SelectorCore(engine, settings.selector)  # on a GPU: the KV pool and, with cuda_graph_warmup, the graphs
    core_s = time.monotonic() - started
    core.read_on_device = read_on_device and engine.device.type != "cpu"
    vocab = lm.vocab_size

    profiles = None
    if profile is not None:  # the measured rounds' host work: the event loop's thread and the compute's
        import cProfile

        # From Python 3.12 cProfile is a sys.monitoring tool: one at a time, and it sees every thread.
        per_thread = sys.version_info < (3, 12)
        profiles = {"event loop (admission, batching, replies)" if per_thread else
                    "every thread (the event loop's admission, batching, replies; the compute thread's "
                    "SelectorCore.compute_select)": cProfile.Profile()}
        if per_thread:
            profiles["compute thread (SelectorCore.compute_select, the forward within it)"] = cProfile.Profile()
        loop_profile, compute_profile = [*profiles.values(), None][:2]
        compute, sends = core.compute_select, []

        def profiled_compute(tickets):
            if len(sends) <= 2 or compute_profile is None:  # the prefill and the warm-up round are not measured
                return compute(tickets)
            compute_profile.enable()
            try:
                return compute(tickets)
            finally:
                compute_profile.disable()

        core.compute_select = profiled_compute

    async def in_process(requests):
        if profiles is None:
            return await asyncio.gather(*[core.handle(r, "select") for r in requests])
        sends.append(None)
        if len(sends) > 2:
            loop_profile.enable()
        try:
            return await asyncio.gather(*[core.handle(r, "select") for r in requests])
        finally:
            loop_profile.disable()

    async def over_grpc():
        """The selector's gRPC server here (as `s2t serve-selector --no-ray` runs it), its clients in a process
        of their own: requests and replies are serialised, sent over loopback TCP and parsed."""
        import multiprocessing

        from llm_selector.grpc_server import serve

        server, port = await serve(core, "127.0.0.1", 0)
        receive, send_back = multiprocessing.get_context("spawn").Pipe(duplex=False)
        clients = multiprocessing.get_context("spawn").Process(
            target=_grpc_clients, args=(port, sessions, context, block, k, rounds, vocab, seed, send_back))
        clients.start()
        try:
            return await asyncio.to_thread(receive.recv)
        finally:
            await asyncio.to_thread(clients.join)
            await server.stop(None)

    on_gpu = engine.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    with attention_backends(cudnn):
        if transport == "grpc":
            prefill_s, walls, windows = asyncio.run(over_grpc())
        else:
            prefill_s, walls, windows = asyncio.run(_rounds(in_process, pb, sessions, context, block, k, rounds,
                                                            vocab, seed))
    if profiles is not None:
        _write_profiles(profiles, profile, rounds)
    # the measured rounds' forwards: those that started within a round's window
    forwards = [d for t, d in forward_s if any(a <= t <= b for a, b in windows)]
    wall = statistics.median(walls)
    forward = statistics.median(forwards) if forwards else 0.0
    graphed = engine.graphed
    result = dict(sessions=sessions, attention="default" if cudnn else "without cuDNN", transport=transport,
                  graphs=graphed.replays if graphed is not None else None,
                  logprobs="on the device" if core.read_on_device else "on the host", kl_threshold=kl_threshold,
                  selector_start_s=round(core_s, 2), context=context, block=block, k=k, rounds=rounds,
                  prefill_s=round(prefill_s, 4), prefill_tokens_per_s=round(sessions * context / prefill_s, 1),
                  round_ms_median=round(1000 * wall, 2), round_ms_all=[round(1000 * w, 2) for w in walls],
                  forward_ms_median=round(1000 * forward, 2), forwards_per_round=len(forwards) / rounds,
                  other_ms_median=round(1000 * (wall - sum(forwards) / rounds), 2),
                  selects_per_s=round(sessions / wall, 1), positions_per_s=round(sessions * block / wall, 1),
                  diverged=core.counters["diverged"], peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
                  kv_gib=round(core.sessions.kv_bytes() / 2**30, 3))
    core.close()
    del core, engine
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def _write_profiles(profiles: dict, path: Path, rounds: int) -> None:
    """Per thread, its functions with the most time of their own and the most cumulative time, per round."""
    import io
    import pstats

    out = io.StringIO()
    for thread, profile in profiles.items():
        stats = pstats.Stats(profile, stream=out)
        out.write(f"## {thread}: {stats.total_tt / rounds * 1000:.2f} ms a round under cProfile ({rounds} rounds)\n")
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(25)
    path.write_text(out.getvalue())


def _threshold(report: dict) -> str:
    """The runs' KL threshold: 0.5 fires at almost every position with random weights (Selects diverge early);
    one no KL reaches accepts every block, read whole."""
    values = {r.get("kl_threshold", 0.5) for shape in report["shapes"] for r in shape["runs"]}
    return ", ".join(f"{v:g}" for v in sorted(values)) + (" (every block accepted)" if min(values) >= 1e6 else "")


def markdown(report: dict) -> str:
    lines = [f"# {report['name']}", "", f"Command: `{report['command']}`  ",
             f"Date: {report['date']}; commit {report['commit']}  ",
             f"Device: {report['device']}; torch {report['torch']}, transformers {report['transformers']}  ",
             f"Each session: a {report['context']}-token prefill, then Selects of {report['block']} new tokens, "
             f"K = {report['k']}, KL trigger (rate {KL_RATE}, threshold {_threshold(report)}) over a {SUPPORT}-id "
             "support; random bf16 weights; "
             "medians over the rounds.", "",
             "The graphs column: CUDA graph replays over the measured and warm-up rounds (runtime.cuda_graphs; "
             "'off': the ordinary forward). Log-probs: where the Selects' log-probabilities were read "
             "(SelectorCore.read_on_device; 'on the host': the [rows, vocab] logits copied to the CPU first). "
             "Transport: 'in-process', SelectorCore.handle called directly; 'grpc', the selector's gRPC server "
             "(as `s2t serve-selector --no-ray`) with the sessions' clients in another process, one channel "
             "each, over loopback TCP.", "",
             "| shape | weights GiB | sessions | attention | graphs | log-probs | transport | round (batch latency) ms | slowest round ms | "
             "forward ms | rest ms | Selects/s | positions/s | prefill tokens/s | peak GPU GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in report["shapes"]:
        for r in shape["runs"]:
            graphs = "off" if r.get("graphs") is None else r["graphs"]
            lines.append(f"| {shape['shape']} | {shape['weight_gib']} | {r['sessions']} | {r['attention']} | {graphs} | "
                         f"{r.get('logprobs', 'on the host')} | {r.get('transport', 'in-process')} | "
                         f"{r['round_ms_median']} | {max(r['round_ms_all'])} | "
                         f"{r['forward_ms_median']} | {r['other_ms_median']} | {r['selects_per_s']} | "
                         f"{r['positions_per_s']} | {r['prefill_tokens_per_s']} | {r['peak_gpu_gib']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="gpu-selector")
    ap.add_argument("--shapes", default="1.5b,32b")
    ap.add_argument("--sessions", default="1,4,16,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attention", default="no-cudnn",
                    help="comma-separated, each run per session count: no-cudnn (the engine's own choice), default "
                         "(torch's default, cuDNN's attention allowed)")
    ap.add_argument("--graphs", default="on", help="comma-separated, each run per session count: on, off "
                    "(selector.runtime.cuda_graphs)")
    ap.add_argument("--read", default="device", help="comma-separated, each run per session count: device, host "
                    "(where the Selects' log-probabilities are read: SelectorCore.read_on_device)")
    ap.add_argument("--kl-threshold", type=float, default=0.5,
                    help="the KL trigger's threshold at the requests' rate; one no KL reaches (1e9) accepts every "
                         "block, so the host reads every position, as for a worker whose picks the selector keeps")
    ap.add_argument("--transport", default="in-process", help="comma-separated, each run per session count: "
                    "in-process (SelectorCore.handle), grpc (the gRPC server, clients in another process)")
    ap.add_argument("--max-len", type=int, default=1024, help="selector.runtime.cuda_graph_max_len")
    ap.add_argument("--profile", action="store_true", help="in-process runs: write cProfile's account of the "
                    "measured rounds' host work to <out>/<name>-<shape>-<sessions>.profile.txt (the rounds run slower)")
    ap.add_argument("--commit", default="", help="the commit measured (the device's copy has no git history)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(min(8, torch.get_num_threads()))  # the host side: the logits' reading
    report = dict(name=args.name, command="python bench/gpu_selector.py " + " ".join(sys.argv[1:]),
                  date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), commit=args.commit,
                  device=torch.cuda.get_device_name(args.device) if args.device != "cpu" else "cpu", torch=torch.__version__,
                  transformers=transformers.__version__, context=args.context, block=args.block, k=args.k,
                  host_threads=torch.get_num_threads(), shapes=[])
    args.out.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes.split(","):
        lm = random_model(shape, args.device, seed=0)
        entry = dict(shape=shape, weight_gib=round(lm.weight_bytes / 2**30, 2), build_s=round(lm.load_s, 1), runs=[])
        report["shapes"].append(entry)
        for n, attention, graphs, read, transport in (
                (int(x), a, g, r, t) for x in args.sessions.split(",") for a in args.attention.split(",")
                for g in args.graphs.split(",") for r in args.read.split(",") for t in args.transport.split(",")):
            run = measure(lm, n, args.context, args.block, args.k, args.rounds, seed=n, cudnn=attention == "default",
                          graphs=graphs == "on", max_len=args.max_len, read_on_device=read == "device",
                          kl_threshold=args.kl_threshold, transport=transport,
                          profile=args.out / f"{args.name}-{shape}-{n}.profile.txt"
                          if args.profile and transport == "in-process" else None)
            entry["runs"].append(run)
            print(json.dumps({"shape": shape, **run}), flush=True)
            (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
            (args.out / f"{args.name}.md").write_text(markdown(report))
        del lm
        gc.collect()
        if args.device != "cpu":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
