"""Model runtime shared by the worker (SLM) and the selector (LLM): loading, KV caches, batched forwards.

Plain synchronous torch. One `Engine.forward` call appends new tokens to any number of sequences, each
with its own KV cache of its own length, in one model forward, and returns logits at the requested
offsets. Rolling a sequence back is `KVCache.crop`, O(1). Works with any transformers causal LM whose
attention layers call `past_key_values.update(...)` and accept a 4D attention mask (Qwen2, Llama, ...).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from .weight_formats import FormatPlan, apply_plan, available_formats, cpu_capability, measure_plan
from .model_store import read_manifest, resolve_model
from .vocab import vocab_hash, weights_sha256
from .rerank import adapter_scope, set_active_adapter, tree_inputs

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    name: str
    path: Path
    model: nn.Module
    tokenizer: object
    vocab_sha256: str
    plan: FormatPlan
    compute_dtype: torch.dtype
    stop_ids: tuple[int, ...]
    load_s: float
    # sha256 of the weight files as stored (s2t.vocab.weights_sha256): names the model in selection logs.
    weights_sha256: str = ""

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer: valid token ids are [0, vocab_size)."""
        return self.model.get_output_embeddings().out_features

    def describe(self) -> dict:
        return {"model": self.name, "path": str(self.path), "weight_formats": self.plan.describe(),
                "compute_dtype": str(self.compute_dtype).removeprefix("torch."), "cpu_capability": cpu_capability(),
                "threads": torch.get_num_threads(), "load_s": round(self.load_s, 2)}


def set_threads(threads: int) -> None:
    """0 means every core: said explicitly, because Ray starts actors with OMP_NUM_THREADS=1."""
    torch.set_num_threads(threads if threads > 0 else (len(os.sched_getaffinity(0)) or 1))


def resolve_plan(spec: str, model_dir: Path | None = None) -> FormatPlan:
    """'auto' measures the formats on this machine at the shape of the model's MLP; anything else is parsed."""
    if spec != "auto":
        plan = FormatPlan.parse(spec)
        missing = set(plan.formats) - set(available_formats())
        if missing:
            raise ValueError(f"weight formats {sorted(missing)} are not available in this torch build")
        return plan
    hidden, inter = 1024, 4096
    if model_dir is not None:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(model_dir))
        hidden = getattr(cfg, "hidden_size", hidden)
        inter = getattr(cfg, "intermediate_size", inter)
    t0 = time.perf_counter()
    plan, timings = measure_plan(hidden, inter)
    log.info("weight formats measured in %.1fs on %s: %s (%s)", time.perf_counter() - t0, cpu_capability(),
             plan.describe(), {f: {r: round(ms, 2) for r, ms in t.items()} for f, t in timings.items()})
    return plan


def stop_ids_of(model: nn.Module, tokenizer) -> tuple[int, ...]:
    """End-of-turn ids: the generation config's eos ids, the tokenizer's eos and <|endoftext|> if present."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for special in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return tuple(sorted(ids))


def load_model(spec: str, cache_dir: Path, weight_formats: str = "auto", threads: int = 0) -> LoadedModel:
    """Load a registry model or a local transformers directory for inference with the given weight plan."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    set_threads(threads)
    t0 = time.perf_counter()
    path = resolve_model(spec, cache_dir)
    plan = resolve_plan(weight_formats, path)
    # bf16 everywhere when the plan is bf16 alone; otherwise fp32 activations around the chosen kernels.
    formats = set(plan.formats)
    if formats == {"native"}:
        dtype = None  # as saved
    elif formats == {"bf16"}:
        dtype, plan = torch.bfloat16, FormatPlan.uniform("native")
    else:
        dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    apply_plan(model, plan)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    manifest = read_manifest(path)
    name = manifest["name"] if manifest else path.name
    vh = manifest.get("vocab_sha256") if manifest else None
    return LoadedModel(name=name, path=path, model=model, tokenizer=tokenizer, vocab_sha256=vh or vocab_hash(tokenizer),
                       plan=plan, compute_dtype=next(model.parameters()).dtype,
                       stop_ids=stop_ids_of(model, tokenizer), load_s=time.perf_counter() - t0,
                       weights_sha256=weights_sha256(path))


class KVCache:
    """One sequence's keys and values for every layer, in buffers that grow geometrically.

    Holds the keys/values of the first `length` tokens of its sequence. `crop` is O(1); appending n tokens
    copies only those n (plus an occasional regrowth), unlike transformers' concatenating DynamicCache.
    """

    __slots__ = ("keys", "values", "length", "capacity", "_shape", "dtype")

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        self._shape = (num_layers, num_kv_heads, head_dim)
        self.dtype = dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0
        self.capacity = 0

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        layers, heads, dim = self._shape
        cap = max(total, 2 * self.capacity, 64)
        for store in (self.keys, self.values):
            for i in range(layers):
                new = torch.empty(heads, cap, dim, dtype=self.dtype)
                if i < len(store):
                    new[:, : self.length] = store[i][:, : self.length]
                    store[i] = new
                else:
                    store.append(new)
        self.capacity = cap

    def crop(self, length: int) -> None:
        if length < 0:
            raise ValueError("crop length must be >= 0")
        self.length = min(self.length, length)

    @property
    def nbytes(self) -> int:
        layers, heads, dim = self._shape
        return 2 * layers * heads * dim * self.capacity * torch.tensor([], dtype=self.dtype).element_size()


class _BatchCache:
    """Handed to the model as `past_key_values` for one forward: writes new keys/values into each
    sequence's KVCache and returns, per layer, the keys/values the batch attends to (right-padded)."""

    is_compileable = False

    def __init__(self, caches: list[KVCache], starts: list[int], counts: list[int]):
        self.caches, self.starts, self.counts = caches, starts, counts
        self.totals = [s + n for s, n in zip(starts, counts)]
        self.kv_len = max(self.totals)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        for b, cache in enumerate(self.caches):
            s, n = self.starts[b], self.counts[b]
            cache.keys[layer_idx][:, s:s + n] = key_states[b, :, :n]
            cache.values[layer_idx][:, s:s + n] = value_states[b, :, :n]
        if len(self.caches) == 1:
            t = self.totals[0]
            return self.caches[0].keys[layer_idx][None, :, :t], self.caches[0].values[layer_idx][None, :, :t]
        bsz, heads, _, dim = key_states.shape
        keys = key_states.new_zeros(bsz, heads, self.kv_len, dim)
        values = value_states.new_zeros(bsz, heads, self.kv_len, dim)
        for b, cache in enumerate(self.caches):
            t = self.totals[b]
            keys[b, :, :t] = cache.keys[layer_idx][:, :t]
            values[b, :, :t] = cache.values[layer_idx][:, :t]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class Engine:
    """Batched, ragged forwards of one causal LM over sequences that each keep their own KVCache.

    Async callers run forwards on `executor`, the engine's one compute thread: one OpenMP thread team per
    process (several teams on few cores measurably slow each other down), one forward at a time.
    """

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        threads = torch.get_num_threads()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="s2t-compute", initializer=torch.set_num_threads, initargs=(threads,))
        cfg = lm.model.config
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_dtype = lm.compute_dtype
        self.base = lm.model.base_model
        self.head = lm.model.get_output_embeddings()
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.vocab_size = lm.vocab_size

    def new_cache(self) -> KVCache:
        return KVCache(self.num_layers, self.num_kv_heads, self.head_dim, self.kv_dtype)

    def forward(self, caches: list[KVCache], tokens: list[list[int]], want: list[list[int]]) -> list[torch.Tensor]:
        """Append tokens[b] to caches[b] and return logits [len(want[b]), vocab] for each b (float32, or
        float64 for a float64 model).

        want[b] holds offsets into tokens[b]: offset i yields the next-token logits after tokens[b][i].
        Sequences are grouped by the number of new tokens so that padding (which the linear layers compute
        like real rows) stays small: a 150-token prefill does not run 50 one-token decodes 150 times over.
        """
        if any(len(t) < 1 for t in tokens):
            raise ValueError("every sequence in a forward needs at least one new token")
        # Proposals come from the base model: no S2T-Local adapter is active here (O(1) if none is).
        set_active_adapter(self.lm.model, None)
        out: list[torch.Tensor | None] = [None] * len(caches)
        for group in _padding_groups([len(t) for t in tokens]):
            logits = self._forward_group([caches[i] for i in group], [tokens[i] for i in group], [want[i] for i in group])
            for i, lg in zip(group, logits):
                out[i] = lg
        return out

    @torch.inference_mode()
    def forward_tree(self, cache: KVCache, tokens: list[int], branches: list[tuple[int, list[int]]],
                     adapter: str | None) -> list[torch.Tensor]:
        """Append `tokens` to `cache` and, in the same forward, score-read each branch's candidates.

        A branch (pos, candidate_ids) puts every candidate at absolute position `pos` (the index of the token
        being chosen), attending to tokens [0, pos) and to itself, not to the other candidates (the tree
        layout of s2t.rerank.tree_inputs). Needs pos <= cache.length + len(tokens). Returns per branch the
        final hidden states (after the final norm) at its candidates, [K, hidden]. Afterwards the cache holds
        exactly its old tokens + `tokens`: the candidates' keys/values are written past its length and are
        dead. `adapter` names the LoRA adapter active for this forward only (None = the base model); the
        new tokens' keys/values are computed with it too, so a scorer keeps a cache of its own, built with
        the same adapter throughout (prefill with branches=[]). `tokens` may be empty.
        """
        start, n = cache.length, len(tokens)
        sizes = [len(c) for _, c in branches]
        positions, mask = tree_inputs(start, n, [p for p, _ in branches], sizes)
        if n + sum(sizes) == 0:
            return [torch.zeros(0, self.lm.model.config.hidden_size, dtype=self.kv_dtype) for _ in branches]
        query = len(positions)
        # Room for the candidates too: they are written after the new tokens and left beyond cache.length.
        cache.reserve(start + query)
        ids = torch.tensor(list(tokens) + [c for _, cands in branches for c in cands], dtype=torch.long)[None]
        with adapter_scope(self.lm.model, adapter):
            hidden = self.base(input_ids=ids, attention_mask=mask[None, None], position_ids=positions[None],
                               past_key_values=_BatchCache([cache], [start], [query]), use_cache=True
                               ).last_hidden_state[0]
        cache.length = start + n
        return list(torch.split(hidden[n:], sizes))

    @torch.inference_mode()
    def _forward_group(self, caches: list[KVCache], tokens: list[list[int]], want: list[list[int]]) -> list[torch.Tensor]:
        counts = [len(t) for t in tokens]
        starts = [c.length for c in caches]
        for c, s, n in zip(caches, starts, counts):
            c.reserve(s + n)
        bsz, width = len(caches), max(counts)
        ids = torch.zeros(bsz, width, dtype=torch.long)
        for b, t in enumerate(tokens):
            ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        start = torch.tensor(starts)[:, None]
        count = torch.tensor(counts)[:, None]
        offs = torch.arange(width)[None, :]
        positions = start + torch.minimum(offs, count - 1)
        kv = torch.arange(max(s + n for s, n in zip(starts, counts)))[None, None, :]
        # Row b, query i sees keys 0..start_b+i; padded queries (i >= count_b) see what their last real query sees.
        mask = (kv <= positions[:, :, None])[:, None]
        batch_cache = _BatchCache(caches, starts, counts)
        hidden = self.base(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=batch_cache,
                           use_cache=True).last_hidden_state
        for c, s, n in zip(caches, starts, counts):
            c.length = s + n
        rows = [(b, i) for b, w in enumerate(want) for i in w]
        if not rows:
            return [hidden.new_zeros(0, self.vocab_size) for _ in caches]
        for b, i in rows:
            if not 0 <= i < counts[b]:
                raise IndexError(f"want offset {i} outside the {counts[b]} new tokens of sequence {b}")
        picked = hidden[[b for b, _ in rows], [i for _, i in rows]]
        logits = self.head(picked)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        out, k = [], 0
        for w in want:
            out.append(logits[k:k + len(w)])
            k += len(w)
        return out


def _padding_groups(lengths: list[int], max_waste: float = 0.3, slack: int = 64) -> list[list[int]]:
    """Partition indices (sorted by length) into groups whose padded size stays within max_waste of the real
    size, or within `slack` rows of it: below that, an extra forward (another pass over all weights) costs
    more than computing the padding rows."""
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        padded = lengths[i] * (len(current) + 1)  # sorted ascending: lengths[i] is the group's maximum
        if current and padded - (real + lengths[i]) > max(slack, max_waste * (real + lengths[i])):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        groups.append(current)
    return groups
