"""Exports in the Django admin, saved through the export services."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import Export
from .services import export_delete, export_publish, export_update


@admin.register(Export)
class ExportAdmin(admin.ModelAdmin):
    list_display = ["name", "image", "enabled", "read_only", "tls_policy", "multi_conn", "node"]
    list_filter = ["enabled", "read_only", "tls_policy", "multi_conn", "node"]
    search_fields = ["name", "description", "image__name"]
    readonly_fields = ["node", "created_at", "updated_at"]  # node: the image's node
    autocomplete_fields = ["image"]

    def save_model(self, request: HttpRequest, obj: Export, form: Any, change: bool) -> None:
        fields = {name: form.cleaned_data[name] for name in form.changed_data}
        if change:
            export_update(export=obj, **fields)
            return
        created = export_publish(
            image=obj.image,
            name=obj.name,
            description=obj.description,
            read_only=obj.read_only,
            enabled=obj.enabled,
            allowed_networks=obj.allowed_networks,
            multi_conn=obj.multi_conn,
            tls_policy=obj.tls_policy,
            allowed_clients=obj.allowed_clients,
            max_connections=obj.max_connections,
        )
        obj.pk, obj.created_at, obj.updated_at = created.pk, created.created_at, created.updated_at
        obj.node = created.node

    def delete_model(self, request: HttpRequest, obj: Export) -> None:
        export_delete(export=obj)  # its lock order, and the engine withdraws it at once

    def delete_queryset(self, request: HttpRequest, queryset: Any) -> None:
        for export in queryset:
            export_delete(export=export)
