"""Credentials of the gRPC faces: bearer tokens and TLS, for every role (roles import only s2t).

Bearer tokens travel as `authorization: Bearer <token>` metadata. A server keeps only their SHA-256 digests
(BearerTokens), compares in constant time, and answers a refusal that names the header but never contains
what the client sent. Token values are SecretStr in the settings, so `s2t config`, ConfigError lines and
reprs show them masked; nothing here logs them.

TLS is optional on each face: a server serves it when its settings name a certificate and key, and requires
client certificates (mTLS) when they name a client CA; a client connects over TLS when its settings enable it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
from pathlib import Path
from typing import Iterable, Sequence

import grpc
from pydantic import SecretStr

from .config import WORKER_ID_PATTERN, ClientTlsSettings, ConfigError, ServerTlsSettings

AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
BEARER = "bearer"  # the scheme; compared case-insensitively (RFC 7235)
WORKER_ID = "worker-id"  # how a worker names itself to the selector (the key of its quotas without tokens)


def bearer_metadata(token: SecretStr) -> tuple[str, str]:
    """The metadata entry that presents `token`."""
    return AUTHORIZATION, f"Bearer {token.get_secret_value()}"


def default_worker_id() -> str:
    """`worker.worker_id` when unset: <hostname>-<pid>, distinct per process on a host (cut to 128 characters,
    characters outside WORKER_ID_PATTERN replaced)."""
    raw = f"{socket.gethostname()}-{os.getpid()}"
    name = "".join(c if WORKER_ID_PATTERN.fullmatch(c) else "_" for c in raw)
    return name[-128:]  # keep the pid: it is what tells two processes of one host apart


def presented_worker_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The `worker-id` a call presents, if it is a valid one (WORKER_ID_PATTERN); anything else is ignored,
    so a malformed header cannot reach logs or quota messages."""
    for key, value in metadata or ():
        if key.lower() == WORKER_ID:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if WORKER_ID_PATTERN.fullmatch(value):
                return value
    return None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class BearerTokens:
    """The bearer tokens one server face accepts, as SHA-256 digests: a digest can travel to another process
    (the Ray Serve replica) without the token, and hashing what the client sent first makes the comparison
    independent of its length. An empty set accepts every call (no authentication)."""

    def __init__(self, digests: Iterable[bytes], server: str, hint: str = ""):
        self._digests = tuple(digests)
        self.server = server  # who refuses, for the message ("selector")
        self.hint = hint  # which settings to check, for the message

    @classmethod
    def from_secrets(cls, tokens: Iterable[SecretStr], server: str, hint: str = "") -> "BearerTokens":
        return cls((_digest(t.get_secret_value()) for t in tokens), server, hint)

    @classmethod
    def from_hex(cls, digests: Iterable[str], server: str, hint: str = "") -> "BearerTokens":
        return cls((bytes.fromhex(d) for d in digests), server, hint)

    def hex_digests(self) -> list[str]:
        return [d.hex() for d in self._digests]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def index_of(self, token: str) -> int | None:
        """The position of `token` in the set (the order of the settings), or None; compares against every
        digest (no early exit)."""
        presented = _digest(token)
        found = None
        for i, digest in enumerate(self._digests):
            if hmac.compare_digest(presented, digest) and found is None:
                found = i
        return found

    def accepts(self, token: str) -> bool:
        """Whether `token` is one of the set."""
        return self.index_of(token) is not None

    def accepted_index(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> int | None:
        """The position of the first accepted bearer token the call presents, or None: with one token per
        worker, who is calling (the selector's quotas are keyed on it)."""
        for value in (v for k, v in metadata or () if k.lower() == AUTHORIZATION):
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == BEARER:
                index = self.index_of(token.strip())
                if index is not None:
                    return index
        return None

    def refusal(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """None if the call may proceed, else the UNAUTHENTICATED message: it names the header and the
        settings to check, never the value that arrived."""
        if not self.enabled:
            return None
        hint = f" ({self.hint})" if self.hint else ""
        metadata = tuple(metadata or ())  # read twice below
        if not any(k.lower() == AUTHORIZATION for k, _ in metadata):
            return f"authorization: the {self.server} requires 'authorization: Bearer <token>' metadata{hint}"
        if self.accepted_index(metadata) is not None:
            return None
        return f"authorization: the {self.server} did not accept the bearer token{hint}"


# -- TLS --------------------------------------------------------------------------------------------------------


def _read(path: Path, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"bad setting {key} = {str(path)!r}: cannot read it ({e.strerror})") from None


def server_credentials(tls: ServerTlsSettings, key: str) -> grpc.ServerCredentials | None:
    """The credentials of a TLS server face; None when `tls` leaves it plaintext. `key` names the section
    (e.g. 'worker.tls') in errors."""
    if not tls.enabled:
        return None
    pair = (_read(tls.key_file, f"{key}.key_file"), _read(tls.cert_file, f"{key}.cert_file"))
    client_ca = _read(tls.client_ca_file, f"{key}.client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def add_port(server: grpc.aio.Server, address: str, tls: ServerTlsSettings, key: str) -> int:
    """Bind `address` in plaintext or TLS as `tls` says; returns the port (0: could not bind)."""
    credentials = server_credentials(tls, key)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def channel_credentials(tls: ClientTlsSettings, key: str) -> grpc.ChannelCredentials | None:
    """The credentials of a TLS client; None when `tls` leaves it plaintext."""
    if not tls.enabled:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, f"{key}.ca_file") if tls.ca_file else None,
        private_key=_read(tls.key_file, f"{key}.key_file") if tls.key_file else None,
        certificate_chain=_read(tls.cert_file, f"{key}.cert_file") if tls.cert_file else None)


def open_channel(address: str, options: list[tuple[str, int | str]], tls: ClientTlsSettings,
                 key: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to `address`, over TLS when `tls` enables it, through `interceptors` (e.g. the
    tracing ones of s2t.tracing.client_interceptors; none: a plain channel)."""
    credentials = channel_credentials(tls, key)
    chain = list(interceptors) or None
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=chain)
    if tls.server_name:
        options = [*options, ("grpc.ssl_target_name_override", tls.server_name)]
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=chain)
