"""Transport security of the runtime: TLS / mutual TLS, shared and per-node tokens, caller ids.

Credentials are made offline by :mod:`gossamer.provision` (``gossamer certs``, ``gossamer
tokens``); this module reads and checks them.

Principle 6 of DESIGN.md: peers authenticate (TLS + token). TLS proves the server (and,
with ``require_client_cert``, the client) holds a key signed by the run's CA; the bearer
token proves the caller belongs to this run. Both are checked before any handler runs.
User errors (bad paths, bad PEM, bad config) raise ``ValueError`` with one line that
names the config field, ``runtime.security.<field>``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

FIELD = "runtime.security"
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: safe in a header

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
