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
import socket
import ssl
import sys
import threading
import time
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


class TlsStream:
    """TLS over a plain blocking socket through memory BIOs.

    ``ssl.SSLSocket`` reads one TLS record per call, each with its own system calls; a
    client with 16 small requests in flight sends 16 records. Here one ``recv_into`` of
    the socket takes every record that has arrived and ``recv_into`` hands back all the
    plaintext they hold in one call, so the server's batch loop sees whole batches as it
    does without TLS; everything a batch writes leaves in one ``sendall``.

    It offers the socket methods the connection uses (``recv_into``, ``recv``,
    ``sendall``, ``pending``); the raw socket stays in charge of timeouts and shutdown.
    """

    RECEIVE = 256 * 1024  # encrypted bytes taken from the socket at a time

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._raw = bytearray(self.RECEIVE)
        self._plain = bytearray()  # decrypted by pending(), not yet handed out
        self._eof = False

    def do_handshake(self, deadline: float) -> None:
        """The TLS handshake, over by ``deadline`` (time.monotonic()) or TimeoutError:
        a client sending a byte now and then must not hold a thread for ever."""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                self._send_alert()  # tell the client why ("certificate revoked")
                raise
            self.send_out()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("TLS handshake took too long")
            self.sock.settimeout(remaining)
            if not self._fill():
                raise ConnectionResetError("client closed during the TLS handshake")
        self.send_out()  # the server's last flight (and TLS 1.3 session tickets)

    def getpeercert(self, binary_form: bool = False) -> object:
        return self._tls.getpeercert(binary_form)

    # ------------------------------------------------------------ reading

    def recv_into(self, view: memoryview | bytearray, nbytes: int = 0) -> int:
        """Block until some plaintext is there, then return all that is (up to the view)."""
        view = memoryview(view)
        if nbytes:
            view = view[:nbytes]
        n = self._take_plain(view)
        while True:
            if n < len(view):
                n += self._decrypt_into(view[n:])
            if n or self._eof:
                return n
            if not self._fill():
                self._eof = True

    def recv(self, size: int) -> bytes:
        buf = bytearray(size)
        return bytes(buf[: self.recv_into(buf)])

    def pending(self) -> bool:
        """Whether ``recv_into`` would return at once (a poll of the socket cannot tell)."""
        if self._plain or self._eof:
            return True
        if self._incoming.pending:
            chunk = bytearray(64 * 1024)
            got = self._decrypt_into(memoryview(chunk))
            if got:
                self._plain += chunk[:got]
                return True
        return self._eof

    def _take_plain(self, view: memoryview) -> int:
        if not self._plain:
            return 0
        n = min(len(view), len(self._plain))
        view[:n] = self._plain[:n]
        del self._plain[:n]
        return n

    def _decrypt_into(self, view: memoryview) -> int:
        """Every record already received, decrypted into ``view``; never blocks."""
        n = 0
        while n < len(view):
            try:
                got = self._tls.read(len(view) - n, view[n:])
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True  # close_notify, or the socket ended mid-stream
                break
            if not got:
                self._eof = True
                break
            n += got
            if not self._incoming.pending and not self._tls.pending():
                break
        if self._outgoing.pending:  # a KeyUpdate answer, for instance
            self.send_out()
        return n

    def _fill(self) -> bool:
        """One receive from the socket into the TLS input; False at end of stream."""
        got = self.sock.recv_into(self._raw)
        if not got:
            self._incoming.write_eof()
            return False
        self._incoming.write(memoryview(self._raw)[:got])
        return True

    # ------------------------------------------------------------ writing

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(data)
        self.send_out()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt without sending: ``send_out`` sends everything written so far at once."""
        self._tls.write(data)

    def send_out(self) -> None:
        """Send every encrypted byte written so far, in one ``sendall``."""
        data = self._outgoing.read()
        if data:
            self.sock.sendall(data)

    def _send_alert(self) -> None:
        try:
            self.send_out()
        except OSError:
            pass

    def close_notify(self) -> None:
        """Best effort: tell the client the TLS stream ends (never waits for its answer)."""
        try:
            self._tls.unwrap()
        except ssl.SSLError:
            pass
        self._send_alert()
