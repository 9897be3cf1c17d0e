"""The PKI in the Django admin: read-only, and never a private key or a PSK on a page.
Certificates are issued, revoked and rotated through the API (the services)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import ClientCertificate, PskIdentity, ServerCertificate


class _ReadOnly(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ClientCertificate)
class ClientCertificateAdmin(_ReadOnly):
    list_display = ["name", "serial", "issued_at", "not_after", "revoked_at",
                    "revocation_reason"]
    list_filter = ["revocation_reason"]
    search_fields = ["name", "serial", "fingerprint"]


@admin.register(ServerCertificate)
class ServerCertificateAdmin(_ReadOnly):
    list_display = ["serial", "active", "created_at", "not_after"]
    exclude = ["key_pem"]


@admin.register(PskIdentity)
class PskIdentityAdmin(_ReadOnly):
    list_display = ["name", "created_at"]
    exclude = ["key_hex"]
