"""Shared fixtures: a tiny model pair on disk, settings pointing at it, and running servers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tiny_model_dir  # noqa: E402

from s2t.config import Settings, load_settings  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(SLM dir, LLM dir): two float64 tiny Qwen2 models with the same byte-level tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model_dir(root / "slm", seed=1), make_tiny_model_dir(root / "llm", seed=2)


@pytest.fixture(scope="session")
def tiny_models(tiny_pair):
    """The same pair loaded as plain transformers models, for independent reference computations."""
    from transformers import AutoModelForCausalLM

    return tuple(AutoModelForCausalLM.from_pretrained(str(p)).eval() for p in tiny_pair)


@pytest.fixture
def make_settings(tiny_pair, tmp_path):
    def make(**overrides) -> Settings:
        base = {"cache_dir": str(tmp_path / "cache"), "data_dir": str(tmp_path / "data"),
                "worker.model": str(tiny_pair[0]), "selector.model": str(tiny_pair[1]),
                "worker.runtime.weight_formats": "native", "selector.runtime.weight_formats": "native",
                "worker.port": 0, "selector.grpc_port": 0, "worker.trigger": "always",
                "worker.select_timeout_ms": 5000, "selector.step_gap_wait_s": 0.5,
                # Random tiny models are unsure at every position, so the confidence gate would cut every
                # block to one position; the speculation tests want full blocks. Gate tests turn it on.
                "worker.draft_confidence": 0.0}
        base.update(overrides)
        return load_settings(**base)

    return make


def reference_s2t(slm, llm, prompt: list[int], max_new: int, k: int, stop_ids, fires=lambda step, p_s, logp_l: True):
    """The offline S2T loop, by full recomputation: at every step the LLM picks among the SLM's top-K when
    `fires(step, slm_probs, llm_logprobs)`; otherwise the SLM's top-1 stands."""
    seq = list(prompt)
    with torch.no_grad():
        for step in range(max_new):
            ids = torch.tensor([seq])
            p_s = torch.softmax(slm(ids).logits[0, -1], -1)
            logp_l = torch.log_softmax(llm(ids).logits[0, -1], -1)
            cand = p_s.topk(k).indices
            token = int(cand[0])
            if fires(step, p_s, logp_l):
                token = int(cand[int(torch.argmax(logp_l[cand]))])
            seq.append(token)
            if token in stop_ids:
                break
    return seq[len(prompt):]


@pytest.fixture
def one_thread():
    """One OpenMP thread for tiny models: on a shared 2-core machine a second thread that waits for a busy core
    makes every small op ~10x slower. Restored afterwards (distill.train.train sets its own count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
