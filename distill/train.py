"""S2T-Local trainer: LoRA + score-bin rows on the SLM, from teacher-labelled candidate groups.

Per group (one position with K SLM candidates and the teacher's probabilities over them), the scores are
s_i = v · softmax(W_R h_i) + w · log p_SLM(c_i), h_i the final hidden state at candidate i placed at the
group's position, w the learned weight of the SLM prior (s2t.rerank.with_prior; w = 0 fixed is the paper's
score). Loss:

  CE(softmax(s / T), teacher argmax) [+ relu(m - (s_best - max_other)) if hinge_margin m > 0]
  + teacher_kl_weight · KL(teacher ‖ softmax(s / T))
  + lm_kl_weight · KL(frozen base ‖ adapted) over next-token distributions at context positions, bins excluded

the selection terms averaged over the optimizer step's groups, the lm-KL over its KL positions.

The paper's released code adds the hinge with m = 1.0 by default, which with s in [0, 1] is always active (only
s_best = 1 and all others 0 meets it), so it is off here by default (hinge_margin = 0); T = 1 (see
`temperature` in TrainConfig for what was measured).

Prefix-shared layout (distill.packing): one forward over a row of a session's tokens scores every candidate
of every group in it, each candidate attending to its prefix only, as Engine.forward_tree does at serving
time. Rows are processed one at a time (gradient accumulation over `batch_rows` rows per optimizer step):
a row is hundreds of tokens, which is already a large enough matmul on CPU, and nothing is padded.

The lm-KL term is computed with a custom autograd function over chunks of positions: its forward computes the
KL and its gradient with respect to the hidden states chunk by chunk ((p_adapted - p_base) @ W), so no
[positions, vocab] tensor outlives its chunk and no pair of them is kept for backward. By default it uses a
fixed random subset of `kl_positions` context positions per row (an unbiased estimate of the mean over all
positions; 0 = all), whose base-model hidden states are computed once per row and cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import resource
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from distill.packing import Row, pack_groups
from s2t.rerank import (NUM_BINS, TARGETS, adapter_scope, attach_lora, bin_probs, expected_bin, install, load_adapter,
                        lora_parameters, lora_wrappers, reserved_bin_ids, save_adapter, set_active_adapter,
                        tree_inputs, with_prior)

log = logging.getLogger("s2t.distill.train")

ADAPTER_NAME = "train"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 3
    lr: float = 5e-5
    weight_decay: float = 0.01
    schedule: str = "linear"  # "linear": decay to 0 over the run, as the paper's HF Trainer; or "constant"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = TARGETS
    lora_layers: int | None = None  # LoRA on the top N decoder layers only; None = all
    # False: the LoRA stays at its initial state (B = 0, the base model exactly) and only the score-bin rows
    # and the prior weight train. The control that says what the LoRA itself adds. Nothing backpropagates
    # through the decoder then, but the forward dominates a step: on the 240-problem set its epoch took
    # 1,805 s against 1,944 s with the LoRA trained (before a frozen run skipped the lm-KL, which is 0).
    lora_trainable: bool = True
    num_bins: int = NUM_BINS
    # Listwise softmax temperature over the K scores. Scores lie in [0, 1], so at T = 1 the softmax can only
    # move from uniform (CE log K) to e/(e + K - 1) on the best candidate: the CE gradient p - y never vanishes
    # (the loss never saturates), and Adam normalises its scale, so it trains. Measured on the synthetic task
    # of tests/test_distill_train.py (tiny model, 128 sessions, 6 epochs, lr 5e-3, 80 held-out groups):
    # held-out agreement@1 0.94 at T = 1, 0.94 at T = 0.25, 0.96 at T = 0.1, 0.975 at T = 1 + hinge m = 1 (the
    # hinge nearly doubled the drift from the base, lm-KL 1.2 vs 0.66 nats): no reason to leave the paper's T.
    temperature: float = 1.0
    # The SLM prior (s2t.rerank.with_prior): score = expected bin + w · log p_SLM(c), w learned from
    # prior_weight_init. init 0 and not trainable is the paper's score. w gets its own learning rate: it is
    # one scalar, and Adam moves a parameter by about lr per step, so at the LoRA's lr it would barely move.
    prior_weight_init: float = 1.0
    prior_weight_trainable: bool = True
    prior_lr: float = 1e-2
    # Learning rate of the score-bin rows W_R (None = lr). The final hidden states the bins read have norms of
    # ~170 on Qwen2.5-0.5B, so an Adam step of lr per element moves a bin logit by up to lr * ||h||_1 (~0.5
    # at lr 1e-4): the bin softmax saturates within tens of steps, every score sits at 1/15 or 1, and the
    # gradient through it vanishes (measured: after 240 steps the bin logits' spread was ~10.5 and 331 training
    # groups were fitted no better than the SLM's own top-1).
    bin_lr: float | None = None
    # Std of the Gaussian noise added to the initial bin rows. Qwen2.5's reserved rows are one and the same
    # vector, so every bin logit is equal and the selection loss's gradient with respect to the hidden state,
    # sum_b p_b (v_b - s) W_R[b], is exactly 0: nothing reaches the LoRA until the rows differ. Noise of std
    # sigma gives bin logits a spread of about sigma * ||h|| (0.003 * 170 ~ 0.5) from the first step.
    bin_init_std: float = 0.0
    hinge_margin: float = 0.0  # > 0 adds relu(m - (s_best - max_other)) per group; the paper's code uses 1.0
    teacher_kl_weight: float = 0.1
    lm_kl_weight: float = 0.1
    kl_positions: int = 128  # context positions per row in the lm-KL (0 = all)
    kl_chunk: int = 128  # positions per chunk of the lm-KL ([chunk, vocab] float tensors at a time)
    # Row shape (distill.packing): at most row_tokens context tokens and max_row_candidates candidates per row;
    # every candidate sees at least min(min_context, its logged context) tokens and at most row_tokens.
    # Compute per group is about K + row_tokens / groups-per-row whatever the shape (~3K at a 10 % trigger
    # rate); memory grows with the row: measured on 0.5B-shaped layers (fp32, LoRA, autograd) ~130 MiB per
    # layer for a 512 + 128-token row, ~350 MiB for 1024 + 512, i.e. ~3 GB vs ~8.5 GB of activations for all
    # 24 layers. row_tokens=1024, min_context=511 gives every candidate the paper's full 511-token context.
    row_tokens: int = 512
    min_context: int = 256
    max_row_candidates: int = 256
    batch_rows: int = 1  # rows per optimizer step
    grad_clip: float = 1.0
    seed: int = 2025
    max_minutes: float | None = None  # stop (checkpoint, evaluate, export) after this much time in this call
    max_steps: int | None = None  # stop after this many optimizer steps in total
    checkpoint_every: int = 100  # optimizer steps
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint under out_dir if there is one
    eval_every: int | None = None  # optimizer steps between held-out evaluations (None: start and end only)
    # float32 measured on this machine (AVX2, 2 cores; fwd+bwd of two 0.5B-shaped layers): 512 tokens 0.8 s in
    # float32 vs 35 s in bfloat16; bf16 backward has no fast kernels here. float64 for exact tests.
    dtype: str = "float32"
    # Per-row caches, filled on a row's first visit and reused by later epochs, within these budgets:
    # the frozen lower layers' output (lora_layers only; rows x tokens x hidden floats) and the base model's
    # hidden states at the KL positions (rows x kl_positions x hidden floats).
    cache_lower_mb: int = 2048
    cache_reference_mb: int = 1024
    threads: int = 0  # 0 = every core
    progress: bool = True
    base_weights_sha256: str | None = None  # default: s2t.vocab.weights_sha256(base_model_dir)
    trigger_calibration: dict = dataclasses.field(default_factory=dict)  # stored in the adapter manifest

    def fingerprint(self) -> dict:
        """The fields a resumed run must share with the checkpoint it resumes (they shape the trajectory)."""
        skip = {"max_minutes", "max_steps", "checkpoint_every", "keep_checkpoints", "resume", "eval_every", "progress",
                "threads", "cache_lower_mb", "cache_reference_mb", "trigger_calibration"}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items() if k not in skip}


# ---------------------------------------------------------------------------------------------- losses


class _TextKL(torch.autograd.Function):
    """sum over positions of KL(p_base ‖ p_adapted) on the text vocabulary (bins excluded), memory-bounded.

    Forward runs the lm_head chunk by chunk and keeps only d(KL)/d(hidden) = (p_adapted - p_base) @ W,
    [positions, hidden]; backward scales it. Neither the logits nor their softmaxes are kept.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, excluded: torch.Tensor,
                chunk: int) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        grad = torch.empty_like(hidden)
        for lo in range(0, hidden.shape[0], chunk):
            h, r = hidden[lo:lo + chunk], ref_hidden[lo:lo + chunk]
            p, logp = _text_softmax(h @ weight.T, excluded)
            q, logq = _text_softmax(r @ weight.T, excluded)
            total += (q * (logq - logp)).sum()  # excluded columns: q = 0 and both logs are 0
            grad[lo:lo + chunk] = ((p - q).to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def _text_softmax(logits: torch.Tensor, excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, log-probabilities) over the vocabulary without the excluded rows: probability 0 there,
    and log-probability 0 (not -inf) so that 0 · log terms vanish instead of turning NaN."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logits.index_fill_(1, excluded, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    return logp.exp(), logp.index_fill_(1, excluded, 0.0)


@dataclasses.dataclass
class GroupBatch:
    """A row's groups as padded [G, Kmax] tensors: the loss over all of them is a few vectorised ops."""

    index: torch.Tensor  # [G, Kmax] positions in the row's flat candidate scores (0 where padded)
    valid: torch.Tensor  # [G, Kmax] bool
    teacher: torch.Tensor  # [G, Kmax] teacher probabilities, renormalised, 0 where padded
    target: torch.Tensor  # [G]
    slm: torch.Tensor  # [G, Kmax] the SLM's probabilities of the candidates; 1 where padded or not logged

    @classmethod
    def of(cls, candidate_counts: Sequence[int], teacher_probs: Sequence[Sequence[float]], targets: Sequence[int],
           dtype: torch.dtype, slm_probs: Sequence[Sequence[float]] | None = None) -> "GroupBatch":
        g, kmax = len(candidate_counts), max(candidate_counts)
        index = torch.zeros(g, kmax, dtype=torch.long)
        valid = torch.zeros(g, kmax, dtype=torch.bool)
        teacher = torch.zeros(g, kmax, dtype=dtype)
        slm = torch.ones(g, kmax, dtype=dtype)  # log 1 = 0: no prior where the worker sent no probabilities
        k0 = 0
        for i, (k, probs) in enumerate(zip(candidate_counts, teacher_probs)):
            index[i, :k] = torch.arange(k0, k0 + k)
            valid[i, :k] = True
            t = torch.tensor(probs, dtype=dtype)
            teacher[i, :k] = t / t.sum()
            if slm_probs is not None and len(slm_probs[i]) == k:
                slm[i, :k] = torch.tensor(slm_probs[i], dtype=dtype)
            k0 += k
        return cls(index, valid, teacher, torch.tensor(list(targets), dtype=torch.long), slm)

    def scores(self, flat: torch.Tensor) -> torch.Tensor:
        """[sum K] -> [G, Kmax], -inf where padded."""
        return flat[self.index].masked_fill(~self.valid, float("-inf"))


def selection_losses(scores: torch.Tensor, groups: GroupBatch, temperature: float, hinge_margin: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over the groups of (CE vs the teacher's argmax, KL(teacher ‖ softmax(s/T)), hinge), and the
    number of groups whose score argmax (ties to the lower index) is the teacher's. scores: [G, Kmax]."""
    logq = torch.log_softmax(scores / temperature, dim=-1)
    target = groups.target[:, None]
    ce = -logq.gather(1, target).sum()
    kl = (torch.xlogy(groups.teacher, groups.teacher) - groups.teacher * logq.masked_fill(~groups.valid, 0.0)).sum()
    hinge = scores.new_zeros(())
    if hinge_margin > 0:
        best = scores.gather(1, target)[:, 0]
        others = scores.scatter(1, target, float("-inf")).amax(dim=1)
        hinge = torch.relu(hinge_margin - (best - others)).sum()
    hits = int((scores.detach().argmax(dim=1) == groups.target).sum())
    return ce, kl, hinge, hits


# ---------------------------------------------------------------------------------------------- metrics


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties averaged."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    _, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.bincount(inverse).to(torch.float64)
    return (sums / counts)[inverse]


def spearman(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> float | None:
    """Spearman's rank correlation; None when either side is constant (it is undefined there)."""
    ra, rb = _ranks(torch.as_tensor(a, dtype=torch.float64)), _ranks(torch.as_tensor(b, dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return None if denom == 0 else float((ra * rb).sum()) / denom


# ---------------------------------------------------------------------------------------------- the model


class RowRunner:
    """Runs rows through the causal LM in the tree layout, with the caches that make epochs cheaper."""

    def __init__(self, model: nn.Module, bin_weight: torch.Tensor, bin_ids: list[int], adapter: str,
                 lower_layers: int, config: TrainConfig, prior_weight: torch.Tensor | float = 0.0):
        self.model = model
        self.decoder = model.base_model
        self.bin_weight = bin_weight
        self.prior_weight = prior_weight  # w of the SLM prior (a parameter while training)
        self.adapter = adapter
        self.lower = lower_layers
        self.config = config
        self.num_layers = len(self.decoder.layers)
        kinds = set(getattr(self.decoder.config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise NotImplementedError(f"layer types {sorted(kinds)}: only full-attention models are supported")
        self.head_weight = model.get_output_embeddings().weight
        self.excluded = torch.tensor(bin_ids, dtype=torch.long)
        self.lower_cache: dict[Any, torch.Tensor] = {}
        self.lower_cache_bytes = 0
        self.ref_cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self.ref_cache_bytes = 0
        self.group_cache: dict[Any, GroupBatch] = {}
        self.last_bin_peak = 0.0

    def layers(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, lo: int, hi: int,
               final_norm: bool) -> torch.Tensor:
        """Decoder layers lo..hi-1 on hidden [1, Q, H]; the same computation as the model's forward."""
        pos = positions[None]
        pos_emb = self.decoder.rotary_emb(hidden, pos)
        mask4 = mask[None, None]
        for layer in self.decoder.layers[lo:hi]:
            out = layer(hidden, attention_mask=mask4, position_ids=pos, position_embeddings=pos_emb)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.decoder.norm(hidden) if final_norm else hidden

    def _inputs(self, row: Row) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.tensor(row.tokens + [c for b in row.branches for c in b.candidate_ids], dtype=torch.long)
        positions, mask = tree_inputs(0, len(row.tokens), [b.pos for b in row.branches],
                                      [len(b.candidate_ids) for b in row.branches])
        return ids, positions, mask

    def _lower(self, key: Any, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Input of the first adapted layer: embeddings, or the frozen lower layers' output (cached)."""
        with torch.no_grad():
            if self.lower == 0:
                return self.decoder.embed_tokens(ids[None])
            cached = self.lower_cache.get(key)
            if cached is not None:
                return cached
            hidden = self.layers(self.decoder.embed_tokens(ids[None]), positions, mask, 0, self.lower, False)
            size = hidden.numel() * hidden.element_size()
            if self.lower_cache_bytes + size <= self.config.cache_lower_mb * 2**20:
                self.lower_cache[key] = hidden
                self.lower_cache_bytes += size
            return hidden

    def kl_index(self, key: Any, context_len: int) -> torch.Tensor:
        """The row's lm-KL positions: a fixed subset (seeded by the row) or all of them."""
        n = self.config.kl_positions
        if n <= 0 or n >= context_len:
            return torch.arange(context_len)
        rng = random.Random(f"{self.config.seed}:{key}")
        return torch.tensor(sorted(rng.sample(range(context_len), n)), dtype=torch.long)

    def _reference(self, key: Any, row: Row, lower: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL positions, base-model final hidden states there), computed once per row with no adapter."""
        cached = self.ref_cache.get(key)
        if cached is not None:
            return cached
        index = self.kl_index(key, len(row.tokens))
        if len(index) == 0:  # a group at the very start of a session: no context, no lm-KL
            return index, lower.new_zeros(0, lower.shape[-1])
        upto = int(index[-1]) + 1
        with torch.no_grad(), adapter_scope(self.model, None):
            # Context tokens never attend to candidates (nor to later tokens): the context up to the last KL
            # position alone gives the same states.
            hidden = self.layers(lower[:, :upto], positions[:upto], mask[:upto, :upto], self.lower, self.num_layers,
                                 True)
        cached = (index, hidden[0, index].detach())
        size = cached[1].numel() * cached[1].element_size()
        if self.ref_cache_bytes + size <= self.config.cache_reference_mb * 2**20:
            self.ref_cache[key] = cached
            self.ref_cache_bytes += size
        return cached

    def forward(self, key: Any, row: Row, with_reference: bool) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """Scores of every candidate in the row [sum K] (differentiable when grad is on), and the adapted and
        base hidden states at the row's KL positions (None unless with_reference)."""
        ids, positions, mask = self._inputs(row)
        lower = self._lower(key, ids, positions, mask)
        ref = self._reference(key, row, lower, positions, mask) if with_reference else None
        with adapter_scope(self.model, self.adapter):
            hidden = self.layers(lower, positions, mask, self.lower, self.num_layers, True)[0]
        n = len(row.tokens)
        probs = bin_probs(hidden[n:], self.bin_weight)
        scores = expected_bin(probs)
        # Mean top bin probability over the row's candidates: ~1/16 with undifferentiated bins, ~1 when the
        # bin softmax has saturated (then no gradient passes through it; see TrainConfig.bin_lr).
        self.last_bin_peak = float(probs.detach().amax(dim=-1).mean()) if len(probs) else 0.0
        kl_pair = None if ref is None else (hidden[:n][ref[0]], ref[1])
        return scores, kl_pair, ref

    def group_batch(self, key: Any, row: Row, dtype: torch.dtype) -> GroupBatch:
        cached = self.group_cache.get(key)
        if cached is None:
            cached = GroupBatch.of([len(b.candidate_ids) for b in row.branches], [b.teacher_probs for b in row.branches],
                                   [b.target for b in row.branches], dtype, [b.slm_probs for b in row.branches])
            self.group_cache[key] = cached
        return cached

    def row_loss(self, key: Any, row: Row, group_norm: int, kl_norm: int) -> tuple[torch.Tensor, dict]:
        """The row's share of the batch loss (already divided by the batch's group and KL-position counts)."""
        cfg = self.config
        # A frozen LoRA is the base model: the lm-KL is 0 and its reference pass would be wasted.
        scores, kl_pair, _ = self.forward(key, row, with_reference=cfg.lm_kl_weight > 0 and cfg.lora_trainable)
        groups = self.group_batch(key, row, scores.dtype)
        ranked = with_prior(groups.scores(scores), groups.slm, self.prior_weight)
        sel, teacher_kl, hinge, hits = selection_losses(ranked, groups, cfg.temperature, cfg.hinge_margin)
        loss = (sel + hinge + cfg.teacher_kl_weight * teacher_kl) / group_norm
        lm_kl = scores.new_zeros(())
        if kl_pair is not None:
            lm_kl = _TextKL.apply(kl_pair[0], kl_pair[1].to(kl_pair[0].dtype), self.head_weight, self.excluded,
                                  cfg.kl_chunk)
            loss = loss + cfg.lm_kl_weight * lm_kl / kl_norm
        return loss, {"selection": float(sel.detach()), "teacher_kl": float(teacher_kl.detach()), "hinge": float(hinge.detach()),
                      "lm_kl": float(lm_kl.detach()), "hits": hits, "groups": len(row.branches),
                      "bin_peak": self.last_bin_peak * len(row.branches)}

    @torch.no_grad()
    def evaluate(self, rows: Sequence[Row], key_prefix: str = "eval") -> dict:
        """agreement@1 (score argmax, ties to the lower index, = teacher argmax) and mean Spearman ρ between
        scores and teacher probabilities over held-out groups; the SLM's own top-1 agreement for reference."""
        was_training = self.model.training
        self.model.eval()
        hits = slm_hits = n = 0
        rhos = []
        try:
            for i, row in enumerate(rows):
                scores, _, _ = self.forward((key_prefix, i), row, with_reference=False)
                k0 = 0
                for b in row.branches:
                    s = scores[k0:k0 + len(b.candidate_ids)]
                    k0 += len(b.candidate_ids)
                    if len(b.slm_probs) == len(s):
                        s = with_prior(s, torch.tensor(b.slm_probs, dtype=s.dtype), self.prior_weight)
                    n += 1
                    hits += int(torch.argmax(s)) == b.target
                    slm_top = max(range(len(b.slm_probs)), key=b.slm_probs.__getitem__) if b.slm_probs else 0
                    slm_hits += slm_top == b.target
                    rho = spearman(s, b.teacher_probs)
                    if rho is not None:
                        rhos.append(rho)
        finally:
            self.model.train(was_training)
        return {"groups": n, "agreement_at_1": hits / n if n else None,
                "spearman": sum(rhos) / len(rhos) if rhos else None,
                "slm_top1_agreement": slm_hits / n if n else None}


# ---------------------------------------------------------------------------------------------- loading


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r}: choose one of {sorted(dtypes)}")
    return dtypes[name]


def load_base(base_model_dir: Path, dtype: str) -> tuple[nn.Module, Any]:
    """The base SLM as a plain transformers model (frozen, sdpa attention) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=_dtype(dtype), attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(str(base_model_dir))


def _base_name(base_model_dir: Path) -> str:
    from s2t.model_store import read_manifest

    manifest = read_manifest(Path(base_model_dir))
    return manifest["name"] if manifest and manifest.get("name") else Path(base_model_dir).name


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def initial_bin_weight(head_weight: torch.Tensor, bin_ids: list[int], cfg: TrainConfig) -> torch.Tensor:
    """W_R at step 0: the model's own reserved rows (the paper trains its lm_head copy from there), plus
    seeded Gaussian noise of std cfg.bin_init_std (see TrainConfig.bin_init_std for why)."""
    rows = head_weight[bin_ids].detach().clone()
    if cfg.bin_init_std > 0:
        noise = torch.Generator().manual_seed(cfg.seed)
        rows += cfg.bin_init_std * torch.randn(rows.shape, generator=noise, dtype=torch.float64).to(rows.dtype)
    return rows


def _lower_layers(model: nn.Module, lora_layers: int | None) -> int:
    total = model.config.num_hidden_layers
    if lora_layers is None:
        return 0
    if not 1 <= lora_layers <= total:
        raise ValueError(f"lora_layers {lora_layers}: the model has {total} layers")
    return total - lora_layers


# ---------------------------------------------------------------------------------------------- checkpoints


def _checkpoints(out_dir: Path) -> list[Path]:
    return sorted((Path(out_dir) / CHECKPOINT_DIR).glob("step-*.pt"))


def _save_checkpoint(out_dir: Path, model: nn.Module, bin_weight: torch.Tensor, prior_weight: torch.Tensor,
                     optimizer, scheduler, state: dict, keep: int) -> Path:
    directory = Path(out_dir) / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    lora = {name: [t.detach().clone() for t in w.weights(ADAPTER_NAME)]
            for name, w in sorted(lora_wrappers(model).items()) if ADAPTER_NAME in w.adapters}
    payload = dict(state, lora=lora, bin_weight=bin_weight.detach().clone(),
                   prior_weight=prior_weight.detach().clone(), optimizer=optimizer.state_dict(),
                   scheduler=scheduler.state_dict(), torch_rng=torch.get_rng_state(), python_rng=random.getstate())
    path = directory / f"step-{state['step']:08d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint as the newest
    for old in _checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _load_checkpoint(path: Path, model: nn.Module, bin_weight: torch.Tensor, prior_weight: torch.Tensor, optimizer,
                     scheduler) -> dict:
    payload = torch.load(path, weights_only=True)
    wrappers = lora_wrappers(model)
    with torch.no_grad():
        for name, (A, B) in payload["lora"].items():
            a, b = wrappers[name].weights(ADAPTER_NAME)
            a.copy_(A)
            b.copy_(B)
        bin_weight.copy_(payload["bin_weight"])
        prior_weight.copy_(payload["prior_weight"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["torch_rng"])
    random.setstate(_as_tuple(payload["python_rng"]))
    return payload


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------- training


def train(groups_train: Sequence[Any], groups_eval: Sequence[Any], base_model_dir: Path, out_dir: Path,
          config: TrainConfig | None = None, sessions: Mapping[str, Sequence[int]] | None = None) -> dict:
    """Train an S2T-Local adapter and export it to out_dir/adapter; returns a summary.

    groups_*: distill.groups.Group objects or their JSON dicts. sessions: optional full session sequences
    (distill.groups.sessions) so that groups in the committed text see their whole prefix. Checkpoints go to
    out_dir/checkpoints every `checkpoint_every` steps and when stopping early; with config.resume a later
    call continues from the newest (the same data and config are required). The summary (also written to
    out_dir/summary.json): wall_s, peak_rss_mb, metrics_before/metrics (held-out), curves, data, adapter.
    """
    from tqdm import tqdm

    from s2t.runtime import set_threads
    from s2t.vocab import weights_sha256

    cfg = config or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    set_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    model, tokenizer = load_base(base_model_dir, cfg.dtype)
    base_sha = cfg.base_weights_sha256 or weights_sha256(Path(base_model_dir))
    head = model.get_output_embeddings()
    bin_ids = reserved_bin_ids(tokenizer, head.out_features, cfg.num_bins)
    lower = _lower_layers(model, cfg.lora_layers)
    attach_lora(model, cfg.rank, cfg.alpha, cfg.targets, layers=range(lower, model.config.num_hidden_layers),
                name=ADAPTER_NAME, dropout=cfg.dropout)
    set_active_adapter(model, ADAPTER_NAME)
    bin_weight = nn.Parameter(initial_bin_weight(head.weight, bin_ids, cfg))
    prior_weight = nn.Parameter(torch.tensor(cfg.prior_weight_init, dtype=bin_weight.dtype),
                                requires_grad=cfg.prior_weight_trainable)

    train_rows, train_stats = pack_groups(groups_train, sessions, cfg.row_tokens, cfg.min_context, cfg.max_row_candidates)
    eval_rows, eval_stats = pack_groups(groups_eval, sessions, cfg.row_tokens, cfg.min_context, cfg.max_row_candidates)
    if not train_rows:
        raise ValueError(f"no trainable groups: {train_stats}")

    lora = lora_parameters(model, ADAPTER_NAME)
    if not cfg.lora_trainable:
        for p in lora:
            p.requires_grad_(False)
    params = (lora if cfg.lora_trainable else []) + [bin_weight]
    param_groups = [{"params": [bin_weight], "lr": cfg.lr if cfg.bin_lr is None else cfg.bin_lr}]
    if cfg.lora_trainable:
        param_groups.append({"params": lora})
    if cfg.prior_weight_trainable:
        param_groups.append({"params": [prior_weight], "lr": cfg.prior_lr, "weight_decay": 0.0})
        params = params + [prior_weight]
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_rows)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.schedule not in ("linear", "constant"):
        raise ValueError(f"schedule {cfg.schedule!r}: 'linear' or 'constant'")
    decay = (lambda s: max(0.0, 1.0 - s / total_steps)) if cfg.schedule == "linear" else (lambda s: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    runner = RowRunner(model, bin_weight, bin_ids, ADAPTER_NAME, lower, cfg, prior_weight)

    # what a checkpoint may be resumed with: the same settings, base, bins and (packed) training data
    data_sha = hashlib.sha256(json.dumps([dataclasses.asdict(r) for r in train_rows]).encode()).hexdigest()
    fingerprint = dict(cfg.fingerprint(), train_rows=len(train_rows), train_data_sha256=data_sha,
                       base_weights_sha256=base_sha, bin_ids=bin_ids)
    step, epoch, batch_in_epoch, prior_s = 0, 0, 0, 0.0
    curves: dict[str, list] = {k: [] for k in ("step", "loss", "selection", "teacher_kl", "lm_kl", "hit1", "bin_peak", "lr",
                                               "prior_weight")}
    eval_curve: list[dict] = []
    metrics_before = None
    resumed_from = None
    if cfg.resume and _checkpoints(out_dir):
        path = _checkpoints(out_dir)[-1]
        state = _load_checkpoint(path, model, bin_weight, prior_weight, optimizer, scheduler)
        if state["fingerprint"] != json.loads(json.dumps(fingerprint)):
            raise ValueError(f"{path} was written by a run with other data or settings; use another out_dir or "
                             f"resume=False (checkpoint {state['fingerprint']}, now {fingerprint})")
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        curves, eval_curve, metrics_before = state["curves"], state["eval_curve"], state["metrics_before"]
        prior_s = state["train_s"]
        resumed_from = str(path)
        log.info("resumed from %s at step %d", path, step)

    if metrics_before is None:
        metrics_before = runner.evaluate(eval_rows) if eval_rows else {}
        eval_curve.append({"step": 0, **metrics_before})

    def checkpoint() -> Path:
        state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "curves": curves,
                 "eval_curve": eval_curve, "metrics_before": metrics_before, "fingerprint": fingerprint,
                 "train_s": prior_s + (time.perf_counter() - t_loop)}
        return _save_checkpoint(out_dir, model, bin_weight, prior_weight, optimizer, scheduler,
                                json.loads(json.dumps(state)), cfg.keep_checkpoints)

    model.train()
    stopped = "done"
    t_loop = time.perf_counter()
    tokens_seen = 0
    bar = tqdm(total=total_steps, initial=step, desc="s2t-local", unit="step", disable=not cfg.progress,
               dynamic_ncols=True)
    try:
        while epoch < cfg.epochs:
            order = list(range(len(train_rows)))
            random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)  # the data position is (epoch, batch)
            while batch_in_epoch < steps_per_epoch:
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    stopped = "max_steps"
                    break
                if cfg.max_minutes is not None and time.perf_counter() - t_start > cfg.max_minutes * 60:
                    stopped = "max_minutes"
                    break
                batch = order[batch_in_epoch * cfg.batch_rows:(batch_in_epoch + 1) * cfg.batch_rows]
                group_norm = sum(len(train_rows[i].branches) for i in batch)
                kl_norm = sum(len(runner.kl_index(("train", i), len(train_rows[i].tokens))) for i in batch) or 1
                optimizer.zero_grad(set_to_none=True)
                totals = {"loss": 0.0, "selection": 0.0, "teacher_kl": 0.0, "lm_kl": 0.0, "hits": 0, "groups": 0,
                          "bin_peak": 0.0}
                for i in batch:
                    loss, parts = runner.row_loss(("train", i), train_rows[i], group_norm, kl_norm)
                    loss.backward()
                    totals["loss"] += float(loss.detach())
                    for k in ("selection", "teacher_kl", "lm_kl", "hits", "groups", "bin_peak"):
                        totals[k] += parts[k]
                    tokens_seen += train_rows[i].query_tokens
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                step += 1
                batch_in_epoch += 1
                curves["step"].append(step)
                curves["loss"].append(totals["loss"])
                curves["selection"].append(totals["selection"] / group_norm)
                curves["teacher_kl"].append(totals["teacher_kl"] / group_norm)
                curves["lm_kl"].append(totals["lm_kl"] / kl_norm)
                curves["hit1"].append(totals["hits"] / group_norm)
                curves.setdefault("bin_peak", []).append(totals["bin_peak"] / group_norm)  # group-weighted
                curves["lr"].append(lr)
                curves["prior_weight"].append(float(prior_weight.detach()))
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{totals['loss']:.4f}", hit1=f"{totals['hits'] / group_norm:.2f}")
                if cfg.eval_every and step % cfg.eval_every == 0 and eval_rows:
                    eval_curve.append({"step": step, **runner.evaluate(eval_rows)})
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint()
            if stopped != "done":
                break
            epoch += 1
            batch_in_epoch = 0
    finally:
        bar.close()
    train_s = time.perf_counter() - t_loop
    if stopped != "done" or not (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
        checkpoint()  # the state to resume from (or the final state)

    model.eval()
    if eval_curve and eval_curve[-1]["step"] == step:  # evaluated at this step already (--eval-every, or no step)
        metrics = {k: v for k, v in eval_curve[-1].items() if k != "step"}
    else:
        metrics = runner.evaluate(eval_rows) if eval_rows else {}
        eval_curve.append({"step": step, **metrics})
    k = max(train_stats["max_candidates"], eval_stats["max_candidates"])
    summary_config = {k2: (list(v) if isinstance(v, tuple) else v) for k2, v in dataclasses.asdict(cfg).items()}
    manifest = {
        "base_model": _base_name(base_model_dir), "base_weights_sha256": base_sha, "K": k,
        "trigger_calibration": cfg.trigger_calibration,
        "metrics": {"agreement_at_1": metrics.get("agreement_at_1"), "spearman": metrics.get("spearman"),
                    "eval_groups": metrics.get("groups"), "before": metrics_before},
        "data": {"train": train_stats, "eval": eval_stats},
        "training": dict(summary_config, steps=step, stopped=stopped),
    }
    adapter_dir = save_adapter(out_dir / "adapter", model, bin_weight.detach(), bin_ids, manifest, ADAPTER_NAME,
                               overwrite=True, prior_weight=float(prior_weight.detach()))
    version = json.loads((adapter_dir / "s2t-adapter.json").read_text())["version"]
    summary = {
        "adapter": str(adapter_dir), "version": version, "steps": step, "total_steps": total_steps,
        "stopped": stopped, "resumed_from": resumed_from, "wall_s": round(time.perf_counter() - t_start, 3),
        "train_s": round(prior_s + train_s, 3), "tokens_per_s": round(tokens_seen / train_s, 1) if train_s > 0 else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1), "metrics_before": metrics_before, "metrics": metrics,
        "curves": curves, "eval_curve": eval_curve, "data": {"train": train_stats, "eval": eval_stats},
        "bin_ids": bin_ids, "prior_weight": float(prior_weight.detach()), "lower_layers_cached": len(runner.lower_cache), "config": summary_config,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate(groups: Sequence[Any], base_model_dir: Path, adapter_dir: Path, config: TrainConfig | None = None,
             sessions: Mapping[str, Sequence[int]] | None = None, check_base: bool = True) -> dict:
    """Held-out metrics of an exported adapter on groups: agreement@1, mean Spearman ρ, the SLM's own top-1
    agreement. Loads the base, checks the adapter against its weights hash (check_base) and bins."""
    from s2t.vocab import weights_sha256

    cfg = config or TrainConfig()
    model, tokenizer = load_base(base_model_dir, cfg.dtype)
    bin_ids = reserved_bin_ids(tokenizer, model.get_output_embeddings().out_features, cfg.num_bins)
    reranker = load_adapter(Path(adapter_dir), weights_sha256(Path(base_model_dir)) if check_base else None, bin_ids)
    install(model, reranker)
    rows, stats = pack_groups(groups, sessions, cfg.row_tokens, cfg.min_context, cfg.max_row_candidates)
    runner = RowRunner(model, reranker.bin_weight.to(_dtype(cfg.dtype)), bin_ids, reranker.version, 0, cfg,
                       reranker.prior_weight)
    return dict(runner.evaluate(rows), data=stats, version=reranker.version)
