"""Node services: the local node registers and beats (its engine worker calls these), and
new images are placed on a node.

A node's status is never stored: it is computed from ``last_heartbeat`` (see
``selectors.node_is_up``), so a host that stops beating is shown down within
``settings.APPLIANCE_NODE_DOWN_AFTER`` seconds without anyone having to notice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from datetime import datetime
from functools import cache

from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils import timezone

from appliance.errors import NodeUnavailable, NoNodeAvailable, human_size

from .models import Node
from .selectors import node_down_after, node_heartbeat_age, node_is_up
from .validators import normalize_labels, validate_node_name

__all__ = [
    "appliance_version",
    "node_choose",
    "node_heartbeat",
    "node_register",
    "node_usage_measure",
    "node_usage_refresh",
]

log = logging.getLogger(__name__)


@cache
def appliance_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nbd-appliance")
    except PackageNotFoundError:
        return "unknown"


def _disk() -> tuple[str, int, int]:
    """The storage root (created if missing), its filesystem's size and free bytes."""
    from appliance.storage.services import storage_root

    root = storage_root()
    st = os.statvfs(root)
    return str(root), st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def node_usage_measure(root: str | os.PathLike[str] | None = None) -> dict[str, list[int]]:
    """The sizes of this node's image files, as ``Node.image_usage`` keeps them:
    ``{"<image id>": [st_size, st_blocks * 512]}``. An image whose file is missing is left
    out (its sizes are unknown, as on the node itself)."""
    from appliance.storage.models import Image
    from appliance.storage.services import _FILENAME, storage_root

    base = os.fspath(root if root is not None else storage_root())
    sizes: dict[str, list[int]] = {}
    rows = Image.objects.filter(node=settings.APPLIANCE_NODE_NAME).order_by("pk")
    for pk, filename in rows.values_list("pk", "filename"):
        if not _FILENAME.fullmatch(filename or ""):
            continue
        try:
            st = os.stat(os.path.join(base, filename))
        except FileNotFoundError:
            continue
        sizes[str(pk)] = [st.st_size, st.st_blocks * 512]
    return sizes


def node_usage_refresh() -> bool:
    """Measure this node's image files now and store the sizes if they changed (what the
    heartbeat does, for the operations that just changed a file: other hosts see the new
    sizes at once instead of at the next beat). True when the row was written."""
    if getattr(settings, "APPLIANCE_ROLE", "all") == "central":
        return False  # no storage here
    usage = node_usage_measure()
    rows = Node.objects.filter(name=settings.APPLIANCE_NODE_NAME)
    stored = rows.values_list("image_usage", flat=True).first()
    if stored is None or stored == usage:
        return False
    return bool(rows.update(image_usage=usage))


def node_register(*, now: datetime | None = None) -> Node:
    """Create or refresh this host's row (``settings.APPLIANCE_NODE_NAME``): its NBD
    address, storage root and space, labels and version; it starts up."""
    name = settings.APPLIANCE_NODE_NAME
    try:
        validate_node_name(name)
    except ValidationError as exc:
        raise ValidationError(f"APPLIANCE_NODE_NAME: {exc.messages[0]}") from exc
    now = now or timezone.now()
    root, capacity, free = _disk()
    node, created = Node.objects.update_or_create(name=name, defaults={
        "nbd_host": settings.NBD_PUBLIC_HOST or settings.NBD_BIND,
        "nbd_port": settings.NBD_PORT,
        "storage_root": root,
        "capacity_bytes": capacity,
        "free_bytes": free,
        "image_usage": node_usage_measure(root),
        "labels": normalize_labels(list(getattr(settings, "APPLIANCE_NODE_LABELS", []))),
        "version": appliance_version(),
        "started_at": now,
        "last_heartbeat": now,
    })
    log.info("%s node %s (nbd %s, %s free of %s, labels %s)",
             "registered" if created else "re-registered", name, node.address,
             human_size(free), human_size(capacity), ",".join(node.labels) or "none")
    return node


def node_heartbeat(*, now: datetime | None = None) -> None:
    """This host is alive: refresh ``last_heartbeat``, the storage root's space and the
    sizes of the image files on it (``image_usage``). A row that vanished (deleted by
    hand) is registered again.

    The sizes cost one indexed query for this node's images and one ``stat`` per file;
    the map is compared with the stored one and written only when a size changed, so an
    idle node's beat stays a one-row UPDATE of a few columns (on PostgreSQL an unchanged
    JSON value is not rewritten)."""
    now = now or timezone.now()
    root, capacity, free = _disk()
    usage = node_usage_measure(root)
    rows = Node.objects.filter(name=settings.APPLIANCE_NODE_NAME)
    stored = rows.values_list("image_usage", flat=True).first()
    if stored is None:
        node_register(now=now)
        return
    fields: dict[str, object] = {"last_heartbeat": now, "capacity_bytes": capacity,
                                 "free_bytes": free}
    if stored != usage:
        fields["image_usage"] = usage
    if not rows.update(**fields):
        node_register(now=now)


def node_choose(*, size: int, labels: Iterable[str] = (), node: str | None = None) -> str:
    """The node a new image of ``size`` bytes goes to.

    With ``node``: that node, which must be registered, up and have every label asked for,
    else ``NodeUnavailable`` (400, field ``node``). Without: among the nodes that are up
    and have all ``labels``, the one with the most free bytes, provided it keeps
    ``APPLIANCE_STORAGE_RESERVE`` free (images are sparse: their size is not taken up
    front); none is ``NoNodeAvailable`` (409) saying why. With no node registered at all (a
    single host whose engine worker never started) it is this host,
    ``settings.APPLIANCE_NODE_NAME``, unless this host is a central one with no storage.
    """
    try:
        wanted = normalize_labels(list(labels))
    except ValidationError as exc:
        raise ValidationError({"labels": exc.messages}) from exc
    now = timezone.now()
    rows = list(Node.objects.order_by("name"))
    local = settings.APPLIANCE_NODE_NAME
    has_storage = getattr(settings, "APPLIANCE_ROLE", "all") != "central"
    if node:
        return _explicit(node, wanted, rows, now=now, fallback=local if has_storage else None)
    if not rows:
        if has_storage:
            return local
        raise NoNodeAvailable("no storage node has registered yet: start the engine worker "
                              "of at least one storage node")
    up = [r for r in rows if node_is_up(r, now=now)]
    if not up:
        raise NoNodeAvailable(
            f"no node is up (no heartbeat within {_seconds()}): "
            + "; ".join(f"{r.name} last seen {_ago(r, now)}" for r in rows[:10]))
    fitting = [r for r in up if set(wanted) <= set(r.labels)]
    if not fitting:
        raise NoNodeAvailable(
            f"no node that is up has the labels {', '.join(wanted)}; up: "
            + "; ".join(f"{r.name} [{', '.join(r.labels) or 'no labels'}]" for r in up[:10]))
    reserve = settings.APPLIANCE_STORAGE_RESERVE
    roomy = [r for r in fitting if r.free_bytes >= reserve]
    if not roomy:
        raise NoNodeAvailable(
            f"no node that is up{_having(wanted)} has room for an image of {human_size(size)}: "
            + "; ".join(f"{r.name} has {human_size(r.free_bytes)} free" for r in fitting[:10])
            + f", and {human_size(reserve)} is kept in reserve on each")
    best = min(roomy, key=lambda r: (-r.free_bytes, r.name))
    return best.name


def _explicit(name: str, wanted: list[str], rows: list[Node], *, now: datetime,
              fallback: str | None) -> str:
    by_name = {r.name: r for r in rows}
    row = by_name.get(name)
    if row is None:
        if not rows and name == fallback:
            return name
        known = ", ".join(f"{r.name} ({'up' if node_is_up(r, now=now) else 'down'})"
                          for r in rows[:10]) or "none"
        raise NodeUnavailable(f"there is no node named {name!r}; known nodes: {known}",
                              field="node", status=400)
    if not node_is_up(row, now=now):
        raise NodeUnavailable(
            f"node {name!r} is down: its last heartbeat was {_ago(row, now)}, more than "
            f"{_seconds()}; choose another node or leave node out", field="node", status=400)
    missing = [label for label in wanted if label not in row.labels]
    if missing:
        raise NodeUnavailable(
            f"node {name!r} lacks the labels {', '.join(missing)} (it has "
            f"{', '.join(row.labels) or 'none'})", field="node", status=400)
    return name


def _seconds() -> str:
    return f"{node_down_after().total_seconds():g} s"


def _ago(node: Node, now: datetime) -> str:
    return f"{node_heartbeat_age(node, now=now):.0f} s ago"


def _having(labels: list[str]) -> str:
    return f" with the labels {', '.join(labels)}" if labels else ""
