"""Model runtime shared by the worker (SLM) and the selector (LLM): loading, KV caches, batched forwards.

Plain synchronous torch. One `Engine.forward` call appends new tokens to any number of sequences, each
with its own KV cache of its own length, in one model forward, and returns logits at the requested
offsets. Rolling a sequence back is `KVCache.crop`, O(1). Works with any transformers causal LM whose
attention layers call `past_key_values.update(...)` and accept a 4D attention mask (Qwen2, Llama, ...).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import kernels
from .weight_formats import (BUCKETS, FormatPlan, apply_plan, cpu_capability, format_available, fuse_outputs,
                             fused_row_function, held_weight_bytes, measure_plan, release_free_memory, row_function,
                             weights_on_huge_pages)
from .config import ConfigError, RuntimeSettings
from .model_store import read_manifest, resolve_model
from .vocab import vocab_hash, weights_sha256
from .rerank import adapter_scope, set_active_adapter, tree_inputs
from .triggers import GatheredLogProbs

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
    # bytes of the weights as held in memory, every format copy included (weight_formats.held_weight_bytes)
    weight_bytes: int = 0
    # RuntimeSettings.huge_pages: the first Engine moves the formatted weights onto 2 MB pages
    huge_pages: bool = True

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer: valid token ids are [0, vocab_size)."""
        return self.model.get_output_embeddings().out_features

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        return {"model": self.name, "path": str(self.path), "device": str(self.device),
                "weight_formats": self.plan.describe(),
                "compute_dtype": str(self.compute_dtype).removeprefix("torch."), "cpu_capability": cpu_capability(),
                "threads": torch.get_num_threads(), "load_s": round(self.load_s, 2),
                "weight_gb": round(self.weight_bytes / 1e9, 3)}


def set_threads(threads: int) -> None:
    """0 means every core: said explicitly, because Ray starts actors with OMP_NUM_THREADS=1."""
    torch.set_num_threads(threads if threads > 0 else (len(os.sched_getaffinity(0)) or 1))


def resolve_plan(spec: str, model_dir: Path | None = None) -> FormatPlan:
    """'auto' measures the formats on this machine at the shape of the model's MLP; anything else is parsed."""
    if spec != "auto":
        plan = FormatPlan.parse(spec)
        missing = {f for f in plan.formats if not format_available(f)}
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


# On a GPU a model computes in one dtype with torch's own kernels: what each weight_formats value means there
# (None: the checkpoint's dtype). The other formats are CPU kernels.
GPU_DTYPES: dict[str, torch.dtype | None] = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32,
                                              "native": None}


def gpu_dtype(device: str, weight_formats: str) -> torch.dtype | None:
    """The dtype a model on `device` (a CUDA device) computes in for `weight_formats`; ConfigError, naming the
    runtime setting, where torch sees no such device or the format is a CPU kernel."""
    if weight_formats not in GPU_DTYPES:
        raise ConfigError(f"bad setting runtime.weight_formats = {weight_formats!r} with runtime.device = {device!r}: "
                          f"those formats are CPU kernels; on a GPU use one of {sorted(GPU_DTYPES)}")
    if not torch.cuda.is_available():
        raise ConfigError(f"bad setting runtime.device = {device!r}: this torch ({torch.__version__}) sees no CUDA "
                          "device (a GPU needs a CUDA build of torch; the project's pin installs the CPU wheel)")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"bad setting runtime.device = {device!r}: torch sees {torch.cuda.device_count()} CUDA "
                          "device(s)")
    return GPU_DTYPES[weight_formats]


def load_model(spec: str, cache_dir: Path, weight_formats: str = "auto", threads: int = 0,
               device: str = "cpu", huge_pages: bool = True) -> LoadedModel:
    """Load a registry model or a local transformers directory for inference with the given weight plan, on
    the CPU or on a CUDA device (RuntimeSettings.device); `huge_pages`: RuntimeSettings.huge_pages."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    set_threads(threads)
    t0 = time.perf_counter()
    path = resolve_model(spec, cache_dir)
    if device != "cpu":
        dtype = gpu_dtype(device, weight_formats)
        # straight onto the device (accelerate's loader), never a host copy of the whole model first
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa",
                                                     device_map={"": device})
        model.eval().requires_grad_(False)
        # the plan only names what computes here (torch's own kernels in that dtype): no format is applied
        return _loaded(model, path, FormatPlan.uniform({torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, "native")), t0)
    plan = resolve_plan(weight_formats, path)
    # bf16 everywhere when the plan is bf16 alone; otherwise fp32 activations around the chosen kernels.
    formats = set(plan.formats)
    if formats == {"native"}:
        dtype = None  # as saved
    elif formats == {"bf16"}:
        dtype, plan = torch.bfloat16, FormatPlan.uniform("native")
    else:
        dtype = torch.float32
    # Mixed plans load the checkpoint as saved and make each matrix's formats from it, then cast what is left
    # (embeddings, norms, biases) to the compute dtype: loading in fp32 first would hold an fp32 copy of the
    # whole model beside the formats at the peak (the 1.5B peaked at 14.2 GiB that way, now 8.8). Upcasting a
    # bf16 checkpoint is exact, so the formats, and the tokens, are the same either way.
    load_dtype = None if dtype is torch.float32 else dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=load_dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    apply_plan(model, plan, out_dtype=dtype)
    if dtype is not None:
        model.to(dtype)
    release_free_memory()
    lm = _loaded(model, path, plan, t0)
    lm.huge_pages = huge_pages
    return lm


def load_with(spec: str, cache_dir: Path, runtime: RuntimeSettings) -> LoadedModel:
    """load_model with a role's runtime settings (worker.runtime, selector.runtime): every one of them, so a
    setting added there reaches every process that loads a model."""
    return load_model(spec, cache_dir, runtime.weight_formats, runtime.threads, runtime.device, runtime.huge_pages)


def _loaded(model: nn.Module, path: Path, plan: FormatPlan, t0: float) -> LoadedModel:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    manifest = read_manifest(path)
    name = manifest["name"] if manifest else path.name
    vh = manifest.get("vocab_sha256") if manifest else None
    return LoadedModel(name=name, path=path, model=model, tokenizer=tokenizer, vocab_sha256=vh or vocab_hash(tokenizer),
                       plan=plan, compute_dtype=next(model.parameters()).dtype,
                       stop_ids=stop_ids_of(model, tokenizer), load_s=time.perf_counter() - t0,
                       weights_sha256=weights_sha256(path), weight_bytes=held_weight_bytes(model))


class KVCache:
    """One sequence's keys and values for layers [first_layer, num_layers), in buffers that grow geometrically.

    Holds the keys/values of the first `length` tokens of its sequence. `crop` is O(1); appending n tokens
    copies only those n (plus an occasional regrowth), unlike transformers' concatenating DynamicCache.

    A drafting cache may also keep a *tap*: the hidden state entering layer `tap_layer` at each position
    (written by Engine.forward). An S2T-Local scorer whose adapter leaves the layers below `tap_layer` alone
    starts its own forward there, from the tap, instead of recomputing those layers (Engine.score_trees).
    Invariant: tap[:length] belongs to the same tokens as keys/values[:length].
    """

    __slots__ = ("keys", "values", "length", "capacity", "_shape", "dtype", "device", "first_layer", "tap_layer",
                 "tap", "_hidden")

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, first_layer: int = 0,
                 tap_layer: int | None = None, hidden_size: int = 0, device: torch.device | str = "cpu"):
        if not 0 <= first_layer < num_layers:
            raise ValueError(f"first_layer {first_layer} outside [0, {num_layers})")
        self._shape = (num_layers - first_layer, num_kv_heads, head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.first_layer = first_layer
        self.tap_layer = tap_layer
        self._hidden = hidden_size
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.tap: torch.Tensor | None = None
        self.length = 0
        self.capacity = 0

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        layers, heads, dim = self._shape
        cap = max(total, 2 * self.capacity, 64)
        for store in (self.keys, self.values):
            for i in range(layers):
                new = torch.empty(heads, cap, dim, dtype=self.dtype, device=self.device)
                if i < len(store):
                    new[:, : self.length] = store[i][:, : self.length]
                    store[i] = new
                else:
                    store.append(new)
        if self.tap_layer is not None:
            tap = torch.empty(cap, self._hidden, dtype=self.dtype, device=self.device)
            if self.tap is not None:
                tap[: self.length] = self.tap[: self.length]
            self.tap = tap
        self.capacity = cap

    def crop(self, length: int) -> None:
        if length < 0:
            raise ValueError("crop length must be >= 0")
        self.length = min(self.length, length)

    def fork(self, length: int, room: int = 0) -> "KVCache":
        """A new cache holding a copy of this one's first `length` tokens (keys, values and tap), with space for
        `room` more; this cache is untouched. Costs one copy of those tokens' keys/values."""
        if not 0 <= length <= self.length:
            raise ValueError(f"fork length {length} outside [0, {self.length}]")
        layers, heads, dim = self._shape
        other = KVCache(self.first_layer + layers, heads, dim, self.dtype, first_layer=self.first_layer,
                        tap_layer=self.tap_layer, hidden_size=self._hidden, device=self.device)
        other.reserve(max(length + room, 1))
        for src, dst in ((self.keys, other.keys), (self.values, other.values)):
            for s, d in zip(src, dst):
                d[:, :length] = s[:, :length]
        if self.tap_layer is not None and self.tap is not None:
            other.tap[:length] = self.tap[:length]
        other.length = length
        return other

    @property
    def nbytes(self) -> int:
        layers, heads, dim = self._shape
        size = torch.tensor([], dtype=self.dtype).element_size()
        tap = self.capacity * self._hidden * size if self.tap_layer is not None else 0
        return 2 * layers * heads * dim * self.capacity * size + tap


@dataclasses.dataclass
class TreeJob:
    """One sequence's share of a batched scoring forward (Engine.score_trees).

    `cache` is the scorer's own cache (computed with the adapter) for layers [cache.first_layer, N); `tokens`
    are appended to it; each branch (pos, candidate_ids) is scored at position pos. When cache.first_layer > 0
    the forward is split there: `base` is the sequence's drafting cache, tapped at that layer, whose tap gives
    the new tokens' hidden states and whose lower layers the candidates attend to. `base_length` is the base
    cache's length to use (read once, by the caller, on the compute thread).
    """

    cache: KVCache
    tokens: list[int]
    branches: list[tuple[int, list[int]]]
    base: KVCache | None = None
    base_length: int = 0


class _BatchCache:
    """Handed to the model as `past_key_values` for one forward: writes new keys/values into each
    sequence's KVCache and returns, per layer, the keys/values the batch attends to (right-padded).

    The padded batch tensors are allocated (zeroed) once per forward and refilled layer after layer: every
    layer writes the same [b, :, :totals[b]] regions, so the padding stays zero, and a layer's attention is
    done with them before the next layer's update. (Allocating them per layer cost a zeroing of tens of MB,
    fresh pages from the kernel, in every layer of every step: at 32 sessions of ~600 tokens on the 1.5B,
    py-spy put 15 % of the selector's decode time in this update.)"""

    is_compileable = False

    def __init__(self, caches: list[KVCache], starts: list[int], counts: list[int]):
        self.caches, self.starts, self.counts = caches, starts, counts
        self.totals = [s + n for s, n in zip(starts, counts)]
        self.kv_len = max(self.totals)
        self._padded: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        for b, cache in enumerate(self.caches):
            s, n, i = self.starts[b], self.counts[b], layer_idx - cache.first_layer
            cache.keys[i][:, s:s + n] = key_states[b, :, :n]
            cache.values[i][:, s:s + n] = value_states[b, :, :n]
        if len(self.caches) == 1:
            t, cache = self.totals[0], self.caches[0]
            i = layer_idx - cache.first_layer
            return cache.keys[i][None, :, :t], cache.values[i][None, :, :t]
        bsz, heads, _, dim = key_states.shape
        shape = (bsz, heads, self.kv_len, dim)
        if self._padded is None or self._padded[0].shape != shape or self._padded[0].dtype != key_states.dtype:
            self._padded = (key_states.new_zeros(shape), value_states.new_zeros(shape))
        keys, values = self._padded
        for b, cache in enumerate(self.caches):
            t, i = self.totals[b], layer_idx - cache.first_layer
            keys[b, :, :t] = cache.keys[i][:, :t]
            values[b, :, :t] = cache.values[i][:, :t]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


# The longest forward (new tokens of one sequence) the compiled step takes; longer ones (prefills) go through
# transformers' forward. Measured on the 1.5B, one thread, a Sapphire Rapids Xeon (`taskset -c 1 python
# bench/forward_rows.py --name forward-rows-direct --plan int8_vnni,int8_vnni,int8_amx,int8_amx,int8_amx --path
# model-forward --path engine`): the compiled step 1.17-1.34x faster for 1-16 rows, 1.08x at 32, even at 64,
# 0.97x at 128, where its attention (one dot product per query row and key) outweighs what it saves.
# S2T_COMPILED_MAX_ROWS=1 keeps only one-token steps compiled, of one sequence or several (to measure what the
# rest saves, end to end).
COMPILED_MAX_ROWS = int(os.environ.get("S2T_COMPILED_MAX_ROWS", "32"))
# ... and the most rows of a forward of several sequences (each within COMPILED_MAX_ROWS): sessions decoding one
# token each gain 1.41x (0.5B) and 1.22x (1.5B) at 100 sessions, two threads, the same Xeon
# (bench/results/batched-decode-compiled-128.md); measured up to 100.
COMPILED_MAX_BATCH_ROWS = int(os.environ.get("S2T_COMPILED_MAX_BATCH_ROWS", "128"))
# Attention on a GPU, without cuDNN's: it builds a plan per shape, and every Select attends over a key length
# of its own (its session's context so far). On an H200 (torch 2.11) one session's Selects of 8 tokens on the
# 1.5B shape took 49 ms a round without it against 691 (rounds up to 1.9 s) with it, and 32B-shape ones 85
# against 136 ms (bench/results/gpu-selector-h200.md); torch picks among the rest per call.
CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_dtype = lm.compute_dtype
        # Where the weights, caches and activations live. Logits come back on the CPU either way (forward).
        self.device = lm.device
        self.base = lm.model.base_model
        self.head = lm.model.get_output_embeddings()
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.vocab_size = lm.vocab_size
        self.hidden_size = cfg.hidden_size
        # Split scoring needs the decoder's parts by their usual names and full attention in every layer.
        types = getattr(cfg, "layer_types", None) or []
        self.can_split = (all(hasattr(self.base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
                          and all(t == "full_attention" for t in types))
        # Batch-1 decoding (one sequence, one new token: a user's request alone on its worker or selector) runs
        # the decoder's parts directly (`_decode_one`) instead of through transformers' model forward, whose
        # per-call and per-layer plumbing (mask preparation, output capture, the cache interface, attention
        # dispatch) is a measurable share of a step that reads the weights in ~25 ms (issue #14).
        self.fast_decode = self.can_split and _plain_decoder_layers(self.base)
        # ... with q/k/v and gate/up each one kernel call over their shared input (fuse_outputs: the weights
        # are shared, not copied; None where a layer's one-row format cannot be fused). Kept on the model, so a
        # second Engine over the same model shares them instead of fusing the fused layers' views again.
        self._fused: list[tuple[nn.Module | None, nn.Module | None]] = []
        if self.fast_decode:
            self._fused = lm.model.__dict__.get("_s2t_fused_decode") or [
                (fuse_outputs([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]),
                 fuse_outputs([l.mlp.gate_proj, l.mlp.up_proj]) if _gated_mlp(l.mlp) else None)
                for l in self.base.layers]
            lm.model.__dict__["_s2t_fused_decode"] = self._fused
        # ... and the weights, fused or not, on 2 MB pages (weights_on_huge_pages): once per model, after the
        # fusion (which makes new storages) and before any step holds them
        if lm.huge_pages and self.device.type == "cpu" and not lm.model.__dict__.get("_s2t_huge_pages"):
            weights_on_huge_pages([lm.model, *(layer for pair in self._fused for layer in pair if layer is not None)])
            lm.model.__dict__["_s2t_huge_pages"] = True
        # ... and, in float32 with the small operations compiled (kernels/decode_ops.cpp), each layer as eight
        # calls (two norms, four products, the attention, silu * up) instead of several dozen torch operations;
        # so do one sequence's forwards of a few new tokens (a selector's Select block), with each product in
        # the format the plan picks for that many rows (`_steps_for`).
        self._ops = None
        self._steps: dict[int, list[_LayerStep] | None] = {}  # per row-count bucket of the plan, built on first use
        if self.fast_decode and self.kv_dtype == torch.float32 and self.device.type == "cpu":
            self._final_norm = _norm_weight(self.base.norm)
            if self._final_norm is not None and _silu_mlp(cfg) and self._steps_for(1) is not None:
                self._ops = kernels.load_decode_ops()
        self.tap_layer: int | None = None  # new caches record the hidden state entering this layer
        self._tap_hook = None
        self._tap_rows: tuple | None = None  # (caches, starts, counts) while Engine.forward runs
        # Set only while forward_logprobs runs its forward (one at a time, on the compute thread): the head's
        # output stays on the device, where its log-probabilities are read.
        self._logits_on_device = False
        # A KV pool and the graphed forwards over it (use_kv_pool; a selector on a GPU), or None.
        self.kv_pool = None
        self.graphed = None

    def use_kv_pool(self, slots: int, max_len: int, capture: bool) -> None:
        """From now on, new caches take a slot of a pool of `slots` × `max_len` tokens while one is free, and
        forwards of pooled caches that fit its buckets run as s2t.cuda_graphs.GraphedForward: replays of captured
        CUDA graphs (`capture`, a GPU), or eagerly (what the tests compare). Caches made before keep theirs."""
        if not self.fast_decode:
            raise ValueError("graphed forwards compute Qwen2/Llama-shaped decoder layers only")
        from s2t.cuda_graphs import GraphedForward, KVPool

        self.kv_pool = KVPool(self.num_layers, self.num_kv_heads, self.head_dim, self.kv_dtype, self.device,
                              slots, max_len)
        self.graphed = GraphedForward(self, self.kv_pool, capture)

    def new_cache(self, first_layer: int = 0) -> KVCache:
        """A cache for layers [first_layer, N) (a split scorer's); drafting caches (first_layer 0) are tapped
        at `tap_layer` when one is set, or take a slot of the KV pool where there is one (use_kv_pool)."""
        tap = self.tap_layer if first_layer == 0 else None
        if self.kv_pool is not None and first_layer == 0 and tap is None:
            slot = self.kv_pool.take()
            if slot is not None:
                from s2t.cuda_graphs import PooledKVCache

                return PooledKVCache(self.kv_pool, slot, self.num_layers, self.num_kv_heads, self.head_dim,
                                     self.kv_dtype, self.device)
        return KVCache(self.num_layers, self.num_kv_heads, self.head_dim, self.kv_dtype, first_layer=first_layer,
                       tap_layer=tap, hidden_size=self.hidden_size, device=self.device)

    def set_tap(self, layer: int | None) -> None:
        """From now on, new drafting caches keep the hidden state entering `layer` (None: stop tapping). Caches
        made before keep the tap they had. Call on the compute thread, between forwards."""
        if layer is not None and not (self.can_split and 0 < layer < self.num_layers):
            raise ValueError(f"cannot tap layer {layer} of this model (split scoring supported: {self.can_split})")
        if self._tap_hook is not None:
            self._tap_hook.remove()
            self._tap_hook = None
        self.tap_layer = layer
        if layer is not None:
            self._tap_hook = self.base.layers[layer].register_forward_pre_hook(self._record_tap)

    def _record_tap(self, module, args):
        if self._tap_rows is None:  # a scoring pass, not a drafting forward
            return
        hidden = args[0]
        for b, (cache, s, n) in enumerate(zip(*self._tap_rows)):
            if cache.tap is not None:
                cache.tap[s:s + n] = hidden[b, :n]

    def forward(self, caches: list[KVCache], tokens: list[list[int]], want: list[list[int]]) -> list[torch.Tensor]:
        """Append tokens[b] to caches[b] and return logits [len(want[b]), vocab] for each b (float32, or
        float64 for a float64 model), on the CPU whatever device the model runs on.

        want[b] holds offsets into tokens[b]: offset i yields the next-token logits after tokens[b][i].
        Sequences are grouped by the number of new tokens so that padding (which the linear layers compute
        like real rows) stays small: a 150-token prefill does not run 50 one-token decodes 150 times over.
        """
        if self.device.type == "cuda":
            with sdpa_kernel(CUDA_ATTENTION):
                return self._forward(caches, tokens, want)
        return self._forward(caches, tokens, want)

    def _forward(self, caches: list[KVCache], tokens: list[list[int]], want: list[list[int]]) -> list[torch.Tensor]:
        if any(len(t) < 1 for t in tokens):
            raise ValueError("every sequence in a forward needs at least one new token")
        # Proposals come from the base model: no S2T-Local adapter is active here (O(1) if none is).
        set_active_adapter(self.lm.model, None)
        rows = sum(len(t) for t in tokens)
        if self.graphed is not None and self.graphed.accepts(caches, [len(t) for t in tokens]):
            for w, t in zip(want, tokens):
                _check_want(w, len(t))
            return self.graphed.forward(caches, tokens, want)
        if self.fast_decode and all(c.first_layer == 0 for c in caches):
            # one pass over the weights for every sequence's rows: a batch of decodes (sessions of one worker or
            # selector) or one sequence's few new tokens (a Select block)
            compiled = (self._ops is not None and max(len(t) for t in tokens) <= COMPILED_MAX_ROWS
                        and rows <= COMPILED_MAX_BATCH_ROWS)
            steps = self._steps_for(rows) if compiled else None
            if steps is not None:
                for w, t in zip(want, tokens):
                    _check_want(w, len(t))
                return self._decode_compiled(caches, tokens, want, steps)
            if len(caches) == 1 and len(tokens[0]) == 1 and want[0] == [0]:
                return [self._decode_one(caches[0], tokens[0][0])]
        out: list[torch.Tensor | None] = [None] * len(caches)
        for group in _padding_groups([len(t) for t in tokens]):
            logits = self._forward_group([caches[i] for i in group], [tokens[i] for i in group], [want[i] for i in group])
            for i, lg in zip(group, logits):
                out[i] = lg
        return out

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
        return self.score_trees([TreeJob(cache, list(tokens), branches)], adapter)[0]

    @torch.inference_mode()
    def score_trees(self, jobs: list[TreeJob], adapter: str | None) -> list[list[torch.Tensor]]:
        """forward_tree for several sequences in one batched forward (per split layer), with the split.

        A job whose cache starts at layer S > 0 runs in two passes: its candidates go through layers [0, S)
        attending to the base (drafting) cache, which holds those layers' keys/values of the prefix already
        (the adapter has no weights there, so base and scorer agree on them); then new tokens — entering at
        layer S from the base cache's tap, never recomputed below it — and candidates go through [S, N) on
        the scorer's cache with the adapter. Results equal the unsplit forward up to rounding. CPU only: S2T-Local
        scores on the worker, which runs on the CPU (RuntimeSettings.device).
        """
        if self.device.type != "cpu":
            raise ValueError(f"S2T-Local scoring runs on the CPU, not on {self.device}")
        out: list[list[torch.Tensor] | None] = [None] * len(jobs)
        for split in sorted({j.cache.first_layer for j in jobs}):
            idx = [i for i, j in enumerate(jobs) if j.cache.first_layer == split]
            for i, res in zip(idx, self._score_split([jobs[i] for i in idx], split, adapter)):
                out[i] = res
        return out

    def _score_split(self, jobs: list[TreeJob], split: int, adapter: str | None) -> list[list[torch.Tensor]]:
        embed = self.base.embed_tokens
        cand_ids = [[c for _, cands in j.branches for c in cands] for j in jobs]
        sizes = [[len(c) for _, c in j.branches] for j in jobs]
        inputs, layouts = [], []
        if split > 0:
            # 1. candidates through layers [0, split), attending to the drafting cache's prefix
            lower_in, lower_layout = [], []
            for j, ids, sz in zip(jobs, cand_ids, sizes):
                if j.base is None or j.base.tap_layer != split or j.base.tap is None:
                    raise ValueError(f"a scorer split at layer {split} needs a drafting cache tapped there")
                start = j.cache.length
                if j.base_length < start + len(j.tokens) or any(p > j.base_length for p, _ in j.branches):
                    raise ValueError(f"the drafting cache holds {j.base_length} tokens, the scorer needs "
                                     f"{start + len(j.tokens)} and branches at {[p for p, _ in j.branches]}")
                lower_in.append(embed(torch.tensor(ids, dtype=torch.long)))
                lower_layout.append(tree_inputs(j.base_length, 0, [p for p, _ in j.branches], sz))
            lower = self._run_layers(range(0, split), [j.base for j in jobs], [j.base_length for j in jobs],
                                     lower_in, lower_layout, adapter=None)
            for j, h in zip(jobs, lower):
                start = j.cache.length
                inputs.append(torch.cat([j.base.tap[start:start + len(j.tokens)], h]))
        else:
            for j, ids in zip(jobs, cand_ids):
                inputs.append(embed(torch.tensor(list(j.tokens) + ids, dtype=torch.long)))
        for j, sz in zip(jobs, sizes):
            layouts.append(tree_inputs(j.cache.length, len(j.tokens), [p for p, _ in j.branches], sz))
        # 2. new tokens and candidates through layers [split, N) on the scorer's cache, with the adapter
        hidden = self._run_layers(range(split, self.num_layers), [j.cache for j in jobs],
                                  [j.cache.length for j in jobs], inputs, layouts, adapter=adapter, norm=True)
        results = []
        for j, h, sz in zip(jobs, hidden, sizes):
            j.cache.length += len(j.tokens)
            results.append(list(torch.split(h[len(j.tokens):], sz)))
        return results

    @torch.inference_mode()
    def _decode_one(self, cache: KVCache, token: int) -> torch.Tensor:
        """Engine.forward for one sequence and one new token, returning its logits [1, vocab].

        The same modules and the same operations as the model's forward for this shape (transformers' sdpa
        path for one query: the query heads grouped per key/value head, a boolean mask of all-true), minus
        the plumbing; `tests/test_runtime.py` checks the two agree. Honours the cache's tap."""
        base = self.base
        t = cache.length
        cache.reserve(t + 1)
        dev = self.device
        hidden = base.embed_tokens(torch.tensor([[token]], dtype=torch.long, device=dev))  # [1, 1, H]
        position = torch.tensor([[t]], dtype=torch.long, device=dev)
        cos, sin = base.rotary_emb(hidden, position)
        cos, sin = cos[:, None], sin[:, None]  # [1, 1, 1, D], broadcast over heads
        mask = torch.ones(1, 1, 1, t + 1, dtype=torch.bool, device=dev)
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        for i, layer in enumerate(base.layers):
            if i == cache.tap_layer and cache.tap is not None:
                cache.tap[t] = hidden[0, 0]
            q, k, v = self._rotated_qkv(i, layer.input_layernorm(hidden), cos, sin)
            cache.keys[i][:, t:t + 1] = k[0]
            cache.values[i][:, t:t + 1] = v[0]
            keys, values = cache.keys[i][None, :, :t + 1], cache.values[i][None, :, :t + 1]
            if kv_heads != heads:
                q = q.reshape(1, kv_heads, heads // kv_heads, dim)
            o = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                                 scale=layer.self_attn.scaling)
            hidden = self._finish_layer(i, hidden, o.reshape(1, heads, 1, dim).transpose(1, 2).reshape(1, 1, heads * dim))
        cache.length = t + 1
        return self._output_logits(self.head(base.norm(hidden)[0]))

    def _rotated_qkv(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder layer i's queries [B, heads, W, D] and keys and values [B, kv heads, W, D] for its normed input
        x [B, W, H], q and k turned by the rotary embedding (cos, sin broadcast over heads): one product where
        the layer's q/k/v are fused (Engine._fused), the heads laid out [q | k | v] so q and k turn in one go."""
        attn, (qkv_proj, _) = self.base.layers[i].self_attn, self._fused[i]
        batch, width = x.shape[:2]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        if qkv_proj is not None:
            qkv = qkv_proj(x).view(batch, width, heads + 2 * kv_heads, dim).transpose(1, 2)
            qk = qkv[:, :heads + kv_heads]
            qk = qk * cos + _rotate_half(qk) * sin
            return qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:]
        q = attn.q_proj(x).view(batch, width, heads, dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, width, kv_heads, dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, width, kv_heads, dim).transpose(1, 2)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def _finish_layer(self, i: int, hidden: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The residual stream after decoder layer i, from the one before it and its attention's output
        o [B, W, heads * D]: the output projection, then the post-attention norm and the MLP (gate and up in one
        product where fused), each added to the stream."""
        layer, (_, gate_up_proj) = self.base.layers[i], self._fused[i]
        hidden = hidden + layer.self_attn.o_proj(o)
        x = layer.post_attention_layernorm(hidden)
        if gate_up_proj is not None:
            gate, up = gate_up_proj(x).chunk(2, dim=-1)
            return hidden + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return hidden + layer.mlp(x)

    def forward_logprobs(self, caches: list[KVCache], tokens: list[list[int]], want: list[list[int]],
                         ids: list[list[list[int]]]) -> list[GatheredLogProbs]:
        """Engine.forward, with the logits read where they are computed: per sequence b, the log-softmax at
        ids[b][i] (and the top-1) for the row of offset want[b][i]. On a GPU only those numbers come back to
        the host, not [rows, vocab] logits."""
        self._logits_on_device = True
        try:
            logits = self.forward(caches, tokens, want)
        finally:
            self._logits_on_device = False
        gathered = GatheredLogProbs(torch.cat(logits), [row for rows in ids for row in rows])
        return gathered.split([len(w) for w in want])

    def _no_logits(self, dtype: torch.dtype) -> torch.Tensor:
        """A sequence's logits when none are wanted: [0, vocab], where _output_logits would put them."""
        return torch.zeros(0, self.vocab_size, dtype=torch.promote_types(dtype, torch.float32),
                           device=self.device if self._logits_on_device else "cpu")

    def _output_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's output as every forward returns it: on the CPU (copied in the head's dtype, half the bytes
        of float32 for a bf16 model on a GPU, and exact), at least float32, soft-capped where the model is.
        Within forward_logprobs they stay on the device."""
        if not self._logits_on_device:
            logits = logits.cpu()
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _steps_for(self, rows: int) -> list[_LayerStep] | None:
        """The compiled step's layers for forwards of `rows` new tokens, each product in the format the plan
        picks for that row count; built once per bucket of the plan (BUCKETS). None where a layer is not what
        the compiled step computes."""
        bucket = next(i for i, bound in enumerate(BUCKETS) if rows <= bound)
        if bucket not in self._steps:
            steps = [_LayerStep.of(layer, qkv, gate_up, rows) for layer, (qkv, gate_up) in zip(self.base.layers, self._fused)]
            self._steps[bucket] = None if None in steps else steps
        return self._steps[bucket]

    @torch.inference_mode()
    def _decode_compiled(self, caches: list[KVCache], tokens: list[list[int]], want: list[list[int]],
                         steps: list[_LayerStep]) -> list[torch.Tensor]:
        """Engine.forward for sequences with a few new tokens each, in float32 with the small operations compiled
        (kernels/decode_ops.cpp): per layer, the residual add and RMSNorm, the rotary embedding + cache write +
        causal attention, and silu * up are one call each (the attention too for several sequences, each over
        its own cache), and the four products call their kernels directly (row_function) on every sequence's
        rows at once. The same arithmetic as the model forward in another summation order:
        tests/test_decode_ops.py bounds the difference. A sequence's results do not depend on what shares its
        forward where the plan has one batch-invariant format at every row count (int8_vnni; tested there too).
        `steps`: _steps_for(total rows). Returns per sequence the logits at offsets want[b] [len(want[b]),
        vocab]; honours each cache's tap."""
        ops, base = self._ops, self.base
        counts = [len(t) for t in tokens]
        starts = [c.length for c in caches]
        offsets = [0, *itertools.accumulate(counts)]  # sequence b's rows: offsets[b]:offsets[b + 1]
        n = offsets[-1]
        for c, s, k in zip(caches, starts, counts):
            c.reserve(s + k)
        flat = [token for t in tokens for token in t]
        hidden = base.embed_tokens(torch.tensor(flat, dtype=torch.long)).reshape(n, self.hidden_size)
        positions = torch.tensor([s + i for s, k in zip(starts, counts) for i in range(k)])
        cos, sin = base.rotary_emb(hidden, positions[None])
        cos, sin = cos.reshape(n, -1).contiguous(), sin.reshape(n, -1).contiguous()
        taps = [(c, t, a, b) for c, t, a, b in zip(caches, starts, offsets[:-1], offsets[1:]) if c.tap is not None]
        # hidden is the residual stream before `delta` (the last block's output) is added: the add happens in
        # the next norm's call, in place (hidden is this forward's own tensor)
        delta = None
        for i, step in enumerate(steps):
            x = ops.add_rms_norm(hidden, delta, step.input_norm, step.eps)
            for cache, t, a, b in taps:
                if i == cache.tap_layer:
                    cache.tap[t:t + b - a] = hidden[a:b]
            qkv = step.qkv(x)
            if len(caches) == 1:
                o = ops.rope_attend(qkv, cos, sin, caches[0].keys[i], caches[0].values[i], starts[0], step.scaling,
                                    self.num_heads)
            else:  # each sequence's rows over its own cache, in one call (one thread team for all of them)
                o = ops.rope_attend_batch(qkv, cos, sin, [c.keys[i] for c in caches], [c.values[i] for c in caches],
                                          starts, counts, step.scaling, self.num_heads)
            x = ops.add_rms_norm(hidden, step.o(o), step.post_norm, step.eps)
            delta = step.down(ops.silu_mul(step.gate_up(x)))
        for c, s, k in zip(caches, starts, counts):
            c.length = s + k
        normed = ops.add_rms_norm(hidden, delta, *self._final_norm)
        picked = [offsets[b] + i for b, w in enumerate(want) for i in w]
        if picked != list(range(n)):
            normed = normed[picked]  # the head (the largest matrix) reads only the rows asked for
        logits = self._output_logits(self.head(normed))
        return list(logits.split([len(w) for w in want]))

    def _run_layers(self, layers: range, caches: list[KVCache], starts: list[int], inputs: list[torch.Tensor],
                    layouts: list[tuple[torch.Tensor, torch.Tensor]], adapter: str | None, norm: bool = False
                    ) -> list[torch.Tensor]:
        """Run decoder layers `layers` over ragged queries: inputs[b] [q_b, H] at layouts[b] = (positions [q_b],
        mask [q_b, starts[b] + q_b]) against caches[b], whose first starts[b] tokens are the keys before the
        query; the query's keys/values are written at starts[b] onward (the caller sets lengths)."""
        counts = [x.shape[0] for x in inputs]
        width = max(counts)
        if width == 0:
            return [x for x in inputs]
        kv = max(s + n for s, n in zip(starts, counts))
        bsz = len(inputs)
        dtype = self.kv_dtype
        hidden = torch.zeros(bsz, width, self.hidden_size, dtype=dtype)
        positions = torch.zeros(bsz, width, dtype=torch.long)
        mask = torch.zeros(bsz, 1, width, kv, dtype=torch.bool)
        mask[:, :, :, 0] = True  # padding queries attend to one real key (no all-masked softmax rows)
        for b, (x, (pos, m), s) in enumerate(zip(inputs, layouts, starts)):
            n = x.shape[0]
            caches[b].reserve(s + n)
            hidden[b, :n] = x
            positions[b, :n] = pos
            mask[b, 0, :n] = False
            mask[b, 0, :n, :s + n] = m
        batch_cache = _BatchCache(caches, starts, counts)
        position_embeddings = self.base.rotary_emb(hidden, positions)
        with adapter_scope(self.lm.model, adapter):
            for i in layers:
                hidden = self.base.layers[i](hidden, attention_mask=mask, position_embeddings=position_embeddings,
                                             position_ids=positions, past_key_values=batch_cache, use_cache=True)
        if norm:
            hidden = self.base.norm(hidden)
        return [hidden[b, :n] for b, n in enumerate(counts)]

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
        # built on the host, then one copy each to a GPU (no-ops on the CPU)
        ids, positions, mask = ids.to(self.device), positions.to(self.device), mask.to(self.device)
        batch_cache = _BatchCache(caches, starts, counts)
        self._tap_rows = (caches, starts, counts)
        try:
            hidden = self.base(input_ids=ids, attention_mask=mask, position_ids=positions,
                               past_key_values=batch_cache, use_cache=True).last_hidden_state
        finally:
            self._tap_rows = None
        for c, s, n in zip(caches, starts, counts):
            c.length = s + n
        rows = [(b, i) for b, w in enumerate(want) for i in w]
        if not rows:
            return [self._no_logits(hidden.dtype) for _ in caches]
        for w, n in zip(want, counts):
            _check_want(w, n)
        picked = hidden[[b for b, _ in rows], [i for _, i in rows]]
        logits = self._output_logits(self.head(picked))
        out, k = [], 0
        for w in want:
            out.append(logits[k:k + len(w)])
            k += len(w)
        return out


def _check_want(want: list[int], count: int) -> None:
    for i in want:
        if not 0 <= i < count:
            raise IndexError(f"want offset {i} outside the {count} new tokens of its sequence")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclasses.dataclass(frozen=True)
class _LayerStep:
    """One decoder layer as Engine._decode_compiled calls it for forwards of some number of rows: its norms'
    float32 weights and epsilon, its attention's scaling, and its products as plain functions (q/k/v and
    gate/up side by side) in the formats the plan picks for that row count."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    scaling: float
    qkv: object
    o: object
    gate_up: object
    down: object

    @classmethod
    def of(cls, layer: nn.Module, qkv_proj: nn.Module | None, gate_up_proj: nn.Module | None, rows: int
           ) -> "_LayerStep | None":
        """The layer's step for `rows` rows (qkv_proj, gate_up_proj: its fused products, see Engine._fused), or
        None where a part is not what the compiled step computes."""
        if qkv_proj is None or gate_up_proj is None:
            return None
        attn, mlp = layer.self_attn, layer.mlp
        norms = _norm_weight(layer.input_layernorm), _norm_weight(layer.post_attention_layernorm)
        fns = [fused_row_function(qkv_proj, [attn.q_proj, attn.k_proj, attn.v_proj], rows),
               row_function(attn.o_proj, rows),
               fused_row_function(gate_up_proj, [mlp.gate_proj, mlp.up_proj], rows),
               row_function(mlp.down_proj, rows)]
        if None in norms or norms[0][1] != norms[1][1] or None in fns:
            return None
        return cls(norms[0][0], norms[1][0], norms[0][1], float(layer.self_attn.scaling), *fns)


def _norm_weight(norm: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight as float32, epsilon) of a Qwen2/Llama RMSNorm (weight * x / sqrt(mean(x^2) + eps)), else None."""
    if type(norm).__name__ not in ("Qwen2RMSNorm", "LlamaRMSNorm") or not hasattr(norm, "variance_epsilon"):
        return None
    return norm.weight.detach().to(torch.float32).contiguous(), float(norm.variance_epsilon)


def _silu_mlp(cfg) -> bool:
    return getattr(cfg, "hidden_act", None) == "silu"


def _gated_mlp(mlp: nn.Module) -> bool:
    """A Qwen2/Llama MLP, down(act(gate(x)) * up(x)), with gate and up of one size."""
    return (type(mlp).__name__ in ("Qwen2MLP", "LlamaMLP") and hasattr(mlp, "act_fn")
            and mlp.gate_proj.out_features == mlp.up_proj.out_features
            and getattr(mlp.gate_proj, "bias", None) is None and getattr(mlp.up_proj, "bias", None) is None)


def _plain_decoder_layers(base: nn.Module) -> bool:
    """The decoder layers are Qwen2/Llama-shaped (the layout `Engine._decode_one` computes): pre-norm attention
    with q/k/v/o projections and the default scaling, then a pre-norm MLP; full attention, no softcap."""
    cfg = base.config
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "use_sliding_window", False):
        return False
    for layer in base.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
            return False
        if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return False
        if hasattr(layer, "pre_feedforward_layernorm") or hasattr(layer, "post_feedforward_layernorm"):
            return False
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "sliding_window", None):
            return False
    return type(base).__name__ in ("Qwen2Model", "LlamaModel")


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
