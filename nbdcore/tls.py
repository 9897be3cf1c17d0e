"""TLS for the I/O layer: the server's SSLContext and what a TLS session proved.

The handshake machine only learns "TLS is up, these are the client's names"; everything
here is the standard library's ``ssl`` (OpenSSL). Certificates follow the layout nbdkit
and qemu use (``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``, ``ca-crl.pem``), so
one directory serves all three servers. Client certificates are optional and, when sent,
verified against the CA (and the CRL); a client whose certificate fails is dropped in the
TLS handshake. TLS-PSK needs the PSK callbacks Python gained in 3.13.
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

PSK_SUPPORTED = bool(getattr(ssl, "HAS_PSK", False)) and hasattr(
    ssl.SSLContext, "set_psk_server_callback"
)
# Python's default cipher string drops the PSK suites; TLS 1.2 PSK clients need them.
_CIPHERS_WITH_PSK = "DEFAULT:!aNULL:!eNULL:!MD5:!3DES:!DES:!RC4:!IDEA:!SEED:!aDSS:!SRP:PSK"


class TlsConfigError(ValueError):
    """The TLS settings cannot be used (missing file, bad key, PSK unsupported)."""


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None  # verify client certificates against this CA
    crl_file: str | None = None  # revoked client certificates
    psk_file: str | None = None  # "identity:hexkey" lines

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str],
                       psk_file: str | None = None) -> TlsSettings:
        """nbdkit's/qemu's layout; the CA and CRL are optional."""
        path = Path(directory)

        def optional(name: str) -> str | None:
            return str(path / name) if (path / name).exists() else None

        return cls(cert_file=str(path / "server-cert.pem"),
                   key_file=str(path / "server-key.pem"),
                   ca_file=optional("ca-cert.pem"), crl_file=optional("ca-crl.pem"),
                   psk_file=psk_file)


def read_psk_file(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Parse a keys file as qemu, nbdkit and libnbd write it: ``identity:hexkey``."""
    keys: dict[str, bytes] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        identity, sep, key_hex = line.partition(":")
        try:
            key = bytes.fromhex(key_hex)
        except ValueError:
            key = b""
        if not sep or not identity or not key:
            raise TlsConfigError(f"{path}:{number}: expected identity:hexkey")
        keys[identity] = key
    return keys


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """A server context for STARTTLS: TLS 1.2 or newer, client certificates optional."""
    if not settings.cert_file and not settings.psk_file:
        raise TlsConfigError("TLS needs a server certificate and key, or a PSK file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    try:
        if settings.cert_file:
            ctx.load_cert_chain(settings.cert_file, settings.key_file)
        if settings.ca_file:
            ctx.load_verify_locations(cafile=settings.ca_file)
            ctx.verify_mode = ssl.CERT_OPTIONAL
        if settings.crl_file:
            if not settings.ca_file:
                raise TlsConfigError("a CRL needs the CA certificate it belongs to")
            ctx.load_verify_locations(cafile=settings.crl_file)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load TLS files: {exc}") from exc
    if settings.psk_file:
        _enable_psk(ctx, read_psk_file(settings.psk_file))
    return ctx


_psk_identity = threading.local()  # the identity the PSK callback accepted, per thread


def _enable_psk(ctx: ssl.SSLContext, keys: dict[str, bytes]) -> None:
    if not PSK_SUPPORTED:
        raise TlsConfigError(
            "TLS-PSK needs Python 3.13 or newer; this engine runs Python "
            f"{sys.version_info.major}.{sys.version_info.minor}")

    def lookup(identity: str | None) -> bytes:
        key = keys.get(identity or "", b"")
        # The handshake runs in the connection's own thread: remember who this was.
        _psk_identity.value = identity if key else None
        return key

    ctx.set_ciphers(_CIPHERS_WITH_PSK)
    ctx.set_psk_server_callback(lookup)  # type: ignore[attr-defined]


def forget_psk_identity() -> None:
    _psk_identity.value = None


def peer_identity(sock: ssl.SSLSocket) -> tuple[tuple[str, ...], int | None]:
    """(names, certificate serial) that the finished TLS handshake verified.

    Names are the subject's common name and DNS alternative names of a verified client
    certificate, or the PSK identity; a client that sent no certificate has none.
    """
    psk = getattr(_psk_identity, "value", None)
    if psk:
        return (psk,), None
    cert = sock.getpeercert()
    if not cert:
        return (), None
    names: list[str] = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value not in names:
                names.append(value)
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS" and value not in names:
            names.append(value)
    serial = cert.get("serialNumber")
    return tuple(names), int(serial, 16) if serial else None
