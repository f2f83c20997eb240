"""Transport security of the runtime: certificates, TLS / mutual TLS, and a shared token.

Principle 6 of DESIGN.md: peers authenticate (TLS + token). TLS proves the server (and,
with ``require_client_cert``, the client) holds a key signed by the run's CA; the bearer
token proves the caller belongs to this run. Both are checked before any handler runs.
User errors (bad paths, bad PEM, bad config) raise ``ValueError`` with one line that
names the config field, ``runtime.security.<field>``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gossamer.metrics.runstore import atomic_write_bytes

FIELD = "runtime.security"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: safe in a header
_CLOCK_SKEW = dt.timedelta(minutes=5)

# --------------------------------------------------------------------------- certificates


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    now = dt.datetime.now(dt.timezone.utc)
    return builder.not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    """IP entries for IP-looking hosts, DNS entries otherwise (gRPC checks the SAN, not CN)."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not host or any(c.isspace() for c in host) or not host.isascii():
            raise ValueError(f"hosts: invalid host {host!r}")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if not names:
        raise ValueError("hosts: need at least one host name or IP address")
    return x509.SubjectAlternativeName(names)


def generate_ca(common_name: str = "gossamer-ca", days: int = 365) -> tuple[bytes, bytes]:
    """A self-signed EC P-256 CA for one deployment; returns (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = _validity(builder, days).sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _load_ca(ca_cert_pem: bytes, ca_key_pem: bytes) -> tuple[x509.Certificate, Any]:
    cert = x509.load_pem_x509_certificate(ca_cert_pem)
    key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        raise ValueError("CA key does not match CA certificate")
    return cert, key


def generate_node_cert(ca_cert_pem: bytes, ca_key_pem: bytes, name: str,
                       hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365) -> tuple[bytes, bytes]:
    """A node certificate signed by the CA, valid as TLS server and client; (cert PEM, key PEM).

    ``hosts`` become SubjectAlternativeName entries: the addresses peers dial this node at.
    """
    ca_cert, ca_key = _load_ca(ca_cert_pem, ca_key_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
    )
    cert = _validity(builder, days).sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _check_names(names: Sequence[str]) -> None:
    if not names:
        raise ValueError("names: need at least one node name")
    for name in names:
        if not _NAME_RE.fullmatch(name) or name == "ca":
            raise ValueError(f"names: invalid node name {name!r} (letters, digits, . _ -; not 'ca')")
    if len(set(names)) != len(names):
        raise ValueError("names: duplicate node name")


def write_certs(out_dir: Path, names: Sequence[str], hosts: Sequence[str] = DEFAULT_HOSTS,
                overwrite: bool = False, days: int = 365) -> dict[str, Path]:
    """Write ``ca.pem``, ``ca.key`` and ``<name>.pem`` / ``<name>.key`` per node; {file name: path}.

    Keys get mode 0600. Refuses to replace existing files (a new CA invalidates every node
    certificate already handed out) unless ``overwrite``. Keep ``ca.key`` off the nodes.
    """
    out_dir = Path(out_dir)
    _check_names(names)
    _san(hosts)  # fail on bad hosts before touching the disk
    files = ["ca.pem", "ca.key"] + [f"{n}{ext}" for n in names for ext in (".pem", ".key")]
    if not overwrite:
        for file in files:
            if (out_dir / file).exists():
                raise ValueError(f"{out_dir / file} already exists; use --overwrite to replace "
                                 "the CA and all node certificates")
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = generate_ca(days=days)
    blobs = {"ca.pem": ca_cert, "ca.key": ca_key}
    for name in names:
        blobs[f"{name}.pem"], blobs[f"{name}.key"] = generate_node_cert(ca_cert, ca_key, name,
                                                                        hosts, days)
    written: dict[str, Path] = {}
    for file, data in blobs.items():
        written[file] = out_dir / file
        atomic_write_bytes(written[file], data, 0o600 if file.endswith(".key") else 0o644)
    return written


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def certs_main(argv: list[str]) -> int:
    """``gossamer certs --out DIR --names a,b [--hosts h1,h2] [--overwrite]``; exit code."""
    parser = _Parser(prog="gossamer certs",
                     description="Create a CA and one certificate per node for TLS / mutual TLS.")
    parser.add_argument("--out", required=True, help="directory to write the PEM files to")
    parser.add_argument("--names", type=_csv, default=[], help="comma-separated node names")
    parser.add_argument("--nodes", type=int, default=0,
                        help="also node-0 .. node-(N-1): certificates that bind node ids")
    parser.add_argument("--hosts", type=_csv, default=list(DEFAULT_HOSTS),
                        help="comma-separated IPs / DNS names the nodes are dialled at")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")

    def write(args: argparse.Namespace) -> None:
        if args.nodes < 0:
            raise ValueError("--nodes: must be >= 0")
        names = args.names + [f"node-{i}" for i in range(args.nodes)]
        if not names:
            raise ValueError("--names: give node names (or --nodes N)")
        for path in write_certs(Path(args.out), names, args.hosts, overwrite=args.overwrite).values():
            print(path)

    return _command(parser, argv, write)


def _command(parser: _Parser, argv: list[str], action: Callable[[argparse.Namespace], None]) -> int:
    """Parse ``argv`` and run ``action``; a usage, value or file error is one line, exit code 2."""
    try:
        action(parser.parse_args(argv))
    except (_UsageError, ValueError) as exc:
        print(f"gossamer: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gossamer: error: --out: {exc.strerror or exc}: {exc.filename}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------- configuration


def _check_token(token: str, field: str) -> str:
    if not _TOKEN_RE.fullmatch(token):
        raise ValueError(f"{FIELD}.{field}: token must be non-empty printable ASCII without spaces")
    return token


@dataclass(frozen=True)
class SecurityConfig:
    """What a node needs to authenticate its peers and itself (``runtime.security`` in YAML)."""

    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    require_client_cert: bool = False
    token: str | None = None
    token_file: str | None = None
    node_tokens_dir: str | None = None
    allow_insecure: bool = False

    def validate(self) -> None:
        """Raise ValueError with one line naming the field if the settings do not fit together."""
        if self.tls and not self.cert:
            raise ValueError(f"{FIELD}.cert: tls needs cert and key")
        if self.tls and not self.key:
            raise ValueError(f"{FIELD}.key: tls needs cert and key")
        if not self.tls and (self.ca or self.cert or self.key):
            raise ValueError(f"{FIELD}.tls: ca/cert/key are set but tls is false")
        if self.require_client_cert and not self.tls:
            raise ValueError(f"{FIELD}.require_client_cert: needs tls: true")
        if self.require_client_cert and not self.ca:
            raise ValueError(f"{FIELD}.ca: require_client_cert needs ca to verify clients")
        if self.token is not None and self.token_file is not None:
            raise ValueError(f"{FIELD}.token_file: set token or token_file, not both")
        if self.token is not None:
            _check_token(self.token, "token")
        if self.node_tokens_dir is not None and (self.token is not None or self.token_file is not None):
            raise ValueError(f"{FIELD}.node_tokens_dir: replaces the shared token; set one of them")
        has_token = self.token is not None or self.token_file is not None or self.node_tokens_dir
        if has_token and not self.tls and not self.allow_insecure:
            raise ValueError(f"{FIELD}.allow_insecure: a token without tls travels in clear text; "
                             "set tls: true, or allow_insecure: true on a trusted network")

    def for_process(self, name: str) -> SecurityConfig:
        """These settings for one process: ``{node}`` in ``cert``/``key`` becomes ``name``
        (``node-<i>`` for node ``i``, ``server`` for the coordinator), so one config serves a
        deployment whose every node has its own certificate."""
        def fill(path: str | None) -> str | None:
            return path.replace("{node}", name) if path else path

        return dataclasses.replace(self, cert=fill(self.cert), key=fill(self.key))

    @property
    def binds_identity(self) -> bool:
        """Whether the channel proves which node a caller is (node tokens or client certs)."""
        return self.node_tokens_dir is not None or self.require_client_cert

    def resolved_token(self, node: int | None = None) -> str | None:
        """The bearer token this process presents: node ``node``'s own token with
        ``node_tokens_dir``, else the shared token (``token_file`` stripped); None if none."""
        if self.node_tokens_dir is not None:
            if node is None:
                return None
            path = Path(self.node_tokens_dir) / f"node-{node}.token"
            return _check_token(_read_text(path, "node_tokens_dir"), "node_tokens_dir")
        if self.token is not None:
            return _check_token(self.token, "token")
        if self.token_file is None:
            return None
        return _check_token(_read_text(Path(self.token_file), "token_file"), "token_file")

    def node_secret(self) -> bytes | None:
        """The server's secret from which every node token is derived (``node_tokens_dir``)."""
        if self.node_tokens_dir is None:
            return None
        text = _read_text(Path(self.node_tokens_dir) / SECRET_FILE, "node_tokens_dir")
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            secret = b""
        if len(secret) < 16:
            raise ValueError(f"{FIELD}.node_tokens_dir: {SECRET_FILE} is not a hex secret of at "
                             "least 16 bytes (write one with gossamer tokens)")
        return secret


def _read_text(path: Path, field: str) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ValueError(f"{FIELD}.{field}: cannot read {path}: {reason}") from None
    if not text:
        raise ValueError(f"{FIELD}.{field}: {path} is empty")
    return text


# --------------------------------------------------------------------------- node tokens

SECRET_FILE = "node-secret"
_NODE_TOKEN_RE = re.compile(r"(0|[1-9][0-9]{0,9})\.([0-9a-f]{64})")
_CN_RE = re.compile(r"node-(0|[1-9][0-9]{0,9})")


def node_token(secret: bytes, node: int) -> str:
    """Node ``node``'s bearer token: ``<node>.<HMAC-SHA256(secret, node)>``. Only the holder of
    ``secret`` (the server) can make one, so a token proves its node id."""
    mac = hmac.new(secret, f"gossamer-node:{node}".encode(), hashlib.sha256).hexdigest()
    return f"{node}.{mac}"


def token_node(secret: bytes, credential: str) -> int | None:
    """The node id ``credential`` is a valid token for, or None."""
    match = _NODE_TOKEN_RE.fullmatch(credential)
    if match is None:
        return None
    node = int(match.group(1))
    return node if hmac.compare_digest(node_token(secret, node), credential) else None


def write_node_tokens(out_dir: Path, num_nodes: int, overwrite: bool = False) -> list[Path]:
    """Write ``node-secret`` (keep it on the server only) and ``node-<i>.token`` for every node
    (hand each client its own), all mode 0600; refuses to replace a secret unless ``overwrite``."""
    out_dir = Path(out_dir)
    if num_nodes < 1:
        raise ValueError("--nodes: need at least one node")
    if (out_dir / SECRET_FILE).exists() and not overwrite:
        raise ValueError(f"{out_dir / SECRET_FILE} already exists; use --overwrite to replace it "
                         "(every token handed out stops working)")
    secret = os.urandom(32)
    written = [out_dir / SECRET_FILE]
    atomic_write_bytes(written[0], secret.hex().encode(), 0o600)
    for node in range(num_nodes):
        written.append(out_dir / f"node-{node}.token")
        atomic_write_bytes(written[-1], node_token(secret, node).encode(), 0o600)
    return written


def tokens_main(argv: list[str]) -> int:
    """``gossamer tokens --out DIR --nodes N [--overwrite]``; exit code."""
    parser = _Parser(prog="gossamer tokens",
                     description="Create a node secret and one token per node id "
                                 "(runtime.security.node_tokens_dir).")
    parser.add_argument("--out", required=True, help="directory to write the files to")
    parser.add_argument("--nodes", required=True, type=int, help="number of node ids (0..N-1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing secret")

    def write(args: argparse.Namespace) -> None:
        written = write_node_tokens(Path(args.out), args.nodes, overwrite=args.overwrite)
        print(f"wrote {written[0]} (server only) and {len(written) - 1} node tokens in {args.out}")

    return _command(parser, argv, write)


def caller_node(context: grpc.ServicerContext, secret: bytes | None) -> int | None:
    """The node id the authenticated channel proves for this call: from a node token (with
    ``secret``) or from a client certificate named ``node-<i>``; None if neither binds one."""
    if secret is not None:
        for key, value in context.invocation_metadata() or ():
            if key == AUTH_KEY:
                scheme, _, credential = str(value).partition(" ")
                if scheme.lower() == "bearer":
                    node = token_node(secret, credential.strip())
                    if node is not None:
                        return node
        return None
    names = (context.auth_context() or {}).get("x509_common_name") or []
    for name in names:
        match = _CN_RE.fullmatch(name.decode("ascii", "replace") if isinstance(name, bytes) else name)
        if match is not None:
            return int(match.group(1))
    return None


# --------------------------------------------------------------------------- credentials


def _public_der(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{FIELD}.{field}: cannot read {path}: {exc.strerror}") from None


def _read_certs(path: str, field: str) -> tuple[bytes, list[x509.Certificate]]:
    """PEM bytes and parsed certificates; parsing here gives a clear error, not a failed handshake."""
    data = _read(path, field)
    try:
        return data, x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{FIELD}.{field}: {path} is not a PEM certificate") from None


def _read_identity(cfg: SecurityConfig) -> tuple[bytes, bytes]:
    """(key PEM, cert chain PEM) of this node, checked to belong together."""
    assert cfg.cert is not None and cfg.key is not None
    cert_pem, certs = _read_certs(cfg.cert, "cert")
    key_pem = _read(cfg.key, "key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{FIELD}.key: {cfg.key} is not an unencrypted PEM private key") from None
    if _public_der(key.public_key()) != _public_der(certs[0].public_key()):
        raise ValueError(f"{FIELD}.key: {cfg.key} does not match cert {cfg.cert}")
    return key_pem, cert_pem


def server_credentials(cfg: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for a listening node (mutual TLS if ``require_client_cert``); None if off."""
    if not cfg.tls:
        return None
    cfg.validate()
    key_pem, cert_pem = _read_identity(cfg)
    ca_pem = _read_certs(cfg.ca, "ca")[0] if cfg.require_client_cert and cfg.ca else None
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=cfg.require_client_cert)


def channel_credentials(cfg: SecurityConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials for dialling a peer: trust ``ca`` (system roots if None), present
    ``cert``/``key`` if given (needed when the peer requires client certs); None if off."""
    if not cfg.tls:
        return None
    if bool(cfg.cert) != bool(cfg.key):
        field = "key" if cfg.cert else "cert"
        raise ValueError(f"{FIELD}.{field}: a client certificate needs both cert and key")
    ca_pem = _read_certs(cfg.ca, "ca")[0] if cfg.ca else None
    key_pem, cert_pem = _read_identity(cfg) if cfg.cert else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem,
                                        certificate_chain=cert_pem)


def add_port(server: grpc.Server, address: str, cfg: SecurityConfig) -> int:
    """Listen on ``address`` (``host:port``; port 0 picks a free one), with TLS per ``cfg``;
    returns the bound port."""
    creds = server_credentials(cfg)
    try:
        port = (server.add_secure_port(address, creds) if creds is not None
                else server.add_insecure_port(address))
    except RuntimeError:
        port = 0
    if port == 0:
        raise ValueError(f"cannot listen on {address}: address in use or invalid")
    return port


def make_channel(address: str, cfg: SecurityConfig,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to ``address``, TLS per ``cfg``; ``options`` (e.g. message size limits) pass
    through. The token is not attached here: use :func:`intercept_channel` or call metadata."""
    creds = channel_credentials(cfg)
    if creds is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, creds, options=list(options))


# --------------------------------------------------------------------------- token


AUTH_KEY = "authorization"


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``: pass as ``metadata=`` on each call."""
    return ((AUTH_KEY, f"Bearer {token}"),)


def _digest(value: str) -> bytes:
    # Comparing fixed-size digests hides the token length from timing, too.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Reject every call whose ``authorization: Bearer <token>`` metadata is absent or wrong.

    Rejected calls get UNAUTHENTICATED with a short reason; the real handler never runs and
    the request is never deserialized. ``on_reject(reason)`` lets the runtime log rejections.
    """

    def __init__(self, token: str | None, on_reject: Callable[[str], None] | None = None, *,
                 node_secret: bytes | None = None) -> None:
        if (token is None) == (node_secret is None):
            raise ValueError("give a shared token or a node secret")
        self._digest = _digest(_check_token(token, "token")) if token is not None else b""
        self._secret = node_secret
        self._on_reject = on_reject

    def _valid(self, credential: str) -> bool:
        if self._secret is not None:
            return token_node(self._secret, credential) is not None
        return hmac.compare_digest(_digest(credential), self._digest)

    def _reject_reason(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        values = [value for key, value in (metadata or ()) if key == AUTH_KEY]
        if not values:
            return "missing bearer token"
        for value in values:
            scheme, _, credential = str(value).partition(" ")
            if scheme.lower() != "bearer" or not credential:
                return "malformed authorization metadata"
            if not self._valid(credential.strip()):
                return "invalid token"
        return None

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        """Pass authenticated calls on; answer others with an aborting handler of the same kind."""
        handler = continuation(handler_call_details)
        reason = self._reject_reason(handler_call_details.invocation_metadata)
        if reason is None or handler is None:  # unknown methods stay UNIMPLEMENTED
            return handler
        return _aborting_handler(handler, reason, handler_call_details.method, self._on_reject)


def _aborting_handler(handler: grpc.RpcMethodHandler, reason: str, method: str,
                      on_reject: Callable[[str], None] | None) -> grpc.RpcMethodHandler:
    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        if on_reject is not None:
            on_reject(f"{reason} ({method} from {context.peer()})")
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    return kinds[(handler.request_streaming, handler.response_streaming)](deny)


_CallDetailsBase = collections.namedtuple(
    "_CallDetailsBase", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression"))


class _CallDetails(_CallDetailsBase, grpc.ClientCallDetails):
    pass


class TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer token to every call's metadata (unless the caller already set one)."""

    def __init__(self, token: str) -> None:
        self._metadata = token_metadata(_check_token(token, "token"))

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or ())
        if not any(key == AUTH_KEY for key, _ in metadata):
            metadata.extend(self._metadata)
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def intercept_channel(channel: grpc.Channel, token: str) -> grpc.Channel:
    """``channel`` with the bearer token attached to every call."""
    return grpc.intercept_channel(channel, TokenClientInterceptor(token))
