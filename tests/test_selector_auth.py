"""Credentials of the selector and worker faces (issue #15): bearer tokens on worker -> selector, checked by the
--no-ray server and the Ray Serve deployment through one check; TLS and mTLS on both faces; no token value in
`s2t config`, error messages or the Serve deployment's stored arguments.

Certificates are generated here with the `cryptography` package (ECDSA P-256, a throwaway CA per session)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import random
import time
from types import SimpleNamespace

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from llm_selector.core import SelectorCore
from llm_selector.grpc_server import serve as serve_selector
from s2t import cli
from s2t.config import ClientTlsSettings, ConfigError, load_settings
from s2t.security import BearerTokens, bearer_metadata, open_channel
from s2t.v1 import generation_pb2 as gen_pb
from s2t.v1 import generation_pb2_grpc as gen_grpc
from s2t.v1 import selector_pb2 as pb
from s2t.v1 import selector_pb2_grpc as sel_grpc
from slm_worker.selector_client import BreakerState, SelectorAuthRefused, SelectorClient
from slm_worker.server import Worker, serve as serve_worker

# Tokens shaped like real ones (long and random-looking), so "not in the message" cannot pass by accident.
TOKEN_A = "tokA-7f3c9e2b1d8a4f6e0c5b"
TOKEN_B = "tokB-2a9d4c7e1f0b8a3d6e5c"
WRONG = "tokX-0e1d2c3b4a5f6e7d8c9b"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def position_request(session: str) -> pb.SelectRequest:
    return pb.SelectRequest(session_id=session, step=0, prefix_length=0, token_ids=[5, 6, 7],
                            positions=[pb.CandidatePosition(position=3, candidate_ids=[1, 2, 3])],
                            trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_ALWAYS))


# -- the shared check, without servers ---------------------------------------------------------------------------


def test_bearer_tokens_accept_each_listed_token_and_nothing_else():
    tokens = BearerTokens.from_secrets([SecretStr(TOKEN_A), SecretStr(TOKEN_B)], "selector", "check X")
    assert tokens.enabled
    for token in (TOKEN_A, TOKEN_B):
        assert tokens.refusal([("authorization", f"Bearer {token}")]) is None
        assert tokens.refusal([("authorization", f"bearer {token}")]) is None, "the scheme is case-insensitive"
        assert tokens.refusal([("session_id", "s"), ("authorization", f"Bearer {token}".encode())]) is None
    missing = "authorization: the selector requires 'authorization: Bearer <token>' metadata (check X)"
    assert tokens.refusal(None) == missing
    assert tokens.refusal([("application", "app")]) == missing
    wrong = "authorization: the selector did not accept the bearer token (check X)"
    for value in (f"Bearer {WRONG}", f"Basic {TOKEN_A}", TOKEN_A, f"Bearer {TOKEN_A}x", f"Bearer {TOKEN_A[:-1]}",
                  "Bearer ", "Bearer"):
        assert tokens.refusal([("authorization", value)]) == wrong, value


def test_an_empty_token_list_means_no_authentication():
    tokens = BearerTokens.from_secrets([], "selector")
    assert not tokens.enabled
    assert tokens.refusal(None) is None and tokens.refusal([("authorization", "Bearer anything")]) is None


def test_token_digests_stand_in_for_the_tokens():
    tokens = BearerTokens.from_secrets([SecretStr(TOKEN_A)], "selector")
    digests = tokens.hex_digests()
    assert len(digests) == 1 and len(digests[0]) == 64 and TOKEN_A not in digests[0]
    again = BearerTokens.from_hex(digests, "selector")
    assert again.refusal([("authorization", f"Bearer {TOKEN_A}")]) is None
    assert again.refusal([("authorization", f"Bearer {TOKEN_B}")]) is not None


def test_malformed_tokens_are_config_errors_that_never_show_them():
    for key, value in (("selector.auth_tokens", [TOKEN_A, "with space-secretpart"]),
                       ("worker.selector_auth_token", "tab\tsecretpart"), ("selector.auth_tokens", [""])):
        with pytest.raises(ConfigError) as e:
            load_settings(**{key: value})
        message = str(e.value)
        assert message.startswith(f"bad setting {key} = *** (from --set {key})"), message
        assert "secretpart" not in message and TOKEN_A not in message


def test_tls_sections_must_be_complete():
    with pytest.raises(ConfigError, match=r"^bad setting worker.tls = .* \(from --set worker.tls.cert_file\): .*"
                                          r"cert_file and key_file are set together$"):
        load_settings(**{"worker.tls.cert_file": "/etc/c.pem"})
    with pytest.raises(ConfigError, match="client_ca_file \\(mTLS\\) needs cert_file and key_file"):
        load_settings(**{"selector.tls.client_ca_file": "/etc/ca.pem"})
    with pytest.raises(ConfigError, match="need enabled: true"):
        load_settings(**{"worker.selector_tls.ca_file": "/etc/ca.pem"})


def test_s2t_config_prints_no_token(capsys, monkeypatch):
    monkeypatch.setenv("S2T_SELECTOR__AUTH_TOKENS", json.dumps([TOKEN_A, TOKEN_B]))
    cli.main(["--set", f"worker.selector_auth_token={TOKEN_A}", "--set", f"worker.auth_token={WRONG}", "config"])
    out = capsys.readouterr().out
    for token in (TOKEN_A, TOKEN_B, WRONG):
        assert token not in out
    assert "auth_tokens:\n  - '**********'\n  - '**********'\n" in out  # both there, masked
    assert "selector_auth_token: '**********'" in out


# -- the --no-ray selector -----------------------------------------------------------------------------------------


@pytest.fixture
async def secured_selector(make_settings):
    """A plain selector accepting TOKEN_A and TOKEN_B: .settings, .core, .server, .port (a test may restart it)."""
    settings = make_settings(**{"selector.auth_tokens": [TOKEN_A, TOKEN_B], "selector.log_enabled": False})
    core = SelectorCore.from_settings(settings)
    server, port = await serve_selector(core, "127.0.0.1", 0)
    selector = SimpleNamespace(settings=settings, core=core, server=server, port=port)
    yield selector
    await selector.server.stop(0)
    core.close()


async def test_plain_selector_refuses_calls_without_an_accepted_token(secured_selector):
    port = secured_selector.port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = sel_grpc.SelectorServiceStub(channel)
        calls = [lambda md: stub.GetSelectorInfo(pb.GetSelectorInfoRequest(), metadata=md),
                 lambda md: stub.Select(position_request("auth-s"), metadata=md),
                 lambda md: stub.CloseSession(pb.CloseSessionRequest(session_id="auth-s"), metadata=md)]
        for call in calls:
            for md, why in (((), "requires 'authorization: Bearer <token>' metadata"),
                            ((("authorization", f"Bearer {WRONG}"),), "did not accept the bearer token"),
                            ((("authorization", f"Basic {TOKEN_A}"),), "did not accept the bearer token")):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call(md)
                assert e.value.code() == UNAUTH
                assert e.value.details() == (f"authorization: the selector {why} (worker.selector_auth_token must "
                                             "be one of the selector's selector.auth_tokens)")
                assert WRONG not in e.value.details() and TOKEN_A not in e.value.details()
        # each worker's token works; the refused Select above never reached the core (no session)
        info = await stub.GetSelectorInfo(pb.GetSelectorInfoRequest(), metadata=[bearer_metadata(SecretStr(TOKEN_B))])
        assert info.vocab_size == 272
        md = [bearer_metadata(SecretStr(TOKEN_A))]
        closed = await stub.CloseSession(pb.CloseSessionRequest(session_id="auth-s"), metadata=md)
        assert not closed.existed
        reply = await stub.Select(position_request("auth-s"), metadata=md)
        assert reply.session_id == "auth-s" and reply.session_length == 3
        # health checks stay open to probes
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_selector_client_takes_a_refused_token_as_refused_not_as_an_outage(secured_selector):
    port = secured_selector.port
    client = SelectorClient(f"127.0.0.1:{port}", breaker_failures=1, rng=random.Random(0),
                            auth_token=SecretStr(WRONG))
    for _ in range(3):
        with pytest.raises(SelectorAuthRefused) as e:
            await client.select(position_request("c-s"), time.monotonic() + 10)
        assert str(e.value) == (f"selector at 127.0.0.1:{port} refused the worker's credentials (UNAUTHENTICATED: "
                                "authorization: the selector did not accept the bearer token (worker.selector_auth_"
                                "token must be one of the selector's selector.auth_tokens)); worker.selector_auth_"
                                "token must be one of the selector's selector.auth_tokens")
        assert WRONG not in str(e.value)
    assert client.counters.attempts == 3, "nothing resent"
    assert client.counters.outage_failures == 0 and client.breaker.state is BreakerState.CLOSED
    await client.close()
    good = SelectorClient(f"127.0.0.1:{port}", auth_token=SecretStr(TOKEN_A))
    assert (await good.select(position_request("c-s"), time.monotonic() + 10)).session_length == 3
    await good.close()


async def generate(port: int, mode, credentials=None, **channel_kw) -> gen_pb.GenerateResponse:
    address = f"127.0.0.1:{port}"
    channel = (grpc.aio.secure_channel(address, credentials, **channel_kw) if credentials
               else grpc.aio.insecure_channel(address))
    async with channel:
        return await gen_grpc.GenerationServiceStub(channel).Generate(gen_pb.GenerateRequest(
            prompt="What is 2 + 3?", options=gen_pb.GenerationOptions(mode=mode, max_new_tokens=6)), timeout=60)


async def test_worker_with_a_refused_token_degrades_naming_the_credentials(secured_selector):
    settings, port = secured_selector.settings, secured_selector.port
    settings.worker.selector_address = f"127.0.0.1:{port}"
    settings.worker.selector_auth_token = WRONG
    worker = Worker(settings)
    await worker.start()
    server, worker_port = await serve_worker(worker, "127.0.0.1", 0)
    try:
        assert worker.selector_info is None
        assert worker.selector_problem.startswith(f"selector at 127.0.0.1:{port} refused the worker's credentials "
                                                  "(UNAUTHENTICATED: ")
        final = await generate(worker_port, gen_pb.MODE_S2T)
        assert final.stats.mode_used == gen_pb.MODE_GREEDY
        assert "refused the worker's credentials" in final.stats.degraded_reason
        assert WRONG not in final.stats.degraded_reason
    finally:
        await server.stop(0)
        await worker.stop()

    # A worker whose token is revoked while it serves: its requests degrade, saying why.
    settings.worker.selector_auth_token = TOKEN_A
    worker = Worker(settings)
    await worker.start(wait_for_selector_s=10)
    server, worker_port = await serve_worker(worker, "127.0.0.1", 0)
    try:
        assert (await generate(worker_port, gen_pb.MODE_S2T)).stats.mode_used == gen_pb.MODE_S2T
        # revoke TOKEN_A: the selector restarts on its port with the new list
        await secured_selector.server.stop(0)
        secured_selector.core.settings.auth_tokens = [TOKEN_B]
        secured_selector.server, _ = await serve_selector(secured_selector.core, "127.0.0.1", port)
        final = await generate(worker_port, gen_pb.MODE_S2T)
        assert final.stats.mode_used == gen_pb.MODE_GREEDY and final.stats.selector_failures >= 1
        assert "refused the worker's credentials (UNAUTHENTICATED" in final.stats.degraded_reason
        assert TOKEN_A not in final.stats.degraded_reason
        assert worker.selector.breaker.state is BreakerState.CLOSED
        assert worker.selector.counters.outage_failures == 0
    finally:
        await server.stop(0)
        await worker.stop()


# -- TLS and mTLS --------------------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, dns=(), ips=(),
           usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    """A CA with a server certificate for 127.0.0.1, one for the name selector.test only, and a client
    certificate; and a foreign CA with a client certificate of its own. PEM files: pki.<name>_cert / _key."""
    root = tmp_path_factory.mktemp("pki")
    files = {}

    def write(name: str, cert: x509.Certificate, key) -> None:
        files[f"{name}_cert"] = root / f"{name}.crt"
        files[f"{name}_key"] = root / f"{name}.key"
        files[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))

    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "server", "named", "client", "other_ca", "other")}
    write("ca", _issue("test CA", keys["ca"], "test CA", keys["ca"], ca=True), keys["ca"])
    write("server", _issue("selector", keys["server"], "test CA", keys["ca"], dns=["localhost"], ips=["127.0.0.1"],
                           usage=ExtendedKeyUsageOID.SERVER_AUTH), keys["server"])
    write("named", _issue("selector.test", keys["named"], "test CA", keys["ca"], dns=["selector.test"],
                          usage=ExtendedKeyUsageOID.SERVER_AUTH), keys["named"])
    write("client", _issue("worker-1", keys["client"], "test CA", keys["ca"], usage=ExtendedKeyUsageOID.CLIENT_AUTH),
          keys["client"])
    write("other_ca", _issue("other CA", keys["other_ca"], "other CA", keys["other_ca"], ca=True), keys["other_ca"])
    write("other", _issue("intruder", keys["other"], "other CA", keys["other_ca"],
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH), keys["other"])
    return SimpleNamespace(**files)


async def info_over(port: int, tls: ClientTlsSettings) -> pb.GetSelectorInfoResponse:
    """GetSelectorInfo through the worker's selector client with these TLS settings."""
    client = SelectorClient(f"127.0.0.1:{port}", tls=tls)
    try:
        return await client.info(timeout_s=10)
    finally:
        await client.close()


async def assert_cannot_connect(port: int, tls: ClientTlsSettings) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await info_over(port, tls)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
async def tls_selector(make_settings, pki):
    """Start a plain selector with the given selector.tls settings: `await start(**tls)` -> port."""
    running = []

    async def start(**tls) -> int:
        settings = make_settings(**{"selector.log_enabled": False, **{f"selector.tls.{k}": str(v) for k, v in tls.items()}})
        core = SelectorCore.from_settings(settings)
        server, port = await serve_selector(core, "127.0.0.1", 0)
        running.append((server, core))
        return port

    yield start
    for server, core in running:
        await server.stop(0)
        core.close()


async def test_selector_serves_tls_that_the_worker_client_verifies(tls_selector, pki):
    port = await tls_selector(cert_file=pki.server_cert, key_file=pki.server_key)
    info = await info_over(port, ClientTlsSettings(enabled=True, ca_file=pki.ca_cert))
    assert info.vocab_size == 272
    await assert_cannot_connect(port, ClientTlsSettings())  # plaintext to a TLS port
    await assert_cannot_connect(port, ClientTlsSettings(enabled=True, ca_file=pki.other_ca_cert))  # untrusted


async def test_selector_mtls_requires_a_client_certificate_of_its_ca(tls_selector, pki):
    port = await tls_selector(cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca_cert)
    trusted = dict(enabled=True, ca_file=pki.ca_cert)
    assert (await info_over(port, ClientTlsSettings(**trusted, cert_file=pki.client_cert,
                                                    key_file=pki.client_key))).vocab_size == 272
    await assert_cannot_connect(port, ClientTlsSettings(**trusted))  # no client certificate
    await assert_cannot_connect(port, ClientTlsSettings(**trusted, cert_file=pki.other_cert, key_file=pki.other_key))


async def test_server_name_checks_the_certificate_against_another_name(tls_selector, pki):
    port = await tls_selector(cert_file=pki.named_cert, key_file=pki.named_key)
    await assert_cannot_connect(port, ClientTlsSettings(enabled=True, ca_file=pki.ca_cert))  # 127.0.0.1 is not in it
    info = await info_over(port, ClientTlsSettings(enabled=True, ca_file=pki.ca_cert, server_name="selector.test"))
    assert info.vocab_size == 272


async def test_worker_face_serves_mtls(make_settings, pki):
    settings = make_settings(**{"worker.tls.cert_file": str(pki.server_cert), "worker.tls.key_file": str(pki.server_key),
                                "worker.tls.client_ca_file": str(pki.ca_cert), "worker.selector_address": "127.0.0.1:9"})
    worker = Worker(settings)
    await worker.start()  # no selector there: greedy requests need none
    server, port = await serve_worker(worker, "127.0.0.1", 0)
    try:
        ca = pki.ca_cert.read_bytes()
        ok = grpc.ssl_channel_credentials(ca, pki.client_key.read_bytes(), pki.client_cert.read_bytes())
        final = await generate(port, gen_pb.MODE_GREEDY, ok)
        assert final.stats.mode_used == gen_pb.MODE_GREEDY and final.stats.completion_tokens == 6
        for credentials in (None, grpc.ssl_channel_credentials(ca),
                            grpc.ssl_channel_credentials(ca, pki.other_key.read_bytes(), pki.other_cert.read_bytes())):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await generate(port, gen_pb.MODE_GREEDY, credentials)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)
        await worker.stop()


async def test_an_unreadable_certificate_is_a_config_error_naming_the_key(tmp_path, pki):
    missing = tmp_path / "absent.pem"
    with pytest.raises(ConfigError, match=r"^bad setting worker.selector_tls.ca_file = '.*absent.pem': cannot read it "
                                          r"\(No such file or directory\)$"):
        open_channel("127.0.0.1:1", [], ClientTlsSettings(enabled=True, ca_file=missing), "worker.selector_tls")


# -- the Ray Serve deployment ------------------------------------------------------------------------------------


class ProxyContext:
    """What Serve's proxy hands RayServegRPCContext: the servicer context of the real call."""

    def __init__(self, metadata):
        self.metadata = list(metadata)

    def auth_context(self):
        return {}

    def code(self):
        return None

    def details(self):
        return None

    def invocation_metadata(self):
        return self.metadata

    def peer(self):
        return "ipv4:127.0.0.1:1"

    def peer_identities(self):
        return None

    def peer_identity_key(self):
        return None

    def trailing_metadata(self):
        return ()


async def test_serve_deployment_checks_tokens_it_gets_as_digests(make_settings, monkeypatch):
    """The deployment class without Ray: bound as build_app binds it, called with the RayServegRPCContext the
    proxy makes. Its model core is built here (the replica's Ray metrics need a running replica)."""
    from ray.serve.grpc_util import RayServegRPCContext

    from llm_selector import serve_app

    settings = make_settings(**{"selector.auth_tokens": [TOKEN_A], "worker.selector_auth_token": TOKEN_A,
                                "worker.auth_token": TOKEN_B, "selector.log_enabled": False})
    bound = serve_app.build_app(settings)._bound_deployment
    args = bound.init_args
    stored = json.dumps(args)
    assert TOKEN_A not in stored and TOKEN_B not in stored and "**********" not in stored
    assert args[1] == BearerTokens.from_secrets([SecretStr(TOKEN_A)], "selector").hex_digests()

    core = SelectorCore.from_settings(settings)
    monkeypatch.setattr(serve_app, "SelectorMetrics", SimpleNamespace(for_ray_serve=lambda: None), raising=False)
    monkeypatch.setattr(serve_app, "SelectorCore", SimpleNamespace(from_settings=lambda s, **kw: core))
    deployment = serve_app.SelectorDeployment.func_or_class(*args)
    calls = [(deployment.Select, position_request("d-s"), pb.SelectResponse()),
             (deployment.Decode, pb.DecodeRequest(session_id="d-s", token_ids=[1], max_tokens=1), pb.DecodeResponse()),
             (deployment.GetSelectorInfo, pb.GetSelectorInfoRequest(), pb.GetSelectorInfoResponse()),
             (deployment.CloseSession, pb.CloseSessionRequest(session_id="d-s"), pb.CloseSessionResponse())]
    try:
        for metadata, why in (((), "requires 'authorization: Bearer <token>' metadata"),
                              ([("authorization", f"Bearer {WRONG}")], "did not accept the bearer token")):
            for method, request, empty in calls:
                ctx = RayServegRPCContext(ProxyContext(metadata))
                assert await method(request, ctx) == empty
                assert ctx.code() == UNAUTH
                assert ctx.details() == (f"authorization: the selector {why} (worker.selector_auth_token must be one "
                                         "of the selector's selector.auth_tokens)")
        assert "d-s" not in core.sessions, "refused calls never reach the core"
        ctx = RayServegRPCContext(ProxyContext([("session_id", "d-s"), ("authorization", f"Bearer {TOKEN_A}")]))
        reply = await deployment.Select(position_request("d-s"), ctx)
        assert reply.session_length == 3 and ctx.code() is None
        # a field of the wrong wire type, as the proxy's deserializer hands it over: refused by name, not
        # served with the field defaulted (here `step` as a string: step 0 would replay the first reply)
        mistyped = pb.SelectRequest.FromString(position_request("d-s").SerializeToString() + b"\x12\x01x")
        ctx = RayServegRPCContext(ProxyContext([("session_id", "d-s"), ("authorization", f"Bearer {TOKEN_A}")]))
        assert await deployment.Select(mistyped, ctx) == pb.SelectResponse()
        assert ctx.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ctx.details() == "wrong field types: step (field 2) arrived as length-delimited"
    finally:
        core.close()


def test_serve_app_refuses_selector_tls(make_settings, pki):
    from llm_selector import serve_app

    settings = make_settings(**{"selector.tls.cert_file": str(pki.server_cert), "selector.tls.key_file": str(pki.server_key)})
    with pytest.raises(ConfigError, match="Ray Serve's gRPC proxy cannot serve TLS"):
        serve_app.build_app(settings)


@pytest.mark.ray
async def test_tokens_are_checked_behind_the_ray_serve_proxy(tiny_pair, tmp_path):
    """Through a real local Ray Serve: the proxy passes the metadata on, the replica checks it."""
    import socket

    from llm_selector import serve_app

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    settings = load_settings(**{
        "cache_dir": str(tmp_path / "cache"), "data_dir": str(tmp_path / "data"), "worker.model": str(tiny_pair[0]),
        "selector.model": str(tiny_pair[1]), "worker.runtime.weight_formats": "native",
        "selector.runtime.weight_formats": "native", "selector.grpc_port": free_port(),
        "selector.http_port": free_port(), "selector.auth_tokens": [TOKEN_A, TOKEN_B],
        "worker.selector_auth_token": TOKEN_B, "worker.trigger": "always"})
    settings.worker.selector_address = await asyncio.to_thread(serve_app.start, settings)
    try:
        app = [("application", settings.selector.application)]
        async with grpc.aio.insecure_channel(settings.worker.selector_address) as channel:
            stub = sel_grpc.SelectorServiceStub(channel)
            for md in (app, app + [("authorization", f"Bearer {WRONG}")]):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.GetSelectorInfo(pb.GetSelectorInfoRequest(), metadata=md)
                assert e.value.code() == UNAUTH and e.value.details().startswith("authorization: the selector ")
                assert WRONG not in e.value.details()
            info = await stub.GetSelectorInfo(pb.GetSelectorInfoRequest(),
                                              metadata=app + [bearer_metadata(SecretStr(TOKEN_A))])
            assert info.vocab_size == 272
        worker = Worker(settings)
        await worker.start(wait_for_selector_s=60)
        server, port = await serve_worker(worker, "127.0.0.1", 0)
        try:
            assert (await generate(port, gen_pb.MODE_S2T)).stats.mode_used == gen_pb.MODE_S2T
        finally:
            await server.stop(0)
            await worker.stop()
    finally:
        await asyncio.to_thread(serve_app.stop)
