"""S2T-Local: the score-bin re-ranker, its LoRA adapters, their on-disk format and the tree-attention layout.

Method (the S2T paper's S2T-Local, §4; ZIP-style score bins): `num_bins` reserved output rows R of the SLM's vocabulary act as score
bins. The score of candidate c at position t is v · softmax(W_R h) with v = linspace(0, 1, num_bins) and h
the final hidden state (after the final norm) at the candidate token's own position when c is appended to
the context. The SLM is adapted by LoRA on its attention and MLP projections; W_R is trained alongside.

Serving keeps the base model pristine: the adapter is a named LoRA on `LoRALinear` wrappers, active only for
the scoring forward (`Engine.forward_tree(..., adapter=version)`), so proposals come from the base SLM (the
proposal-preserving variant of a follow-up study). The trained W_R lives in the `Reranker`, not in the
model's lm_head: the base rows R stay the untrained padding rows they were, so generation is unchanged.

On disk an adapter is a directory in peft's format, so ordinary tools read the LoRA part:
  adapter_config.json         peft LoraConfig fields (peft_type LORA, r, lora_alpha, target_modules, ...)
  adapter_model.safetensors   base_model.model.<module>.lora_A.weight / .lora_B.weight
  score_bins.safetensors      "weight" [num_bins, hidden]: the trained rows W_R; "bin_ids": their vocab ids;
                              "prior_weight" []: w of the SLM prior below (absent in older adapters: 0)
  s2t-adapter.json            manifest: version, base model and weights sha256, bins, K, calibration, metrics
A load against other base weights or other bins raises AdapterMismatch naming both values.

The SLM prior (our addition; w = 0 is the paper's score exactly): the ranking score is
    score(c) = v · softmax(W_R h_c) + w · log p_SLM(c)
with p_SLM the base SLM's own probability of the candidate — the proposal's probability, which the worker
has anyway and the selection logs record — and w a scalar learned with the adapter. Why: the bins must
otherwise learn the SLM's ranking from scratch. On our 0.5B/1.5B pair with a few thousand groups, the
paper's score reached held-out agreement@1 0.24 where the SLM's own top-1 agrees 0.38 (bench/results/
s2t-local.json), i.e. it re-ranked worse than not re-ranking; with the prior the adapter starts from the
SLM's ranking and learns where to depart from it. The paper's released code does not combine the two (§4.5);
`TrainConfig.prior_weight_init = 0, prior_weight_trainable = False` trains exactly the paper's score.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .weight_formats import FormattedLinear

NUM_BINS = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMAT_VERSION = 1
MANIFEST = "s2t-adapter.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SCORE_BINS = "score_bins.safetensors"
# peft names a LoRA weight after the module path inside PeftModel -> LoraModel -> the causal LM.
PEFT_PREFIX = "base_model.model."

# Attributes kept on the root model (plain attributes, not submodules): the wrappers by module name, and the
# adapter active in all of them. Cached so that Engine.forward can say "no adapter" at no cost.
_WRAPPERS_ATTR = "_s2t_lora_wrappers"
_ACTIVE_ATTR = "_s2t_active_adapter"
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


_GGUF_PADDING = re.compile(r"\[PAD\d+\]")


class AdapterMismatch(ValueError):
    """An adapter does not fit the model it is loaded for (other base weights, other bins, other K or shape)."""


# ---------------------------------------------------------------------------------------------- score bins


def reserved_bin_ids(tokenizer, vocab_rows: int, num_bins: int = NUM_BINS) -> list[int]:
    """The vocabulary rows that serve as score bins, ascending.

    The highest output rows that no token of the tokenizer is assigned to (for Qwen2.5: the padding rows
    151920-151935 of 151936; a GGUF-converted tokenizer names them "[PAD151920]" ..., still padding), as the paper's code does when the vocabulary has no unused/reserved tokens.
    Those rows are never produced in generation (no text decodes from them), so repurposing them changes no
    ordinary distribution. Falls back to the highest named reserved tokens (Gemma `<unused…>`, Llama-3
    `<|reserved_special_token_…|>`) when the matrix has too few padding rows; special and stop ids are never
    used. Raises ValueError if neither source has `num_bins` rows.
    """
    vocab = tokenizer.get_vocab()
    # GGUF-converted tokenizers name the padding rows "[PAD<id>]" (llama.cpp's convention): rows, not text.
    assigned = {i for tok, i in vocab.items() if not _GGUF_PADDING.fullmatch(tok)}
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    free = [i for i in range(vocab_rows - 1, -1, -1) if i not in assigned][:num_bins]
    if len(free) == num_bins and min(free) > max(assigned, default=-1):
        return sorted(free)
    named = sorted((i for tok, i in vocab.items() if i < vocab_rows and i not in special
                    and (tok.startswith("<unused") or tok.startswith("<|reserved_special_token_"))), reverse=True)
    pool = sorted(set(free) | set(named), reverse=True)[:num_bins]
    if len(pool) < num_bins:
        raise ValueError(f"need {num_bins} reserved rows for score bins, the {vocab_rows}-row vocabulary has "
                         f"{len(free)} unassigned rows and {len(named)} reserved tokens")
    return sorted(pool)


def bin_values(num_bins: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """v: the value of each bin, evenly spaced over [0, 1]."""
    return torch.linspace(0.0, 1.0, num_bins, dtype=dtype)


def bin_scores(hidden: torch.Tensor, bin_weight: torch.Tensor) -> torch.Tensor:
    """Expected bin value v · softmax(W_R h) for each row of hidden [..., H] -> [...].

    Computed in at least float32 (a bf16 model's hidden states are promoted), differentiably: the trainer
    and the serving Reranker share this function, so their scores agree to rounding.
    """
    return expected_bin(bin_probs(hidden, bin_weight))


def bin_probs(hidden: torch.Tensor, bin_weight: torch.Tensor) -> torch.Tensor:
    """softmax(W_R h) over the bins for each row of hidden [..., H] -> [..., bins], in at least float32."""
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, bin_weight.dtype), torch.float32)
    return torch.softmax(hidden.to(dtype) @ bin_weight.to(dtype).T, dim=-1)


def expected_bin(probs: torch.Tensor) -> torch.Tensor:
    """v · p for bin probabilities [..., bins] -> [...]."""
    return probs @ bin_values(probs.shape[-1], probs.dtype).to(probs.device)


def with_prior(scores: torch.Tensor, slm_probs: torch.Tensor | None, prior_weight: torch.Tensor | float
               ) -> torch.Tensor:
    """scores + w · log p_SLM (the SLM prior, see the module docstring); scores unchanged when w is 0 or
    there are no probabilities. Probabilities are clamped at 1e-12, so a candidate the SLM gives no mass
    still gets a finite score. Shared by the trainer and the serving Reranker."""
    if slm_probs is None or (not torch.is_tensor(prior_weight) and prior_weight == 0.0):
        return scores
    logp = torch.log(slm_probs.to(scores.dtype).clamp_min(1e-12))
    return scores + prior_weight * logp


def contenders(slm_probs: Sequence[float], prior_weight: float) -> list[int]:
    """Indices of the candidates (in the SLM's order, the first being its top-1) that can still outrank the
    first under score = bins + w · log p_SLM, whatever the bins say: bin scores lie in [0, 1], so candidate i
    can win only if w · (log p_0 - log p_i) < 1. The rest need no scoring forward; a position whose list is
    [0] needs none at all. Exact: the winner among the contenders is the winner among all candidates. Every
    candidate contends when w <= 0 (the paper's score)."""
    if prior_weight <= 0.0 or not slm_probs:
        return list(range(len(slm_probs)))
    logp = [math.log(max(float(p), 1e-12)) for p in slm_probs]  # clamped as with_prior clamps
    # the margin keeps a candidate whose bound is within rounding of 1 (the scores are float32)
    return [i for i, lp in enumerate(logp) if i == 0 or prior_weight * (logp[0] - lp) < 1.0 + 1e-4]


# ---------------------------------------------------------------------------------------------- LoRA layers


def _base_dtype(module: nn.Module) -> torch.dtype:
    if isinstance(module, FormattedLinear):
        return module.out_dtype
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.dtype
    return next(module.parameters()).dtype


class LoRALinear(nn.Module):
    """A linear-like module plus any number of named LoRA adapters, at most one active.

    y = base(x) + (alpha / r) · (dropout(x) @ Aᵀ) @ Bᵀ for the active adapter; with none active, y = base(x)
    exactly (the same call, nothing added). `base` may be an nn.Linear or a FormattedLinear (the runtime's
    weight formats): the adapter only needs in/out features. Several adapters coexist so a worker can keep
    the version that running requests use while a new one is installed (hot swap).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        # Keys are sanitised names (a parameter name cannot hold "."); _keys maps adapter name -> key.
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self._keys: dict[str, str] = {}
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active: str | None = None

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def add_adapter(self, name: str, A: torch.Tensor, B: torch.Tensor, alpha: float, dropout: float = 0.0,
                    trainable: bool = False) -> None:
        """Add (or replace) adapter `name` with A [r, in] and B [out, r], cast to the base's dtype."""
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise AdapterMismatch(f"LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a "
                                  f"{self.in_features}->{self.out_features} linear")
        # prefixed: a bare key becomes a ParameterDict attribute and could shadow a method ("train")
        key = "adapter_" + re.sub(r"[^0-9A-Za-z_]", "_", name)
        clash = [n for n, k in self._keys.items() if k == key and n != name]
        if clash:
            raise ValueError(f"adapter names {name!r} and {clash[0]!r} collide; rename one")
        dtype = _base_dtype(self.base)
        self._keys[name] = key
        self.lora_A[key] = nn.Parameter(A.detach().to(dtype).clone(), requires_grad=trainable)
        self.lora_B[key] = nn.Parameter(B.detach().to(dtype).clone(), requires_grad=trainable)
        self.rank[name], self.alpha[name], self.dropout[name] = r, float(alpha), float(dropout)

    def remove_adapter(self, name: str) -> None:
        key = self._keys.pop(name)
        del self.lora_A[key], self.lora_B[key]
        del self.rank[name], self.alpha[name], self.dropout[name]
        if self.active == name:
            self.active = None

    def weights(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A, B) of adapter `name`: the live parameters, not copies."""
        key = self._keys[name]
        return self.lora_A[key], self.lora_B[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        name = self.active
        if name is None:
            return y
        A, B = self.weights(name)
        h = x.to(A.dtype)
        if self.training and self.dropout[name] > 0:
            h = F.dropout(h, self.dropout[name], training=True)
        lora = (h @ A.T) @ B.T
        return y + (lora * (self.alpha[name] / self.rank[name])).to(y.dtype)

    def extra_repr(self) -> str:
        return f"adapters={list(self._keys)}, active={self.active!r}"


def lora_wrappers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear wrappers by module name (relative to `model`), cached on the model."""
    cached = model.__dict__.get(_WRAPPERS_ATTR)
    if cached is None:
        cached = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
        model.__dict__[_WRAPPERS_ATTR] = cached
    return cached


def _set_wrappers(model: nn.Module, wrappers: dict[str, LoRALinear]) -> None:
    model.__dict__[_WRAPPERS_ATTR] = wrappers
    # New wrappers start inactive; re-apply the model's active adapter so all of them agree.
    active = model.__dict__.get(_ACTIVE_ATTR)
    model.__dict__[_ACTIVE_ATTR] = None
    for w in wrappers.values():
        w.active = None
    if active is not None and any(active in w.adapters for w in wrappers.values()):
        set_active_adapter(model, active)


def _wrap(model: nn.Module, name: str) -> LoRALinear:
    module = model.get_submodule(name)
    if isinstance(module, LoRALinear):
        return module
    if not (isinstance(module, (nn.Linear, FormattedLinear))
            or (hasattr(module, "in_features") and hasattr(module, "out_features"))):
        raise TypeError(f"{name} is a {type(module).__name__}, not a linear layer")
    parent_name, _, child = name.rpartition(".")
    wrapper = LoRALinear(module)
    wrapper.train(module.training)  # a wrapper inside an eval() model must not switch LoRA dropout on
    setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
    return wrapper


def attach_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = TARGETS,
                layers: Sequence[int] | None = None, name: str = "train", dropout: float = 0.0) -> list[str]:
    """Add a trainable LoRA adapter `name` to every target projection of the given decoder layers (None = all).

    Initialised as peft does (A Kaiming-uniform, B zero), so the adapted model starts equal to the base.
    Returns the wrapped module names, relative to `model` (the causal LM: `model.layers.3.mlp.up_proj`). The
    adapter is not activated: call set_active_adapter.
    """
    wanted = None if layers is None else {int(i) for i in layers}
    names = []
    for module_name, module in list(model.named_modules()):
        last = module_name.rpartition(".")[2]
        if last not in targets or not hasattr(module, "in_features"):  # LoRALinear has in_features too
            continue
        match = _LAYER_INDEX.search(module_name + ".")
        if wanted is not None and (match is None or int(match.group(1)) not in wanted):
            continue
        names.append(module_name)
    if not names:
        raise ValueError(f"no modules named {list(targets)} in layers {layers} of {type(model).__name__}")
    wrappers = dict(lora_wrappers(model))
    for module_name in names:
        wrapper = _wrap(model, module_name)
        A = torch.empty(rank, wrapper.in_features, dtype=torch.float64)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # peft's default init of lora_A
        B = torch.zeros(wrapper.out_features, rank, dtype=torch.float64)
        wrapper.add_adapter(name, A, B, alpha, dropout, trainable=True)
        wrappers[module_name] = wrapper
    _set_wrappers(model, wrappers)
    return names


def lora_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Adapter `name`'s parameters in a fixed order (module name, then A before B): optimizer state saved
    from one model fits another built the same way."""
    out = []
    for _, w in sorted(lora_wrappers(model).items()):
        if name in w.adapters:
            out.extend(w.weights(name))
    return out


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` active in every wrapper that has it (others run their base), or none (None).

    O(1) when nothing changes, so Engine.forward calls it on every forward. Raises KeyError for an adapter
    the model does not have. Not thread-safe: call it on the thread that runs the model's forwards.
    """
    wrappers = lora_wrappers(model)
    if model.__dict__.get(_ACTIVE_ATTR) == name:
        return
    if name is not None and not any(name in w.adapters for w in wrappers.values()):
        raise KeyError(f"no LoRA adapter {name!r} on this model; installed: {sorted(installed_adapters(model))}")
    for w in wrappers.values():
        w.active = name if name is not None and name in w.adapters else None
    model.__dict__[_ACTIVE_ATTR] = name


def active_adapter(model: nn.Module) -> str | None:
    return model.__dict__.get(_ACTIVE_ATTR)


@contextlib.contextmanager
def adapter_scope(model: nn.Module, name: str | None) -> Iterator[None]:
    """Activate `name` for the duration of a block, then restore the previous state."""
    previous = active_adapter(model)
    set_active_adapter(model, name)
    try:
        yield
    finally:
        set_active_adapter(model, previous)


def installed_adapters(model: nn.Module) -> set[str]:
    return {a for w in lora_wrappers(model).values() for a in w.adapters}


# ---------------------------------------------------------------------------------------------- tree layout


def tree_inputs(past: int, new_tokens: int, branch_positions: Sequence[int], branch_sizes: Sequence[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [Q] and boolean attention mask [Q, past + Q] (True = may attend) for one tree forward.

    The query holds `new_tokens` ordinary tokens at positions past .. past+new_tokens-1, each seeing every
    key up to itself, then the candidates of each branch: a branch at position p (the index of the token
    being chosen) puts each of its candidates at position p, seeing keys [0, p) and itself only, never the
    other candidates. Keys are the `past` cached tokens followed by the Q query tokens, in order. The same
    layout serves the Engine (past = cache length) and the trainer (past = 0, no cache).
    """
    total = past + new_tokens
    if any(not 0 <= p <= total for p in branch_positions):
        raise ValueError(f"branch positions {list(branch_positions)} must lie in [0, {total}]")
    n_cand = sum(branch_sizes)
    q = new_tokens + n_cand
    cand_pos = torch.repeat_interleave(torch.as_tensor(list(branch_positions), dtype=torch.long),
                                       torch.as_tensor(list(branch_sizes), dtype=torch.long))
    positions = torch.cat([torch.arange(past, total, dtype=torch.long), cand_pos])
    keys = torch.arange(past + q)
    mask = torch.zeros(q, past + q, dtype=torch.bool)
    # ordinary tokens: causal over the cache and the new tokens (they never see candidates: keys >= total)
    mask[:new_tokens] = keys[None, :] <= positions[:new_tokens, None]
    # candidates: the prefix before their position, and their own key
    mask[new_tokens:] = keys[None, :] < cand_pos[:, None]
    own = torch.arange(n_cand)
    mask[new_tokens + own, total + own] = True
    return positions, mask


# ---------------------------------------------------------------------------------------------- adapters on disk


@dataclasses.dataclass
class Reranker:
    """One loaded adapter version, ready to score.

    Added to the brief's fields: `lora` (module name -> (A, B) as stored), `rank`, `alpha`, read by install.
    """

    version: str
    path: Path
    manifest: dict
    bin_ids: list[int]
    bin_weight: torch.Tensor  # [num_bins, hidden]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict, repr=False)
    rank: int = 0
    alpha: float = 0.0
    prior_weight: float = 0.0  # w of the SLM prior (0: the paper's score)

    @property
    def num_bins(self) -> int:
        return self.bin_weight.shape[0]

    def contenders(self, slm_probs: Sequence[float]) -> list[int]:
        """contenders(slm_probs, this adapter's prior weight): the candidates worth a scoring forward."""
        return contenders(slm_probs, self.prior_weight)

    @property
    def first_layer(self) -> int:
        """The lowest decoder layer the LoRA adapts: below it the adapted model is the base model, so a
        scorer may start there from the drafting cache (Engine.score_trees)."""
        layers = [int(m.group(1)) for name in self.lora if (m := _LAYER_INDEX.search(name + "."))]
        return min(layers, default=0)

    def scores(self, hidden: torch.Tensor, slm_probs: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
        """[n, hidden] final hidden states at candidate positions (+ the SLM's probabilities of the n
        candidates) -> [n] ranking scores: expected bin values in [0, 1] + prior_weight · log p_SLM."""
        with torch.no_grad():
            scores = bin_scores(hidden, self.bin_weight)
            if slm_probs is None or self.prior_weight == 0.0:
                return scores
            return with_prior(scores, torch.as_tensor(slm_probs, dtype=scores.dtype), self.prior_weight)


def _adapter_layout(model: nn.Module, adapter_name: str) -> tuple[dict[str, LoRALinear], list[str], list[int] | None]:
    """The wrappers holding the adapter, its target names and its layers (None = every layer that has the
    targets). peft describes an adapter as targets x layers, so another shape is refused."""
    holders = {n: w for n, w in lora_wrappers(model).items() if adapter_name in w.adapters}
    if not holders:
        raise KeyError(f"no LoRA adapter {adapter_name!r} on this model")
    targets = sorted({n.rpartition(".")[2] for n in holders})
    layer_of = {n: int(m.group(1)) for n in holders if (m := _LAYER_INDEX.search(n + "."))}
    layers = sorted(set(layer_of.values()))
    expected = {n for n, _ in model.named_modules() if n.rpartition(".")[2] in targets
                and (m := _LAYER_INDEX.search(n + ".")) and int(m.group(1)) in layers}
    # The expected set reaches through existing wrappers ("...q_proj.base" is not a target name, "...q_proj" is).
    if set(holders) != expected or len(layer_of) != len(holders):
        raise ValueError(f"adapter {adapter_name!r} is not a full targets x layers grid; peft cannot describe it")
    all_layers = {int(m.group(1)) for n, _ in model.named_modules() if (m := _LAYER_INDEX.search(n + "."))}
    return holders, targets, (None if set(layers) == all_layers else layers)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def save_adapter(directory: Path, model: nn.Module, bin_weight: torch.Tensor, bin_ids: Sequence[int], manifest: dict,
                 adapter_name: str = "train", overwrite: bool = False, prior_weight: float = 0.0) -> Path:
    """Write adapter `adapter_name` of `model` (the causal LM it was attached to) and the score bins.

    `manifest` must carry "base_weights_sha256" (s2t.vocab.weights_sha256 of the base) and "K" (candidates
    per group in training); it may carry "version" (default: "s2t-" + the first 16 hex digits of the sha256
    of the weight files, so equal weights give equal versions), "base_model", "trigger_calibration",
    "metrics", "data", "training". prior_weight: w of the SLM prior. The directory is written next to its final place and renamed into it, so
    a watcher never sees half an adapter. An existing directory is replaced only with overwrite=True.
    """
    from safetensors.torch import save_file

    for key in ("base_weights_sha256", "K"):
        if manifest.get(key) in (None, ""):
            raise ValueError(f"the adapter manifest needs {key!r}")
    bin_ids = [int(i) for i in bin_ids]
    if bin_weight.ndim != 2 or bin_weight.shape[0] != len(bin_ids):
        raise ValueError(f"bin_weight {tuple(bin_weight.shape)} does not match {len(bin_ids)} bin ids")
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    holders, targets, layers = _adapter_layout(model, adapter_name)
    any_wrapper = next(iter(holders.values()))
    rank, alpha, dropout = (any_wrapper.rank[adapter_name], any_wrapper.alpha[adapter_name],
                            any_wrapper.dropout[adapter_name])
    tensors = {}
    for name, w in sorted(holders.items()):
        A, B = w.weights(adapter_name)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().contiguous().clone()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().contiguous().clone()
    base_name = manifest.get("base_model") or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        prior_weight = float(prior_weight)
        if not math.isfinite(prior_weight):
            raise ValueError(f"prior_weight {prior_weight} is not finite")
        save_file({"weight": bin_weight.detach().contiguous().clone(),
                   "bin_ids": torch.tensor(bin_ids, dtype=torch.long),
                   "prior_weight": torch.tensor(prior_weight, dtype=torch.float64)},
                  str(tmp / SCORE_BINS), metadata={"format": "pt"})
        version = manifest.get("version") or "s2t-" + _sha256_files([tmp / ADAPTER_WEIGHTS, tmp / SCORE_BINS])[:16]
        _write_json(tmp / ADAPTER_CONFIG, {
            # the peft LoraConfig fields this adapter uses; peft fills the rest with its defaults
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "r": rank,
            "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets, "layers_to_transform": layers,
            "layers_pattern": None, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None})
        _write_json(tmp / MANIFEST, {
            "format_version": FORMAT_VERSION, "version": version, "base_model": base_name,
            "base_weights_sha256": manifest["base_weights_sha256"], "bin_ids": bin_ids, "num_bins": len(bin_ids),
            "K": int(manifest["K"]), "hidden_size": int(bin_weight.shape[1]),
            "score": {"bins": "expected value over linspace(0, 1, num_bins)", "prior_weight": prior_weight},
            "lora": {"r": rank, "alpha": alpha, "dropout": dropout, "target_modules": targets, "layers": layers},
            "trigger_calibration": manifest.get("trigger_calibration") or {},
            "metrics": manifest.get("metrics") or {}, "data": manifest.get("data") or {},
            "training": manifest.get("training") or {},
            "created": manifest.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if directory.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, trash / "old")
            os.replace(tmp, directory)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_adapter(directory: Path, base_weights_sha256: str | None, bin_ids: Sequence[int] | None = None,
                 k: int | None = None) -> Reranker:
    """Read an adapter directory written by save_adapter.

    base_weights_sha256: the weights hash of the model it will run on (None skips the check); bin_ids: the
    model's reserved bin rows (None skips); k: demand this many candidates per group in training (None
    skips: a scorer trained on K=16 ranks K=8 just as well, each score depends on its own candidate only,
    which is the paper's setup). A mismatch raises AdapterMismatch naming the expected and found values.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except FileNotFoundError as e:
        raise AdapterMismatch(f"{directory} is not an S2T-Local adapter: {Path(e.filename).name} is missing") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AdapterMismatch(f"{directory}: adapter format version {manifest.get('format_version')!r}, "
                              f"this code reads {FORMAT_VERSION}")
    version = manifest["version"]
    found = manifest.get("base_weights_sha256")
    if base_weights_sha256 is not None and found != base_weights_sha256:
        raise AdapterMismatch(f"adapter {version} at {directory} was trained on base weights sha256 {found}, "
                              f"but the model it is loaded for has weights sha256 {base_weights_sha256}")
    bins = load_file(str(directory / SCORE_BINS))
    stored_ids = [int(i) for i in bins["bin_ids"].tolist()]
    if stored_ids != [int(i) for i in manifest["bin_ids"]]:
        raise AdapterMismatch(f"{directory}: score_bins.safetensors holds bin ids {stored_ids}, the manifest says "
                              f"{manifest['bin_ids']}")
    if bin_ids is not None and stored_ids != [int(i) for i in bin_ids]:
        raise AdapterMismatch(f"adapter {version} at {directory} scores with bins {stored_ids}, but the model's "
                              f"reserved bin rows are {list(bin_ids)}")
    if k is not None and int(manifest["K"]) != int(k):
        raise AdapterMismatch(f"adapter {version} at {directory} was trained with K={manifest['K']} candidates, "
                              f"expected K={k}")
    weights = load_file(str(directory / ADAPTER_WEIGHTS))
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in sorted(weights):
        if not (key.startswith(PEFT_PREFIX) and key.endswith(".lora_A.weight")):
            continue
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        b_key = f"{PEFT_PREFIX}{module}.lora_B.weight"
        if b_key not in weights:
            raise AdapterMismatch(f"{directory}: {key} has no matching lora_B")
        lora[module] = (weights[key], weights[b_key])
    if not lora:
        raise AdapterMismatch(f"{directory}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    prior_weight = float(bins["prior_weight"]) if "prior_weight" in bins else 0.0
    if not math.isfinite(prior_weight):
        raise AdapterMismatch(f"{directory}: score_bins.safetensors holds a non-finite prior_weight {prior_weight}")
    return Reranker(version=version, path=directory, manifest=manifest, bin_ids=stored_ids,
                    bin_weight=bins["weight"], lora=lora, rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                    prior_weight=prior_weight)


def install(model: nn.Module, reranker: Reranker) -> None:
    """Register the reranker's LoRA on `model` (the causal LM) as adapter `reranker.version`, wrapping the
    target modules that are not wrapped yet. Installing a version again replaces its weights. The adapter
    is not activated. Run it between forwards (on the Engine's compute thread)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is not None and reranker.bin_weight.shape[1] != hidden:
        raise AdapterMismatch(f"adapter {reranker.version} has {reranker.bin_weight.shape[1]}-wide score bins, "
                              f"the model's hidden size is {hidden}")
    modules = dict(model.named_modules())
    for name, (A, B) in reranker.lora.items():
        module = modules.get(name)
        if module is None:
            raise AdapterMismatch(f"adapter {reranker.version} adapts module {name}, which this model does not have")
        if (A.shape[1], B.shape[0]) != (module.in_features, module.out_features):
            raise AdapterMismatch(f"adapter {reranker.version}: {name} is {A.shape[1]}->{B.shape[0]} in the adapter, "
                                  f"{module.in_features}->{module.out_features} in the model")
    wrappers = dict(lora_wrappers(model))
    for name, (A, B) in reranker.lora.items():
        wrapper = _wrap(model, name)
        wrapper.add_adapter(reranker.version, A, B, reranker.alpha)
        wrappers[name] = wrapper
    _set_wrappers(model, wrappers)


def uninstall(model: nn.Module, version: str) -> None:
    """Remove adapter `version`; wrappers left without adapters are replaced by their base module again, so
    a model with no adapters runs exactly as loaded. Raises KeyError if it is not installed."""
    wrappers = dict(lora_wrappers(model))
    holders = [n for n, w in wrappers.items() if version in w.adapters]
    if not holders:
        raise KeyError(f"adapter {version!r} is not installed")
    if active_adapter(model) == version:
        set_active_adapter(model, None)
    for name in holders:
        w = wrappers[name]
        w.remove_adapter(version)
        if not w.adapters:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, w.base)
            del wrappers[name]
    _set_wrappers(model, wrappers)
