"""Client sessions in the Django admin: recorded by the engine, so read-only here."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from .models import FEATURES, ClientSession, ConnectionRefusal, ExportSample


@admin.register(ClientSession)
class ClientSessionAdmin(admin.ModelAdmin):
    list_display = ["peer", "export_name", "fingerprint", "connected_at", "disconnected_at",
                    "structured_replies", "extended_headers", "bytes_read", "bytes_written"]
    list_filter = ["fingerprint", "node", *FEATURES]
    search_fields = ["peer", "export_name", "close_reason"]
    date_hierarchy = "connected_at"

    def get_readonly_fields(
        self, request: HttpRequest, obj: ClientSession | None = None
    ) -> list[str]:
        return [f.name for f in ClientSession._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ClientSession | None = None) -> bool:
        return False


@admin.register(ExportSample)
class ExportSampleAdmin(admin.ModelAdmin):
    """History samples the engine writes for plots: read-only."""

    list_display = ["export_name", "node", "at", "clients", "ops", "bytes_read", "bytes_written"]
    list_filter = ["node", "export_name"]
    date_hierarchy = "at"

    def get_readonly_fields(
        self, request: HttpRequest, obj: ExportSample | None = None
    ) -> list[str]:
        return [f.name for f in ExportSample._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ExportSample | None = None) -> bool:
        return False


@admin.register(ConnectionRefusal)
class ConnectionRefusalAdmin(admin.ModelAdmin):
    """Clients the engine refused, and why: read-only."""

    list_display = ["at", "peer", "export_name", "kind", "reason"]
    list_filter = ["kind", "node"]
    search_fields = ["peer", "export_name", "reason"]
    date_hierarchy = "at"

    def get_readonly_fields(
        self, request: HttpRequest, obj: ConnectionRefusal | None = None
    ) -> list[str]:
        return [f.name for f in ConnectionRefusal._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: ConnectionRefusal | None = None
    ) -> bool:
        return False
