"""Strict parsing of wire messages: a field sent with the wrong type is an error that names the field.

protobuf keeps a field whose wire type does not match its declaration as an *unknown* field and leaves
the declared field unset, so a client built from a mismatched schema would otherwise be served with
silently defaulted options. Unknown field numbers (a newer client) are still accepted.
"""

from __future__ import annotations

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
