"""Offline provisioning of a deployment's credentials: a CA, node certificates, node tokens.

``gossamer certs`` and ``gossamer tokens`` write them (``launch`` calls the token writer for
its own run); the runtime only reads and checks them (``runtime/security.py``). Every file
is written atomically; private keys and secrets with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gossamer.metrics.runstore import atomic_write_bytes
from gossamer.runtime.security import SECRET_FILE, _public_der, node_token

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
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


