"""Nodes in the Django admin: read-only (engine workers register and update them)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from appliance.errors import human_size

from .models import Node


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ["name", "status", "address", "free", "capacity", "labels", "version",
                    "last_heartbeat"]
    search_fields = ["name", "nbd_host"]
    readonly_fields = ["name", "status", "nbd_host", "nbd_port", "storage_root", "capacity",
                       "free", "labels", "version", "started_at", "last_heartbeat"]
    fields = readonly_fields

    @admin.display(description="status")
    def status(self, node: Node) -> str:
        return node.status

    @admin.display(description="capacity")
    def capacity(self, node: Node) -> str:
        return human_size(node.capacity_bytes)

    @admin.display(description="free")
    def free(self, node: Node) -> str:
        return human_size(node.free_bytes)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
