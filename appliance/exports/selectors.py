"""Reads about exports, for the API now and the engine worker later."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import TYPE_CHECKING

from django.db.models import Count, Q, QuerySet

from .models import Export, TlsPolicy

if TYPE_CHECKING:
    from appliance.nodes.models import Node

# Nodes by name, as ``appliance.nodes.selectors.node_map()`` gives them: passed by callers
# that render many exports, so that each does not look its node up again.
NodeMap = Mapping[str, "Node"]


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


def export_available(export: Export, *, nodes: NodeMap | None = None) -> bool:
    """Whether the export's node is registered and up (its engine can serve it)."""
    from appliance.nodes.selectors import nodes_available

    return nodes_available([export.node], nodes=nodes)[export.node]


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


def export_address(export: Export, *, nodes: NodeMap | None = None) -> tuple[str, int]:
    """(host, port) clients dial for the export: its node's registered NBD address, else
    (no such node registered yet) this host's NBD_PUBLIC_HOST and NBD_PORT."""
    from django.conf import settings

    if nodes is not None:
        node = nodes.get(export.node)
    else:
        from appliance.nodes.models import Node

        node = Node.objects.filter(name=export.node).only("nbd_host", "nbd_port").first()
    if node is not None:
        return node.nbd_host, node.nbd_port
    return settings.NBD_PUBLIC_HOST, settings.NBD_PORT


def export_uri(export: Export, *, nodes: NodeMap | None = None) -> str:
    """The URI clients connect to: nbds:// when TLS is required, else nbd://, naming the host
    and port its node's engine listens on."""
    return _uri("nbds" if export_requires_tls(export) else "nbd", export, nodes)


def export_tls_uri(export: Export, *, nodes: NodeMap | None = None) -> str | None:
    """The nbds:// URI when the appliance advertises TLS for the export (policy optional or
    required, or a server that requires it), else None."""
    if export.tls_policy == TlsPolicy.OFF and not export_requires_tls(export):
        return None
    return _uri("nbds", export, nodes)


def _uri(scheme: str, export: Export, nodes: NodeMap | None) -> str:
    from urllib.parse import quote

    host, port = export_address(export, nodes=nodes)
    if ":" in host:
        host = f"[{host}]"
    suffix = "" if port == 10809 else f":{port}"
    return f"{scheme}://{host}{suffix}/{quote(export.name, safe='')}"
