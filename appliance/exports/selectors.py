"""Reads about exports, for the API now and the engine worker later."""

from __future__ import annotations

import ipaddress

from django.db.models import Count, Q, QuerySet

from .models import Export


def export_list() -> QuerySet[Export]:
    # Explicit order: Meta.ordering is not applied to aggregating querysets.
    return (
        Export.objects.select_related("image")
        .annotate(
            active_sessions=Count("sessions", filter=Q(sessions__disconnected_at__isnull=True))
        )
        .order_by("name")
    )


def export_list_enabled(*, node: str) -> QuerySet[Export]:
    """What the engine on ``node`` should be serving."""
    return Export.objects.select_related("image").filter(node=node, enabled=True)


def export_list_on_node(*, node: str) -> QuerySet[Export]:
    """Every export placed on ``node``, enabled or not (the engine refuses disabled ones)."""
    return Export.objects.select_related("image").filter(node=node)


def export_allows_client(export: Export, address: str) -> bool:
    """Whether a client at ``address`` may use the export (an empty list allows all)."""
    if not export.allowed_networks:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for text in export.allowed_networks:
        network = ipaddress.ip_network(text)
        if ip.version == network.version and ip in network:
            return True
        if ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped in network:
            return True
    return False


def export_uri(export: Export) -> str:
    """The nbd:// URI of an export, naming the host and port its node's engine listens on."""
    from urllib.parse import quote

    from django.conf import settings

    host = settings.NBD_PUBLIC_HOST
    if ":" in host:
        host = f"[{host}]"
    port = "" if settings.NBD_PORT == 10809 else f":{settings.NBD_PORT}"
    return f"nbd://{host}{port}/{quote(export.name, safe='')}"
