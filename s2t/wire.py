"""Strict parsing of wire messages: a field sent with the wrong type is an error that names the field.

protobuf keeps a field whose wire type does not match its declaration as an *unknown* field and leaves
the declared field unset, so a client built from a mismatched schema would otherwise be served with
silently defaulted options. Unknown field numbers (a newer client) are still accepted.

Also what every client and server of ours shares: channel settings (keepalive and its ping policy) and the
graceful stop of a server on SIGTERM (below).
"""

from __future__ import annotations

import asyncio
import signal

import grpc
from google.protobuf import message as _message
from google.protobuf import unknown_fields

_WIRE_NAMES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "group", 4: "group", 5: "32-bit"}


class WireError(ValueError):
    """The bytes do not parse as the expected message, or a known field has the wrong wire type."""


def wrong_type_fields(msg: _message.Message, path: str = "") -> list[str]:
    """Names of declared fields that arrived with another wire type, e.g. 'options.max_new_tokens'."""
    out = []
    by_number = msg.DESCRIPTOR.fields_by_number
    for uf in unknown_fields.UnknownFieldSet(msg):
        field = by_number.get(uf.field_number)
        if field is not None:
            out.append(f"{path}{field.name} (field {uf.field_number}) arrived as {_WIRE_NAMES.get(uf.wire_type, uf.wire_type)}")
    for field, value in msg.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        if field.is_repeated:
            for i, item in enumerate(value):
                out.extend(wrong_type_fields(item, f"{path}{field.name}[{i}]."))
        else:
            out.extend(wrong_type_fields(value, f"{path}{field.name}."))
    return out


def check_wire_types(msg: _message.Message) -> None:
    bad = wrong_type_fields(msg)
    if bad:
        raise WireError("wrong field types: " + "; ".join(bad))


def parse(cls, data: bytes):
    """Parse `data` as `cls`, rejecting undecodable bytes and mistyped fields with a WireError."""
    try:
        msg = cls.FromString(data)
    except _message.DecodeError as e:
        raise WireError(f"request is not a valid {cls.DESCRIPTOR.full_name}: {e}") from None
    check_wire_types(msg)
    return msg


# -- channel settings: keepalive ------------------------------------------------------------------------------
#
# A gRPC server polices the HTTP/2 pings it receives (grpc core, chttp2 ping_abuse_policy.cc): on a connection
# with no call in flight it accepts one ping per 2 hours unless the server sets
# `grpc.keepalive_permit_without_calls`, and otherwise one per `grpc.http2.min_ping_interval_without_data_ms`
# (core's default `min_recv_ping_interval_without_data`: 5 minutes) while it sends no data. Each earlier ping is
# a strike; more than `grpc.http2.max_ping_strikes` (default 2) and the server closes the connection with
# GOAWAY ENHANCE_YOUR_CALM "too_many_pings" (the client then doubles its keepalive time). Ray Serve's gRPC proxy
# runs with exactly these defaults and cannot be told otherwise (serve.config.gRPCOptions has no channel
# options; its server gets only message-size limits and so_reuseport). The worker used to ping every 30 s even
# without calls, and an idle worker drew that GOAWAY from the proxy during a held-out run (after a few minutes:
# a grpc client sends 2 pings without data, then one a minute, so the third strike took its time).
#
# So the one client policy here fits the strictest server a client may meet (the proxy): no pings without a
# call in flight, and during a call at most one per 5 minutes (plus a margin for scheduling jitter). Dead
# connections are still found: a ping during a call that goes unanswered for KEEPALIVE_TIMEOUT_MS closes it,
# and the selector client's per-attempt deadlines bound every call anyway. Our own servers (the --no-ray
# selector, the worker's client face) accept anything at least as patient as SERVER_MIN_PING_INTERVAL_MS, with
# or without calls, so third-party clients with a typical 30 s keepalive are not cut off either.

GRPC_DEFAULT_MIN_RECV_PING_INTERVAL_MS = 300_000  # grpc core's server default, the Serve proxy's policy
CLIENT_KEEPALIVE_TIME_MS = GRPC_DEFAULT_MIN_RECV_PING_INTERVAL_MS + 30_000
KEEPALIVE_TIMEOUT_MS = 20_000  # an unanswered ping closes the connection after this
SERVER_MIN_PING_INTERVAL_MS = 10_000  # our servers' policy: at most CLIENT_KEEPALIVE_TIME_MS, with or without calls
SERVER_MAX_PING_STRIKES = 2  # grpc's default, explicit: a client that pings faster is still cut off


def client_channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel options of every client of our services (the worker's selector client, `s2t collect`)."""
    return [
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def server_options(max_receive_message_bytes: int) -> list[tuple[str, int]]:
    """Server options of our gRPC servers: a ping policy that every client_channel_options client (and any
    client pinging no more often than every SERVER_MIN_PING_INTERVAL_MS) satisfies."""
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", SERVER_MAX_PING_STRIKES),
        ("grpc.max_receive_message_length", max_receive_message_bytes),
    ]


async def serve_until_signalled(server: grpc.aio.Server, grace_s: float) -> None:
    """Return once SIGTERM or SIGINT came and `server` drained: from the signal on, new calls are refused (health
    checks too, so the orchestrator stops routing here), running calls get up to `grace_s` to finish and are
    cancelled after that. The caller then closes what the calls used (e.g. the selection log's open segment)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        await server.stop(grace_s)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
