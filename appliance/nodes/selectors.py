"""Reads about nodes: whether each is up (from the age of its heartbeat), what it holds."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from .models import Node

__all__ = [
    "node_down_after",
    "node_heartbeat_age",
    "node_is_up",
    "node_list",
    "node_map",
    "nodes_available",
    "nodes_up",
]


def node_down_after() -> timedelta:
    """How long a node may go without a heartbeat before it is shown down."""
    return timedelta(seconds=float(getattr(settings, "APPLIANCE_NODE_DOWN_AFTER", 15.0)))


def node_heartbeat_age(node: Node, *, now: datetime | None = None) -> float:
    """Seconds since the node's last heartbeat (never negative)."""
    now = now or timezone.now()
    return max(0.0, (now - node.last_heartbeat).total_seconds())


def node_is_up(node: Node, *, now: datetime | None = None) -> bool:
    """Up while its last heartbeat is at most ``APPLIANCE_NODE_DOWN_AFTER`` seconds old."""
    if node.last_heartbeat is None:
        return False
    return node_heartbeat_age(node, now=now) <= node_down_after().total_seconds()


def nodes_up(*, now: datetime | None = None) -> QuerySet[Node]:
    """The nodes whose heartbeat is recent enough, by name."""
    now = now or timezone.now()
    return Node.objects.filter(last_heartbeat__gte=now - node_down_after()).order_by("name")


def node_list() -> QuerySet[Node]:
    """Every node with ``images_count`` and ``exports_count`` (placed on it), by name."""
    from appliance.exports.models import Export
    from appliance.storage.models import Image

    def count(model: type) -> Coalesce:
        rows = (model.objects.filter(node=OuterRef("name")).order_by().values("node")
                .annotate(n=Count("pk")).values("n"))
        return Coalesce(Subquery(rows, output_field=IntegerField()), Value(0))

    return Node.objects.annotate(images_count=count(Image),
                                 exports_count=count(Export)).order_by("name")


def node_map(names: Iterable[str] | None = None) -> dict[str, Node]:
    """Nodes by name (all of them, or those named)."""
    rows = Node.objects.all() if names is None else Node.objects.filter(name__in=set(names))
    return {node.name: node for node in rows}


def nodes_available(names: Iterable[str], *, nodes: dict[str, Node] | None = None,
                    now: datetime | None = None) -> dict[str, bool]:
    """For each node name: whether a registered node of that name is up (an export on it
    is available). A name no node registered is not available."""
    names = set(names)
    known = node_map(names) if nodes is None else nodes
    now = now or timezone.now()
    return {name: name in known and node_is_up(known[name], now=now) for name in names}
