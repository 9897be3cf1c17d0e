"""Test PKI in the GnuTLS directory layout that nbdkit, qemu and libnbd read.

``make_test_pki(root)`` writes, under ``root``::

    server/           ca-cert.pem server-cert.pem server-key.pem ca-crl.pem  (nbdcore, nbdkit,
                      qemu-nbd: --tls-certificates / tls-creds-x509,endpoint=server,dir=)
    server-no-crl/    the same without ca-crl.pem
    clients/alice/    ca-cert.pem client-cert.pem client-key.pem   (qemu tls-creds-x509,
    clients/bob/      endpoint=client,dir=...; libnbd ?tls-certificates=...)
    clients/stranger/ a client certificate from another CA
    clients/revoked/  a client certificate listed in server/ca-crl.pem
    clients/anonymous/ only ca-cert.pem: TLS without a client certificate
    psk/keys.psk      "identity:hexkey" lines (qemu tls-creds-psk dir=..., libnbd/nbdcore
                      tls-psk-file)

What qemu 7.2 (GnuTLS) insists on, found by trying it against nbdkit: before connecting it
checks its own certificate against the ca-cert.pem of its own directory ("Our own
certificate ... failed validation ... hasn't got a known issuer"), so the stranger's
directory trusts both CAs, or qemu would refuse locally and the server would never be
asked; an extendedKeyUsage marked critical must hold clientAuth for a client ("purpose does
not allow use with a TLS client"); the server certificate must name the address qemu dials
(an IP SAN for 127.0.0.1: "Certificate does not match the hostname 127.0.0.1"; libnbd
fails the same way). keyUsage without keyEncipherment, a non-critical wrong EKU and a
certificate with no extensions at all were accepted; EC P-256 and RSA 2048 both work. The
certificates below are conventional all the same (keyUsage digitalSignature +
keyEncipherment, EKU serverAuth / clientAuth); EC is the default because it is generated
in microseconds. libnbd 1.14 takes the PSK identity from the URI's user part
(nbds://alice@host/?tls-psk-file=F); it has no tls-username query parameter.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:  # the PKI part is used by bench/nbdbench.py too, without tests/ on the path
    from nbdclient import NbdClient

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

SERVER_DNS_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1", "127.0.0.2")
CLIENT_NAMES = ("alice", "bob")


def new_key(key_type: str = "ec") -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key type {key_type!r}: use 'ec' or 'rsa'")


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nbdcore tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# keyUsage for end entities: qemu refuses a critical keyUsage without keyEncipherment.
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=True,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False,
)
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)


class TestCA:
    """A certificate authority that issues server and client certificates and CRLs."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "nbdcore test CA", key_type: str = "ec") -> None:
        self.key_type = key_type
        self.key = new_key(key_type)
        now = _now()
        public = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def _issue(self, common_name: str, usage: x509.ObjectIdentifier,
               sans: list[x509.GeneralName], key: PrivateKey | None = None,
               ) -> tuple[x509.Certificate, PrivateKey]:
        key = key or new_key(self.key_type)
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key

    def issue_server(self, dns_names: Iterable[str] = SERVER_DNS_NAMES,
                     ips: Iterable[str] = SERVER_IPS) -> tuple[x509.Certificate, PrivateKey]:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        return self._issue("localhost", ExtendedKeyUsageOID.SERVER_AUTH, sans)

    def issue_client(self, name: str, dns_names: Iterable[str] = ()
                     ) -> tuple[x509.Certificate, PrivateKey]:
        """A client certificate with subject CN ``name`` (and optional DNS SANs)."""
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        return self._issue(name, ExtendedKeyUsageOID.CLIENT_AUTH, sans)

    def crl(self, revoked: Iterable[x509.Certificate] = ()) -> x509.CertificateRevocationList:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(now + datetime.timedelta(days=30))
        )
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(now - datetime.timedelta(minutes=1))
                .build()
            )
        return builder.sign(self.key, hashes.SHA256())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    # PKCS#8 without a password: what GnuTLS and OpenSSL both read.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def write_server_dir(directory: Path, ca: TestCA, cert: x509.Certificate, key: PrivateKey,
                     crl: x509.CertificateRevocationList | None = None) -> Path:
    """ca-cert.pem, server-cert.pem, server-key.pem (0600) and, with ``crl``, ca-crl.pem."""
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / "ca-cert.pem", cert_pem(ca.cert))
    _write(directory / "server-cert.pem", cert_pem(cert))
    _write(directory / "server-key.pem", key_pem(key), 0o600)
    if crl is not None:
        _write(directory / "ca-crl.pem", crl.public_bytes(serialization.Encoding.PEM))
    return directory


def write_client_dir(directory: Path, trusted: Iterable[TestCA],
                     cert: x509.Certificate | None = None,
                     key: PrivateKey | None = None) -> Path:
    """ca-cert.pem (every trusted CA, concatenated) and, if given, client-cert.pem and
    client-key.pem (0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / "ca-cert.pem", b"".join(cert_pem(ca.cert) for ca in trusted))
    if cert is not None and key is not None:
        _write(directory / "client-cert.pem", cert_pem(cert))
        _write(directory / "client-key.pem", key_pem(key), 0o600)
    return directory


def write_psk_file(path: Path, identities: dict[str, bytes]) -> Path:
    """``identity:hexkey`` lines (0600), the format qemu, nbdkit, libnbd and nbdcore read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{name}:{key.hex()}\n" for name, key in identities.items())
    return _write(path, lines.encode(), 0o600)


@dataclass
class TestPki:
    """Paths of a complete test PKI (see the module docstring for the layout)."""

    __test__ = False

    root: Path
    ca: TestCA
    other_ca: TestCA
    server_dir: Path
    server_dir_no_crl: Path
    clients: dict[str, Path]
    serials: dict[str, int]
    psk_dir: Path
    psk_file: Path
    psk_identity: str
    psk_key: bytes
    server_cert: x509.Certificate = field(repr=False)

    def client(self, name: str) -> Path:
        return self.clients[name]


def make_test_pki(root: Path, key_type: str = "ec") -> TestPki:
    """Write the whole test PKI under ``root`` (created if needed)."""
    root.mkdir(parents=True, exist_ok=True)
    ca = TestCA("nbdcore test CA", key_type)
    other_ca = TestCA("some other CA", key_type)
    server_cert, server_key = ca.issue_server()

    clients: dict[str, Path] = {}
    serials: dict[str, int] = {}
    issued = {name: ca.issue_client(name) for name in CLIENT_NAMES}
    issued["revoked"] = ca.issue_client("revoked")
    for name, (cert, key) in issued.items():
        clients[name] = write_client_dir(root / "clients" / name, [ca], cert, key)
        serials[name] = cert.serial_number
    # qemu checks its own certificate against its own ca-cert.pem before connecting: trust
    # both CAs so that the server, not qemu, is the one refusing the stranger.
    stranger_cert, stranger_key = other_ca.issue_client("stranger")
    clients["stranger"] = write_client_dir(root / "clients" / "stranger", [ca, other_ca],
                                           stranger_cert, stranger_key)
    serials["stranger"] = stranger_cert.serial_number
    clients["anonymous"] = write_client_dir(root / "clients" / "anonymous", [ca])

    crl = ca.crl([issued["revoked"][0]])
    server_dir = write_server_dir(root / "server", ca, server_cert, server_key, crl)
    server_dir_no_crl = write_server_dir(root / "server-no-crl", ca, server_cert, server_key)

    psk_identity, psk_key = "alice", secrets.token_bytes(32)
    psk_dir = root / "psk"
    psk_file = write_psk_file(psk_dir / "keys.psk", {psk_identity: psk_key,
                                                     "bob": secrets.token_bytes(32)})
    return TestPki(root=root, ca=ca, other_ca=other_ca, server_dir=server_dir,
                   server_dir_no_crl=server_dir_no_crl, clients=clients, serials=serials,
                   psk_dir=psk_dir, psk_file=psk_file, psk_identity=psk_identity,
                   psk_key=psk_key, server_cert=server_cert)


# ---------------------------------------------------------------------- raw TLS clients


def client_ssl_context(client_dir: Path) -> ssl.SSLContext:
    """A Python client context from a client directory: trusts its ca-cert.pem, presents
    client-cert.pem when there is one, checks the server's name like libnbd and qemu do."""
    ctx = ssl.create_default_context(cafile=str(client_dir / "ca-cert.pem"))
    if (client_dir / "client-cert.pem").exists():
        ctx.load_cert_chain(client_dir / "client-cert.pem", client_dir / "client-key.pem")
    return ctx


def start_tls(client: NbdClient, client_dir: Path, server_hostname: str = "127.0.0.1"
              ) -> ssl.SSLSocket:
    """NBD_OPT_STARTTLS on a raw test client, then the TLS handshake over its socket.

    With TLS 1.3 the server checks the client certificate after the client has finished
    its side: a refused certificate shows as an error on the next read, not here.
    """
    from nbdcore.protocol.constants import Opt, Rep

    reply = client.option(Opt.STARTTLS)[-1]
    if reply.type != Rep.ACK:
        raise AssertionError(f"STARTTLS refused: {reply}")
    tls = client_ssl_context(client_dir).wrap_socket(client.sock,
                                                     server_hostname=server_hostname)
    client.sock = tls
    return tls
