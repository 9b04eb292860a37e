"""Collect selection logs for S2T-Local: SLM rollouts on GSM8K *train*, every position labelled by the selector.

The collection policy is the paper's "SLM rollouts" as a label-only pass: the SLM decodes greedily (batched
across problems), then each trajectory goes to the selector in blocks of up to `max_positions` positions with
the K = 16 candidates and the SLM's top-64 (for the KL statistic) and a KL threshold no position reaches, so
the selector scores and logs every position and never overrules one. Distill then labels the positions with
the highest KL (the paper's tau = 10 % for data collection). Why not the deployed speculative s2t path: it
rolls back at every divergence, so the LLM re-reads tokens and blocks of 8 cost a forward each, while a block
of a whole trajectory costs one forward for up to 64 positions; and the released code's teacher-corrected
rollouts are not what a deployed SLM sees.

Resumable: problems whose sessions were fully logged are listed in `progress.jsonl` and skipped by a rerun.
Only train problems are ever collected (evaluation uses test; the paper's released code collects on test).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
from pydantic import SecretStr
from tqdm import tqdm

from . import gsm8k
from .calibration import greedy_rollouts
from .config import ClientTlsSettings
from .prompts import chat_prompt_ids
from .runtime import Engine
from .security import bearer_metadata, open_channel
from .triggers import Proposal
from .v1 import selector_pb2 as pb
from .v1 import selector_pb2_grpc as pb_grpc
from .wire import client_channel_options

NEVER_FIRES_NATS = 1e9  # an explicit KL threshold no position reaches: score and log, never overrule


def select_requests(session_id: str, prompt: list[int], generated: list[int], proposals: list[Proposal],
                    k: int, max_positions: int, slm_model: str, slm_weights_sha256: str) -> list[pb.SelectRequest]:
    """The chained Select requests that label every generated position of one trajectory."""
    tokens = list(prompt) + list(generated)
    first = len(prompt)
    requests, prefix = [], 0
    for start in range(first, len(tokens), max_positions):
        end = min(start + max_positions, len(tokens))  # positions [start, end)
        positions = [pb.CandidatePosition(position=p, candidate_ids=prop.ids[:k], candidate_probs=prop.probs[:k],
                                          support_ids=prop.ids[k:], support_probs=prop.probs[k:])
                     for p in range(start, end) for prop in (proposals[p - first],)]
        requests.append(pb.SelectRequest(
            session_id=session_id, step=len(requests), prefix_length=prefix, token_ids=tokens[prefix:end - 1],
            positions=positions, trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_KL, kl_threshold=NEVER_FIRES_NATS),
            request_id=session_id, slm_model=slm_model, slm_weights_sha256=slm_weights_sha256))
        prefix = end - 1
    return requests


async def label(stub, requests: list[pb.SelectRequest], metadata: list, timeout_s: float) -> int:
    """Send one trajectory's requests in order; returns the positions the selector scored."""
    scored = 0
    for request in requests:
        md = metadata + [("session_id", request.session_id)]
        for attempt in range(8):
            try:
                reply = await stub.Select(request, timeout=timeout_s, metadata=md)
                break
            except grpc.aio.AioRpcError as e:  # busy or restarting: the same (session, step) is idempotent
                if e.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE) or attempt == 7:
                    raise
                await asyncio.sleep(min(30.0, 0.5 * 2 ** attempt))
        scored += len(request.positions)
        if reply.outcome != pb.SELECT_OUTCOME_ACCEPTED:
            raise RuntimeError(f"{request.session_id}: the selector overruled a position in a label-only pass")
    await stub.CloseSession(pb.CloseSessionRequest(session_id=requests[0].session_id), timeout=30, metadata=metadata)
    return scored


async def collect(engine: Engine, selector_address: str, application: str, out_dir: Path, problems: int, start: int = 0,
            k: int = 16, max_new_tokens: int = 512, max_positions: int = 64, batch: int = 16,
            system_prompt: str = "", timeout_s: float = 600.0, auth_token: SecretStr | None = None,
            tls: ClientTlsSettings | None = None) -> dict:
    """Roll out GSM8K train problems [start, start + problems) with the SLM and have the selector label them.

    `auth_token` and `tls` are the worker's credentials towards the selector (worker.selector_auth_token,
    worker.selector_tls)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = out_dir / "progress.jsonl"
    done = set()
    if progress.is_file():
        done = {json.loads(line)["idx"] for line in progress.read_text().splitlines() if line.strip()}
    todo = [p for p in gsm8k.load("train", start, problems) if p["idx"] not in done]
    lm = engine.lm
    metadata = [("application", application)] if application else []
    if auth_token is not None:
        metadata.append(bearer_metadata(auth_token))
    t0 = time.time()
    totals = {"positions": 0, "tokens": 0}
    bar = tqdm(total=problems, initial=problems - len(todo), desc="collect", unit="problem", file=sys.stderr)

    async def label_chunk(trajectories) -> list[dict]:
        async with open_channel(selector_address, client_channel_options(64 << 20), tls or ClientTlsSettings(),
                                "worker.selector_tls") as ch:
            stub = pb_grpc.SelectorServiceStub(ch)
            jobs = []
            for problem, prompt, (generated, proposals) in trajectories:
                sid = f"collect-train-{problem['idx']}"
                reqs = select_requests(sid, prompt, generated, proposals, k, max_positions, lm.name,
                                       lm.weights_sha256)
                jobs.append(label(stub, reqs, metadata, timeout_s))
            scored = await asyncio.gather(*jobs)
        return [{"idx": problem["idx"], "tokens": len(generated), "positions": n}
                for (problem, _, (generated, _)), n in zip(trajectories, scored)]

    # The SLM rolls out with continuous batching (a finished problem's slot takes the next one at once);
    # whenever `batch` trajectories are finished, rollouts pause while the selector labels them, so the two
    # models never contend for the cores, and their progress is recorded.
    prompts = [chat_prompt_ids(lm.tokenizer, system_prompt, p["question"]) for p in todo]
    rollouts = greedy_rollouts(engine, prompts, max_new_tokens, lm.stop_ids, batch)
    loop = asyncio.get_running_loop()
    finished: list[tuple] = []
    exhausted = False
    rolled_out = 0
    while not exhausted or finished:
        if not exhausted:
            item = await loop.run_in_executor(engine.executor, next, rollouts, None)
            if item is None:
                exhausted = True
            else:
                i, generated, proposals = item
                finished.append((todo[i], prompts[i], (generated, proposals)))
                rolled_out += 1
                # The bar counts labelled problems, which move a chunk at a time: say what runs in between.
                bar.set_postfix_str(f"rolled out {problems - len(todo) + rolled_out}/{problems}")
        if finished and (exhausted or len(finished) >= batch):
            bar.set_postfix_str(f"labelling {len(finished)}")
            rows = await label_chunk(finished)
            with open(progress, "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
                    totals["positions"] += row["positions"]
                    totals["tokens"] += row["tokens"]
            bar.update(len(finished))
            finished = []
    bar.close()
    rows = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()] if progress.is_file() else []
    return {"mode": "collect", "kind": "collection", "problems": len(rows),
            "positions": sum(r["positions"] for r in rows), "tokens": sum(r["tokens"] for r in rows),
            "this_run": {"problems": len(todo), **totals, "wall_s": round(time.time() - t0, 1)},
            "k": k, "max_new_tokens": max_new_tokens, "max_positions": max_positions, "slm": lm.name,
            "slm_weights_sha256": lm.weights_sha256}
