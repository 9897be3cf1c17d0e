"""X.509 material built with ``cryptography``: no database, no files.

Key type: EC P-256 for the CA and every certificate. GnuTLS (qemu, libnbd, nbdkit) and
OpenSSL (Python's ssl, the engine) both accept it; its keys are made in microseconds where
RSA 3072 takes about 0.1 s, and a TLS handshake signs with the server key, where ECDSA is
cheaper than RSA too. The leaf profile is the conventional one (tests/tlsutil.py has what
qemu 7.2 and libnbd were found to check): a critical keyUsage with digitalSignature and
keyEncipherment, extendedKeyUsage serverAuth or clientAuth (a critical EKU without
clientAuth is what qemu refuses for a client), basicConstraints CA:FALSE.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "NBD appliance"
# Clients' and servers' clocks differ: a certificate is valid from a little before it is made.
BACKDATE = datetime.timedelta(minutes=5)

_CA_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)
_LEAF_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=True,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False,
)
REASONS = {
    "key_compromise": x509.ReasonFlags.key_compromise,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
}


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, in PEM, with what the database keeps about it."""

    cert_pem: str
    key_pem: str
    serial: int
    fingerprint: str
    not_after: datetime.datetime


@dataclass(frozen=True)
class Revoked:
    serial: int
    revoked_at: datetime.datetime
    reason: str = ""  # a key of REASONS, or "" for none given


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def ca_common_name(node: str) -> str:
    # A random suffix: clients that trust the CAs of two appliances must tell them apart.
    return f"NBD appliance CA {node[:32]} {secrets.token_hex(4)}"


def ca_create(*, common_name: str, days: int) -> Issued:
    """A self-signed CA: basicConstraints CA:TRUE, keyCertSign and cRLSign."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    start = now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return _issued(cert, key)


def server_certificate_create(*, ca_cert_pem: str, ca_key_pem: str, names: list[str],
                              days: int) -> Issued:
    """serverAuth, with every name as a DNS or IP subjectAltName; CN is the first name."""
    return _leaf(ca_cert_pem, ca_key_pem, common_name=names[0], names=names, days=days,
                 usage=ExtendedKeyUsageOID.SERVER_AUTH)


def client_certificate_create(*, ca_cert_pem: str, ca_key_pem: str, name: str,
                              dns_names: list[str], days: int) -> Issued:
    """clientAuth, subject CN ``name`` (and ``dns_names`` as DNS subjectAltNames)."""
    return _leaf(ca_cert_pem, ca_key_pem, common_name=name, names=dns_names, days=days,
                 usage=ExtendedKeyUsageOID.CLIENT_AUTH)


def crl_create(*, ca_cert_pem: str, ca_key_pem: str, revoked: Iterable[Revoked], number: int,
               days: int) -> tuple[str, datetime.datetime]:
    """The CA's CRL listing ``revoked``, and its nextUpdate."""
    ca_cert, ca_key = load_certificate(ca_cert_pem), _load_key(ca_key_pem)
    start = now()
    next_update = start + datetime.timedelta(days=days)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(start - BACKDATE)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    for entry in sorted(revoked, key=lambda r: r.serial):
        item = x509.RevokedCertificateBuilder().serial_number(entry.serial).revocation_date(
            entry.revoked_at)
        if entry.reason in REASONS:  # RFC 5280: leave the reason out rather than "unspecified"
            item = item.add_extension(x509.CRLReason(REASONS[entry.reason]), critical=False)
        builder = builder.add_revoked_certificate(item.build())
    crl = builder.sign(ca_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM).decode(), next_update


def load_certificate(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses of the certificate's subjectAltName."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in sans if isinstance(n, x509.DNSName | x509.IPAddress)]


def subject_text(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _leaf(ca_cert_pem: str, ca_key_pem: str, *, common_name: str, names: list[str],
          days: int, usage: x509.ObjectIdentifier) -> Issued:
    ca_cert, ca_key = load_certificate(ca_cert_pem), _load_key(ca_key_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    start = now()
    # A certificate cannot outlive the CA that vouches for it.
    not_after = min(start + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
    return _issued(builder.sign(ca_key, hashes.SHA256()), key)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _issued(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    return Issued(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        # PKCS#8 without a password: what GnuTLS and OpenSSL both read.
        key_pem=key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode(),
        serial=cert.serial_number,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        not_after=cert.not_valid_after_utc,
    )


def _load_key(pem: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"the CA key is a {type(key).__name__}, not an EC or RSA key")
    return key
