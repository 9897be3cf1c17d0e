"""Reads about exports, for the API now and the engine worker later."""

from __future__ import annotations

import ipaddress

from django.db.models import Count, Q, QuerySet

from .models import Export, TlsPolicy


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


def server_tls_mode() -> str:
    """The engines' TLS mode: "off", "optional" or "required" (settings.NBD_TLS_MODE)."""
    from django.conf import settings

    return getattr(settings, "NBD_TLS_MODE", "optional")


def export_requires_tls(export: Export) -> bool:
    """Whether a plaintext client is refused: the export (or the whole server) requires TLS,
    or the export admits only named clients, whose names only TLS can prove."""
    return (
        export.tls_policy == TlsPolicy.REQUIRED
        or bool(export.allowed_clients)
        or server_tls_mode() == "required"
    )


def export_uri(export: Export) -> str:
    """The URI clients connect to: nbds:// when TLS is required, else nbd://, naming the host
    and port its node's engine listens on."""
    return _uri("nbds" if export_requires_tls(export) else "nbd", export)


def export_tls_uri(export: Export) -> str | None:
    """The nbds:// URI when the appliance advertises TLS for the export (policy optional or
    required, or a server that requires it), else None."""
    if export.tls_policy == TlsPolicy.OFF and not export_requires_tls(export):
        return None
    return _uri("nbds", export)


def _uri(scheme: str, export: Export) -> str:
    from urllib.parse import quote

    from django.conf import settings

    host = settings.NBD_PUBLIC_HOST
    if ":" in host:
        host = f"[{host}]"
    port = "" if settings.NBD_PORT == 10809 else f":{settings.NBD_PORT}"
    return f"{scheme}://{host}{port}/{quote(export.name, safe='')}"
