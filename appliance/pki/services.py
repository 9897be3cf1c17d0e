"""PKI services: the CA, the engine's server certificate, client certificates and their
revocation list, PSK identities, and the files the engine reads.

The CA and the server certificate are made on first use (``pki_ensure``, run by
``manage.py appliance_bootstrap`` and by every ``engine_tls_spec``) and kept in the database
with their private keys: the database is the appliance's trust root (see models.py). A
client's private key is returned once by ``client_certificate_issue`` and not stored.

Whatever changes what the engine must load (revocation, rotation, PSK identities) asks the
engines to converge once the transaction commits; they pick the files up through
``engine_tls_spec()``, whose ``version`` changes with the files' contents.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from appliance.config import is_host_name
from appliance.engine.control import sync_on_commit
from appliance.errors import (
    CertificateAlreadyRevoked,
    ClientNameTaken,
    PskIdentityNameTaken,
    PskUnsupported,
)
from nbdcore import tls as nbd_tls

from . import certificates
from .models import (
    CertificateAuthority,
    ClientCertificate,
    PskIdentity,
    RevocationReason,
    ServerCertificate,
)
from .validators import is_dns_name, validate_client_name

__all__ = [
    "ca_certificate_pem",
    "client_certificate_issue",
    "client_certificate_revoke",
    "engine_tls_spec",
    "pki_ensure",
    "psk_identity_create",
    "psk_identity_delete",
    "psk_supported",
    "psk_unsupported_message",
    "server_certificate_rotate",
    "server_names",
]

log = logging.getLogger(__name__)

CA_DAYS = 3650
SERVER_DAYS = 365
# The server certificate is renewed by itself this long before it expires (engine_tls_spec
# runs at every reconcile, every few seconds).
SERVER_RENEW_BEFORE = datetime.timedelta(days=30)
CLIENT_DAYS_DEFAULT = 365
CLIENT_DAYS_MAX = 3650
CRL_DAYS = 30  # nextUpdate; re-signed when less than half of it remains
PSK_KEY_BYTES = 32

CA_FILE, CERT_FILE, KEY_FILE, CRL_FILE, PSK_FILE = (
    "ca-cert.pem", "server-cert.pem", "server-key.pem", "ca-crl.pem", "psk.keys",
)
_PRIVATE = {KEY_FILE, PSK_FILE}  # 0600; the rest 0644


# ------------------------------------------------------------------ the CA and the engine


def pki_ensure() -> None:
    """Make the CA and the server certificate if there are none (idempotent); renew the
    server certificate when it nears its end or lacks a configured name, and the CRL when
    half of its validity has passed."""
    ca = _ca_ensure()
    _server_certificate_ensure(ca)
    _crl_ensure_fresh(ca)


def engine_tls_spec() -> dict[str, Any]:
    """Write the engine's TLS files into ``settings.APPLIANCE_TLS_DIR`` (only those whose
    content changed) and describe them for the engine spec."""
    pki_ensure()
    ca = CertificateAuthority.objects.get(pk=1)
    server = ServerCertificate.objects.get(active=True)
    identities = list(PskIdentity.objects.order_by("name"))
    revoked = sorted(
        int(serial)
        for serial in ClientCertificate.objects.filter(revoked_at__isnull=False)
        .values_list("serial", flat=True)
    )
    contents = {
        CA_FILE: ca.cert_pem,
        CERT_FILE: server.cert_pem,
        KEY_FILE: server.key_pem,
        CRL_FILE: ca.crl_pem,
        PSK_FILE: "".join(f"{i.name}:{i.key_hex}\n" for i in identities),
    }
    directory = Path(settings.APPLIANCE_TLS_DIR)
    _files_write(directory, contents)
    digest = hashlib.sha256()
    for name, text in contents.items():
        digest.update(f"{name}\0{len(text)}\0{text}".encode())
    return {
        "mode": settings.NBD_TLS_MODE,
        "cert_file": str(directory / CERT_FILE),
        "key_file": str(directory / KEY_FILE),
        "ca_file": str(directory / CA_FILE),
        "crl_file": str(directory / CRL_FILE),
        "psk_file": str(directory / PSK_FILE) if identities else None,
        "version": digest.hexdigest()[:16],
        "revoked_serials": revoked,
    }


def ca_certificate_pem() -> str:
    """The CA certificate clients trust (their ``ca-cert.pem``)."""
    return _ca_ensure().cert_pem


def server_names() -> list[str]:
    """What the server certificate names: the node, localhost and the loopback addresses,
    the engine's public host and bind address (not a wildcard one),
    ``APPLIANCE_TLS_SERVER_NAMES`` and every registered node's name and address. GnuTLS
    clients (qemu, libnbd) check the host of the URI they connect to against these."""
    candidates = [
        settings.APPLIANCE_NODE_NAME, "localhost", "127.0.0.1", "::1",
        settings.NBD_PUBLIC_HOST, settings.NBD_BIND, *settings.APPLIANCE_TLS_SERVER_NAMES,
        *_node_names(),
    ]
    names: list[str] = []
    for candidate in candidates:
        name = _server_name(candidate)
        if name is not None and name not in names:
            names.append(name)
    return names


def _node_names() -> list[str]:
    """Every registered node's name and address: the nodes share one server certificate,
    and a client dialling any node checks that node's address against it."""
    from appliance.nodes.models import Node

    names: list[str] = []
    for name, host in Node.objects.order_by("name").values_list("name", "nbd_host"):
        names += [name, host]
    return names


def server_certificate_rotate() -> ServerCertificate:
    """A new server certificate (new key) for new connections; connected clients keep their
    sessions. The old one stays in the database, inactive."""
    ca = _ca_ensure()
    server = _server_certificate_issue(ca, names=server_names())
    _engines_sync()
    log.info("rotated the server certificate: serial %s", server.serial)
    return server


# ------------------------------------------------------------------ client certificates


def client_certificate_issue(
    *, name: str, days: int = CLIENT_DAYS_DEFAULT
) -> tuple[ClientCertificate, str, str]:
    """A certificate for the client ``name`` (its subject CN, and a DNS subjectAltName when
    the name is a host name): the row, the certificate PEM and the private key PEM. The key
    is not stored: this is the only time anyone sees it."""
    _client_name_check(name)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= CLIENT_DAYS_MAX:
        raise ValidationError({"days": [
            f"days must be a whole number from 1 to {CLIENT_DAYS_MAX}; got {days!r}"]})
    _client_name_free(name)
    ca = _ca_ensure()
    issued = certificates.client_certificate_create(
        ca_cert_pem=ca.cert_pem, ca_key_pem=ca.key_pem, name=name,
        dns_names=[name] if is_dns_name(name) else [], days=days,
    )
    try:
        with transaction.atomic():
            cert = ClientCertificate.objects.create(
                name=name, serial=str(issued.serial), fingerprint=issued.fingerprint,
                cert_pem=issued.cert_pem, issued_at=certificates.now(),
                not_after=issued.not_after,
            )
    except IntegrityError:
        _client_name_free(name)  # another request issued one for this name meanwhile
        raise
    log.info("issued a client certificate for %s: serial %s", name, cert.serial)
    return cert, issued.cert_pem, issued.key_pem


def client_certificate_revoke(
    *, certificate: ClientCertificate, reason: str = RevocationReason.UNSPECIFIED
) -> ClientCertificate:
    """Revoke: the CRL lists it from now on, so the engine refuses it in the TLS handshake
    and drops that client's live connections."""
    if reason not in RevocationReason.values:
        raise ValidationError({"reason": [
            f"reason must be one of {', '.join(RevocationReason.values)}; got {reason!r}"]})
    _ca_ensure()
    with transaction.atomic():
        locked = ClientCertificate.objects.select_for_update().get(pk=certificate.pk)
        if locked.revoked_at is not None:
            raise CertificateAlreadyRevoked(
                f"the certificate of {locked.name!r} (serial {locked.serial}) was already "
                f"revoked at {locked.revoked_at.isoformat(timespec='seconds')}"
            )
        locked.revoked_at = certificates.now()
        locked.revocation_reason = reason
        locked.save(update_fields=["revoked_at", "revocation_reason"])
        _crl_publish()
    _engines_sync()
    certificate.revoked_at, certificate.revocation_reason = locked.revoked_at, reason
    log.info("revoked the client certificate of %s: serial %s (%s)", locked.name,
             locked.serial, reason)
    return certificate


# ------------------------------------------------------------------ PSK identities


def psk_supported() -> bool:
    """Whether the engine's Python can do TLS-PSK (ssl's PSK callbacks, Python 3.13+). The
    engine runs in the appliance's own interpreter, so the answer here is the engine's."""
    return bool(nbd_tls.PSK_SUPPORTED)


def psk_unsupported_message() -> str:
    return (
        "TLS-PSK needs Python 3.13 or newer for the engine; this engine runs Python "
        f"{sys.version_info.major}.{sys.version_info.minor}"
    )


def psk_identity_create(*, name: str) -> tuple[PskIdentity, str]:
    """A PSK identity with a new random 256-bit key: the row and the key in hex (clients
    put ``name:key`` in their PSK file)."""
    if not psk_supported():
        raise PskUnsupported(psk_unsupported_message())
    _client_name_check(name)
    if PskIdentity.objects.filter(name=name).exists():
        raise PskIdentityNameTaken(_psk_name_taken(name))
    key_hex = secrets.token_hex(PSK_KEY_BYTES)
    try:
        with transaction.atomic():
            identity = PskIdentity.objects.create(name=name, key_hex=key_hex)
    except IntegrityError as exc:
        raise PskIdentityNameTaken(_psk_name_taken(name)) from exc
    _engines_sync()
    log.info("created PSK identity %s", name)
    return identity, key_hex


def psk_identity_delete(*, identity: PskIdentity) -> None:
    """Forget the identity: new TLS-PSK handshakes with it fail from the next engine sync."""
    name = identity.name
    identity.delete()
    _engines_sync()
    log.info("deleted PSK identity %s", name)


# ------------------------------------------------------------------ internals


def _ca_ensure() -> CertificateAuthority:
    ca = CertificateAuthority.objects.filter(pk=1).first()
    if ca is not None:
        return ca
    issued = certificates.ca_create(
        common_name=certificates.ca_common_name(settings.APPLIANCE_NODE_NAME), days=CA_DAYS)
    crl_pem, next_update = certificates.crl_create(
        ca_cert_pem=issued.cert_pem, ca_key_pem=issued.key_pem, revoked=[], number=1,
        days=CRL_DAYS)
    try:
        with transaction.atomic():
            ca = CertificateAuthority.objects.create(
                pk=1, cert_pem=issued.cert_pem, key_pem=issued.key_pem,
                fingerprint=issued.fingerprint, not_after=issued.not_after,
                crl_pem=crl_pem, crl_number=1, crl_next_update=next_update,
            )
    except IntegrityError:
        return CertificateAuthority.objects.get(pk=1)  # another process made it first
    log.info("created the appliance's CA (SHA-256 %s)", ca.fingerprint)
    return ca


def _server_certificate_ensure(ca: CertificateAuthority) -> ServerCertificate:
    wanted = server_names()
    current = ServerCertificate.objects.filter(active=True).first()
    if current is not None and _server_certificate_fits(current, wanted):
        return current
    # Keep the names it had: two processes configured with different names (a node name
    # each, say) then converge on one certificate naming both instead of taking turns.
    names = wanted + [n for n in (current.names if current else []) if n not in wanted]
    server = _server_certificate_issue(
        ca, names=names, keep=lambda c: _server_certificate_fits(c, wanted))
    if current is None or server.pk != current.pk:
        _engines_sync()
        log.info("new server certificate %s for %s", server.serial, ", ".join(names))
    return server


def _server_certificate_fits(server: ServerCertificate, wanted: list[str]) -> bool:
    fresh = server.not_after - certificates.now() > SERVER_RENEW_BEFORE
    return fresh and set(wanted) <= set(server.names)


def _server_certificate_issue(ca: CertificateAuthority, *, names: list[str],
                              keep: Any = None) -> ServerCertificate:
    """Make the active server certificate one for ``names``, unless ``keep(current)`` says
    the one active now (another process may just have replaced it) will do."""
    issued = certificates.server_certificate_create(
        ca_cert_pem=ca.cert_pem, ca_key_pem=ca.key_pem, names=names, days=SERVER_DAYS)
    try:
        with transaction.atomic():
            current = ServerCertificate.objects.select_for_update().filter(active=True).first()
            if current is not None and keep is not None and keep(current):
                return current
            if current is not None:
                current.active = False
                current.save(update_fields=["active"])
            return ServerCertificate.objects.create(
                cert_pem=issued.cert_pem, key_pem=issued.key_pem, serial=str(issued.serial),
                fingerprint=issued.fingerprint, names=names, not_after=issued.not_after,
                active=True,
            )
    except IntegrityError:
        # Another process made one at the same moment (the one-active constraint): use it.
        return ServerCertificate.objects.get(active=True)


def _crl_ensure_fresh(ca: CertificateAuthority) -> None:
    if ca.crl_next_update - certificates.now() > datetime.timedelta(days=CRL_DAYS) / 2:
        return
    with transaction.atomic():
        locked = CertificateAuthority.objects.select_for_update().get(pk=1)
        if locked.crl_next_update - certificates.now() > datetime.timedelta(days=CRL_DAYS) / 2:
            return  # another process re-signed it
        _crl_publish()
    _engines_sync()


def _crl_publish() -> CertificateAuthority:
    """Re-sign the CRL with every revoked certificate (inside the caller's transaction)."""
    ca = CertificateAuthority.objects.select_for_update().get(pk=1)
    revoked = [
        certificates.Revoked(int(serial), revoked_at, reason)
        for serial, revoked_at, reason in ClientCertificate.objects.filter(
            revoked_at__isnull=False).values_list("serial", "revoked_at", "revocation_reason")
    ]
    ca.crl_number += 1
    ca.crl_pem, ca.crl_next_update = certificates.crl_create(
        ca_cert_pem=ca.cert_pem, ca_key_pem=ca.key_pem, revoked=revoked,
        number=ca.crl_number, days=CRL_DAYS)
    ca.save(update_fields=["crl_pem", "crl_number", "crl_next_update"])
    return ca


def _client_name_check(name: object) -> None:
    try:
        validate_client_name(name)
    except ValidationError as exc:
        raise ValidationError({"name": exc.messages}) from exc


def _client_name_free(name: str) -> None:
    other = ClientCertificate.objects.filter(name=name, revoked_at__isnull=True).first()
    if other is not None:
        raise ClientNameTaken(
            f"client {name!r} already has a certificate (serial {other.serial}, valid until "
            f"{other.not_after.date().isoformat()}); revoke it before issuing another"
        )


def _psk_name_taken(name: str) -> str:
    return f"a PSK identity named {name!r} already exists; delete it first or choose another"


def _server_name(value: str) -> str | None:
    """``value`` as a subjectAltName (an IP address or a host name), or None."""
    value = (value or "").strip().strip("[]")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        host = value[2:] if value.startswith("*.") else value
        return value.lower() if is_host_name(host) else None
    return None if address.is_unspecified else str(address)


def _engines_sync() -> None:
    """Every engine serves with these files: ask each node with exports (and this one)."""
    from appliance.exports.models import Export

    nodes = set(Export.objects.values_list("node", flat=True)) | {settings.APPLIANCE_NODE_NAME}
    sync_on_commit(*sorted(nodes))


def _files_write(directory: Path, contents: dict[str, str]) -> None:
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    changed = [
        name for name, text in contents.items()
        if _file_write(directory / name, text.encode(), 0o600 if name in _PRIVATE else 0o644)
    ]
    if changed:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames survive a crash
        finally:
            os.close(fd)
        log.info("wrote %s in %s", ", ".join(changed), directory)


def _file_write(path: Path, data: bytes, mode: int) -> bool:
    """Replace ``path`` atomically with ``data`` unless it holds that already."""
    try:
        if path.read_bytes() == data:
            if (path.stat().st_mode & 0o777) != mode:
                os.chmod(path, mode)
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # whatever the umask took away
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True
