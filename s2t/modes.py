"""Modes and triggers as types, with their one mapping to and from the wire enums of s2t.v1.

Configuration files and the command line name them in lower case (`s2t-local`, `entropy`); the wire uses the
proto enums (`MODE_S2T_LOCAL`, `TRIGGER_ENTROPY`); code uses these Enums. Every conversion goes through here.
"""

from __future__ import annotations

import enum

from s2t.v1 import generation_pb2 as gen_pb


class Mode(enum.Enum):
    """What produces the text of a request."""

    GREEDY = "greedy"  # the SLM alone
    S2T = "s2t"  # the SLM drafts, the remote selector picks among its top-K
    S2T_LOCAL = "s2t-local"  # the SLM drafts, its S2T-Local re-ranker picks: no large-model calls
    LLM = "llm"  # the selector's model generates alone (the quality baseline)
    # the SLM drafts; where the trigger fires, the selector's model's own top-1 replaces the draft (the paper's
    # upper reference for selection: what picking among the SLM's top-K gives up)
    TAKEOVER = "takeover"

    @property
    def proto(self) -> int:
        return _MODE_TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> "Mode":
        """MODE_UNSPECIFIED has no Mode: the caller resolves it to its default first."""
        try:
            return _PROTO_TO_MODE[value]
        except KeyError:
            raise ValueError(f"unknown mode {value}") from None

    @property
    def verified(self) -> bool:
        """Modes whose drafts go through a verifier (remote selector or local re-ranker)."""
        return self in (Mode.S2T, Mode.S2T_LOCAL, Mode.TAKEOVER)

    @property
    def selector_verified(self) -> bool:
        """Modes whose verifier is the remote selector: they spend its call budget and learn its odds."""
        return self in (Mode.S2T, Mode.TAKEOVER)


class TriggerKind(enum.Enum):
    """Which drafted positions a verifier may overrule."""

    ALWAYS = "always"  # every position
    ENTROPY = "entropy"  # LLM-free: the SLM's top-64 entropy above a calibrated threshold
    MARGIN = "margin"  # LLM-free: the SLM's top-1 minus top-2 probability below a calibrated threshold
    KL = "kl"  # on the selector: KL(SLM || LLM) on the SLM's top-64 above a calibrated threshold

    @property
    def proto(self) -> int:
        return _TRIGGER_TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> "TriggerKind":
        try:
            return _PROTO_TO_TRIGGER[value]
        except KeyError:
            raise ValueError(f"unknown trigger {value}") from None

    @property
    def llm_free(self) -> bool:
        """Computable by the worker alone, so usable by the local re-ranker."""
        return self in (TriggerKind.ENTROPY, TriggerKind.MARGIN)


_MODE_TO_PROTO = {Mode.GREEDY: gen_pb.MODE_GREEDY, Mode.S2T: gen_pb.MODE_S2T, Mode.S2T_LOCAL: gen_pb.MODE_S2T_LOCAL,
                  Mode.LLM: gen_pb.MODE_LLM, Mode.TAKEOVER: gen_pb.MODE_TAKEOVER}
_PROTO_TO_MODE = {v: k for k, v in _MODE_TO_PROTO.items()}
_TRIGGER_TO_PROTO = {TriggerKind.ALWAYS: gen_pb.TRIGGER_ALWAYS, TriggerKind.ENTROPY: gen_pb.TRIGGER_ENTROPY,
                     TriggerKind.MARGIN: gen_pb.TRIGGER_MARGIN, TriggerKind.KL: gen_pb.TRIGGER_KL}
_PROTO_TO_TRIGGER = {v: k for k, v in _TRIGGER_TO_PROTO.items()}
