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
from google.protobuf import descriptor as _descriptor
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
    """Parse `data` as `cls`, rejecting undecodable bytes and mistyped fields with a WireError that names the
    field where the bytes stop making sense (protobuf's own error names only the message type)."""
    try:
        msg = cls.FromString(data)
    except _message.DecodeError as e:
        where = decode_error_location(cls.DESCRIPTOR, data) or str(e)
        raise WireError(f"request is not a valid {cls.DESCRIPTOR.full_name}: {where}") from None
    check_wire_types(msg)
    return msg


# -- where undecodable bytes go wrong -------------------------------------------------------------------------
#
# A walk over the wire format that mirrors what protobuf's parser (upb) rejects: a truncated or over-long
# varint, a field key beyond 32 bits or with field number 0, wire types 6 and 7, an end-group without its
# start, a length beyond the bytes left, invalid UTF-8 in a declared string field, a broken packed repeated
# field, and all of these inside declared message fields (recursively) and groups. Only run once the parser
# has refused the bytes, so its cost does not matter.

_MAX_DEPTH = 100  # upb's default recursion limit
_PACKED_WIDTH = {_descriptor.FieldDescriptor.TYPE_DOUBLE: 8, _descriptor.FieldDescriptor.TYPE_FIXED64: 8,
                 _descriptor.FieldDescriptor.TYPE_SFIXED64: 8, _descriptor.FieldDescriptor.TYPE_FLOAT: 4,
                 _descriptor.FieldDescriptor.TYPE_FIXED32: 4, _descriptor.FieldDescriptor.TYPE_SFIXED32: 4}
_LENGTH_DELIMITED_TYPES = {_descriptor.FieldDescriptor.TYPE_STRING, _descriptor.FieldDescriptor.TYPE_BYTES,
                           _descriptor.FieldDescriptor.TYPE_MESSAGE}


class _Cut(Exception):
    """The bytes end inside a value, or a value is malformed; says what, the walk adds where."""


class _Located(Exception):
    """A _Cut with the field path it happened in: the finished location."""


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    for i in range(10):
        if pos + i >= end:
            raise _Cut("a varint is cut off")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise _Cut("a varint is longer than 10 bytes")


def decode_error_location(descriptor, data: bytes) -> str | None:
    """Where `data` stops being a valid `descriptor` message: 'positions[0].candidate_ids: a varint is cut off',
    or 'field key at byte 17: ...' for a broken field key of the message itself (no field to name yet). None
    if the walk finds nothing wrong (a parser limit it does not model): the caller then reports the parser's
    own message."""
    try:
        _walk(descriptor, data, 0, len(data), "", 0, None)
    except _Located as e:
        return str(e)
    return None


def _walk(descriptor, data: bytes, pos: int, end: int, path: str, depth: int, group: int | None) -> int:
    """Walk the fields in data[pos:end] of a `descriptor` message (None: an unknown group's fields) and return
    where the walk stopped: `end`, or after the end-group key of `group`. Raises _Located."""
    if depth > _MAX_DEPTH:
        raise _Located(f"{path.rstrip('.') or 'the message'}: nested more than {_MAX_DEPTH} levels deep")
    occurrences: dict[int, int] = {}
    while pos < end:
        # A broken key belongs to the enclosing field; one of the top-level message is located by its offset.
        key_at = f"{path.rstrip('.')}: field key at byte {pos}" if path else f"field key at byte {pos}"
        try:
            key, pos = _varint(data, pos, end)
        except _Cut as e:
            raise _Located(f"{key_at}: {e}") from None
        number, wire_type = key >> 3, key & 7
        if number == 0 or key > 0xFFFFFFFF:
            raise _Located(f"{key_at}: field number {number} is not valid")
        field = descriptor.fields_by_number.get(number) if descriptor is not None else None
        name = f"{path}{field.name}" if field is not None else f"{path}<field {number}>"
        if field is not None and field.message_type is not None and field.is_repeated:
            occurrences[number] = occurrences.get(number, 0) + 1
            name += f"[{occurrences[number] - 1}]"
        try:
            if wire_type == 0:
                _, pos = _varint(data, pos, end)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                if pos > end:
                    raise _Cut(f"its {'8' if wire_type == 1 else '4'} bytes are cut off")
            elif wire_type == 2:
                length, pos = _varint(data, pos, end)
                if length > end - pos:
                    raise _Cut(f"{length} bytes announced, {end - pos} left")
                _check_payload(field, data, pos, pos + length, name, depth)
                pos += length
            elif wire_type == 3:
                pos = _walk(None, data, pos, end, f"{name}.", depth + 1, number)
            elif wire_type == 4:
                if group != number:
                    raise _Cut("an end-group key without its start")
                return pos
            else:
                raise _Cut(f"wire type {wire_type} does not exist")
        except _Cut as e:
            raise _Located(f"{name}: {e}") from None
    if group is not None:
        raise _Located(f"{path.rstrip('.')}: the group has no end-group key")
    return pos


def _check_payload(field, data: bytes, pos: int, end: int, name: str, depth: int) -> None:
    """A length-delimited value of a declared field with that wire type: a message, a string, or a packed
    repeated scalar (any other declared field with this wire type is kept as an unknown field, unchecked)."""
    if field is None:
        return
    if field.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
        _walk(field.message_type, data, pos, end, f"{name}.", depth + 1, None)
    elif field.type == _descriptor.FieldDescriptor.TYPE_STRING:
        try:
            data[pos:end].decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Cut(f"not valid UTF-8 (at byte {e.start} of the string)") from None
    elif field.is_repeated and field.type not in _LENGTH_DELIMITED_TYPES:  # packed scalars
        width = _PACKED_WIDTH.get(field.type)
        if width is not None:
            if (end - pos) % width:
                raise _Cut(f"{end - pos} bytes of packed {width}-byte values")
        else:
            while pos < end:
                _, pos = _varint(data, pos, end)


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
