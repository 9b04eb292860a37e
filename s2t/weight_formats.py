"""Per-operation weight formats for linear layers, chosen by measuring on the machine at hand.

CPUs of the same nominal kind differ (measured on two 2-core machines of one kind): with AVX-512 bf16, bf16 matmuls are fastest at
any row count; on AVX2-only machines bf16 GEMMs stay near 18 GFLOP/s whatever the batch, fp32 through
oneDNN's prepacked kernels batches well, and weight-only int8 decodes fastest at one or a few rows.
A model therefore keeps each linear weight in the one or two formats its row-count buckets need, and
`FormattedLinear` picks the format by the number of rows in the call.

Formats:
  native      the nn.Linear as loaded (any dtype); the exact reference, used by the tests in float64
  bf16        bfloat16 weight, F.linear
  fp32        float32 weight, F.linear (MKL)
  fp32_packed float32 weight prepacked for oneDNN (mkldnn._linear_pointwise)
  int8        weight-only int8 with per-output-channel scales, bf16 activations (_weight_int8pack_mm)
  int8_avx2   the same int8 weights with fp32 scales and fp32 activations, through the project's AVX2 kernel
              (s2t/kernels): measured on the 0.5B's shapes at one row and one thread, about twice as fast as
              _weight_int8pack_mm on an AVX2 machine, which streams short rows at 3-4 GB/s per core; only
              where the kernel builds (x86 with AVX2, a C++ compiler)
  int8_vnni   the same int8 weights (stored + 128 as uint8) times activations quantised to int8 on the fly,
              one scale per row and block of 128 inputs, through the project's kernel: integer dot products
              (AVX-512 VNNI: 64 pairs per instruction; on CPUs without it, a bit-identical AVX2 build), so
              many rows cost little more than one; every output depends on its own row only
              (batch-invariant); only where a build exists (x86 with AVX2, a C++ compiler)
  int8_amx    int8_vnni's weights and activations on AMX tiles (Intel Xeon since Sapphire Rapids, where Linux
              grants the tile state): 16 x 16 rows per instruction, so 2-16 rows cost about what one does
              (int8_vnni's integer work grows with the rows); the same numbers as int8_vnni up to the order of
              float sums (batch-invariant too), and a layer holding both keeps one copy of the weights
  int4_vnni   4-bit weights on an affine grid per group of 32 inputs, a float16 step and offset each
              (llama.cpp's Q4_1 layout: min / max per group; 5 bits per weight: 0.625x int8's bytes,
              so a memory-bound decode step reads that much less), times the same per-block int8
              activations, through the project's kernel (AVX-512 VNNI, else a bit-identical AVX2
              build); the lm_head stays int8_vnni
              (INT4_KEEP_8BIT). It changes the model's numbers more than int8 does, so `auto` never
              picks it: ask for it.

Activation quantisation with one scale per token (fbgemm dynamic int8) is not offered: measured per token
on the 0.5B it moved the top-1 token at ~5 % of positions (KL 0.055 nats/token against fp32; bf16: 0.7 %,
0.0002). One scale per block of 128 inputs (int8_vnni) moves it far less; see that format's measurement in
the README (issue #14).
"""

from __future__ import annotations

import dataclasses
import mmap
import time
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from s2t import kernels

FORMATS = ("native", "bf16", "fp32", "fp32_packed", "int8", "int8_avx2", "int8_vnni", "int8_amx", "int4_vnni")
# what `auto` may choose from: formats that keep the weights at 8 bits or more
AUTO_CANDIDATES = ("bf16", "fp32", "fp32_packed", "int8", "int8_avx2", "int8_vnni", "int8_amx")
# Row-count buckets a plan assigns a format to: a call with m rows uses the first bucket with m <= bound.
BUCKETS = (1, 4, 8, 16, 1 << 30)
# Bytes each format holds per weight: every distinct format in a plan is a full copy of every matrix.
BYTES_PER_WEIGHT = {"bf16": 2, "fp32": 4, "fp32_packed": 4, "int8": 1, "int8_avx2": 1, "int8_vnni": 1,
                    "int8_amx": 1, "int4_vnni": 0.625}
# Formats stored in one layout, so a layer holding several keeps one copy of the weights (FormattedLinear).
SHARED_LAYOUT = {"int8_vnni": "int8_layout", "int8_amx": "int8_layout"}


def shares_layout(a: str, b: str) -> bool:
    """Whether two different formats hold one copy of the weights between them (SHARED_LAYOUT)."""
    return a != b and a in SHARED_LAYOUT and SHARED_LAYOUT[a] == SHARED_LAYOUT.get(b)
# How much slower a bucket may run to share a format the plan holds anyway instead of adding a copy.
# Measured: on a 2-core AVX-512 Xeon the fastest-per-bucket plan of the 1.5B kept fp32 for 17+ rows beside
# fp32_packed for 9-16, two fp32 copies of every matrix, and the selector peaked at 14.6 GiB
# (bench/results/split-cores-anchor.json) against 8.9 GiB with one fp32 copy.
SHARE_TOLERANCE = 0.15


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def format_available(fmt: str) -> bool:
    """Whether `fmt` works here. Builds (or loads) only that format's kernel: a process that asks for one format
    does not compile the others (a minute each on 2 cores the first time)."""
    if fmt in ("native", "bf16", "fp32"):
        return True
    if fmt == "fp32_packed":
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if fmt == "int8":
        return hasattr(torch, "_weight_int8pack_mm")
    if fmt == "int8_avx2":
        return kernels.load_int8_linear() is not None
    if fmt == "int8_vnni":
        return kernels.load_int8_vnni_linear() is not None
    if fmt == "int8_amx":
        return kernels.load_int8_amx_linear() is not None
    if fmt == "int4_vnni":
        return kernels.load_int4_vnni_linear() is not None
    return False


def available_formats() -> tuple[str, ...]:
    return tuple(f for f in FORMATS if format_available(f))


@dataclasses.dataclass(frozen=True)
class FormatPlan:
    """Which weight format serves calls of each row-count bucket (parallel to BUCKETS)."""

    formats: tuple[str, ...]

    def __post_init__(self):
        if len(self.formats) != len(BUCKETS):
            raise ValueError(f"a plan needs {len(BUCKETS)} formats (one per bucket {BUCKETS}), got {self.formats}")
        for f in self.formats:
            if f not in FORMATS:
                raise ValueError(f"unknown weight format {f!r}; known: {', '.join(FORMATS)}")

    @classmethod
    def uniform(cls, fmt: str) -> "FormatPlan":
        return cls((fmt,) * len(BUCKETS))

    @classmethod
    def parse(cls, text: str) -> "FormatPlan":
        """'bf16' (every bucket) or 'int8,int8,fp32_packed,fp32_packed,fp32_packed' (one per bucket)."""
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return cls.uniform(parts[0]) if len(parts) == 1 else cls(tuple(parts))

    def format_for(self, rows: int) -> str:
        for bound, fmt in zip(BUCKETS, self.formats):
            if rows <= bound:
                return fmt
        return self.formats[-1]

    def describe(self) -> str:
        lo, parts = 1, []
        for bound, fmt in zip(BUCKETS, self.formats):
            parts.append(f"{lo}-{bound if bound < 1 << 30 else '∞'} rows: {fmt}")
            lo = bound + 1
        return "; ".join(parts)


class FormattedLinear(nn.Module):
    """A bias-optional linear layer holding its weight in the formats a plan uses."""

    def __init__(self, linear: nn.Linear, plan: FormatPlan, out_dtype: torch.dtype | None = None):
        """out_dtype: the dtype of the outputs (the model's compute dtype); default the weight's own. A model
        loaded in its checkpoint's bf16 and computed in fp32 passes fp32: the formats are made from the bf16
        weight directly (bf16 -> fp32 is exact), so no fp32 copy of the whole model is ever held."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.plan = plan
        self.out_dtype = out_dtype or linear.weight.dtype
        w = linear.weight.detach()
        # a copy: a bias that is a view into a memory-mapped checkpoint would keep the whole file mapped
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.weights: dict[str, object] = {}
        for fmt in sorted(set(plan.formats)):
            sibling = next((f for f in self.weights if shares_layout(f, fmt)), None)
            # a format in a layout the layer holds already takes that copy, with its own kernel
            self.weights[fmt] = (_prepare(w, fmt) if sibling is None
                                 else _with_kernel(self.weights[sibling], _prepare_kernel(fmt)))

    @classmethod
    def from_parts(cls, in_features: int, out_features: int, plan: FormatPlan, out_dtype: torch.dtype,
                   weights: dict[str, object], bias: torch.Tensor | None) -> "FormattedLinear":
        """A layer from weights already in their formats (fuse_outputs)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.plan, layer.out_dtype = in_features, out_features, plan, out_dtype
        layer.bias, layer.weights = bias, dict(weights)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        fmt = self.plan.format_for(x2.shape[0])
        y = _apply(fmt, self.weights[fmt], x2, self.bias)
        return y.to(self.out_dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, formats={sorted(self.weights)}"


# Formats that store a weight row by row (output features first, every tensor part [out_features, ...]): the
# weights of layers that read the same input, concatenated along the outputs, are one layer's, and each
# layer's rows are a contiguous view of it. fp32_packed (oneDNN's blocked layout) is not.
ROW_MAJOR_FORMATS = frozenset({"native", "bf16", "fp32", "int8", "int8_avx2", "int8_vnni", "int8_amx", "int4_vnni"})


def fuse_outputs(layers: list[nn.Module], rows: int = 1) -> FormattedLinear | None:
    """One layer that computes `layers` side by side on one input (their outputs concatenated, in order), for
    inputs of `rows` rows: one kernel call instead of len(layers). The weights are shared, not copied: each
    layer's weight for that row count becomes a view of its rows in the fused layer's, so the layers compute
    exactly what they did and fusing adds no memory. Returns None where the layers cannot be fused: not all
    nn.Linear or FormattedLinear, different input sizes or output dtypes, or a format that is not stored row
    by row (ROW_MAJOR_FORMATS)."""
    if len(layers) < 2 or len({l.in_features for l in layers}) != 1:
        return None
    outs = [l.out_features for l in layers]
    if all(type(l) is nn.Linear for l in layers):
        dtype = layers[0].weight.dtype
        if any(l.weight.dtype != dtype for l in layers):
            return None
        fmt, parts = "native", [l.weight.detach() for l in layers]
        out_dtype = dtype
    elif all(type(l) is FormattedLinear for l in layers):
        fmt = layers[0].plan.format_for(rows)
        out_dtype = layers[0].out_dtype
        if (fmt not in ROW_MAJOR_FORMATS or any(l.plan.format_for(rows) != fmt or l.out_dtype != out_dtype
                                                 for l in layers)):
            return None
        parts = [l.weights[fmt] for l in layers]
    else:
        return None
    fused_weight = _concat_rows(parts, outs)
    if fused_weight is None:
        return None
    biases = [l.bias.detach() if l.bias is not None else None for l in layers]
    fused_bias = None
    if any(b is not None for b in biases):
        ref = next(b for b in biases if b is not None)
        fused_bias = torch.cat([b if b is not None else ref.new_zeros(n) for b, n in zip(biases, outs)])
    fused = FormattedLinear.from_parts(layers[0].in_features, sum(outs), FormatPlan.uniform(fmt), out_dtype,
                                       {fmt: fused_weight}, fused_bias)
    start = 0
    for layer, n in zip(layers, outs):
        view = _row_view(fused_weight, start, n)
        bias = None if fused_bias is None or layer.bias is None else fused_bias[start:start + n]
        if type(layer) is nn.Linear:
            layer.weight = nn.Parameter(view, requires_grad=False)
            if bias is not None:
                layer.bias = nn.Parameter(bias, requires_grad=False)
        else:
            layer.weights[fmt] = view
            for other in [f for f in layer.weights if shares_layout(f, fmt)]:
                layer.weights[other] = _with_kernel(view, layer.weights[other][-1])  # one copy still
            if bias is not None:
                layer.bias = bias
        start += n
    return fused


def row_function(layer: nn.Module, rows: int = 1) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`layer`'s product for a contiguous float32 input of `rows` rows, as a plain function (float32 [rows, in]
    -> float32 [rows, out]): the same kernel call on the same weights as the layer's forward, minus the module
    call, the row-count lookup and the reshapes, which at one row cost a visible share of a decode step
    (Engine._decode_one). None where the layer is neither a FormattedLinear computing in float32 nor a float32
    nn.Linear. Bound to the layer's weights as they are now: build it after fuse_outputs."""
    if type(layer) is nn.Linear:
        if layer.weight.dtype != torch.float32:
            return None
        weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        return lambda x: F.linear(x, weight, bias)
    if type(layer) is not FormattedLinear or layer.out_dtype != torch.float32:
        return None
    fmt = layer.plan.format_for(rows)
    return _product(fmt, layer.weights[fmt], layer.bias)


def fused_row_function(fused: nn.Module, layers: list[nn.Module], rows: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """row_function for `layers` side by side (outputs concatenated, in order), `fused` being fuse_outputs(layers)
    (or None): for inputs of `rows` rows, the format the layers' plan picks for that row count. The fused
    layer's weights serve where that is the format they are held in or one sharing its layout (int8_vnni's
    copy with int8_amx's kernel: one call, no copy); otherwise one call per layer, outputs concatenated. None
    where a layer has no row function (row_function's conditions)."""
    if type(fused) is FormattedLinear and all(type(l) is nn.Linear for l in layers):
        return row_function(fused, rows)  # nn.Linear layers: one format ("native") at every row count
    if type(fused) is FormattedLinear and all(type(l) is FormattedLinear and l.plan == layers[0].plan for l in layers):
        want, held = layers[0].plan.format_for(rows), fused.plan.format_for(rows)  # the fused plan is uniform
        if want == held:
            return row_function(fused, rows)
        if shares_layout(want, held):
            return _product(want, _with_kernel(fused.weights[held], layers[0].weights[want][-1]), fused.bias)
    parts = [row_function(l, rows) for l in layers]
    if None in parts:
        return None
    return lambda x: torch.cat([f(x) for f in parts], dim=-1)


def _product(fmt: str, w, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain function computing a float32 FormattedLinear's product in format `fmt` on weight `w`."""
    bias = None if bias is None else bias.detach().to(torch.float32)
    if fmt in ("int8_vnni", "int8_amx"):
        u, scale, k, kernel = w
        product = lambda x: kernel(x, u, scale, k)  # noqa: E731
    elif fmt == "int4_vnni":
        packed, steps, offsets, k, kernel = w
        product = lambda x: kernel(x, packed, steps, offsets, k)  # noqa: E731
    else:
        return lambda x: _apply(fmt, w, x, bias).to(torch.float32)
    return product if bias is None else lambda x: product(x).add_(bias)


def _concat_rows(parts: list, outs: list[int]):
    """Concatenate per-layer weights of one format along the output rows: a tensor, or a tuple whose tensor
    parts are [out_features, ...] and whose other parts (input size, kernel) are the same for every layer."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts) if all(p.shape[0] == n for p, n in zip(parts, outs)) else None
    if not all(isinstance(p, tuple) and len(p) == len(parts[0]) for p in parts):
        return None
    fused = []
    for items in zip(*parts):
        if all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in items):
            if any(x.shape[0] != n for x, n in zip(items, outs)):
                return None
            fused.append(torch.cat(items))
        elif all(x is items[0] or (not isinstance(x, torch.Tensor) and x == items[0]) for x in items):
            fused.append(items[0])
        else:
            return None
    return tuple(fused)


def _row_view(weight, start: int, n: int):
    if isinstance(weight, torch.Tensor):
        return weight[start:start + n]
    return tuple(x[start:start + n] if isinstance(x, torch.Tensor) and x.dim() >= 1 else x for x in weight)


def _prepare(w: torch.Tensor, fmt: str):
    if fmt == "native":
        return w
    if fmt == "bf16":  # a copy even from a bf16 checkpoint, so no format is a view into its file mapping
        return w.to(torch.bfloat16, copy=True).contiguous()
    if fmt == "fp32":
        return w.to(torch.float32).contiguous()
    if fmt == "fp32_packed":
        return torch.ops.mkldnn._reorder_linear_weight(w.to(torch.float32).contiguous(), None)
    if fmt == "int4_vnni":
        fn = kernels.load_int4_vnni_linear()
        if fn is None:
            raise ValueError(f"weight format int4_vnni is not available here: {kernels.unavailable_reason('int4_vnni')}")
        return (*int4_weight(w), w.shape[1], fn)
    if fmt in ("int8", "int8_avx2", "int8_vnni", "int8_amx"):
        w32 = w.to(torch.float32)
        scale = w32.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        if fmt == "int8_avx2":
            if kernels.load_int8_linear() is None:
                raise ValueError(f"weight format int8_avx2 is not available here: {kernels.unavailable_reason()}")
            return q, scale
        if fmt in ("int8_vnni", "int8_amx"):
            # the build (AVX-512 VNNI or AVX2) is chosen once, here: the layer keeps it, so decode steps do not
            # look it up, and layers made under different S2T_INT8_VNNI_KERNEL settings can be compared
            return vnni_weight(q), scale, w.shape[1], _prepare_kernel(fmt)
        return q, scale.to(torch.bfloat16)
    raise ValueError(fmt)


def _prepare_kernel(fmt: str) -> Callable:
    """The kernel of an int8_vnni-layout format (int8_vnni, int8_amx), or ValueError where it is unavailable."""
    fn = kernels.load_int8_vnni_linear() if fmt == "int8_vnni" else kernels.load_int8_amx_linear()
    if fn is None:
        raise ValueError(f"weight format {fmt} is not available here: {kernels.unavailable_reason(fmt)}")
    return fn


def _with_kernel(weight: tuple, kernel: Callable) -> tuple:
    """A weight of an int8_vnni-layout format with another format's kernel: the same tensors, not a copy."""
    return (*weight[:-1], kernel)


VNNI_BLOCK = 128  # inputs per activation scale in int8_vnni (int8_vnni.cpp's kBlock)


def vnni_weight(q: torch.Tensor) -> torch.Tensor:
    """int8 weights [N, K] -> the int8_vnni kernel's layout: uint8 q + 128, each row zero-padded (q = 0) to a
    multiple of VNNI_BLOCK inputs."""
    n, k = q.shape
    padded = -(-k // VNNI_BLOCK) * VNNI_BLOCK
    u = torch.full((n, padded), 128, dtype=torch.uint8)
    u[:, :k] = (q.to(torch.int16) + 128).to(torch.uint8)
    return u


INT4_GROUP = 32  # inputs per int4_vnni step and offset (int4_vnni.cpp's kGroup)


def int4_weight(w: torch.Tensor, rows_per_pass: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights [N, K] -> the int4_vnni kernel's layout: nibbles [N, Kp / 2] uint8, steps d and offsets mn
    [N, Kp / 32] float16, Kp = K rounded up to a multiple of VNNI_BLOCK (zeros): w ~ d * u + mn, u in [0, 15].
    Per group of 32 inputs: d = (max - min) / 15, mn = min (both rounded to float16 first, and u computed
    against the rounded values), u = round((w - mn) / d) clamped to [0, 15]. (Searching narrower grids per
    group for the least squared error, measured on three of the 1.5B's matrices, cut the relative error by
    5 % (0.044 -> 0.042) for 5x the time; not done.) Byte j of each 64-input chunk holds u of input j in its
    low nibble and of input j + 32 in its high one. Done `rows_per_pass` rows at a time: the float
    temporaries of the 1.5B's lm_head whole would be several GB."""
    n, k = w.shape
    kp = -(-k // VNNI_BLOCK) * VNNI_BLOCK
    packed = torch.empty(n, kp // 2, dtype=torch.uint8)
    steps = torch.empty(n, kp // INT4_GROUP, dtype=torch.float16)
    offsets = torch.empty(n, kp // INT4_GROUP, dtype=torch.float16)
    for r0 in range(0, n, rows_per_pass):
        rows = F.pad(w[r0:r0 + rows_per_pass].to(torch.float32), (0, kp - k))
        groups = rows.view(rows.shape[0], kp // INT4_GROUP, INT4_GROUP)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        d, mn = ((hi - lo) / 15).to(torch.float16), lo.to(torch.float16)
        d32, mn32 = d.to(torch.float32), mn.to(torch.float32)
        inv = torch.where(d32 != 0, 1 / d32, torch.zeros_like(d32))
        u = torch.round((groups - mn32) * inv).clamp(0, 15).to(torch.uint8)
        chunks = u.view(rows.shape[0], kp // 64, 2, 32)
        packed[r0:r0 + rows_per_pass] = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(rows.shape[0], kp // 2)
        steps[r0:r0 + rows_per_pass] = d.squeeze(-1)
        offsets[r0:r0 + rows_per_pass] = mn.squeeze(-1)
    return packed, steps, offsets


def int4_dequantised(packed: torch.Tensor, steps: torch.Tensor, offsets: torch.Tensor, in_features: int) -> torch.Tensor:
    """The float32 weights [N, K] an int4_weight() layout stands for (the tests' reference)."""
    n = packed.shape[0]
    chunks = packed.view(n, -1, 1, 32)
    u = torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(n, -1, INT4_GROUP)
    w = u.to(torch.float32) * steps.to(torch.float32).unsqueeze(-1) + offsets.to(torch.float32).unsqueeze(-1)
    return w.reshape(n, -1)[:, :in_features]


def _apply(fmt: str, w, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if fmt == "native":
        return F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
    if fmt == "bf16":
        y = F.linear(x.to(torch.bfloat16), w)
    elif fmt == "fp32":
        y = F.linear(x.to(torch.float32), w)
    elif fmt == "fp32_packed":
        y = torch.ops.mkldnn._linear_pointwise(x.to(torch.float32).contiguous(), w, None, "none", [], "")
    elif fmt == "int8":
        q, scale = w
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), q, scale)
    elif fmt == "int8_avx2":
        q, scale = w
        y = kernels.load_int8_linear()(x.to(torch.float32).contiguous(), q, scale)
    elif fmt in ("int8_vnni", "int8_amx"):
        u, scale, in_features, kernel = w
        y = kernel(x.to(torch.float32).contiguous(), u, scale, in_features)
    elif fmt == "int4_vnni":
        packed, steps, offsets, in_features, kernel = w
        y = kernel(x.to(torch.float32).contiguous(), packed, steps, offsets, in_features)
    else:
        raise ValueError(fmt)
    return y if bias is None else y + bias.to(y.dtype)


# Layers a 4-bit plan keeps at 8 bits (int8_vnni), by the end of their name. Measured teacher-forced on the
# 1.5B (10 GSM8K problems, symmetric grid): the lm_head at 8 bits took its top-1 changes against fp32 from
# 5.1 to 3.75 %; v_proj and down_proj at 8 bits too changed nothing more (README, issue #14's section).
INT4_KEEP_8BIT: tuple[str, ...] = ("lm_head",)


def plan_for_layer(plan: FormatPlan, name: str) -> FormatPlan:
    """The plan of layer `name`: `plan`, except that a layer in INT4_KEEP_8BIT gets int8_vnni where the plan
    says int4_vnni (llama.cpp's 4-bit files likewise keep the output layer at 6 bits)."""
    if "int4_vnni" in plan.formats and name.endswith(INT4_KEEP_8BIT):
        return FormatPlan(tuple("int8_vnni" if f == "int4_vnni" else f for f in plan.formats))
    return plan


def apply_plan(model: nn.Module, plan: FormatPlan, skip: Iterable[str] = (),
               out_dtype: torch.dtype | None = None) -> int:
    """Replace every nn.Linear under `model` (except names in `skip`) by a FormattedLinear whose outputs are
    `out_dtype` (default: each weight's dtype); returns the count.

    Only names are collected up front: holding the modules themselves would keep every replaced weight alive
    until the end, so a model's peak memory would be its old weights plus all their new formats. One at a time,
    each old weight is freed as soon as its formats exist (unless something else, e.g. a tied embedding,
    still holds it).
    """
    if set(plan.formats) == {"native"}:
        return 0
    skip = set(skip)
    targets = [(parent_name, child_name)
               for parent_name, parent in model.named_modules()
               for child_name, child in parent.named_children()
               if isinstance(child, nn.Linear)
               and (f"{parent_name}.{child_name}" if parent_name else child_name) not in skip]
    for parent_name, child_name in targets:
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        name = f"{parent_name}.{child_name}" if parent_name else child_name
        setattr(parent, child_name, FormattedLinear(linear, plan_for_layer(plan, name), out_dtype))
        if "native" not in plan.formats:  # the source weight is no longer read
            page_out(linear.weight)
        del linear
        release_free_memory()  # the quantisation's temporaries, before the next matrix makes its own
    return len(targets)


def held_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights `model` holds: its parameters and every format copy of every FormattedLinear (not
    buffers such as rotary tables: they are computed, not loaded), each byte counted once: per storage, the bytes
    its tensors span (a fused layer's parts are views into one storage; a tied embedding is one tensor; the
    weights moved onto huge pages share one mapping, whose alignment slack is not weights). Memory-mapped
    tensors count at their full size, resident or not."""
    spans: dict[int, list[tuple[int, int]]] = {}
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if t.is_mkldnn:  # oneDNN's blocked layout has no storage to share: always its own copy
            total += t.numel() * t.element_size()
            return
        if t.numel():
            start = t.storage_offset() * t.element_size()
            extent = 1 + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
            spans.setdefault(t.untyped_storage().data_ptr(), []).append((start, start + extent * t.element_size()))

    for t in model.parameters():
        add(t)
    for module in model.modules():
        if isinstance(module, FormattedLinear):
            for part in format_tensors(module):
                add(part)
            if module.bias is not None:
                add(module.bias)
    for ranges in spans.values():  # the union of each storage's spans
        end = 0
        for lo, hi in sorted(ranges):
            total += max(0, hi - max(lo, end))
            end = max(end, hi)
    return total


def format_tensors(layer: FormattedLinear, skip: Iterable[str] = ()) -> Iterator[torch.Tensor]:
    """The tensors of every format copy `layer` holds but those of the formats in `skip` (a format's weight is
    one tensor or a tuple of parts, some of them not tensors: an input width, a kernel)."""
    for fmt, weight in layer.weights.items():
        if fmt not in skip:
            yield from (part for part in (weight if isinstance(weight, tuple) else (weight,))
                        if isinstance(part, torch.Tensor))


_PAGE = 4096
_MADV_PAGEOUT = 21  # Linux >= 5.4


def _madvise():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return fn


_MADVISE = _madvise()


def page_out(t: torch.Tensor) -> None:
    """Ask the kernel to reclaim the pages under `t` (MADV_PAGEOUT), a hint that never changes contents.

    transformers maps the checkpoint file and hands out views into it: every page a format was made from
    stays in this process's resident set until the last view dies, which is at the end of loading (a bias,
    a norm or a tied embedding holds the mapping). Paged out, a file page is dropped (re-read from the file if
    touched again); an anonymous page without swap stays, so this is safe on any tensor. No-op where the
    call is missing or refused."""
    if _MADVISE is None or t.device.type != "cpu" or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if last > first:
        _MADVISE(first, last - first, _MADV_PAGEOUT)


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
# Storages from one 4 KB page up move: packed one after the other into the mapping, a storage smaller than a huge
# page shares one with its neighbours. (Moving only storages of 2 MB or more left the 0.5B's q/k/v and o_proj
# products, 1.0 and 0.8 MB a layer, 42 of its 475 MB of formatted weights, on 4 KB pages.)
MOVE_MIN_BYTES = 4096
_MADV_HUGEPAGE = 14
_ARENA_ALIGN = 64  # each moved storage starts on a cache line (the kernels' loads)
_TRIM_EVERY = 128 << 20  # bytes moved between two malloc_trim calls (each walks the heap: ~1 ms)


def weights_on_huge_pages(modules: Iterable[nn.Module]) -> int:
    """Move the formatted weights of `modules` (every FormattedLinear in them; not `native` weights, which may
    be views of the checkpoint's file mapping) into one anonymous mapping that Linux is asked to back with
    2 MB pages (madvise MADV_HUGEPAGE, before any page is touched); the bytes moved.

    Why: a decode step streams every weight once, and on 4 KB pages that is a TLB miss and a page walk every
    4 KB (375,000 of them per step for the 1.5B's 1.5 GB). torch's allocator hands out 4 KB pages unless
    THP_MEM_ALLOC_ENABLE is set before its first allocation, and Linux's default (`madvise`) gives huge
    pages only where asked. Measured on the 2-core Xeon, one thread, both settings interleaved in one process
    (bench/forward_rows.py --huge-pages off,on): the 0.5B's one-row step 39.0 -> 33.9 ms, the 1.5B's 110.2 ->
    101.3 ms, 1.04-1.12x at 2-16 rows (README, issue #14).

    Storages under MOVE_MIN_BYTES (a 4 KB page) stay where they are. Each moved tensor keeps its identity (set_
    onto the mapping, same offset, sizes and strides), so views that share a storage (fused layers) still share
    it, and the numbers are the same bit for bit. One storage is copied at a time and freed once its tensors have
    moved, so the peak adds one storage, not the model. Where Linux has no transparent huge pages (or they are
    `never`) the hint is ignored and the mapping is plain memory."""
    tensors = {id(t): t for module in modules for m in module.modules() if isinstance(m, FormattedLinear)
               for t in format_tensors(m, skip=("native",)) if t.device.type == "cpu" and not t.is_mkldnn}
    by_storage: dict[int, list[torch.Tensor]] = {}
    for t in tensors.values():
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    # (the tensors only: a reference to an old storage kept here would keep it alive through the move)
    moving = [(views, nbytes) for views in by_storage.values()
              if (nbytes := views[0].untyped_storage().nbytes()) >= MOVE_MIN_BYTES]
    if not moving or _MADVISE is None:
        return 0
    slots, total = [], 0
    for _, nbytes in moving:
        slots.append(total)
        total += -(-nbytes // _ARENA_ALIGN) * _ARENA_ALIGN
    # one mapping for all, its start rounded up to a huge page, so only the last huge page is partly used
    mapping = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: not shmem
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive while any weight views it
    start = -whole.data_ptr() % HUGE_PAGE
    _MADVISE(whole.data_ptr() + start, min(-(-total // HUGE_PAGE) * HUGE_PAGE, len(mapping) - start), _MADV_HUGEPAGE)
    arena = whole[start:start + total]
    freed = 0
    with torch.no_grad():
        for (views, nbytes), slot in zip(moving, slots):
            arena[slot:slot + nbytes].copy_(torch.empty(0, dtype=torch.uint8).set_(views[0].untyped_storage()))
            for t in views:
                size = t.element_size()
                t.set_(arena.untyped_storage(), (start + slot) // size + t.storage_offset(), t.size(), t.stride())
            # storages under glibc's mmap threshold (up to 32 MB) go back to its heap, not to Linux: hand them
            # back as we go, or the peak holds the old copies beside the new (the 1.5B: +0.9 GB)
            freed += nbytes
            if freed >= _TRIM_EVERY:
                release_free_memory()
                freed = 0
    release_free_memory()
    return total


def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Building a matrix's formats allocates temporaries below glibc's mmap threshold (32 MB at most), which come
    from the heap and stay resident after they are freed: measured on the 0.5B, ~0.7 GB of such free heap
    was still counted in the process's RSS after loading."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def measure_plan(in_features: int, out_features: int, candidates: Iterable[str] | None = None,
                 repeats: int = 3, clock: Callable[[], float] = time.perf_counter,
                 ) -> tuple[FormatPlan, dict[str, dict[int, float]]]:
    """Time each candidate format on a weight of the given shape at each bucket's row count; pick the fastest.

    Uses several distinct weights so they stream from memory as in a real forward rather than sitting in
    cache. Returns the plan and the timings (ms per call, each format's fastest round) it was based on.

    The rounds interleave the formats (each round times every format at every row count, starting from
    another format each time), and a format's time is its fastest round: a slow spell during start-up (a
    process beside it loading its model, a noisy neighbour) then slows one round of every format rather
    than every round of the one being timed. Timed one format after the other, a one-thread selector
    started beside its worker kept bf16 for the open bucket in two runs (5.19 GiB of weights instead of
    2.31) where int8_amx was 1.3-2.1x faster end to end (bench/results/forward-rows-open-bucket.md).
    `clock` is for tests.
    """
    candidates = [c for c in (candidates or AUTO_CANDIDATES) if c != "native" and format_available(c)]
    copies = 6
    base = [torch.randn(out_features, in_features) * 0.02 for _ in range(copies)]
    # The open bucket is timed at 128 rows: it serves prefills and batched scoring of hundreds of rows, where
    # int8's weight-only kernel falls far behind (measured on the 0.5B's MLP shape, 2 AVX2 cores: int8 vs
    # fp32_packed 35 vs 13 ms at 48 rows, 113 vs 41 at 256); at 48 rows it could win by noise and slow them.
    rows_per_bucket = [1, 4, 8, 16, 128]
    inputs = {rows: torch.randn(rows, in_features) for rows in rows_per_bucket}
    # every format's copies at once, as interleaving needs (~1.2 GB on the 1.5B's MLP shape with all seven
    # formats: below what loading the model peaks at afterwards, and freed before it)
    weights = {fmt: [_prepare(w, fmt) for w in base] for fmt in candidates}
    del base
    for fmt, ws in weights.items():  # first calls: kernels' one-off set-up (AMX tile permission, oneDNN primitives)
        for rows in rows_per_bucket:
            for w in ws[:2]:
                _apply(fmt, w, inputs[rows], None)
    timings: dict[str, dict[int, float]] = {fmt: {} for fmt in candidates}
    for r in range(repeats):
        order = candidates[r % len(candidates):] + candidates[:r % len(candidates)] if candidates else []
        for rows in rows_per_bucket:
            for fmt in order:
                t0 = clock()
                for w in weights[fmt]:
                    _apply(fmt, w, inputs[rows], None)
                ms = (clock() - t0) / copies * 1e3
                timings[fmt][rows] = min(ms, timings[fmt].get(rows, ms))
    del weights
    fastest = [min(candidates, key=lambda f: timings[f][rows]) for rows in rows_per_bucket]
    return FormatPlan(share_formats(fastest, timings, rows_per_bucket)), timings


def share_formats(formats: Iterable[str], timings: dict[str, dict[int, float]], rows_per_bucket: Iterable[int],
                  tolerance: float = SHARE_TOLERANCE) -> tuple[str, ...]:
    """Drop formats from a per-bucket plan where another format it holds anyway is nearly as fast.

    Each distinct format is a whole copy of the weights, so a format that wins a bucket by a few percent
    costs its full size in memory. Repeatedly, starting from the format with the most bytes per weight, its
    buckets move to another format already in the plan when that one is at most `tolerance` slower in every
    one of them (the fastest such one). A format that is much faster somewhere (int8 at one row) stays, and
    so does one that shares its layout with another format held (SHARED_LAYOUT: no copy of its own).
    """
    formats, rows = list(formats), list(rows_per_bucket)
    while True:
        held = sorted(set(formats), key=lambda f: (-BYTES_PER_WEIGHT.get(f, 0), f))
        for fmt in held:
            if any(shares_layout(g, fmt) for g in held):
                continue  # it shares its copy with another format held: dropping it would save no memory
            buckets = [i for i, f in enumerate(formats) if f == fmt]
            fits = [g for g in held if g != fmt
                    and all(timings[g][rows[i]] <= timings[fmt][rows[i]] * (1 + tolerance) for i in buckets)]
            if fits:
                best = min(fits, key=lambda g: sum(timings[g][rows[i]] for i in buckets))
                formats = [best if f == fmt else f for f in formats]
                break
        else:
            return tuple(formats)
