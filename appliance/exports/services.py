"""Export services: publish an image under an NBD name, change its policy, withdraw it.

The engine side (issue 4) converges on these rows; a service here only changes the database.
An export is served by the node that holds its image: ``Export.node`` is always
``export.image.node`` (set here on publish, and again whenever the export changes image).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from appliance.engine.control import sync_on_commit
from appliance.errors import ExportNameTaken
from appliance.storage.models import Image

from .models import Export, TlsPolicy
from .validators import normalize_client_names, normalize_networks

__all__ = ["export_delete", "export_publish", "export_update"]

log = logging.getLogger(__name__)

_UPDATABLE = frozenset(
    {
        "name",
        "image",
        "description",
        "read_only",
        "enabled",
        "allowed_networks",
        "multi_conn",
        "tls_policy",
        "allowed_clients",
        "max_connections",
        "node",
    }
)


def export_publish(
    *,
    image: Image,
    name: str,
    description: str = "",
    read_only: bool = False,
    enabled: bool = True,
    allowed_networks: Iterable[str] = (),
    multi_conn: bool = True,
    tls_policy: str = TlsPolicy.OFF,
    allowed_clients: Iterable[str] = (),
    max_connections: int = 0,
    node: str | None = None,
) -> Export:
    """Publish ``image`` as ``name``, served by the image's node. ``node``, if given, must
    be that node (it is only checked: an export cannot be served elsewhere)."""
    _check_node(image, node)
    export = Export(
        image=image,
        name=name,
        description=description,
        read_only=read_only,
        enabled=enabled,
        allowed_networks=_networks(allowed_networks),
        multi_conn=multi_conn,
        tls_policy=tls_policy,
        allowed_clients=_client_names(allowed_clients),
        max_connections=max_connections,
        node=image.node,
    )
    _save(export, force_insert=True)
    sync_on_commit(export.node)
    log.info("published image %s as export %s on %s", image.name, name, export.node)
    return export


def export_update(*, export: Export, **changes: Any) -> Export:
    """Change some of an export's fields (those ``export_publish`` takes). A new image
    brings its node along; ``node`` alone may only be set to the image's node (what a move
    of the image does once the image's node changed)."""
    unknown = set(changes) - _UPDATABLE
    if unknown:
        raise TypeError(f"export_update() got unexpected fields: {', '.join(sorted(unknown))}")
    image = changes.get("image", export.image)
    _check_node(image, changes.get("node"))
    changes["node"] = image.node
    if "allowed_networks" in changes:
        changes["allowed_networks"] = _networks(changes["allowed_networks"])
    if "allowed_clients" in changes:
        changes["allowed_clients"] = _client_names(changes["allowed_clients"])
    old_node = export.node
    for field, value in changes.items():
        setattr(export, field, value)
    _save(export)
    sync_on_commit(old_node, export.node)
    return export


def export_delete(*, export: Export) -> None:
    """Withdraw an export. The sessions it had keep their history, detached from it
    (``ClientSession.export`` becomes NULL; ``export_name`` stays).

    The export's row is locked before its sessions are detached, and the engine locks it
    too before it records a session (``session_record_from_engine``): one lock order,
    export then sessions. So a session recorded meanwhile either commits before the
    sessions are detached (and is detached with them) or waits and is recorded without an
    export. Without the lock, a session committed between the detaching UPDATE and the
    DELETE still referenced the export, and on PostgreSQL the deletion failed at commit
    with an IntegrityError (the foreign key is checked when the transaction ends).
    """
    name, node = export.name, export.node
    with transaction.atomic():
        locked = Export.objects.select_for_update().filter(pk=export.pk).first()
        if locked is not None:  # else someone else withdrew it first: nothing to delete
            locked.delete()
        sync_on_commit(node)
    log.info("withdrew export %s", name)


def _check_node(image: Image, node: str | None) -> None:
    if node is not None and node != image.node:
        raise ValidationError({"node": [
            f"an export is served by the node that holds its image: image {image.name!r} is "
            f"on node {image.node!r}, not {node!r} (move the image to serve it from there)"
        ]})


def _networks(value: object) -> list[str]:
    if not isinstance(value, str | bytes | list | tuple):
        value = list(value)  # type: ignore[call-overload]
    try:
        return normalize_networks(value)
    except ValidationError as exc:
        raise ValidationError({"allowed_networks": exc.messages}) from exc


def _client_names(value: object) -> list[str]:
    if not isinstance(value, str | bytes | list | tuple):
        value = list(value)  # type: ignore[call-overload]
    try:
        return normalize_client_names(value)
    except ValidationError as exc:
        raise ValidationError({"allowed_clients": exc.messages}) from exc


def _save(export: Export, *, force_insert: bool = False) -> None:
    export.full_clean(validate_unique=False, validate_constraints=False)
    try:
        with transaction.atomic():
            export.save(force_insert=force_insert)
    except IntegrityError as exc:
        other = Export.objects.filter(name=export.name).exclude(pk=export.pk).first()
        if other is not None:
            raise ExportNameTaken(
                f"export name {export.name!r} is already taken by the export of image "
                f"{other.image.name!r}; choose another name"
            ) from exc
        raise
