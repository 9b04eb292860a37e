"""What the SLM proposes at a position, and when to ask the large model about it.

At every drafted position the worker keeps the SLM's top-64 ids and probabilities: the first K are the
candidates offered to the selector, all 64 are the support of the paper's KL trigger. The LLM-free
triggers read the same numbers: the entropy of the top-64 distribution renormalised (high = unsure), or
the top-1 minus top-2 probability margin (low = unsure). Thresholds come from a calibration on GSM8K
*train* prompts (`s2t calibrate`), as a table from target rate to threshold.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np
import torch

SUPPORT = 64
KL_P_FLOOR = 1e-12  # teacher probabilities at or below this leave the KL support, as in the paper's code


@dataclasses.dataclass
class Proposal:
    """The SLM's view of one position."""

    ids: list[int]  # top-SUPPORT ids, best first; ids[0] is the draft token
    probs: list[float]  # their full-softmax probabilities
    entropy: float  # of the renormalised top-SUPPORT distribution, nats
    margin: float  # probs[0] - probs[1]
    triggered: bool = False  # the worker's LLM-free trigger fired here

    @property
    def token(self) -> int:
        return self.ids[0]


def propose(logits: torch.Tensor, support: int = SUPPORT) -> list[Proposal]:
    """One Proposal per row of logits [rows, vocab]."""
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top = probs.topk(min(support, probs.shape[-1]), dim=-1)
    p, ids = top.values, top.indices
    renorm = p / p.sum(-1, keepdim=True)
    entropy = -(renorm * renorm.clamp_min(1e-30).log()).sum(-1)
    second = p[:, 1] if p.shape[1] > 1 else torch.zeros_like(p[:, 0])
    margin = p[:, 0] - second
    return [Proposal(ids=i, probs=q, entropy=e, margin=m)
            for i, q, e, m in zip(ids.tolist(), p.tolist(), entropy.tolist(), margin.tolist())]


class ThresholdTable:
    """Target rate -> threshold, linearly interpolated between calibrated rates."""

    def __init__(self, table: dict, name: str):
        items = sorted((float(r), float(v)) for r, v in table.items())
        self.rates = [r for r, _ in items]
        self.values = [v for _, v in items]
        self.name = name

    def threshold(self, rate: float) -> float:
        if not self.rates:
            raise ValueError(f"no calibrated {self.name} thresholds; run `s2t calibrate`")
        for r, v in zip(self.rates, self.values):  # rates cross the wire as float32: 0.1 arrives as 0.10000000149
            if abs(rate - r) <= 1e-6 * max(1.0, r):
                return v
        if not self.rates[0] <= rate <= self.rates[-1]:
            raise ValueError(f"{self.name} trigger rate {rate:g} is outside the calibrated rates "
                             f"[{self.rates[0]:g}, {self.rates[-1]:g}]")
        i = bisect.bisect_left(self.rates, rate)
        r0, r1, v0, v1 = self.rates[i - 1], self.rates[i], self.values[i - 1], self.values[i]
        return v0 + (v1 - v0) * (rate - r0) / (r1 - r0)

    def as_dict(self) -> dict[str, float]:
        return {f"{r:g}": v for r, v in zip(self.rates, self.values)}


@dataclasses.dataclass(frozen=True)
class LocalTrigger:
    """The worker's LLM-free trigger: fires on high entropy or low margin, never in the warm-up steps."""

    kind: str  # "entropy" or "margin"
    threshold: float
    warmup_steps: int

    def fires(self, proposal: Proposal, generation_step: int) -> bool:
        if generation_step < self.warmup_steps:
            return False
        if self.kind == "entropy":
            return proposal.entropy > self.threshold
        return proposal.margin < self.threshold

    def value(self, proposal: Proposal) -> float:
        return proposal.entropy if self.kind == "entropy" else proposal.margin


def kl_on_support(ids: list[int], student_probs: list[float], teacher_logp: torch.Tensor) -> float:
    """KL(p_S || p_L) on the SLM's top ids, both distributions renormalised on that support: the paper's
    LLM-side trigger statistic (its code's `compute_trigger`). teacher_logp is a full-vocabulary log-softmax.
    """
    return kl_on_support_at(student_probs, teacher_logp[torch.tensor(ids)])


def kl_on_support_at(student_probs: list[float], teacher_logp_at_ids: torch.Tensor) -> float:
    """kl_on_support with the teacher's log-probabilities already read at the support's ids, in their order:
    kl_on_support_rows for one position."""
    p_s = torch.tensor([student_probs], dtype=torch.float64)
    return float(kl_on_support_rows(p_s, teacher_logp_at_ids.double()[None])[0])


class VocabLogProbs:
    """The log-softmax of logits [rows, vocab], read at a few ids per row: each row's log-normaliser once, in
    the logits' own dtype, then logit - normaliser in float64 at the ids asked for.

    A Select reads ~72 ids a position (candidates, KL support, the LLM's top-1). The full float64 log-softmax
    this replaces cost ~0.3-1 ms a position on one core (0.5 s and 1.2 GB of temporaries for a batch of 512
    positions); the float32 normaliser costs a fifth to a half of that and nothing the size of the logits
    (bench/select_logprobs.py). It is within ~1e-6 of the float64 one: the KL trigger renormalises on its
    support, so its value does not depend on it (bar the KL_P_FLOOR cut), the candidates' argmax never does,
    and the logged probabilities move by ~1e-6 relative. Models computing in float64 (the exact test
    references) keep a float64 normaliser.
    """

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.log_normaliser = torch.logsumexp(logits, dim=-1).double()

    def at(self, row: int, ids: list[int]) -> torch.Tensor:
        """float64 log-probabilities of `ids` (in their order) at `row`."""
        return self.logits[row, torch.tensor(ids, dtype=torch.long)].double() - self.log_normaliser[row]

    def top1(self, row: int) -> int:
        """The vocabulary's argmax at `row` (the first maximum, as torch.argmax of the log-softmax)."""
        return int(torch.argmax(self.logits[row]))

    def table(self, rows: list[int], ids: list[list[int]]) -> torch.Tensor:
        """float64 log-probabilities [len(rows), max width]: row i holds ids[i] at rows[i], in their order; the
        columns past a row's ids are -inf (what kl_on_support_rows and an argmax skip)."""
        index, pad = padded_rows(ids, torch.long)  # padding: id 0, masked after the read
        picked = self.logits[torch.tensor(rows, dtype=torch.long)[:, None], index].double()
        table = picked - self.log_normaliser[rows][:, None]
        return table.masked_fill_(pad, float("-inf")) if pad is not None else table


class GatheredLogProbs:
    """VocabLogProbs read on the logits' device, for a GPU selector: the log-softmax of logits [rows, vocab] at
    the ids asked for up front, each row's top-1 and its log-probability, computed where the logits are; only
    those cross to the host (a few hundred numbers a row, against the vocabulary's 152k: 64 sessions' 8-token
    Selects made 155 MB of bf16 logits a forward, copied and converted on the host). The same arithmetic as
    VocabLogProbs (a float32 normaliser, or float64 for a float64 model; logit - normaliser in float64).

    `split` makes views of consecutive rows (one per sequence of a batch)."""

    def __init__(self, logits: torch.Tensor, ids_by_row: list[list[int]]):
        if len(ids_by_row) != logits.shape[0]:
            raise ValueError(f"{len(ids_by_row)} rows of ids for {logits.shape[0]} rows of logits")
        index, pad = padded_rows(ids_by_row, torch.long)
        normaliser = torch.logsumexp(logits, dim=-1).double()[:, None]
        top1 = torch.argmax(logits, dim=-1, keepdim=True)
        values = torch.cat([logits.gather(1, index.to(logits.device)), logits.gather(1, top1)], dim=1)
        # one copy to the host; column -1 is the top-1's log-probability, the columns before it the ids asked for
        self._values = (values.double() - normaliser).cpu()
        self._table = self._values[:, :-1]
        if pad is not None:
            self._table.masked_fill_(pad, float("-inf"))
        self._top1 = top1[:, 0].cpu().tolist()
        self._asked = ids_by_row
        self._columns: dict[int, dict[int, int]] = {}  # row -> id -> column, built when `at` needs it
        self._offset = 0

    def split(self, sizes: list[int]) -> list["GatheredLogProbs"]:
        """Views of consecutive rows: sizes[b] rows each."""
        views, start = [], 0
        for n in sizes:
            view = object.__new__(GatheredLogProbs)
            view.__dict__.update(self.__dict__)
            view._offset = start
            views.append(view)
            start += n
        return views

    def at(self, row: int, ids: list[int]) -> torch.Tensor:
        """float64 log-probabilities of `ids` (in their order) at `row`: ids asked for up front, or the top-1."""
        r = self._offset + row
        if r not in self._columns:
            self._columns[r] = {token: c for c, token in enumerate(self._asked[r])}
        columns, top1 = self._columns[r], self._top1[r]
        picked = []
        for i in ids:
            if i not in columns and i != top1:
                raise KeyError(f"id {i} at row {row} was not asked for when the log-probabilities were read")
            picked.append(columns[i] if i in columns else -1)
        return self._values[r, picked]

    def top1(self, row: int) -> int:
        """The vocabulary's argmax at `row` (the first maximum)."""
        return self._top1[self._offset + row]

    def table(self, rows: list[int], ids: list[list[int]]) -> torch.Tensor:
        """VocabLogProbs.table: straight from what was read where ids[i] is what row rows[i] was asked for."""
        rs = [self._offset + r for r in rows]
        if all(self._asked[r] == i for r, i in zip(rs, ids)):
            width = max((len(i) for i in ids), default=0)
            return self._table[rs, :width]
        return _pad_rows([self.at(r, i) for r, i in zip(rows, ids)])


_NUMPY_DTYPES = {torch.long: np.int64, torch.float64: np.float64}


def padded_rows(rows: list, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Python sequences of numbers as one [len(rows), max width] tensor of `dtype` (torch.long or float64),
    padded with zeros, and the padding's mask (None where every row is as wide). Converted through numpy,
    whose reading of Python lists is ~4× torch.tensor's: 512 rows × 72 ids (a batch of 64 Selects' positions)
    take ~0.9 ms against ~4 on one core here."""
    width = max((len(r) for r in rows), default=0)
    np_dtype = _NUMPY_DTYPES[dtype]
    if all(len(r) == width for r in rows):
        return torch.from_numpy(np.array(rows, dtype=np_dtype).reshape(len(rows), width)), None
    out = np.zeros((len(rows), width), dtype=np_dtype)
    pad = np.ones((len(rows), width), dtype=bool)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
        pad[i, :len(row)] = False
    return torch.from_numpy(out), torch.from_numpy(pad)


def _pad_rows(rows: list[torch.Tensor], fill: float = float("-inf")) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), fill, dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def kl_on_support_rows(student_probs: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """kl_on_support for many positions at once: student_probs and teacher_logp [positions, width] (float64),
    a position's support in its row, padded with student probability 0 (or teacher -inf); teacher
    probabilities at or below KL_P_FLOOR and zero student probabilities leave the support, and a position with
    nothing left scores 0."""
    p_l = teacher_logp.exp()
    keep = (p_l > KL_P_FLOOR) & (student_probs > 0)
    zero = torch.zeros((), dtype=torch.float64)
    p_s = torch.where(keep, student_probs, zero)
    p_l = torch.where(keep, p_l, zero)
    p_s = p_s / p_s.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    p_l = p_l / p_l.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    terms = torch.where(keep, p_s * (p_s.log() - p_l.log()), zero)
    return terms.sum(dim=1)
