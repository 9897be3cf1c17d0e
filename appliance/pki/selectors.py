"""Reads about the PKI, for the API and the dashboard."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import QuerySet

from . import certificates
from .models import CertificateAuthority, ClientCertificate, PskIdentity, ServerCertificate
from .services import pki_ensure, psk_supported, psk_unsupported_message


def client_certificate_list() -> QuerySet[ClientCertificate]:
    return ClientCertificate.objects.order_by("name", "-issued_at", "-id")


def psk_identity_list() -> QuerySet[PskIdentity]:
    return PskIdentity.objects.order_by("name")


def server_certificate_active() -> ServerCertificate:
    """The certificate the engine presents (made on first use)."""
    pki_ensure()
    return ServerCertificate.objects.get(active=True)


def tls_status() -> dict[str, Any]:
    """The server-wide mode, whether PSK is possible, and the CA and server certificate."""
    pki_ensure()
    ca = CertificateAuthority.objects.get(pk=1)
    server = ServerCertificate.objects.get(active=True)
    supported = psk_supported()
    return {
        "mode": settings.NBD_TLS_MODE,
        "psk_supported": supported,
        "psk_detail": "" if supported else psk_unsupported_message(),
        "ca": {
            "subject": certificates.subject_text(certificates.load_certificate(ca.cert_pem)),
            "fingerprint": ca.fingerprint,
            "not_after": ca.not_after,
            "crl_next_update": ca.crl_next_update,
        },
        "server_certificate": {
            "id": server.pk,
            "serial": server.serial,
            "fingerprint": server.fingerprint,
            "names": server.names,
            "not_after": server.not_after,
        },
        "client_certificates": {
            "active": ClientCertificate.objects.filter(revoked_at__isnull=True).count(),
            "revoked": ClientCertificate.objects.filter(revoked_at__isnull=False).count(),
        },
        "psk_identities": PskIdentity.objects.count(),
    }
