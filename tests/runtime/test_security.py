"""Security of the runtime: certificates, TLS, mutual TLS, bearer tokens, and the certs CLI.

Every server binds 127.0.0.1:0 and is stopped in a ``finally``; every call has a timeout.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections import namedtuple
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gossamer.provision import certs_main, generate_ca, generate_node_cert, write_certs
from gossamer.runtime.security import (
    SecurityConfig,
    TokenAuthInterceptor,
    add_port,
    channel_credentials,
    intercept_channel,
    make_channel,
    server_credentials,
    token_metadata,
)

TIMEOUT = 5.0
TOKEN = "s3cret-token-0123456789"
KINDS = ("unary_unary", "unary_stream", "stream_unary")


def _identity(data: bytes) -> bytes:
    return data


def _echo_service(calls: list[str]) -> grpc.GenericRpcHandler:
    """A raw-bytes echo with one method per RPC kind; ``calls`` records which handlers ran."""
    def unary_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        calls.append("unary_unary")
        return request

    def unary_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        calls.append("unary_stream")
        yield request
        yield request

    def stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        calls.append("stream_unary")
        return b"".join(requests)

    codec = {"request_deserializer": _identity, "response_serializer": _identity}
    return grpc.method_handlers_generic_handler("test.Echo", {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary, **codec),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream, **codec),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary, **codec),
    })


@contextmanager
def serving(cfg: SecurityConfig, interceptors: tuple = ()) -> Iterator[tuple[str, list[str]]]:
    """An echo server on a free 127.0.0.1 port; yields (address, handler calls)."""
    calls: list[str] = []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
    try:
        server.add_generic_rpc_handlers((_echo_service(calls),))
        port = add_port(server, "127.0.0.1:0", cfg)
        server.start()
        yield f"127.0.0.1:{port}", calls
    finally:
        server.stop(grace=None)


def call(channel: grpc.Channel, kind: str, metadata=None) -> object:
    """One echo call of the given kind, bounded by TIMEOUT."""
    codec = {"request_serializer": _identity, "response_deserializer": _identity}
    if kind == "unary_unary":
        rpc = channel.unary_unary("/test.Echo/UnaryUnary", **codec)
        return rpc(b"hi", timeout=TIMEOUT, metadata=metadata)
    if kind == "unary_stream":
        rpc = channel.unary_stream("/test.Echo/UnaryStream", **codec)
        return list(rpc(b"hi", timeout=TIMEOUT, metadata=metadata))
    rpc = channel.stream_unary("/test.Echo/StreamUnary", **codec)
    return rpc(iter([b"h", b"i"]), timeout=TIMEOUT, metadata=metadata)


EXPECTED = {"unary_unary": b"hi", "unary_stream": [b"hi", b"hi"], "stream_unary": b"hi"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    return write_certs(tmp_path_factory.mktemp("certs"), ["server", "client0"],
                       ["127.0.0.1", "localhost"])


@pytest.fixture(scope="module")
def rogue(tmp_path_factory) -> dict[str, Path]:
    """Certificates from a second, untrusted CA."""
    return write_certs(tmp_path_factory.mktemp("rogue"), ["rogue"], ["127.0.0.1"])


def server_cfg(certs: dict[str, Path], mutual: bool = False, name: str = "server") -> SecurityConfig:
    return SecurityConfig(tls=True, ca=str(certs["ca.pem"]), cert=str(certs[f"{name}.pem"]),
                          key=str(certs[f"{name}.key"]), require_client_cert=mutual)


def client_cfg(ca: Path, identity: dict[str, Path] | None = None, name: str = "") -> SecurityConfig:
    if identity is None:
        return SecurityConfig(tls=True, ca=str(ca))
    return SecurityConfig(tls=True, ca=str(ca), cert=str(identity[f"{name}.pem"]),
                          key=str(identity[f"{name}.key"]))


def echo_fails(address: str, cfg: SecurityConfig) -> bool:
    with make_channel(address, cfg) as channel:
        try:
            call(channel, "unary_unary")
        except grpc.RpcError:
            return True
    return False


# --------------------------------------------------------------------------- certificates


def test_node_cert_is_signed_by_ca_with_san_and_both_usages(certs):
    ca = x509.load_pem_x509_certificate(certs["ca.pem"].read_bytes())
    node = x509.load_pem_x509_certificate(certs["server.pem"].read_bytes())
    node.verify_directly_issued_by(ca)  # raises if the signature does not verify
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    usages = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_node_cert_from_another_ca_does_not_verify():
    ca_a, _ = generate_ca()
    ca_b, key_b = generate_ca()
    node, _ = generate_node_cert(ca_b, key_b, "n")
    with pytest.raises(Exception):  # noqa: B017 - cryptography raises InvalidSignature
        x509.load_pem_x509_certificate(node).verify_directly_issued_by(
            x509.load_pem_x509_certificate(ca_a))


def test_keys_are_private_and_no_temp_files_are_left(certs):
    for path in certs.values():
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == (0o600 if path.suffix == ".key" else 0o644), path
    assert sorted(p.name for p in certs["ca.pem"].parent.iterdir()) == sorted(certs)


def test_write_certs_refuses_to_overwrite_ca_unless_asked(tmp_path):
    first = write_certs(tmp_path, ["a"], ["127.0.0.1"])
    ca_before = first["ca.pem"].read_bytes()
    with pytest.raises(ValueError, match="ca.pem") as err:
        write_certs(tmp_path, ["a"], ["127.0.0.1"])
    assert "\n" not in str(err.value)
    assert first["ca.pem"].read_bytes() == ca_before
    write_certs(tmp_path, ["a"], ["127.0.0.1"], overwrite=True)
    assert first["ca.pem"].read_bytes() != ca_before


@pytest.mark.parametrize("names, hosts, match", [
    ([], ["127.0.0.1"], "names"),
    (["a", "a"], ["127.0.0.1"], "duplicate"),
    (["../evil"], ["127.0.0.1"], "names"),
    (["ca"], ["127.0.0.1"], "names"),
    (["a"], [], "hosts"),
    (["a"], ["bad host"], "hosts"),
])
def test_write_certs_rejects_bad_input_before_writing(tmp_path, names, hosts, match):
    with pytest.raises(ValueError, match=match):
        write_certs(tmp_path / "out", names, hosts)
    assert not (tmp_path / "out").exists()


def test_certs_cli_writes_files_then_refuses_overwrite(tmp_path, capsys):
    out = tmp_path / "certs"
    assert certs_main(["--out", str(out), "--names", "server,client0",
                       "--hosts", "127.0.0.1,localhost"]) == 0
    printed = capsys.readouterr().out.split()
    assert {Path(p).name for p in printed} == {"ca.pem", "ca.key", "server.pem", "server.key",
                                                "client0.pem", "client0.key"}
    assert all(Path(p).exists() for p in printed)
    assert certs_main(["--out", str(out), "--names", "server"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gossamer: error: ") and err.count("\n") == 1 and "ca.pem" in err
    assert certs_main(["--out", str(out), "--names", "server", "--overwrite"]) == 0


def test_certs_cli_usage_error_is_one_line(tmp_path, capsys):
    assert certs_main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gossamer: error: ") and err.count("\n") == 1 and "--names" in err


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, field", [
    ({"tls": True, "key": "k"}, "runtime.security.cert"),
    ({"tls": True, "cert": "c"}, "runtime.security.key"),
    ({"cert": "c", "key": "k"}, "runtime.security.tls"),
    ({"require_client_cert": True}, "runtime.security.require_client_cert"),
    ({"tls": True, "cert": "c", "key": "k", "require_client_cert": True}, "runtime.security.ca"),
    ({"token": "a", "token_file": "f"}, "runtime.security.token_file"),
    ({"token": "has space"}, "runtime.security.token"),
    ({"token": ""}, "runtime.security.token"),
])
def test_validate_names_the_field(kwargs, field):
    with pytest.raises(ValueError) as err:
        SecurityConfig(**kwargs).validate()
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)


def test_valid_configs_pass():
    SecurityConfig().validate()
    SecurityConfig(tls=True, ca="ca", cert="c", key="k", require_client_cert=True,
                   token="t").validate()


def test_resolved_token_reads_and_strips_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert SecurityConfig(token_file=str(path)).resolved_token() == TOKEN
    assert SecurityConfig(token=TOKEN).resolved_token() == TOKEN
    assert SecurityConfig().resolved_token() is None


@pytest.mark.parametrize("content", [None, "\n  \n"])
def test_resolved_token_rejects_missing_or_empty_file(tmp_path, content):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=r"^runtime\.security\.token_file: "):
        SecurityConfig(token_file=str(path)).resolved_token()


def test_credentials_report_bad_files_by_field(certs, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ValueError, match=r"^runtime\.security\.cert: .*not a PEM certificate"):
        server_credentials(SecurityConfig(tls=True, cert=str(junk), key=str(certs["server.key"])))
    with pytest.raises(ValueError, match=r"^runtime\.security\.key: .*does not match"):
        server_credentials(SecurityConfig(tls=True, cert=str(certs["server.pem"]),
                                          key=str(certs["client0.key"])))
    with pytest.raises(ValueError, match=r"^runtime\.security\.ca: cannot read"):
        channel_credentials(SecurityConfig(tls=True, ca=str(tmp_path / "missing.pem")))
    with pytest.raises(ValueError, match=r"^runtime\.security\.key: "):
        channel_credentials(SecurityConfig(tls=True, cert=str(certs["client0.pem"])))


def test_tls_off_means_no_credentials():
    assert server_credentials(SecurityConfig()) is None
    assert channel_credentials(SecurityConfig()) is None


# --------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("kind", KINDS)
def test_tls_end_to_end(certs, kind):
    with serving(server_cfg(certs)) as (address, calls), \
            make_channel(address, client_cfg(certs["ca.pem"]),
                         options=[("grpc.max_receive_message_length", 1 << 20)]) as channel:
        assert call(channel, kind) == EXPECTED[kind]
        assert calls == [kind]


def test_client_that_does_not_trust_the_ca_fails(certs, rogue):
    with serving(server_cfg(certs)) as (address, _):
        assert echo_fails(address, client_cfg(rogue["ca.pem"]))


def test_server_cert_for_another_host_fails(certs, tmp_path):
    cert, key = generate_node_cert(certs["ca.pem"].read_bytes(), certs["ca.key"].read_bytes(),
                                   "elsewhere", ["example.invalid"])
    (tmp_path / "elsewhere.pem").write_bytes(cert)
    (tmp_path / "elsewhere.key").write_bytes(key)
    cfg = SecurityConfig(tls=True, cert=str(tmp_path / "elsewhere.pem"),
                         key=str(tmp_path / "elsewhere.key"))
    with serving(cfg) as (address, _):
        assert echo_fails(address, client_cfg(certs["ca.pem"]))


def test_insecure_client_cannot_talk_to_tls_server(certs):
    with serving(server_cfg(certs)) as (address, calls):
        assert echo_fails(address, SecurityConfig())
        assert calls == []


def test_mutual_tls_rejects_clients_without_a_valid_cert(certs, rogue):
    with serving(server_cfg(certs, mutual=True)) as (address, calls):
        assert echo_fails(address, client_cfg(certs["ca.pem"]))
        assert echo_fails(address, SecurityConfig(tls=True, ca=str(certs["ca.pem"]),
                                                  cert=str(rogue["rogue.pem"]),
                                                  key=str(rogue["rogue.key"])))
        assert calls == []
        with make_channel(address, client_cfg(certs["ca.pem"], certs, "client0")) as channel:
            assert call(channel, "unary_unary") == b"hi"
        assert calls == ["unary_unary"]


# --------------------------------------------------------------------------- tokens


@contextmanager
def token_server(rejections: list[str]) -> Iterator[tuple[str, list[str]]]:
    with serving(SecurityConfig(), (TokenAuthInterceptor(TOKEN, rejections.append),)) as served:
        yield served


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metadata", [
    None,
    token_metadata("wrong-token"),
    token_metadata(TOKEN + "x"),
    (("authorization", TOKEN),),  # no "Bearer" scheme
], ids=["missing", "wrong", "longer", "no-scheme"])
def test_bad_token_is_unauthenticated_and_handler_never_runs(kind, metadata):
    rejections: list[str] = []
    with token_server(rejections) as (address, calls), make_channel(address, SecurityConfig()) as ch:
        with pytest.raises(grpc.RpcError) as err:
            call(ch, kind, metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN not in (err.value.details() or "")
        assert calls == []
    assert len(rejections) == 1 and rejections[0]
    assert TOKEN not in rejections[0] and "wrong-token" not in rejections[0]


@pytest.mark.parametrize("kind", KINDS)
def test_right_token_works_as_metadata_and_via_interceptor(kind):
    rejections: list[str] = []
    with token_server(rejections) as (address, calls), make_channel(address, SecurityConfig()) as ch:
        assert call(ch, kind, token_metadata(TOKEN)) == EXPECTED[kind]
        assert call(intercept_channel(ch, TOKEN), kind) == EXPECTED[kind]
        assert calls == [kind, kind] and rejections == []


def test_token_and_mutual_tls_together(certs):
    server = SecurityConfig(tls=True, ca=str(certs["ca.pem"]), cert=str(certs["server.pem"]),
                            key=str(certs["server.key"]), require_client_cert=True, token=TOKEN)
    client = client_cfg(certs["ca.pem"], certs, "client0")
    interceptors = (TokenAuthInterceptor(server.resolved_token()),)
    with serving(server, interceptors) as (address, calls), make_channel(address, client) as ch:
        with pytest.raises(grpc.RpcError) as err:
            call(ch, "unary_unary")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert call(intercept_channel(ch, TOKEN), "stream_unary") == b"hi"
        assert calls == ["stream_unary"]


_HandlerCallDetails = namedtuple("_HandlerCallDetails", ("method", "invocation_metadata"))


@pytest.mark.parametrize("method", ["UnaryUnary", "UnaryStream", "StreamUnary"])
def test_rejecting_handler_has_the_kind_of_the_real_one(method):
    service = _echo_service([])
    details = _HandlerCallDetails(f"/test.Echo/{method}", token_metadata("wrong"))
    real = service.service(details)
    denied = TokenAuthInterceptor(TOKEN).intercept_service(service.service, details)
    assert denied is not real
    assert (denied.request_streaming, denied.response_streaming) == (
        real.request_streaming, real.response_streaming)
    good = details._replace(invocation_metadata=token_metadata(TOKEN))
    assert TokenAuthInterceptor(TOKEN).intercept_service(service.service, good) is real


def test_add_port_reports_a_bad_address_in_one_line():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        with pytest.raises(ValueError, match="cannot listen on not an address"):
            add_port(server, "not an address", SecurityConfig())
    finally:
        server.stop(grace=None)


def test_interceptor_refuses_an_empty_token():
    with pytest.raises(ValueError, match="token"):
        TokenAuthInterceptor("")
