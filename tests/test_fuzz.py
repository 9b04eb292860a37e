"""Fuzzing both gRPC faces: the worker's GenerationService and the selector's SelectorService (issue #15).

A seeded generator mixes valid-but-extreme messages (huge K, block sizes and token counts, 100 KB prompts,
unknown enum values, out-of-vocabulary ids, unknown sessions, step gaps, prefixes beyond what the selector
holds), fields appended with another wire type or a negative varint, byte-level mutations of serialized
messages (truncation, bit flips, overwritten, inserted and random bytes, splices), messages of another type,
scripted session protocols, cancelled streams, unknown methods and a couple of messages beyond the servers'
receive limits. Every case goes over real gRPC as raw bytes.

The oracle is the contract (the protos' comments and the servers' settings), computed from the bytes as
protobuf parses them, not by calling the servers' validation: which statuses a case may get, and which field a
refusal must name. UNKNOWN and INTERNAL are never allowed. After the fuzzing both servers answer SERVING, the
requests made before the fuzzing get the same answers (nothing lost: a session opened before it continues),
nothing is left running, and the process's RSS is back within RSS_SLACK_BYTES of its level after a warm-up
batch of the same generator (a bound on memory, not on time).

S2T_FUZZ_N (default 1500) sets the cases per face, S2T_FUZZ_SEED the seed; each face prints its counts by
status code (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import enum
import gc
import math
import os
import random
import re
import struct
import time
from typing import Awaitable, Callable

import grpc
import pytest
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf import unknown_fields
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_selector.core import SelectorCore, SelectorError
from llm_selector.grpc_server import serve as serve_selector
from s2t.prompts import chat_ids
from s2t.v1 import generation_pb2 as gen_pb
from s2t.v1 import selector_pb2 as sel_pb
from servers import Stack

FUZZ_N = int(os.environ.get("S2T_FUZZ_N", "1500"))
FUZZ_SEED = int(os.environ.get("S2T_FUZZ_SEED", "15"))
WARMUP_N = 200
CONCURRENCY = 16
RSS_SLACK_BYTES = 64 << 20
OVERSIZED_PER_RUN = 2  # each is tens of MiB on the client
CALL_TIMEOUT_S = 300.0  # a safety net against a hung call, far above any answer's time
MAX_ID_LEN = 128

# Small limits keep every valid case cheap on the tiny models (generation of at most 4 tokens, contexts of at
# most 1024 tokens) and put "huge" values beyond them.
FUZZ_SETTINGS = {
    "worker.max_new_tokens": 4, "worker.max_new_tokens_limit": 4, "worker.max_prompt_tokens": 512,
    "worker.select_timeout_ms": 120_000,
    "selector.max_context_tokens": 1024, "selector.max_decode_tokens": 4, "selector.step_gap_wait_s": 0.05,
    "selector.session_idle_ttl_s": 86_400,  # the session opened before a long run must not expire during it
}

GEN_SERVICE = "/s2t.v1.GenerationService/"
SEL_SERVICE = "/s2t.v1.SelectorService/"
ROLES = ("system", "user", "assistant")
CODE = grpc.StatusCode

# Bits of text for prompts: multi-byte characters, a special token, control characters, an emoji.
WORDS = ["What", "is", "2", "+", "3", "?", "ÿ", "日本語", "🙂", "<|im_end|>", "\n", "\t", "\x00", "-1", "é",
         "x" * 40]
BLANKS = ["", " ", "\n\t ", "\u3000", "\u2028"]


# -- outcomes and expectations ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    replies: list[bytes]


@dataclasses.dataclass(frozen=True)
class Naming:
    """What a refusal's message must name: one of `paths` ('positions[0].candidate_ids' at the start, or
    'step (field 2)' in a wrong-types message), or, for undecodable bytes of `located` (a message type), a
    location in it whose field path exists in that message."""

    paths: tuple[str, ...] = ()
    located: _descriptor.Descriptor | None = None

    def problem(self, details: str) -> str | None:
        if self.located is not None:
            return located_problem(self.located, details)
        if self.paths and not any(details.startswith(f"{p}:") or f" {p} (field " in details for p in self.paths):
            return f"names none of {list(self.paths)}"
        return None


@dataclasses.dataclass(frozen=True)
class Expect:
    """The statuses a case may get, each with what its message must name."""

    codes: dict[grpc.StatusCode, Naming]

    def problem(self, outcome: Outcome) -> str | None:
        naming = self.codes.get(outcome.code)
        if naming is None:
            expected = [f"{c.name}{f' naming one of {list(n.paths)}' if n.paths else ''}"
                        for c, n in self.codes.items()]
            return f"{outcome.code.name} {outcome.details!r}, expected {' or '.join(expected)}"
        why = naming.problem(outcome.details)
        return f"{outcome.code.name} {outcome.details!r} {why}" if why else None


OK_ONLY = Expect({CODE.OK: Naming()})
OVERSIZED = Expect({CODE.RESOURCE_EXHAUSTED: Naming()})  # grpc's own refusal: "Received message larger than max"


def invalid(*paths: str) -> Expect:
    return Expect({CODE.INVALID_ARGUMENT: Naming(tuple(paths))})


def located_problem(descriptor: _descriptor.Descriptor, details: str) -> str | None:
    """None if `details` is 'request is not a valid <type>: <where>: <what>' and <where> is a field path of
    `descriptor` (unknown field numbers as '<field N>') or the offset of a broken top-level field key."""
    match = re.fullmatch(rf"request is not a valid {re.escape(descriptor.full_name)}: (.+?): .+", details, re.S)
    if match is None:
        return "is not a located decode error"
    where = match.group(1)
    if re.fullmatch(r"field key at byte \d+", where):
        return None
    desc: _descriptor.Descriptor | None = descriptor
    for part in where.split("."):
        if desc is None or part.startswith("<field "):  # inside an unknown field or group: nothing to resolve
            return None
        field = desc.fields_by_name.get(re.sub(r"\[\d+\]$", "", part))
        if field is None:
            return f"locates {where!r}, not a field of {descriptor.full_name}"
        desc = field.message_type
    return None


def mistyped_paths(msg: _message.Message, path: str = "") -> list[str]:
    """Declared fields that arrived with another wire type: protobuf keeps them as unknown fields."""
    out = [f"{path}{msg.DESCRIPTOR.fields_by_number[f.field_number].name}"
           for f in unknown_fields.UnknownFieldSet(msg) if f.field_number in msg.DESCRIPTOR.fields_by_number]
    for field, value in msg.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        items = enumerate(value) if field.is_repeated else [(None, value)]
        for i, item in items:
            out += mistyped_paths(item, f"{path}{field.name}{'' if i is None else f'[{i}]'}.")
    return out


def parsed_or_refusal(cls, data: bytes) -> tuple[_message.Message | None, Expect | None]:
    """The message as the server will see it, or the refusal the bytes deserve before any validation."""
    try:
        msg = cls.FromString(data)
    except _message.DecodeError:
        return None, Expect({CODE.INVALID_ARGUMENT: Naming(located=cls.DESCRIPTOR)})
    wrong = mistyped_paths(msg)
    if wrong:
        return msg, invalid(*wrong)
    return msg, None


def calibrated(rate: float, rates) -> bool:
    """A trigger rate the calibration can map to a threshold: one of its rates (float32 on the wire) or between."""
    rates = sorted(float(r) for r in rates)
    return bool(rates) and (any(abs(rate - r) <= 1e-6 * max(1.0, r) for r in rates) or rates[0] <= rate <= rates[-1])


# -- the tally ---------------------------------------------------------------------------------------------------


class Kind(enum.Enum):
    """Where a case comes from: the rows of the report."""

    STRUCTURED = "structured"  # built field by field, valid or with out-of-range values
    RAW_FIELD = "raw field"  # a structured message with a field appended: another wire type, a negative varint
    MUTATED = "mutated"  # bytes of a serialized message, truncated, bit-flipped, overwritten, spliced or random
    OTHER_TYPE = "other type"  # a message of another type
    OVERSIZED = "oversized"  # beyond the server's receive limit
    UNKNOWN_METHOD = "unknown method"
    SESSION_SCRIPT = "session script"  # several calls on one selector session
    CANCELLED_STREAM = "cancelled stream"  # the client goes away after the first message


@dataclasses.dataclass
class Tally:
    face: str
    codes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: list[str] = dataclasses.field(default_factory=list)
    done: int = 0

    def record(self, kind: Kind, label: str, outcome: Outcome, expect: Expect,
               check_reply: Callable[[list[bytes]], str | None] | None = None) -> bool:
        """Count the outcome and keep a failure if it breaks `expect` (or, when OK, `check_reply`)."""
        self.codes[outcome.code.name] += 1
        self.by_kind[kind.value, outcome.code.name] += 1
        problem = expect.problem(outcome)
        if problem is None and outcome.code == CODE.OK and check_reply is not None:
            problem = check_reply(outcome.replies)
        if problem is not None:
            self.fail(f"{kind.value} {label}: {problem}")
        return problem is None

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def start_counting(self) -> None:
        """Forget the counts so far (the warm-up's); its failures stay."""
        self.codes.clear()
        self.by_kind.clear()
        self.done = 0

    def report(self, wall_s: float, rss: tuple[int, int]) -> str:
        kinds = collections.defaultdict(dict)
        for (kind, code), n in sorted(self.by_kind.items()):
            kinds[kind][code] = n
        return (f"\n[fuzz {self.face}] {self.done} cases (seed {FUZZ_SEED}) in {wall_s:.1f} s; status codes "
                f"{dict(self.codes.most_common())}; by kind {dict(kinds)}; RSS after warm-up {rss[0] >> 20} MiB, "
                f"after fuzzing {rss[1] >> 20} MiB; {len(self.failures)} failures")


async def call(channel: grpc.aio.Channel, method: str, data: bytes, stream: bool = False) -> Outcome:
    """`data` as the request of `method`, bytes in and out (no serializers: grpc passes bytes through)."""
    try:
        if stream:
            replies = [r async for r in channel.unary_stream(method)(data, timeout=CALL_TIMEOUT_S)]
        else:
            replies = [await channel.unary_unary(method)(data, timeout=CALL_TIMEOUT_S)]
        return Outcome(CODE.OK, "", replies)
    except grpc.aio.AioRpcError as e:
        return Outcome(e.code(), e.details() or "", [])


async def run_all(cases: list[Callable[[], Awaitable[None]]], tally: Tally) -> None:
    """Run the cases CONCURRENCY at a time (concurrent requests batch and interleave on the servers)."""
    pending = iter(cases)
    step = max(len(cases) // 10, 1)

    async def lane() -> None:
        for case in pending:
            await case()
            tally.done += 1
            if FUZZ_N >= 5000 and tally.done % step == 0:
                print(f"[fuzz {tally.face}] {tally.done}/{len(cases)}: {dict(tally.codes.most_common())}", flush=True)

    await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))


def rss_bytes() -> int:
    """This process's resident memory (the servers run in it). Freed memory that glibc keeps in its per-thread
    arenas (torch computes on executor threads) is handed back first: the RSS then measures what is still held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS includes the allocator's free lists
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise RuntimeError("no VmRSS in /proc/self/status")


async def assert_serving(channel: grpc.aio.Channel, service: str) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", service):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=CALL_TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


# -- byte-level building blocks ------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative values as protobuf encodes int32/int64: ten bytes of two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field_bytes(number: int, wire_type: int, payload: bytes | int) -> bytes:
    """One encoded field; `payload` is the varint value, the fixed bytes, or the length-delimited content."""
    key = varint(number << 3 | wire_type)
    if wire_type == 0:
        return key + varint(payload)
    if wire_type == 2:
        return key + varint(len(payload)) + payload
    return key + payload


EXTREME_VARINTS = [0, 1, -1, -(2 ** 31), 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 32, 2 ** 63, 2 ** 64 - 1]
EXTREME_FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-45, 0.5, 1.0, 3.4e38]
WIRE_TYPE = {_descriptor.FieldDescriptor.TYPE_DOUBLE: 1, _descriptor.FieldDescriptor.TYPE_FLOAT: 5,
             _descriptor.FieldDescriptor.TYPE_STRING: 2, _descriptor.FieldDescriptor.TYPE_MESSAGE: 2,
             _descriptor.FieldDescriptor.TYPE_BYTES: 2}  # every other type of ours: varint


def raw_field(rng: random.Random, descriptor: _descriptor.Descriptor, depth: int = 0) -> bytes:
    """A field of `descriptor` (or of one of its message fields, nested) with an extreme value, usually with its
    declared wire type (a negative varint for an unsigned field, a NaN float, random bytes for a string),
    sometimes with another one. Appended to a message, protobuf merges it in (last one wins)."""
    field = rng.choice(descriptor.fields)
    declared = WIRE_TYPE.get(field.type, 0)
    if field.message_type is not None and depth < 2 and rng.random() < 0.7:
        return field_bytes(field.number, 2, raw_field(rng, field.message_type, depth + 1))
    wire_type = declared if rng.random() < 0.7 else rng.choice([0, 1, 2, 5])
    if wire_type == 0:
        return field_bytes(field.number, 0, rng.choice(EXTREME_VARINTS))
    if wire_type == 1:
        return field_bytes(field.number, 1, struct.pack("<d", rng.choice(EXTREME_FLOATS)))
    if wire_type == 5:
        return field_bytes(field.number, 5, struct.pack("<f", rng.choice(EXTREME_FLOATS)))
    content = rng.choice([b"", rng.randbytes(rng.randint(1, 12)), "日本🙂".encode(), b"\xff\xfe", b"x" * 200])
    return field_bytes(field.number, 2, content)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """`data` truncated, bit-flipped, overwritten, with bytes inserted, spliced with itself, or random bytes."""
    d = bytearray(data)
    how = rng.randrange(7)
    if how == 0 and d:
        return bytes(d[:rng.randrange(len(d))])
    if how == 1 and d:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(d))
            d[i] ^= 1 << rng.randrange(8)
        return bytes(d)
    if how == 2 and d:
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(len(d))] = rng.randrange(256)
        return bytes(d)
    if how == 3:
        i = rng.randrange(len(d) + 1)
        return bytes(d[:i]) + rng.randbytes(rng.randint(1, 8)) + bytes(d[i:])
    if how == 4:
        return bytes(d) + bytes(d)  # repeated fields doubled, scalars and messages merged
    if how == 5:  # a length-delimited field announcing far more bytes than follow
        return bytes(d) + bytes([rng.choice([0x0A, 0x12, 0x1A, 0x22, 0x2A])]) + varint(rng.choice([2 ** 31, 2 ** 20]))
    return rng.randbytes(rng.randint(0, 300))


def random_text(rng: random.Random, max_words: int = 12) -> str:
    if rng.random() < 0.3:  # random code points (surrogates excluded: they cannot be UTF-8)
        chars = [chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0xD800),
                                 rng.randrange(0xE000, 0x110000)])) for _ in range(rng.randint(1, 20))]
        text = "".join(chars)
    else:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))
    return text if text.strip() else text + "x"


def long_id(rng: random.Random) -> str:
    return "r" * rng.choice([MAX_ID_LEN + 1, 300, 5000])


# -- the worker's face -------------------------------------------------------------------------------------------------


class WorkerFace:
    """Cases for GenerationService and their oracle, from the worker's settings and the selector's limits."""

    def __init__(self, stack: Stack, tally: Tally):
        self.stack, self.tally = stack, tally
        self.ws = stack.settings.worker
        self.max_candidates = stack.settings.selector.max_candidates
        self.tokenizer = stack.worker.lm.tokenizer
        self.kl_rates = stack.settings.selector.kl_thresholds.keys()
        self.default_mode = {"greedy": gen_pb.MODE_GREEDY, "s2t": gen_pb.MODE_S2T, "s2t-local": gen_pb.MODE_S2T_LOCAL,
                             "llm": gen_pb.MODE_LLM}[self.ws.default_mode]
        self.default_trigger = {"always": gen_pb.TRIGGER_ALWAYS, "entropy": gen_pb.TRIGGER_ENTROPY,
                                "margin": gen_pb.TRIGGER_MARGIN, "kl": gen_pb.TRIGGER_KL}[self.ws.trigger]

    # the oracle

    def problems(self, req) -> list[str]:
        """Every field of `req` the contract refuses (the server names the first it finds)."""
        ws, out = self.ws, []
        if len(req.request_id) > MAX_ID_LEN or not all(" " <= c <= "~" for c in req.request_id):
            out.append("request_id")  # it travels on as gRPC metadata: printable ASCII
        which, messages = req.WhichOneof("input"), None
        if which is None:
            out.append("prompt")
        elif which == "prompt":
            if req.prompt.strip():
                messages = [{"role": "system", "content": ws.system_prompt}, {"role": "user", "content": req.prompt}]
            else:
                out.append("prompt")
        else:
            msgs = req.conversation.messages
            bad = [f"conversation.messages[{i}].role" for i, m in enumerate(msgs) if m.role not in ROLES]
            bad += [f"conversation.messages[{i}].content" for i, m in enumerate(msgs) if not m.content.strip()]
            out += bad if msgs else ["conversation.messages"]
            if msgs and not bad:
                messages = [{"role": m.role, "content": m.content} for m in msgs]
        if messages is not None and len(chat_ids(self.tokenizer, messages)) > ws.max_prompt_tokens:
            out.append(which)
        o = req.options
        mode = o.mode or self.default_mode
        if mode not in (gen_pb.MODE_GREEDY, gen_pb.MODE_S2T, gen_pb.MODE_LLM, gen_pb.MODE_S2T_LOCAL,
                        gen_pb.MODE_TAKEOVER):
            out.append("options.mode")
        if (o.max_new_tokens or ws.max_new_tokens) > ws.max_new_tokens_limit:
            out.append("options.max_new_tokens")
        if (o.num_candidates or ws.num_candidates) > self.max_candidates:
            out.append("options.num_candidates")
        trigger = o.trigger or self.default_trigger
        if trigger not in (gen_pb.TRIGGER_ALWAYS, gen_pb.TRIGGER_ENTROPY, gen_pb.TRIGGER_MARGIN, gen_pb.TRIGGER_KL):
            out.append("options.trigger")
        if mode == gen_pb.MODE_S2T_LOCAL and trigger == gen_pb.TRIGGER_KL:
            trigger = gen_pb.TRIGGER_ENTROPY  # S2T-Local has no large model: the entropy trigger stands in
        rate = o.trigger_rate or ws.trigger_rate
        calibration = {gen_pb.TRIGGER_ENTROPY: ws.thresholds.entropy.keys(),
                       gen_pb.TRIGGER_MARGIN: ws.thresholds.margin.keys(),
                       gen_pb.TRIGGER_KL: self.kl_rates}.get(trigger)
        if not 0 < rate <= 1 or (calibration is not None and not calibrated(rate, calibration)):  # NaN fails too
            out.append("options.trigger_rate")
        if (o.block_size or ws.block_size) > ws.max_block_size:
            out.append("options.block_size")
        if o.max_inflight_blocks > 16:
            out.append("options.max_inflight_blocks")
        confidence = o.draft_confidence if o.HasField("draft_confidence") else ws.draft_confidence
        if not 0 <= confidence < 1:
            out.append("options.draft_confidence")
        if o.verify_policy not in (0, gen_pb.VERIFY_POLICY_WAIT, gen_pb.VERIFY_POLICY_COMMIT_AFTER_LAG):
            out.append("options.verify_policy")
        # sampling: a finite temperature >= 0, top_p in [0, 1], and a temperature > 0 in mode greedy only
        if not (math.isfinite(o.temperature) and o.temperature >= 0) or (
                o.temperature > 0 and mode != gen_pb.MODE_GREEDY):
            out.append("options.temperature")
        if not 0 <= o.top_p <= 1:
            out.append("options.top_p")
        return out

    def expect(self, method: str, data: bytes) -> tuple[Expect, _message.Message | None]:
        cls = gen_pb.GenerateStreamRequest if method.endswith("GenerateStream") else gen_pb.GenerateRequest
        msg, refusal = parsed_or_refusal(cls, data)
        if refusal is not None:
            return refusal, None
        problems = self.problems(msg)
        return (invalid(*problems), None) if problems else (OK_ONLY, msg)

    def reply_check(self, req, stream: bool) -> Callable[[list[bytes]], str | None]:
        """The contract of an answer: at most max_new_tokens, LENGTH only when that many, the request id echoed,
        and a stream of committed deltas that concatenate to the final text."""

        def check(replies: list[bytes]) -> str | None:
            if stream:
                events = [gen_pb.GenerateStreamResponse.FromString(r) for r in replies]
                if not events or events[-1].WhichOneof("event") != "final":
                    return "the stream does not end with its final message"
                if any(e.WhichOneof("event") != "delta" for e in events[:-1]):
                    return "a final message before the end of the stream"
                final = events[-1].final
                if [t for e in events[:-1] for t in e.delta.token_ids] != list(final.token_ids) \
                        or "".join(e.delta.text for e in events[:-1]) != final.text:
                    return "the deltas do not concatenate to the final completion"
            else:
                final = gen_pb.GenerateResponse.FromString(replies[0])
            max_new = req.options.max_new_tokens or self.ws.max_new_tokens
            n = final.stats.completion_tokens
            if len(final.token_ids) != n or n > max_new:
                return f"{len(final.token_ids)} token ids, {n} completion tokens, max_new_tokens {max_new}"
            if final.finish_reason not in (gen_pb.FINISH_REASON_STOP, gen_pb.FINISH_REASON_LENGTH) \
                    or (final.finish_reason == gen_pb.FINISH_REASON_LENGTH and n != max_new):
                return f"finish reason {final.finish_reason} after {n} of {max_new} tokens"
            if req.request_id and final.request_id != req.request_id:
                return f"request id {final.request_id!r} echoed for {req.request_id!r}"
            if final.stats.mode_requested != (req.options.mode or self.default_mode):
                return f"mode_requested {final.stats.mode_requested}"
            if self.undegraded(req) and (final.stats.degraded_reason or final.stats.selector_failures
                                         or final.stats.mode_used != final.stats.mode_requested):
                return f"degraded with a healthy selector: {final.stats}"
            return None

        return check

    def undegraded(self, req) -> bool:
        """Whether a valid request must run in the mode it asked for, every token verified: it uses the (healthy)
        selector and gives it the default verify deadline (30 s) or more."""
        o = req.options
        if (o.mode or self.default_mode) not in (gen_pb.MODE_S2T, gen_pb.MODE_LLM):
            return False
        policy = o.verify_policy or (gen_pb.VERIFY_POLICY_WAIT if self.ws.verify_policy == "wait"
                                     else gen_pb.VERIFY_POLICY_COMMIT_AFTER_LAG)
        deadline_ms = (o.verify_deadline_ms or self.ws.verify_deadline_ms) if policy == gen_pb.VERIFY_POLICY_WAIT \
            else (o.commit_lag_ms or self.ws.commit_lag_ms)
        return deadline_ms >= 30_000

    # the generator

    def request(self, rng: random.Random) -> gen_pb.GenerateRequest:
        """A request built field by field: mostly valid values, each field sometimes extreme or out of range."""
        req = gen_pb.GenerateRequest()
        x = rng.random()
        if x < 0.62:
            y = rng.random()
            if y < 0.08:
                req.prompt = rng.choice(BLANKS)
            elif y < 0.12:
                req.prompt = ("".join(rng.choice(WORDS) for _ in range(100)) * 200)[:100_000]  # ~100 KB
            else:
                req.prompt = random_text(rng)
        elif x < 0.95:
            for _ in range(rng.choice([0, 1, 1, 2, 3, 4])):
                role = rng.choice(ROLES) if rng.random() < 0.9 else rng.choice(["robot", "", "User", "system "])
                content = random_text(rng, 6) if rng.random() < 0.92 else rng.choice(BLANKS)
                req.conversation.messages.add(role=role, content=content)
            if not req.conversation.messages:
                req.conversation.SetInParent()  # the oneof set, to an empty conversation
        o = req.options

        def pick(valid: Callable[[], object], extreme: list) -> object | None:
            """None (leave the field at its default) about half of the time."""
            if rng.random() < 0.55:
                return None
            return valid() if rng.random() < 0.88 else rng.choice(extreme)

        for name, valid, extreme in [
            ("mode", lambda: rng.randrange(5), [6, 99, 2 ** 31 - 1, -1, -(2 ** 31)]),
            ("max_new_tokens", lambda: rng.randint(1, self.ws.max_new_tokens_limit), [5, 4096, 2 ** 31, 2 ** 32 - 1]),
            ("num_candidates", lambda: rng.randint(1, self.max_candidates),
             [self.max_candidates + 1, 65, 10 ** 4, 2 ** 32 - 1]),
            ("trigger", lambda: rng.randrange(5), [5, 2 ** 31 - 1, -3]),
            ("trigger_rate", lambda: rng.choice([0.01, 0.1, 0.3, 0.5, rng.uniform(0.01, 0.5)]),
             [math.nan, math.inf, -math.inf, -0.1, 1.5, 1.0, 0.9, 0.6, 1e-9]),
            ("block_size", lambda: rng.randint(1, self.ws.max_block_size),
             [self.ws.max_block_size + 1, 10 ** 6, 2 ** 32 - 1]),
            ("verify_policy", lambda: rng.randrange(3), [3, 7, -1]),
            ("verify_deadline_ms", lambda: rng.choice([1, 10, 1000, 2 ** 32 - 1]), [2 ** 32 - 1]),
            ("commit_lag_ms", lambda: rng.choice([1, 10, 1000, 2 ** 32 - 1]), [2 ** 32 - 1]),
            ("max_inflight_blocks", lambda: rng.randint(1, 16), [17, 2 ** 32 - 1]),
            ("draft_confidence", lambda: rng.choice([0.0, 0.5, 0.99]), [1.0, 1.5, -0.1, math.nan, math.inf]),
        ]:
            value = pick(valid, extreme)
            if value is not None:
                setattr(o, name, value)
        if rng.random() < 0.2:
            req.request_id = rng.choice([long_id(rng), "r" * MAX_ID_LEN, f"req {rng.randrange(10 ** 6)} ~!", "x\ty",
                                         random_text(rng, 3)[:MAX_ID_LEN]])
        return req

    OTHER_TYPES = [
        sel_pb.SelectRequest(session_id="other", step=3, token_ids=[1, 2, 3],
                             positions=[sel_pb.CandidatePosition(position=3, candidate_ids=[4, 5])]),
        sel_pb.DecodeRequest(session_id="What is 2 + 3?", token_ids=[1], max_tokens=2, stop_ids=[3]),
        sel_pb.SelectResponse(session_id="x", step=2, outcome=2, selections=[sel_pb.Selection(position=1, index=1)]),
        sel_pb.GetSelectorInfoResponse(model_name="m", vocab_size=272, kl_thresholds={"0.1": 0.5}),
        gen_pb.GenerateResponse(request_id="r", text="hi", token_ids=[1, 2], stats=gen_pb.GenerationStats(wall_s=1.5)),
        gen_pb.GenerateStreamResponse(delta=gen_pb.TextDelta(text="hi", token_ids=[7])),
        gen_pb.Conversation(messages=[gen_pb.ChatMessage(role="user", content="hi")]),
        gen_pb.ChatMessage(role="user", content="What is 2 + 3?"),
        gen_pb.GenerationOptions(mode=1, max_new_tokens=2),
        health_pb2.HealthCheckRequest(service="s2t.v1.GenerationService"),
        sel_pb.CloseSessionRequest(session_id="What is 2 + 3?"),
    ]

    def cases(self, rng: random.Random, n: int, oversized: int) -> list[Callable[[], Awaitable[None]]]:
        out = [self.oversized_case(i) for i in range(oversized)]
        while len(out) < n:
            x = rng.random()
            method = GEN_SERVICE + rng.choice(["Generate", "GenerateStream"])
            base = self.request(rng)
            if x < 0.52:
                out.append(self.single_case(Kind.STRUCTURED, method, base.SerializeToString()))
            elif x < 0.62:
                data = base.SerializeToString() + raw_field(rng, gen_pb.GenerateRequest.DESCRIPTOR)
                out.append(self.single_case(Kind.RAW_FIELD, method, data))
            elif x < 0.85:
                out.append(self.single_case(Kind.MUTATED, method, mutate(rng, base.SerializeToString())))
            elif x < 0.93:
                out.append(self.single_case(Kind.OTHER_TYPE, method, rng.choice(self.OTHER_TYPES).SerializeToString()))
            elif x < 0.98:
                out.append(self.cancelled_stream_case(rng))
            else:
                out.append(self.unknown_method_case(rng))
        rng.shuffle(out)
        return out

    def single_case(self, kind: Kind, method: str, data: bytes) -> Callable[[], Awaitable[None]]:
        stream = method.endswith("GenerateStream")
        expect, msg = self.expect(method, data)

        async def run() -> None:
            outcome = await call(self.stack.channel, method, data, stream)
            self.tally.record(kind, f"{method} {data[:80]!r}", outcome, expect,
                              self.reply_check(msg, stream) if msg is not None else None)

        return run

    def oversized_case(self, i: int) -> Callable[[], Awaitable[None]]:
        data = gen_pb.GenerateRequest(prompt="x" * ((16 << 20) + 1 + i * 4096)).SerializeToString()

        async def run() -> None:
            outcome = await call(self.stack.channel, GEN_SERVICE + "Generate", data)
            self.tally.record(Kind.OVERSIZED, f"{len(data)} bytes", outcome, OVERSIZED)

        return run

    def unknown_method_case(self, rng: random.Random) -> Callable[[], Awaitable[None]]:
        method = rng.choice([GEN_SERVICE + "Select", GEN_SERVICE + "generate", "/s2t.v1.Nope/Generate"])

        async def run() -> None:
            outcome = await call(self.stack.channel, method, b"")
            self.tally.record(Kind.UNKNOWN_METHOD, method, outcome, Expect({CODE.UNIMPLEMENTED: Naming()}))

        return run

    def cancelled_stream_case(self, rng: random.Random) -> Callable[[], Awaitable[None]]:
        """A valid streamed request whose client goes away after its first message."""
        req = gen_pb.GenerateStreamRequest(prompt=random_text(rng), options=gen_pb.GenerationOptions(
            mode=rng.choice([gen_pb.MODE_GREEDY, gen_pb.MODE_S2T, gen_pb.MODE_LLM]), max_new_tokens=4, block_size=1))
        data = req.SerializeToString()

        async def run() -> None:
            stream = self.stack.channel.unary_stream(GEN_SERVICE + "GenerateStream")(data, timeout=CALL_TIMEOUT_S)
            try:
                async for _ in stream:
                    stream.cancel()
                    break
                outcome = Outcome(CODE.CANCELLED, "cancelled by the client", [])
            except grpc.aio.AioRpcError as e:
                outcome = Outcome(e.code(), e.details() or "", [])
            self.tally.record(Kind.CANCELLED_STREAM, "", outcome, Expect({CODE.CANCELLED: Naming(), CODE.OK: Naming()}))

        return run


# -- the selector's face ------------------------------------------------------------------------------------------


STATE_CODES = {CODE.FAILED_PRECONDITION: Naming(("session_id", "step", "prefix_length"))}


class SelectorFace:
    """Cases for SelectorService and their oracle, from the limits GetSelectorInfo announces."""

    def __init__(self, channel: grpc.aio.Channel, core: SelectorCore, info: sel_pb.GetSelectorInfoResponse,
                 tally: Tally):
        self.channel, self.core, self.info, self.tally = channel, core, info, tally
        self.vocab = info.vocab_size
        self.kl_rates = [float(r) for r in info.kl_thresholds]
        self.oov = [self.vocab, self.vocab + 1, 10 ** 6, 2 ** 31 - 1, -1, -(2 ** 31)]

    # the oracle

    def common_problems(self, req) -> list[str]:
        out = []
        if not req.session_id or len(req.session_id) > MAX_ID_LEN:
            out.append("session_id")
        if len(req.request_id) > MAX_ID_LEN:
            out.append("request_id")
        if not req.token_ids or req.prefix_length + len(req.token_ids) > self.info.max_context_tokens:
            out.append("token_ids")
        return out + self.id_problems("token_ids", req.token_ids)

    def id_problems(self, field: str, ids) -> list[str]:
        return [f"{field}[{i}]" for i, t in enumerate(ids) if not 0 <= t < self.vocab]

    def select_problems(self, req: sel_pb.SelectRequest) -> list[str]:
        out = self.common_problems(req)
        out += [name for name in ("slm_model", "slm_weights_sha256") if len(getattr(req, name)) > MAX_ID_LEN]
        if len(req.positions) > self.info.max_positions:  # none: a prefill
            out.append("positions")
        kind = req.trigger.kind
        if kind not in (sel_pb.SELECT_TRIGGER_ALWAYS, sel_pb.SELECT_TRIGGER_WORKER, sel_pb.SELECT_TRIGGER_KL):
            out.append("trigger.kind")
        if kind == sel_pb.SELECT_TRIGGER_KL:
            threshold, rate = req.trigger.kl_threshold, req.trigger.kl_rate
            if not threshold >= 0:  # an explicit threshold in nats; NaN is none
                out.append("trigger.kl_threshold")
            elif threshold == 0 and not (0 < rate <= 1 and calibrated(rate, self.kl_rates)):
                out.append("trigger.kl_rate")
        lo, hi, prev = req.prefix_length + 1, req.prefix_length + len(req.token_ids), 0
        for j, pos in enumerate(req.positions):
            f = f"positions[{j}]"
            if not lo <= pos.position <= hi or pos.position <= prev:
                out.append(f"{f}.position")
            prev = pos.position
            k = len(pos.candidate_ids)
            if not 1 <= k <= self.info.max_candidates \
                    or len(set(pos.candidate_ids) | set(pos.support_ids)) != k + len(pos.support_ids):
                out.append(f"{f}.candidate_ids")
            out += self.id_problems(f"{f}.candidate_ids", pos.candidate_ids)
            out += self.id_problems(f"{f}.support_ids", pos.support_ids)
            for name, ids, probs in (("candidate", pos.candidate_ids, pos.candidate_probs),
                                     ("support", pos.support_ids, pos.support_probs)):
                if probs and len(probs) != len(ids):
                    out.append(f"{f}.{name}_probs")
                else:
                    out += [f"{f}.{name}_probs[{i}]" for i, p in enumerate(probs) if not 0 <= p <= 1]
                if kind == sel_pb.SELECT_TRIGGER_KL and ids and not probs:  # the KL statistic needs them all
                    out.append(f"{f}.{name}_probs")
        return out

    def decode_problems(self, req: sel_pb.DecodeRequest) -> list[str]:
        out = self.common_problems(req)
        if not 1 <= req.max_tokens <= self.info.max_decode_tokens \
                or req.prefix_length + len(req.token_ids) + req.max_tokens > self.info.max_context_tokens:
            out.append("max_tokens")
        return out + self.id_problems("stop_ids", req.stop_ids)

    REQUEST_CLS = {"Select": sel_pb.SelectRequest, "Decode": sel_pb.DecodeRequest,
                   "CloseSession": sel_pb.CloseSessionRequest, "GetSelectorInfo": sel_pb.GetSelectorInfoRequest}

    def expect(self, method: str, data: bytes, fresh_session: bool) -> tuple[Expect, _message.Message | None]:
        """`fresh_session`: the session id is one no other case uses, so its state is known (none)."""
        name = method.rsplit("/", 1)[1]
        msg, refusal = parsed_or_refusal(self.REQUEST_CLS[name], data)
        if refusal is not None:
            return refusal, msg
        if name in ("CloseSession", "GetSelectorInfo"):
            return OK_ONLY, msg
        problems = self.select_problems(msg) if name == "Select" else self.decode_problems(msg)
        if problems:
            return invalid(*problems), msg
        if not fresh_session:  # someone else's session: any state
            return Expect({CODE.OK: Naming(), **STATE_CODES}), msg
        if msg.prefix_length != 0:
            return Expect({CODE.FAILED_PRECONDITION: Naming(("session_id",))}), msg
        return OK_ONLY, msg

    def reply_check(self, method: str, req) -> Callable[[list[bytes]], str | None]:
        """The contract of an answer to a request on a fresh session (not a replay)."""
        name = method.rsplit("/", 1)[1]

        def check(replies: list[bytes]) -> str | None:
            if name == "Select":
                return self.select_reply_problem(req, sel_pb.SelectResponse.FromString(replies[0]))
            if name == "Decode":
                return self.decode_reply_problem(req, sel_pb.DecodeResponse.FromString(replies[0]))
            if name == "GetSelectorInfo":
                reply = sel_pb.GetSelectorInfoResponse.FromString(replies[0])
                return None if reply == self.info else "GetSelectorInfo answered differently"
            sel_pb.CloseSessionResponse.FromString(replies[0])
            return None

        return check

    def select_reply_problem(self, req: sel_pb.SelectRequest, reply: sel_pb.SelectResponse) -> str | None:
        if (reply.session_id, reply.step) != (req.session_id, req.step):
            return f"reply for {reply.session_id!r} step {reply.step}"
        sels = list(reply.selections)
        if not req.positions:  # a prefill: the session grew by the tokens, nothing was scored
            if sels or reply.outcome != sel_pb.SELECT_OUTCOME_ACCEPTED \
                    or reply.session_length != req.prefix_length + len(req.token_ids):
                return f"prefill: {len(sels)} selections, outcome {reply.outcome}, session_length {reply.session_length}"
            return None
        if not 1 <= len(sels) <= len(req.positions):
            return f"{len(sels)} selections for {len(req.positions)} positions"
        for sel, pos in zip(sels, req.positions):
            fires = {sel_pb.SELECT_TRIGGER_ALWAYS: True, sel_pb.SELECT_TRIGGER_WORKER: pos.worker_triggered}.get(
                req.trigger.kind, sel.diverged)  # KL: the statistic is the selector's
            if sel.position != pos.position or sel.index >= len(pos.candidate_ids) \
                    or sel.diverged != (sel.index != 0 and fires):
                return f"selection {sel} for position {pos.position}"
        if any(s.diverged for s in sels[:-1]):
            return "the reply goes on after a divergence"
        if sels[-1].diverged:
            if reply.outcome != sel_pb.SELECT_OUTCOME_DIVERGED or reply.session_length != sels[-1].position:
                return f"diverged at {sels[-1].position}: outcome {reply.outcome}, " \
                       f"session_length {reply.session_length}"
        elif reply.outcome != sel_pb.SELECT_OUTCOME_ACCEPTED or len(sels) != len(req.positions) \
                or reply.session_length != req.prefix_length + len(req.token_ids):
            return f"accepted: outcome {reply.outcome}, session_length {reply.session_length}"
        return None

    def decode_reply_problem(self, req: sel_pb.DecodeRequest, reply: sel_pb.DecodeResponse) -> str | None:
        out = list(reply.token_ids)
        if (reply.session_id, reply.step) != (req.session_id, req.step):
            return f"reply for {reply.session_id!r} step {reply.step}"
        if not 1 <= len(out) <= req.max_tokens or any(not 0 <= t < self.vocab for t in out):
            return f"{out} for max_tokens {req.max_tokens}"
        if len(out) < req.max_tokens and out[-1] not in req.stop_ids:
            return f"{out} stopped early without a stop id"
        if reply.session_length != req.prefix_length + len(req.token_ids) + len(out) - 1:
            return f"session_length {reply.session_length}"
        return None

    # the generator

    def ids(self, rng: random.Random, n: int) -> list[int]:
        ids = [rng.randrange(self.vocab) for _ in range(n)]
        if ids and rng.random() < 0.04:
            ids[rng.randrange(n)] = rng.choice(self.oov)
        return ids

    def select(self, rng: random.Random, session_id: str, step: int | None = None, prefix: int | None = None,
               valid: bool = False) -> sel_pb.SelectRequest:
        """A Select built field by field; with `valid`, every field in range (for the session scripts)."""
        wild = (lambda p: False) if valid else (lambda p: rng.random() < p)
        req = sel_pb.SelectRequest(session_id=session_id)
        if wild(0.05):
            req.session_id = rng.choice(["", long_id(rng)])
        req.step = step if step is not None else rng.choice([0, 1, rng.randrange(1000), 2 ** 63, 2 ** 64 - 1])
        req.prefix_length = prefix if prefix is not None else (
            0 if rng.random() < 0.8 else rng.choice([1, 7, self.info.max_context_tokens, 2 ** 31, 2 ** 32 - 1]))
        n = (rng.choice([0, self.info.max_context_tokens + 1, rng.randint(self.info.max_positions + 1, 90)])
             if wild(0.1) else rng.randint(1, 24))
        req.token_ids.extend(self.ids(rng, n) if not valid else [rng.randrange(self.vocab) for _ in range(n)])
        kind = rng.choice([1, 2, 3]) if not wild(0.08) else rng.choice([0, 4, 2 ** 31 - 1, -1])
        req.trigger.kind = kind
        if kind == sel_pb.SELECT_TRIGGER_KL:
            if rng.random() < 0.25:
                req.trigger.kl_threshold = rng.uniform(0.01, 3) if not wild(0.3) \
                    else rng.choice([-1.0, math.nan, math.inf])
            else:
                req.trigger.kl_rate = rng.choice([0.01, 0.1, 0.5, rng.uniform(0.01, 0.5)]) if not wild(0.25) \
                    else rng.choice([0.0, math.nan, 0.7, 1.5, -0.2, 0.005])
        m = (rng.choice([0, self.info.max_positions + 1]) if wild(0.05)
             else rng.randint(1, max(1, min(n, 8))))
        spots = sorted(rng.sample(range(req.prefix_length + 1, req.prefix_length + n + 1), min(m, n))) if n else []
        spots += [rng.randrange(2 ** 32)] * (m - len(spots))
        if spots and wild(0.05):
            spots[rng.randrange(len(spots))] = rng.choice([0, req.prefix_length + n + 1, 2 ** 32 - 1])
        if len(spots) > 1 and wild(0.05):
            spots[-1] = spots[-2]  # not strictly increasing
        for spot in spots:
            pos = req.positions.add(position=spot & 0xFFFFFFFF)
            k = (rng.choice([0, self.info.max_candidates + 1, 64, 300, self.info.max_candidates]) if wild(0.07)
                 else rng.randint(1, min(8, self.info.max_candidates)))
            cands = rng.sample(range(self.vocab), k) if k <= self.vocab \
                else [rng.randrange(self.vocab) for _ in range(k)]  # more than the vocabulary: repeats
            if k > 1 and wild(0.03):
                cands[1] = cands[0]
            if cands and wild(0.03):
                cands[rng.randrange(k)] = rng.choice(self.oov)
            pos.candidate_ids.extend(cands)
            if kind == sel_pb.SELECT_TRIGGER_KL and not wild(0.1) or rng.random() < 0.45:
                pos.candidate_probs.extend(rng.random() for _ in cands)
            if rng.random() < 0.2:
                taken = set(cands)
                rest = [t for t in range(self.vocab) if t not in taken]
                support = rng.sample(rest, min(len(rest), rng.randint(1, 8)))
                pos.support_ids.extend(support)
                if (kind == sel_pb.SELECT_TRIGGER_KL and not wild(0.2)) or rng.random() < 0.5:
                    pos.support_probs.extend(rng.random() for _ in support)
            for probs in (pos.candidate_probs, pos.support_probs):
                if probs and wild(0.04):
                    if rng.random() < 0.5:
                        probs.append(0.5)  # one too many
                    else:
                        probs[rng.randrange(len(probs))] = rng.choice([math.nan, -0.5, 1.5, math.inf])
            pos.worker_triggered = rng.random() < 0.5
            pos.worker_trigger_value = rng.choice([0.0, 0.7, math.nan, math.inf, -1.0])
        if wild(0.15):
            setattr(req, rng.choice(["request_id", "slm_model", "slm_weights_sha256"]),
                    long_id(rng) if rng.random() < 0.4 else random_text(rng, 3)[:MAX_ID_LEN])
        return req

    def decode(self, rng: random.Random, session_id: str, step: int | None = None, prefix: int | None = None,
               valid: bool = False) -> sel_pb.DecodeRequest:
        wild = (lambda p: False) if valid else (lambda p: rng.random() < p)
        req = sel_pb.DecodeRequest(session_id=session_id if not wild(0.05) else rng.choice(["", long_id(rng)]))
        req.step = step if step is not None else rng.choice([0, 1, rng.randrange(1000), 2 ** 64 - 1])
        req.prefix_length = prefix if prefix is not None else (
            0 if rng.random() < 0.8 else rng.choice([1, self.info.max_context_tokens - 2, 2 ** 32 - 1]))
        n = rng.choice([0, self.info.max_context_tokens]) if wild(0.06) else rng.randint(1, 24)
        req.token_ids.extend(self.ids(rng, n) if not valid else [rng.randrange(self.vocab) for _ in range(n)])
        req.max_tokens = rng.randint(1, self.info.max_decode_tokens) if not wild(0.15) else rng.choice(
            [0, self.info.max_decode_tokens + 1, 64, 2 ** 32 - 1])
        req.stop_ids.extend(self.ids(rng, rng.choice([0, 0, 1, 3])) if not valid else [])
        if wild(0.1):
            req.request_id = long_id(rng)
        return req

    OTHER_TYPES = [
        gen_pb.GenerateRequest(prompt="What is 2 + 3?", request_id="r1"),
        gen_pb.GenerateRequest(conversation=gen_pb.Conversation(messages=[gen_pb.ChatMessage(role="user",
                                                                                             content="hi")]),
                               options=gen_pb.GenerationOptions(mode=2, max_new_tokens=3)),
        gen_pb.GenerationOptions(mode=2, max_new_tokens=3, num_candidates=4, trigger=1, trigger_rate=0.5),
        gen_pb.GenerateResponse(request_id="r", text="hi", token_ids=[1, 2], stats=gen_pb.GenerationStats(wall_s=1.5)),
        sel_pb.SelectResponse(session_id="other-select", step=1, outcome=1, selections=[sel_pb.Selection(position=1)]),
        sel_pb.DecodeResponse(session_id="other-decode", step=1, token_ids=[5], session_length=3),
        sel_pb.GetSelectorInfoResponse(model_name="m", vocab_size=272, kl_thresholds={"0.1": 0.5}),
        sel_pb.CloseSessionRequest(session_id="other-close"),
        sel_pb.SelectRequest(session_id="other-select-as-decode", token_ids=[1, 2],
                             trigger=sel_pb.SelectTriggerSpec(kind=1),
                             positions=[sel_pb.CandidatePosition(position=2, candidate_ids=[3, 4])]),
        sel_pb.DecodeRequest(session_id="other-decode-as-select", token_ids=[1, 2], max_tokens=2),
        health_pb2.HealthCheckRequest(service="s2t.v1.SelectorService"),
    ]

    def cases(self, rng: random.Random, n: int, oversized: int) -> list[Callable[[], Awaitable[None]]]:
        out = [self.oversized_case(i) for i in range(oversized)]
        label = f"{rng.getrandbits(32):08x}"  # session ids unique to this batch of cases
        while len(out) < n:
            i, x = len(out), rng.random()
            sid = f"single-{label}-{i}"
            if x < 0.36:
                out.append(self.single_case(Kind.STRUCTURED, SEL_SERVICE + "Select", self.select(rng, sid), True))
            elif x < 0.48:
                out.append(self.single_case(Kind.STRUCTURED, SEL_SERVICE + "Decode", self.decode(rng, sid), True))
            elif x < 0.51:
                close = sel_pb.CloseSessionRequest(session_id=rng.choice([sid, "", long_id(rng), random_text(rng, 3)]))
                out.append(self.single_case(Kind.STRUCTURED, SEL_SERVICE + "CloseSession", close, True))
            elif x < 0.53:
                out.append(self.single_case(Kind.STRUCTURED, SEL_SERVICE + "GetSelectorInfo",
                                            sel_pb.GetSelectorInfoRequest(), True))
            elif x < 0.61:
                method = rng.choice(["Select", "Decode"])
                base = (self.select if method == "Select" else self.decode)(rng, sid)
                out.append(self.single_case(Kind.RAW_FIELD, SEL_SERVICE + method, base.SerializeToString()
                                            + raw_field(rng, base.DESCRIPTOR), True))
            elif x < 0.80:
                method = rng.choice(["Select", "Select", "Decode", "CloseSession", "GetSelectorInfo"])
                sid = f"mutant-{label}-{i}"
                base = {"Select": lambda: self.select(rng, sid), "Decode": lambda: self.decode(rng, sid),
                        "CloseSession": lambda: sel_pb.CloseSessionRequest(session_id=sid),
                        "GetSelectorInfo": sel_pb.GetSelectorInfoRequest}[method]()
                out.append(self.single_case(Kind.MUTATED, SEL_SERVICE + method, mutate(rng, base.SerializeToString()),
                                            False))
            elif x < 0.87:
                method = rng.choice(list(self.REQUEST_CLS))
                out.append(self.single_case(Kind.OTHER_TYPE, SEL_SERVICE + method,
                                            rng.choice(self.OTHER_TYPES).SerializeToString(), False))
            elif x < 0.99:
                out.append(self.script_case(random.Random(rng.getrandbits(64)), f"script-{label}-{i}"))
            else:
                out.append(self.unknown_method_case(rng))
        rng.shuffle(out)
        return out

    async def close(self, session_id: str) -> bool:
        """Release a session a case may have opened (fuzzing must not hold memory); True if it existed."""
        outcome = await call(self.channel, SEL_SERVICE + "CloseSession",
                             sel_pb.CloseSessionRequest(session_id=session_id).SerializeToString())
        if outcome.code != CODE.OK:
            self.tally.fail(f"CloseSession({session_id[:40]!r}) answered {outcome.code.name} {outcome.details!r}")
            return False
        return sel_pb.CloseSessionResponse.FromString(outcome.replies[0]).existed

    def single_case(self, kind: Kind, method: str, request: _message.Message | bytes,
                    fresh_session: bool) -> Callable[[], Awaitable[None]]:
        data = request if isinstance(request, bytes) else request.SerializeToString()
        expect, msg = self.expect(method, data, fresh_session)
        check = self.reply_check(method, msg) if fresh_session and msg is not None else None

        async def run() -> None:
            outcome = await call(self.channel, method, data)
            self.tally.record(kind, f"{method} {data[:80]!r}", outcome, expect, check)
            sid = getattr(msg, "session_id", "")
            if outcome.code == CODE.OK and sid and method.endswith(("Select", "Decode")):
                await self.close(sid)

        return run

    def oversized_case(self, i: int) -> Callable[[], Awaitable[None]]:
        data = sel_pb.SelectRequest(session_id="big", request_id="x" * ((32 << 20) + 1 + i * 4096)).SerializeToString()

        async def run() -> None:
            outcome = await call(self.channel, SEL_SERVICE + "Select", data)
            self.tally.record(Kind.OVERSIZED, f"{len(data)} bytes", outcome, OVERSIZED)

        return run

    def unknown_method_case(self, rng: random.Random) -> Callable[[], Awaitable[None]]:
        method = rng.choice([SEL_SERVICE + "Generate", SEL_SERVICE + "select", "/s2t.v1.Nope/Select"])

        async def run() -> None:
            outcome = await call(self.channel, method, b"")
            self.tally.record(Kind.UNKNOWN_METHOD, method, outcome, Expect({CODE.UNIMPLEMENTED: Naming()}))

        return run

    def script_case(self, rng: random.Random, sid: str) -> Callable[[], Awaitable[None]]:
        """One session's protocol: open it, then a replay, the next step, a prefix beyond what it holds (and the
        resync after it), an old step, a step gap, a Decode, a refused step and its valid resend, or a close."""
        follow_up = rng.choice(["replay", "next", "beyond", "old", "gap", "decode", "invalid-then-valid", "close"])
        step0 = rng.choice([0, rng.randrange(1, 1000)])
        if follow_up == "old":
            step0 = max(step0, 1)
        opening = self.select(rng, sid, step=step0, prefix=0, valid=True)

        async def send(method: str, req, expect: Expect, check: bool = True) -> Outcome:
            data = req.SerializeToString()
            outcome = await call(self.channel, SEL_SERVICE + method, data)
            self.tally.record(Kind.SESSION_SCRIPT, f"{follow_up} {method} step {req.step} prefix {req.prefix_length}",
                              outcome, expect, self.reply_check(SEL_SERVICE + method, req) if check else None)
            return outcome

        async def run() -> None:
            first = await send("Select", opening, OK_ONLY)
            if first.code != CODE.OK:
                return
            held = sel_pb.SelectResponse.FromString(first.replies[0]).session_length
            after = step0 + 1
            if follow_up == "replay":  # the same request again: the first reply, and the session advanced once
                again = await send("Select", opening, OK_ONLY)
                if again.code == CODE.OK and again.replies != first.replies:
                    self.tally.fail(f"script {sid}: a replayed step got another reply")
            elif follow_up == "next":
                await send("Select", self.select(rng, sid, after, rng.randint(0, held), valid=True), OK_ONLY)
            elif follow_up == "beyond":
                await send("Select", self.select(rng, sid, after, held + rng.randint(1, 5), valid=True),
                           Expect({CODE.FAILED_PRECONDITION: Naming(("prefix_length",))}))
                await send("Select", self.select(rng, sid, after + 1, 0, valid=True), OK_ONLY)  # the resync
            elif follow_up == "old":
                await send("Select", self.select(rng, sid, step0 - 1, rng.randint(0, held), valid=True),
                           Expect({CODE.FAILED_PRECONDITION: Naming(("step",))}))
            elif follow_up == "gap":  # the missing steps are given up after step_gap_wait_s
                await send("Select", self.select(rng, sid, after + rng.randint(1, 5), rng.randint(1, held), valid=True),
                           OK_ONLY)
            elif follow_up == "decode":
                await send("Decode", self.decode(rng, sid, after, rng.randint(0, held), valid=True), OK_ONLY)
            elif follow_up == "invalid-then-valid":  # a refused request does not advance the session
                good = self.select(rng, sid, after, rng.randint(1, held), valid=True)
                bad = sel_pb.SelectRequest()
                bad.CopyFrom(good)
                bad.token_ids[0] = self.vocab
                await send("Select", bad, invalid("token_ids[0]"))
                await send("Select", good, OK_ONLY)
            else:  # close: the session is gone, a step that builds on it is refused, a second close finds nothing
                if not await self.close(sid):
                    self.tally.fail(f"script {sid}: CloseSession did not find the open session")
                await send("Select", self.select(rng, sid, after, rng.randint(1, held), valid=True),
                           Expect({CODE.FAILED_PRECONDITION: Naming(("session_id",))}))
                if await self.close(sid):
                    self.tally.fail(f"script {sid}: a closed session existed again")
                return
            await self.close(sid)

        return run


# -- the tests -----------------------------------------------------------------------------------------------------


PROMPT = "What is 2 + 3?"


async def generate_references(stack: Stack) -> list[tuple]:
    """Greedy, s2t and llm answers to one prompt, free of timing (an unbounded verify deadline)."""
    out = []
    for mode in (gen_pb.MODE_GREEDY, gen_pb.MODE_S2T, gen_pb.MODE_LLM):
        reply = await stack.stub.Generate(gen_pb.GenerateRequest(prompt=PROMPT, options=gen_pb.GenerationOptions(
            mode=mode, max_new_tokens=4, verify_policy=gen_pb.VERIFY_POLICY_WAIT, verify_deadline_ms=2 ** 32 - 1)),
            timeout=CALL_TIMEOUT_S)
        st = reply.stats
        out.append((mode, list(reply.token_ids), reply.text, reply.finish_reason, st.mode_used, st.completion_tokens,
                    st.verified_tokens, st.unverified_tokens, st.picks_changed, st.degraded_reason))
    return out


async def eventually(condition: Callable[[], bool], polls: int = 600) -> bool:
    """Whether `condition` holds now or within `polls` polls of the event loop (a cancelled request's cleanup
    runs on the scheduler's next turn)."""
    for _ in range(polls):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def test_worker_face_survives_fuzzing(make_settings, one_thread):
    tally = Tally("worker GenerationService")
    async with Stack(make_settings(**FUZZ_SETTINGS)) as stack:
        face = WorkerFace(stack, tally)
        # Built before any traffic: the oracle's work would stall the event loop the servers share with the test
        # (the worker's best-effort CloseSession of a finished request gives up after 2 s).
        warmup = face.cases(random.Random(FUZZ_SEED + 1), min(WARMUP_N, FUZZ_N), 1)
        cases = face.cases(random.Random(FUZZ_SEED), FUZZ_N, OVERSIZED_PER_RUN)
        before = await generate_references(stack)
        await run_all(warmup, tally)
        baseline = rss_bytes()
        tally.start_counting()
        started = time.monotonic()
        await run_all(cases, tally)
        wall = time.monotonic() - started
        await assert_serving(stack.channel, "s2t.v1.GenerationService")
        after = await generate_references(stack)
        assert after == before, "the fuzzing changed the answer to a valid request"
        # nothing left running or held: requests, scheduled sequences, selector sessions of finished requests
        assert await eventually(lambda: stack.worker.active == 0 and not stack.worker.scheduler.active
                                and len(stack.core.sessions) == 0), \
            (stack.worker.active, len(stack.worker.scheduler.active), len(stack.core.sessions))
        rss = rss_bytes()
    print(tally.report(wall, (baseline, rss)))
    assert not tally.failures, f"{len(tally.failures)} failures, e.g.\n" + "\n".join(tally.failures[:20])
    assert not {"UNKNOWN", "INTERNAL"} & set(tally.codes)
    assert rss - baseline <= RSS_SLACK_BYTES, f"RSS grew by {(rss - baseline) >> 20} MiB"


async def test_selector_face_survives_fuzzing(make_settings, one_thread):
    settings = make_settings(**FUZZ_SETTINGS)
    core = SelectorCore.from_settings(settings)  # with its selection log: records of extreme requests too
    server, port = await serve_selector(core, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    tally = Tally("selector SelectorService")
    try:
        answer = await call(channel, SEL_SERVICE + "GetSelectorInfo", b"")
        info = sel_pb.GetSelectorInfoResponse.FromString(answer.replies[0])
        face = SelectorFace(channel, core, info, tally)
        warmup = face.cases(random.Random(FUZZ_SEED + 1), min(WARMUP_N, FUZZ_N), 1)  # before any traffic
        cases = face.cases(random.Random(FUZZ_SEED), FUZZ_N, OVERSIZED_PER_RUN)
        # A session opened before the fuzzing, continued after it; and the same two steps on fresh sessions.
        rng = random.Random(FUZZ_SEED)
        opening = face.select(rng, "keep", step=0, prefix=0, valid=True)
        first = await call(channel, SEL_SERVICE + "Select", opening.SerializeToString())
        held = sel_pb.SelectResponse.FromString(first.replies[0]).session_length
        second = face.select(rng, "keep", step=1, prefix=held, valid=True)

        async def script_on(session_id: str) -> list[sel_pb.SelectResponse]:
            replies = []
            for req in (opening, second):
                renamed = sel_pb.SelectRequest()
                renamed.CopyFrom(req)
                renamed.session_id = session_id
                outcome = await call(channel, SEL_SERVICE + "Select", renamed.SerializeToString())
                assert outcome.code == CODE.OK, outcome
                reply = sel_pb.SelectResponse.FromString(outcome.replies[0])
                reply.ClearField("session_id")
                replies.append(reply)
            await face.close(session_id)
            return replies

        reference = await script_on("reference-before")
        await run_all(warmup, tally)
        baseline = rss_bytes()
        tally.start_counting()
        started = time.monotonic()
        await run_all(cases, tally)
        wall = time.monotonic() - started
        await assert_serving(channel, "s2t.v1.SelectorService")
        continued = await call(channel, SEL_SERVICE + "Select", second.SerializeToString())
        assert continued.code == CODE.OK, continued  # the session opened before the fuzzing is still there
        kept = sel_pb.SelectResponse.FromString(continued.replies[0])
        kept.ClearField("session_id")
        assert [kept] == reference[1:] and await script_on("reference-after") == reference
        assert sel_pb.GetSelectorInfoResponse.FromString(
            (await call(channel, SEL_SERVICE + "GetSelectorInfo", b"")).replies[0]) == info
        await face.close("keep")
        assert len(core.sessions) == 0, sorted(core.sessions._sessions)[:10]  # every case released its session
        rss = rss_bytes()
    finally:
        await channel.close()
        await server.stop(0)
        core.close()
    print(tally.report(wall, (baseline, rss)))
    assert not tally.failures, f"{len(tally.failures)} failures, e.g.\n" + "\n".join(tally.failures[:20])
    assert not {"UNKNOWN", "INTERNAL"} & set(tally.codes)
    assert rss - baseline <= RSS_SLACK_BYTES, f"RSS grew by {(rss - baseline) >> 20} MiB"


# -- regressions: what the fuzzing found ---------------------------------------------------------------------------


@pytest.fixture
def selector_core(make_settings):
    core = SelectorCore.from_settings(make_settings(**{"selector.log_enabled": False}))
    yield core
    core.close()


async def test_selector_server_refuses_undecodable_and_mistyped_bytes_naming_the_field(selector_core):
    """The plain selector server used grpc's generated deserializer: undecodable bytes were UNKNOWN, and a field
    with the wrong wire type was dropped silently (a `step` sent as a string was served as step 0)."""
    server, port = await serve_selector(selector_core, "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            good = sel_pb.SelectRequest(session_id="s", step=5, token_ids=[1, 2, 3],
                                        trigger=sel_pb.SelectTriggerSpec(kind=sel_pb.SELECT_TRIGGER_ALWAYS),
                                        positions=[sel_pb.CandidatePosition(position=3, candidate_ids=[4, 5])])
            data = good.SerializeToString()
            for method, payload, message in [
                ("Select", data[:-1], "request is not a valid s2t.v1.SelectRequest: trigger: 2 bytes announced, 1 left"),
                ("Select", bytes([0x0A, 2, 0xFF, 0xFE]),
                 "request is not a valid s2t.v1.SelectRequest: session_id: not valid UTF-8 (at byte 0 of the string)"),
                ("Select", data + field_bytes(2, 2, b"x"),
                 "wrong field types: step (field 2) arrived as length-delimited"),
                ("Decode", field_bytes(5, 5, b"\0\0\0\0"), "wrong field types: max_tokens (field 5) arrived as 32-bit"),
                ("CloseSession", b"\xff", "request is not a valid s2t.v1.CloseSessionRequest: "
                                          "field key at byte 0: a varint is cut off"),
                ("GetSelectorInfo", b"\x0a\x05", "request is not a valid s2t.v1.GetSelectorInfoRequest: "
                                                 "<field 1>: 5 bytes announced, 0 left"),
            ]:
                outcome = await call(channel, SEL_SERVICE + method, payload)
                assert (outcome.code, outcome.details) == (CODE.INVALID_ARGUMENT, message)
            assert "s" not in selector_core.sessions  # nothing was served from the mistyped request
            assert (await call(channel, SEL_SERVICE + "Select", data)).code == CODE.OK  # the valid one still is
    finally:
        await server.stop(0)


def test_undecodable_bytes_are_located_in_the_field_where_they_break():
    from s2t.wire import WireError, decode_error_location, parse

    valid = sel_pb.SelectRequest(session_id="s", token_ids=[1], positions=[
        sel_pb.CandidatePosition(position=1, candidate_ids=[1])]).SerializeToString()
    # a second position whose packed candidate_ids hold the first byte of the two-byte varint 300
    cut_varint = valid + field_bytes(5, 2, field_bytes(1, 0, 2) + field_bytes(2, 2, varint(300)[:1]))
    with pytest.raises(WireError, match=r"^request is not a valid s2t.v1.SelectRequest: positions\[1\]\.candidate_ids: "
                                        r"a varint is cut off$"):
        parse(sel_pb.SelectRequest, cut_varint)
    message = field_bytes(1, 2, b"user") + field_bytes(2, 2, "é".encode()[:1])  # half of a two-byte character
    half_character = field_bytes(2, 2, field_bytes(1, 2, message))
    with pytest.raises(WireError, match=r"conversation\.messages\[0\]\.content: not valid UTF-8"):
        parse(gen_pb.GenerateRequest, half_character)
    assert decode_error_location(sel_pb.SelectRequest.DESCRIPTOR, b"\x08\x01\x00") == \
        "field key at byte 2: field number 0 is not valid"
    assert decode_error_location(sel_pb.SelectRequest.DESCRIPTOR, b"\x2a\x02\x0f\x01") == \
        "positions[0].position: wire type 7 does not exist"
    assert decode_error_location(sel_pb.SelectRequest.DESCRIPTOR, valid) is None  # nothing wrong with valid bytes


def test_the_locator_finds_every_refusal_of_the_parser():
    """On mutated messages: whenever protobuf refuses the bytes, the walk names where, in a field path of the
    message type (the message of every such refusal depends on it)."""
    from s2t.wire import decode_error_location

    rng = random.Random(FUZZ_SEED)
    chat = gen_pb.Conversation(messages=[gen_pb.ChatMessage(role="user", content="hé")] * 2)
    position = sel_pb.CandidatePosition(position=1, candidate_ids=[1, 2], candidate_probs=[0.5, 0.2], support_ids=[7],
                                        support_probs=[0.1])
    bases = [gen_pb.GenerateRequest(conversation=chat, options=gen_pb.GenerationOptions(mode=2, trigger_rate=0.1,
                                                                                        draft_confidence=0.5)),
             sel_pb.SelectRequest(session_id="s", step=3, token_ids=[1, 300, -1], positions=[position] * 2,
                                  trigger=sel_pb.SelectTriggerSpec(kind=3, kl_rate=0.1)),
             sel_pb.DecodeRequest(session_id="s", token_ids=[1] * 5, stop_ids=[3], max_tokens=4)]
    refused = 0
    for _ in range(3000):
        base = rng.choice(bases)
        cls = rng.choice([type(base), gen_pb.GenerateRequest, sel_pb.SelectRequest, sel_pb.CloseSessionRequest])
        data = mutate(rng, base.SerializeToString())
        try:
            cls.FromString(data)
            continue
        except _message.DecodeError:
            refused += 1
        where = decode_error_location(cls.DESCRIPTOR, data)
        assert where is not None, (cls.__name__, data)
        details = f"request is not a valid {cls.DESCRIPTOR.full_name}: {where}"
        assert located_problem(cls.DESCRIPTOR, details) is None, where
    assert refused > 1000


def test_a_nan_kl_threshold_is_invalid(selector_core):
    """NaN passed `kl_threshold < 0` and `== 0`: the trigger then never fired (nothing exceeds NaN), silently."""
    req = sel_pb.SelectRequest(session_id="nan", token_ids=[1, 2], positions=[sel_pb.CandidatePosition(
        position=2, candidate_ids=[3, 4], candidate_probs=[0.6, 0.3])],
        trigger=sel_pb.SelectTriggerSpec(kind=sel_pb.SELECT_TRIGGER_KL, kl_threshold=math.nan))
    with pytest.raises(SelectorError) as e:
        asyncio.run(selector_core.handle(req, "select"))
    assert e.value.code == CODE.INVALID_ARGUMENT and e.value.message.startswith("trigger.kl_threshold:")
    assert "nan" not in selector_core.sessions


def test_kl_support_ids_without_their_probabilities_are_invalid_and_lose_no_other_session(selector_core):
    """Valid by the old checks, the request failed the batch's KL computation, and the selector dropped every
    session batched with it ('the selector lost this session')."""
    kl = sel_pb.SelectTriggerSpec(kind=sel_pb.SELECT_TRIGGER_KL, kl_rate=0.1)
    bad = sel_pb.SelectRequest(session_id="bad", token_ids=[1, 2], trigger=kl, positions=[sel_pb.CandidatePosition(
        position=2, candidate_ids=[3, 4], candidate_probs=[0.6, 0.3], support_ids=[5, 6])])
    peer = sel_pb.SelectRequest(session_id="peer", token_ids=[1, 2], trigger=kl, positions=[sel_pb.CandidatePosition(
        position=2, candidate_ids=[3, 4], candidate_probs=[0.6, 0.3], support_ids=[5, 6], support_probs=[0.05, 0.05])])

    async def both():
        return await asyncio.gather(selector_core.handle(bad, "select"), selector_core.handle(peer, "select"),
                                    return_exceptions=True)

    refused, served = asyncio.run(both())
    assert refused.code == CODE.INVALID_ARGUMENT, refused
    assert refused.message.startswith("positions[0].support_probs:")
    assert isinstance(served, sel_pb.SelectResponse)
    assert "peer" in selector_core.sessions and "bad" not in selector_core.sessions


async def test_a_kl_rate_outside_the_selectors_calibration_is_invalid(make_settings):
    """The worker validated entropy and margin rates against its calibration but passed any KL rate on: the
    selector refused every Select and the request was served unverified, as OK."""
    async with Stack(make_settings(**{"selector.kl_thresholds": {0.1: 0.5, 0.2: 0.3}})) as stack:
        for rate in (0.05, 0.3):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stack.generate(PROMPT, mode=gen_pb.MODE_S2T, trigger=gen_pb.TRIGGER_KL, trigger_rate=rate,
                                     max_new_tokens=2)
            assert e.value.code() == CODE.INVALID_ARGUMENT
            assert e.value.details().startswith("options.trigger_rate: KL trigger rate"), e.value.details()
        final = await stack.generate(PROMPT, mode=gen_pb.MODE_S2T, trigger=gen_pb.TRIGGER_KL, trigger_rate=0.15,
                                     max_new_tokens=2)
        assert final.stats.selector_failures == 0 and final.stats.unverified_tokens == 0


async def test_request_ids_reach_the_selector_intact(make_settings):
    """The worker passes the request id to the selector as gRPC metadata and inside the session id: a non-ASCII one
    failed every selector call in the client ('Illegal header value'), and one over 119 characters made a session
    id over the selector's 128; both requests were served unverified, as OK."""
    async with Stack(make_settings()) as stack:
        options = gen_pb.GenerationOptions(mode=gen_pb.MODE_S2T, max_new_tokens=2)
        for request_id in ("日本", "a\nb", "é"):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stack.stub.Generate(gen_pb.GenerateRequest(prompt=PROMPT, request_id=request_id, options=options))
            assert e.value.code() == CODE.INVALID_ARGUMENT
            assert e.value.details().startswith("request_id: only printable ASCII"), e.value.details()
        for request_id in ("r" * MAX_ID_LEN, " ~ !"):
            final = await stack.stub.Generate(gen_pb.GenerateRequest(prompt=PROMPT, request_id=request_id,
                                                                     options=options))
            st = final.stats
            assert final.request_id == request_id
            assert (st.degraded_reason, st.selector_failures, st.unverified_tokens) == ("", 0, 0)
            assert st.verified_tokens == st.completion_tokens > 0
