"""Mode s2t-local in the worker: the S2T-Local adapter re-ranks the SLM's candidates with no selector calls;
s2t falls back to it during a selector outage; a newer adapter is taken while serving."""

import asyncio
import shutil

import torch

from s2t.rerank import adapter_scope, attach_lora, install, load_adapter, lora_wrappers, reserved_bin_ids, save_adapter
from s2t.v1 import generation_pb2 as pb
from s2t.vocab import weights_sha256
from servers import Stack

PROMPT = "What is 2 + 3?"
NUM_BINS = 8  # the tiny vocabulary has 13 unassigned rows
PRIOR = 1.0  # the test adapter's SLM-prior weight: large enough to change some picks of the random bins


def make_adapter(slm_dir, out, version: str, seed: int, base_hash: str | None = None, prior_weight: float = 0.0,
                 layers=None):
    """A random (untrained) adapter for the tiny SLM: LoRA B and score bins drawn at random, so it re-ranks.
    layers: the decoder layers it adapts (None: all)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(slm_dir))
    tok = AutoTokenizer.from_pretrained(str(slm_dir))
    attach_lora(model, rank=4, alpha=8.0, name="train", layers=layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in lora_wrappers(model).values():
            A, B = w.weights("train")
            B.copy_(torch.randn(B.shape, generator=g, dtype=B.dtype) * 0.3)
    bins = reserved_bin_ids(tok, model.config.vocab_size, NUM_BINS)
    bin_weight = torch.randn(NUM_BINS, model.config.hidden_size, generator=g, dtype=torch.float64) * 2.0
    save_adapter(out, model, bin_weight, bins, {"base_weights_sha256": base_hash or weights_sha256(slm_dir), "K": 8,
                                                "version": version}, prior_weight=prior_weight)
    return out


def reference_local(slm_dir, adapter_dir, prompt_ids, max_new: int, k: int, stop_ids, use_prior: bool = True
                    ) -> list[int]:
    """The paper's S2T-Local loop by full recomputation: at every step the base SLM proposes its top-K, each
    `context + candidate` is re-encoded with the adapter on, and the highest score wins: expected bin value +
    the adapter's prior_weight · log p_SLM(candidate) (the SLM prior; 0 in the paper)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(slm_dir)).eval()
    reranker = load_adapter(adapter_dir, None)
    install(model, reranker)
    seq = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new):
            probs = torch.softmax(model(torch.tensor([seq])).logits[0, -1], -1)
            cand = probs.topk(k).indices.tolist()
            with adapter_scope(model, reranker.version):
                hidden = torch.stack([model.model(torch.tensor([seq + [c]])).last_hidden_state[0, -1] for c in cand])
            bins = reranker.scores(hidden)
            scores = bins + (reranker.prior_weight if use_prior else 0.0) * torch.log(probs[cand].to(bins.dtype))
            token = cand[int(torch.argmax(scores))]
            seq.append(token)
            if token in stop_ids:
                break
    return seq[len(prompt_ids):]


def prompt_ids(stack):
    return stack.worker.prompt_ids(pb.GenerateRequest(prompt=PROMPT))


async def test_s2t_local_equals_the_paper_loop_and_calls_no_selector(make_settings, tiny_pair, tmp_path):
    # a non-zero SLM prior: the worker must add w · log p of its own proposals, as the trainer does
    adapter = make_adapter(tiny_pair[0], tmp_path / "adapters" / "v1", "v1", seed=3, prior_weight=PRIOR)
    async with Stack(make_settings(**{"worker.adapter_dir": str(tmp_path / "adapters")})) as stack:
        stops = set(stack.worker.lm.stop_ids)
        expected = reference_local(tiny_pair[0], adapter, prompt_ids(stack), 24, 8, stops)
        assert expected != reference_local(tiny_pair[0], adapter, prompt_ids(stack), 24, 8, stops, use_prior=False)
        greedy = await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=24)
        deltas, final = await stack.stream(PROMPT, mode=pb.MODE_S2T_LOCAL, max_new_tokens=24, num_candidates=8,
                                           trigger=pb.TRIGGER_ALWAYS, block_size=4)
        calls = stack.servicer.calls
    assert list(final.token_ids) == expected
    assert list(final.token_ids) != list(greedy.token_ids)  # the adapter did re-rank
    assert "".join(d.text for d in deltas) == final.text
    st = final.stats
    assert st.mode_used == pb.MODE_S2T_LOCAL and st.adapter_version == "v1" and not st.degraded_reason
    assert st.selector_calls == 0 and calls == 0 and st.positions_checked == 0
    assert st.reranked_positions >= st.completion_tokens and st.picks_changed > 0


async def test_split_scoring_of_concurrent_requests_equals_the_paper_loop(make_settings, tiny_pair, tmp_path):
    """An adapter on the upper layer only: the worker taps the drafting caches there, scores from the tap, and
    batches the scoring of concurrent requests; every answer still equals the full-recomputation loop."""
    adapter = make_adapter(tiny_pair[0], tmp_path / "adapters" / "v1", "v1", seed=5, prior_weight=PRIOR, layers=[1])
    prompts = [PROMPT, "Name a prime.", "Count to three.", "Why?"]
    async with Stack(make_settings(**{"worker.adapter_dir": str(tmp_path / "adapters")})) as stack:
        worker = stack.worker
        assert worker.engine.tap_layer == 1
        stops = set(worker.lm.stop_ids)
        ids = [worker.prompt_ids(pb.GenerateRequest(prompt=p)) for p in prompts]
        expected = [reference_local(tiny_pair[0], adapter, i, 20, 8, stops) for i in ids]
        finals = await asyncio.gather(*(stack.generate(p, mode=pb.MODE_S2T_LOCAL, max_new_tokens=20, num_candidates=8,
                                                       trigger=pb.TRIGGER_ALWAYS, block_size=3) for p in prompts))
        scoring = worker.scoring
    assert [list(f.token_ids) for f in finals] == expected
    assert sum(f.stats.picks_changed for f in finals) > 0
    assert all(f.stats.mode_used == pb.MODE_S2T_LOCAL and not f.stats.degraded_reason for f in finals)
    assert 0 < scoring.batches < scoring.jobs  # requests shared scoring forwards


async def test_without_an_adapter_s2t_local_degrades_to_greedy_and_says_why(make_settings):
    async with Stack(make_settings()) as stack:
        greedy = await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=10)
        final = await stack.generate(PROMPT, mode=pb.MODE_S2T_LOCAL, max_new_tokens=10)
    assert list(final.token_ids) == list(greedy.token_ids)
    assert final.stats.mode_used == pb.MODE_GREEDY and "no S2T-Local adapter" in final.stats.degraded_reason


async def test_an_adapter_of_another_base_model_is_refused_naming_both_hashes(make_settings, tiny_pair, tmp_path):
    make_adapter(tiny_pair[0], tmp_path / "adapters" / "alien", "alien", seed=1, base_hash="ab" * 32)
    async with Stack(make_settings(**{"worker.adapter_dir": str(tmp_path / "adapters")})) as stack:
        final = await stack.generate(PROMPT, mode=pb.MODE_S2T_LOCAL, max_new_tokens=4)
        ours = stack.worker.lm.weights_sha256
    reason = final.stats.degraded_reason
    assert final.stats.mode_used == pb.MODE_GREEDY
    assert "ab" * 32 in reason and ours in reason, reason


async def test_selector_killed_mid_request_continues_in_s2t_local(make_settings, tiny_pair, tmp_path):
    make_adapter(tiny_pair[0], tmp_path / "adapters" / "v1", "v1", seed=3)
    settings = make_settings(**{"worker.adapter_dir": str(tmp_path / "adapters"), "worker.breaker_failures": 1})
    async with Stack(settings) as stack:
        stack.servicer.max_delay_s = 0.05
        call = stack.stub.GenerateStream(pb.GenerateStreamRequest(prompt=PROMPT, options=pb.GenerationOptions(
            mode=pb.MODE_S2T, max_new_tokens=40, block_size=2, trigger=pb.TRIGGER_ALWAYS)))
        deltas, final = [], None
        async for msg in call:
            if msg.HasField("delta"):
                deltas.append(msg.delta)
                if len(deltas) == 2:
                    await stack.stop_selector()
            else:
                final = msg.final
        after = await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=8, trigger=pb.TRIGGER_ALWAYS)
    st = final.stats
    assert final.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert "".join(d.text for d in deltas) == final.text and len(final.token_ids) == st.completion_tokens
    assert st.positions_checked > 0 and st.reranked_positions > 0 and st.adapter_version == "v1"
    assert "re-ranked locally" in st.degraded_reason and st.unverified_tokens == 0
    assert after.stats.mode_used == pb.MODE_S2T_LOCAL and after.stats.selector_calls <= 1


async def test_a_newer_adapter_is_taken_while_serving_without_failing_a_request(make_settings, tiny_pair, tmp_path):
    root = tmp_path / "adapters"
    make_adapter(tiny_pair[0], root / "v1", "v1", seed=3)
    staged = make_adapter(tiny_pair[0], tmp_path / "staging" / "v2", "v2", seed=4)
    settings = make_settings(**{"worker.adapter_dir": str(root), "worker.adapter_poll_s": 0.05})
    async with Stack(settings) as stack:
        ask = lambda: stack.generate(PROMPT, mode=pb.MODE_S2T_LOCAL, max_new_tokens=30,  # noqa: E731
                                     trigger=pb.TRIGGER_ALWAYS, block_size=2)
        before = [asyncio.create_task(ask()) for _ in range(6)]
        await asyncio.sleep(0.3)
        shutil.copytree(staged, root / "v2")  # a redistilled adapter arrives (newest manifest wins)
        for _ in range(200):
            if stack.worker.adapters.current().version == "v2":
                break
            await asyncio.sleep(0.05)
        in_flight_at_swap = sum(not t.done() for t in before)
        late = [asyncio.create_task(ask()) for _ in range(3)]
        finals = await asyncio.gather(*before, *late)
        installed_after = set(stack.worker.adapters.describe()["installed"])
    assert in_flight_at_swap > 0  # the swap happened under load
    assert [f.stats.adapter_version for f in finals[:6]] == ["v1"] * 6  # in flight: the version they started with
    assert [f.stats.adapter_version for f in finals[6:]] == ["v2"] * 3
    assert all(f.stats.mode_used == pb.MODE_S2T_LOCAL and not f.stats.degraded_reason for f in finals)
    assert len({tuple(f.token_ids) for f in finals[:6]}) == 1 and len({tuple(f.token_ids) for f in finals[6:]}) == 1
    assert installed_after == {"v2"}  # v1 left the model once no request held it
