"""s2t.rerank and Engine.forward_tree: LoRA wrappers, the peft-compatible adapter format, tree-attention scoring.

Everything runs on tiny float64 Qwen2 models with 288 vocabulary rows (259 tokens + 29 free rows, so the 16
score bins are rows 272-287), and is compared exactly against plain full forwards.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from tiny import make_tiny_model_dir

from s2t.rerank import (AdapterMismatch, LoRALinear, Reranker, attach_lora, bin_scores, install, installed_adapters,
                        load_adapter, lora_wrappers, reserved_bin_ids, save_adapter, set_active_adapter, tree_inputs,
                        uninstall)
from s2t.runtime import Engine, TreeJob, load_model

VOCAB_ROWS = 288
BINS = list(range(272, 288))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def slm_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("rerank") / "slm", seed=1, vocab_rows=VOCAB_ROWS)


def plain_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def randomise_adapter(model, name: str, seed: int) -> None:
    """A trained-looking adapter: B is zero after attach_lora, which would make every test trivially pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in lora_wrappers(model).values():
            if name in w.adapters:
                A, B = w.weights(name)
                A.copy_(torch.randn(A.shape, generator=gen, dtype=A.dtype) * 0.3)
                B.copy_(torch.randn(B.shape, generator=gen, dtype=B.dtype) * 0.3)


def naive_hidden(model, context: list[int], candidate: int) -> torch.Tensor:
    """The paper's layout: re-encode context + [candidate] from scratch, final hidden state at the candidate."""
    with torch.no_grad():
        return model.model(torch.tensor([context + [candidate]])).last_hidden_state[0, -1]


def make_reranker(model, version: str, bin_weight: torch.Tensor, tmp: Path, sha: str = "sha-base") -> Reranker:
    path = save_adapter(tmp / version, model, bin_weight, BINS, {"base_weights_sha256": sha, "K": 4, "version": version},
                        adapter_name=version)
    return load_adapter(path, sha, BINS)


# ---------------------------------------------------------------------------------------------- bins and layout


def test_reserved_bins_are_the_highest_unassigned_rows(slm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(slm_dir))
    assert reserved_bin_ids(tok, VOCAB_ROWS) == BINS
    with pytest.raises(ValueError, match="16 reserved rows"):
        reserved_bin_ids(tok, 272)  # 13 padding rows only

    class QwenLike:  # Qwen2.5: 151,665 assigned ids in a 151,936-row matrix
        all_special_ids = [151643, 151644, 151645]

        def get_vocab(self):
            return {f"t{i}": i for i in range(151665)}

    assert reserved_bin_ids(QwenLike(), 151936) == list(range(151920, 151936))


def test_tree_inputs_mask_and_positions():
    positions, mask = tree_inputs(past=2, new_tokens=2, branch_positions=[1, 4], branch_sizes=[2, 1])
    assert positions.tolist() == [2, 3, 1, 1, 4]
    # keys: 2 cached, 2 new (positions 2, 3), then candidates c0, c1 (pos 1) and c2 (pos 4)
    expected = [
        [1, 1, 1, 0, 0, 0, 0],  # token at 2
        [1, 1, 1, 1, 0, 0, 0],  # token at 3
        [1, 0, 0, 0, 1, 0, 0],  # c0 sees [0, 1) and itself
        [1, 0, 0, 0, 0, 1, 0],  # c1 likewise, not c0
        [1, 1, 1, 1, 0, 0, 1],  # c2 sees [0, 4) and itself
    ]
    assert mask.int().tolist() == expected
    with pytest.raises(ValueError):
        tree_inputs(2, 2, [5], [1])


# ---------------------------------------------------------------------------------------------- forward_tree


@pytest.mark.parametrize("with_adapter", [False, True])
def test_forward_tree_equals_naive_reencoding_with_a_lazily_extended_cache(slm_dir, tmp_path, with_adapter):
    engine = Engine(load_model(str(slm_dir), slm_dir.parent, weight_formats="native", threads=1))
    reference = plain_model(slm_dir)
    adapter = None
    if with_adapter:
        attach_lora(reference, rank=4, alpha=8, name="v1")
        randomise_adapter(reference, "v1", seed=3)
        set_active_adapter(reference, "v1")
        install(engine.lm.model, make_reranker(reference, "v1", torch.randn(16, 64, dtype=torch.float64), tmp_path))
        adapter = "v1"
    rng = random.Random(0)
    seq = [rng.randrange(256) for _ in range(40)]
    cache = engine.new_cache()
    # a scorer's cache holds keys/values computed with its adapter: prefill through forward_tree too
    assert engine.forward_tree(cache, seq[:6], [], adapter=adapter) == []
    # several calls, each extending the cache by the delta since the last and scoring branches at positions
    # inside the old cache, inside the delta and right after it
    calls = [(seq[6:15], [(3, [7, 8, 9]), (15, [1, 2])]),
             ([], [(15, [4]), (10, [5, 6, 7, 8])]),
             (seq[15:31], [(31, [11, 12, 13]), (20, [14]), (0, [15, 16])])]
    length = 6
    for tokens, branches in calls:
        out = engine.forward_tree(cache, tokens, branches, adapter=adapter)
        length += len(tokens)
        assert cache.length == length
        assert [h.shape for h in out] == [(len(c), 64) for _, c in branches]
        for (pos, cands), hidden in zip(branches, out):
            for c, h in zip(cands, hidden):
                torch.testing.assert_close(h, naive_hidden(reference, seq[:pos], c), rtol=0, atol=1e-10)
    # the branches left no trace: the cache continues exactly as a plain prefix of seq
    (hidden,) = engine.forward_tree(cache, seq[31:35], [(35, [9])], adapter=adapter)
    torch.testing.assert_close(hidden[0], naive_hidden(reference, seq[:35], 9), rtol=0, atol=1e-10)
    if adapter is None:
        logits = engine.forward([cache], [seq[35:38]], [[2]])[0][0]
        with torch.no_grad():
            torch.testing.assert_close(logits, reference(torch.tensor([seq[:38]])).logits[0, -1], rtol=0, atol=1e-10)


def test_forward_tree_with_formatted_linear_and_lora_stays_close(slm_dir, tmp_path):
    """The worker runs FormattedLinear layers (here fp32): the LoRA wraps them just the same."""
    engine = Engine(load_model(str(slm_dir), slm_dir.parent, weight_formats="fp32", threads=1))
    reference = plain_model(slm_dir)
    attach_lora(reference, rank=4, alpha=8, name="v1")
    randomise_adapter(reference, "v1", seed=4)
    set_active_adapter(reference, "v1")
    install(engine.lm.model, make_reranker(reference, "v1", torch.randn(16, 64, dtype=torch.float64), tmp_path))
    assert isinstance(engine.lm.model.model.layers[0].mlp.up_proj, LoRALinear)
    seq = list(range(30, 50))
    cache = engine.new_cache()
    (hidden,) = engine.forward_tree(cache, seq, [(20, [1, 2, 3])], adapter="v1")
    for c, h in zip([1, 2, 3], hidden):
        torch.testing.assert_close(h.double(), naive_hidden(reference, seq, c), rtol=1e-4, atol=1e-4)


def test_forward_ignores_an_installed_adapter_that_is_not_active(slm_dir, tmp_path):
    plain = Engine(load_model(str(slm_dir), slm_dir.parent, weight_formats="native", threads=1))
    adapted = Engine(load_model(str(slm_dir), slm_dir.parent, weight_formats="native", threads=1))
    donor = plain_model(slm_dir)
    attach_lora(donor, rank=4, alpha=8, name="v1")
    randomise_adapter(donor, "v1", seed=5)
    install(adapted.lm.model, make_reranker(donor, "v1", torch.randn(16, 64, dtype=torch.float64), tmp_path))
    seq = list(range(60, 80))
    ref = plain.forward([plain.new_cache()], [seq], [list(range(20))])[0]
    cache = adapted.new_cache()
    got = adapted.forward([cache], [seq[:12]], [list(range(12))])[0]
    assert torch.equal(got, ref[:12])
    # a scoring forward with the adapter active in between must not leave it active
    adapted.forward_tree(cache, [], [(12, [1, 2])], adapter="v1")
    set_active_adapter(adapted.lm.model, "v1")  # even if someone left it on, forward runs the base
    got = adapted.forward([cache], [seq[12:]], [list(range(8))])[0]
    assert torch.equal(got, ref[12:])


# ---------------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("layers", [None, [1]])
def test_peft_reads_the_adapter_and_computes_the_same_logits(slm_dir, tmp_path, layers):
    from peft import PeftModel

    ours = plain_model(slm_dir)
    wrapped = attach_lora(ours, rank=4, alpha=8, layers=layers, name="train", dropout=0.05)
    assert len(wrapped) == 7 * (2 if layers is None else 1)
    randomise_adapter(ours, "train", seed=6)
    path = save_adapter(tmp_path / "adapter", ours, torch.randn(16, 64, dtype=torch.float64), BINS,
                        {"base_weights_sha256": "sha-base", "K": 8})
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["layers_to_transform"] == layers and sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = PeftModel.from_pretrained(plain_model(slm_dir), str(path)).eval()
    ids = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 250]])
    set_active_adapter(ours, "train")
    ours.eval()  # dropout off, as peft's eval
    with torch.no_grad():
        got, want = ours(ids).logits, peft_model(ids).logits
        base = plain_model(slm_dir)(ids).logits
    assert (got - base).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    manifest = json.loads((path / "s2t-adapter.json").read_text())
    assert manifest["bin_ids"] == BINS and manifest["num_bins"] == 16 and manifest["K"] == 8
    assert manifest["version"].startswith("s2t-") and manifest["base_weights_sha256"] == "sha-base"


def test_load_refuses_other_base_weights_bins_or_k(slm_dir, tmp_path):
    model = plain_model(slm_dir)
    attach_lora(model, rank=2, alpha=4)
    path = save_adapter(tmp_path / "a", model, torch.zeros(16, 64, dtype=torch.float64), BINS,
                        {"base_weights_sha256": "aaaa", "K": 16})
    with pytest.raises(AdapterMismatch, match="aaaa.*bbbb"):
        load_adapter(path, "bbbb")
    other_bins = list(range(256, 272))
    with pytest.raises(AdapterMismatch) as e:
        load_adapter(path, "aaaa", other_bins)
    assert str(BINS) in str(e.value) and str(other_bins) in str(e.value)
    with pytest.raises(AdapterMismatch, match="K=16.*K=8"):
        load_adapter(path, "aaaa", BINS, k=8)
    assert load_adapter(path, "aaaa", BINS, k=16).bin_ids == BINS
    assert load_adapter(path, None).version  # None skips the hash check
    with pytest.raises(FileExistsError):
        save_adapter(path, model, torch.zeros(16, 64, dtype=torch.float64), BINS, {"base_weights_sha256": "a", "K": 1})


def test_versions_coexist_switch_and_uninstall_restores_the_base(slm_dir, tmp_path):
    engine = Engine(load_model(str(slm_dir), slm_dir.parent, weight_formats="native", threads=1))
    originals = {n: type(m) for n, m in engine.lm.model.named_modules()}
    donors, rerankers = [], []
    for i, version in enumerate(["v1", "v2"]):
        donor = plain_model(slm_dir)
        attach_lora(donor, rank=4, alpha=8, layers=[i], name=version)
        randomise_adapter(donor, version, seed=10 + i)
        set_active_adapter(donor, version)
        donors.append(donor)
        rerankers.append(make_reranker(donor, version, torch.randn(16, 64, dtype=torch.float64), tmp_path))
        install(engine.lm.model, rerankers[-1])
    assert installed_adapters(engine.lm.model) == {"v1", "v2"}
    seq = list(range(100, 120))

    def scores(version):
        (hidden,) = engine.forward_tree(engine.new_cache(), seq, [(20, [1, 2, 3, 4])], adapter=version)
        return rerankers[int(version[1]) - 1].scores(hidden)

    for donor, version in zip(donors, ["v1", "v2"]):
        want = bin_scores(torch.stack([naive_hidden(donor, seq, c) for c in [1, 2, 3, 4]]),
                          rerankers[int(version[1]) - 1].bin_weight)
        torch.testing.assert_close(scores(version), want, rtol=0, atol=1e-10)
    uninstall(engine.lm.model, "v1")
    torch.testing.assert_close(scores("v2"), bin_scores(torch.stack([naive_hidden(donors[1], seq, c) for c in [1, 2, 3, 4]]),
                                                       rerankers[1].bin_weight), rtol=0, atol=1e-10)
    with pytest.raises(KeyError):
        engine.forward_tree(engine.new_cache(), seq, [(20, [1])], adapter="v1")
    uninstall(engine.lm.model, "v2")
    assert {n: type(m) for n, m in engine.lm.model.named_modules()} == originals
    with pytest.raises(KeyError):
        uninstall(engine.lm.model, "v2")


def test_install_refuses_an_adapter_for_another_shape(slm_dir, tmp_path):
    small = plain_model(slm_dir)
    attach_lora(small, rank=2, alpha=4, name="v1")
    reranker = make_reranker(small, "v1", torch.zeros(16, 64, dtype=torch.float64), tmp_path)
    wide_dir = make_tiny_model_dir(tmp_path / "wide", seed=1, vocab_rows=VOCAB_ROWS, hidden=32)
    with pytest.raises(AdapterMismatch, match="hidden size"):
        install(plain_model(wide_dir), reranker)


def test_gguf_padding_tokens_count_as_free_rows():
    """A GGUF-converted Qwen tokenizer names its padding rows "[PAD151665]" ... "[PAD151935]": they are rows no
    text maps to, so the bins are the highest of them, as for a tokenizer that leaves them unassigned."""

    class GgufLikeTokenizer:
        all_special_ids = [258]

        def get_vocab(self):
            vocab = {f"t{i}": i for i in range(259)}
            vocab.update({f"[PAD{i}]": i for i in range(259, 288)})
            return vocab

    assert reserved_bin_ids(GgufLikeTokenizer(), 288, 16) == list(range(272, 288))


def test_split_scoring_reuses_the_drafting_cache_below_the_adapter_and_batches_sequences(slm_dir, tmp_path):
    """An adapter on layer 1 only: the scorer starts at layer 1 from the drafting cache's tap (never recomputing
    layer 0 for the context), and several sequences score in one batched forward; all of it equals naive
    re-encoding of context + candidate with the adapter on."""
    engine = Engine(load_model(str(slm_dir), slm_dir.parent, weight_formats="native", threads=1))
    reference = plain_model(slm_dir)
    attach_lora(reference, rank=4, alpha=8, name="v1", layers=[1])
    randomise_adapter(reference, "v1", seed=6)
    set_active_adapter(reference, "v1")
    reranker = make_reranker(reference, "v1", torch.randn(16, 64, dtype=torch.float64), tmp_path)
    assert reranker.first_layer == 1
    install(engine.lm.model, reranker)
    untapped = engine.new_cache()
    engine.set_tap(reranker.first_layer)
    rng = random.Random(1)
    seqs = [[rng.randrange(256) for _ in range(n)] for n in (30, 23)]
    drafts = [engine.new_cache() for _ in seqs]
    assert untapped.tap_layer is None and all(c.tap_layer == 1 for c in drafts)
    # drafting: a prompt, then one token per forward, both sequences batched (the tap records every row)
    engine.forward(drafts, [s[:9] for s in seqs], [[8], [8]])
    for i in range(9, 20):
        engine.forward(drafts, [[s[i]] for s in seqs], [[0], [0]])
    scorers = [engine.new_cache(first_layer=1) for _ in seqs]

    def job(b, upto, branches):
        return TreeJob(scorers[b], seqs[b][scorers[b].length:upto], branches, base=drafts[b],
                       base_length=drafts[b].length)

    rounds = [[(0, 12, [(12, [3, 4, 5]), (4, [6])]), (1, 15, [(15, [7, 8])])],
              [(0, 20, [(20, [9, 10]), (13, [11])]), (1, 15, [(2, [12, 13, 14])])]]
    for jobs in rounds:
        out = engine.score_trees([job(*j) for j in jobs], adapter="v1")
        for (b, upto, branches), hidden in zip(jobs, out):
            assert scorers[b].length == upto
            for (pos, cands), h in zip(branches, hidden):
                for c, row in zip(cands, h):
                    torch.testing.assert_close(row, naive_hidden(reference, seqs[b][:pos], c), rtol=0, atol=1e-10)
    assert len(scorers[0].keys) == 1  # the scorer holds layer 1 only
    # the candidates' scratch keys left the drafting caches as they were: drafting continues exactly
    got = engine.forward([drafts[0]], [seqs[0][20:30]], [[9]])[0][0]
    with torch.no_grad():
        want = plain_model(slm_dir)(torch.tensor([seqs[0]])).logits[0, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # a split needs a drafting cache tapped at that layer
    with pytest.raises(ValueError, match="tapped"):
        engine.score_trees([TreeJob(engine.new_cache(first_layer=1), [], [(0, [1])], base=untapped)], adapter="v1")
    with pytest.raises(ValueError, match="cannot tap"):
        engine.set_tap(0)


def test_contenders_are_the_candidates_the_bins_can_still_lift_above_the_slm_top1():
    """Bin scores lie in [0, 1]: under the SLM prior w · log p a candidate whose probability is below
    exp(-1/w) of the top-1's cannot win, so it needs no scoring row; with w = 0 every candidate contends."""
    bins = torch.zeros(16, 8)
    r = Reranker(version="v", path=Path("."), manifest={}, bin_ids=BINS, bin_weight=bins, prior_weight=1.0)
    probs = [0.5, 0.3, 0.1, 0.01, 0.0]
    assert r.contenders(probs) == [0, 1]  # 0.5/0.3 -> 0.51 nats; 0.5/0.1 -> 1.61 nats
    assert dataclasses.replace(r, prior_weight=0.5).contenders(probs) == [0, 1, 2]
    assert dataclasses.replace(r, prior_weight=0.0).contenders(probs) == [0, 1, 2, 3, 4]
    assert r.contenders([0.9]) == [0]
    # exact: whatever the bins say, the winner among all candidates is a contender
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        p = torch.softmax(torch.randn(8, generator=gen) * 2, -1).sort(descending=True).values
        w = float(torch.rand(1, generator=gen)) * 2
        bin_part = torch.rand(8, generator=gen, dtype=torch.float64)
        bin_part[0] = 0.0  # the worst case for the top-1
        winner = int(torch.argmax(bin_part + w * torch.log(p.double())))
        assert winner in dataclasses.replace(r, prior_weight=w).contenders(p.tolist())
