"""Moving an image to another node: an online copy over NBD of the allocated extents only.

1. ``image_move_start`` marks the image (``moving_to``, a secret ``move_token``) and
   queues ``storage.move``. From then on the source node's engine serves the image's
   exports read-only (writes would be lost by the copy) and publishes it once more as a
   hidden, read-only export named ``.move-<token>``: the token is the secret, the name
   never appears in NBD_OPT_LIST, and user export names cannot start with a dot.
2. ``storage.move`` (any worker of the ``appliance`` queue) asks the target node to
   ``move_in``: the target makes a new sparse file, connects to the source engine with
   ``nbdcore.client``, copies the data extents that ``base:allocation`` reports (holes are
   never sent), syncs, then reads the source again and checks both digests and the
   copy's own data.
3. Only a verified copy is switched to: in one transaction the image gets its new node and
   file name and its exports follow; both engines are told (the source withdraws, the
   target publishes, at the target's address). The old file is removed last, on the
   source node. Any failure before the switch removes the partial copy and leaves the
   image where it was, with ``move_error`` saying why.
"""

from __future__ import annotations

import logging
import os
import secrets
import ssl
import time
from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import transaction

from appliance.engine.control import sync_on_commit
from appliance.errors import ImageMoveRefused

from .models import Image
from .remote import operation, run_on_node

log = logging.getLogger(__name__)

MOVE_EXPORT_PREFIX = ".move-"
CONNECT_PATIENCE_S = 30.0  # the source engine publishes the move export within a second


def move_export_name(image: Image) -> str:
    return f"{MOVE_EXPORT_PREFIX}{image.move_token}"


# ------------------------------------------------------------------ the caller's side


def image_move_start(*, image: Image, node: str) -> Image:
    """Begin moving ``image`` to ``node``; the copy runs in the background (``storage.move``)."""
    from appliance.nodes.services import node_choose

    with transaction.atomic():
        locked = Image.objects.select_for_update().get(pk=image.pk)
        if locked.moving_to:
            raise ImageMoveRefused(
                f"image {locked.name!r} is already moving to {locked.moving_to!r}")
        if node == locked.node:
            raise ImageMoveRefused(f"image {locked.name!r} is already on node {node!r}",
                                   field="node")
        node_choose(size=locked.size, node=node)  # exists and is up, or a clear error
        locked.moving_to = node
        locked.move_token = secrets.token_hex(16)
        locked.move_error = ""
        locked.save(update_fields=["moving_to", "move_token", "move_error", "updated_at"])
        sync_on_commit(locked.node)  # read-only exports and the hidden move export
        transaction.on_commit(lambda: storage_move.delay(locked.pk))
    log.info("image %s: moving from %s to %s", locked.name, locked.node, node)
    return locked


@shared_task(name="storage.move", ignore_result=True)
def storage_move(image_id: int) -> None:
    image_move_run(image_id)


def image_move_run(image_id: int) -> Image:
    """Copy, verify, switch, clean up (see the module docstring)."""
    from appliance.nodes.models import Node

    image = Image.objects.get(pk=image_id)
    if not image.moving_to:
        return image
    source, target = image.node, image.moving_to
    origin = Node.objects.filter(name=source).first()
    host = origin.nbd_host if origin else settings.NBD_PUBLIC_HOST
    port = origin.nbd_port if origin else settings.NBD_PORT
    try:
        copied = run_on_node(target, "move_in", image=image.pk, host=host, port=port,
                             export=move_export_name(image), size=image.size)
    except Exception as exc:
        _abandon(image, f"copy to {target} failed: {exc}")
        raise
    old_filename = image.filename
    _switch(image, target, copied["filename"])
    try:
        run_on_node(source, "delete_file", node=source, filename=old_filename)
    except Exception as exc:  # the image moved; only a stale file is left behind
        log.warning("image %s moved, but its old file %s on %s stays: %s", image.name,
                    old_filename, source, exc)
    log.info("image %s moved from %s to %s (%d data bytes, %d hole bytes not sent)",
             image.name, source, target, copied["data_bytes"], copied["hole_bytes"])
    return Image.objects.get(pk=image.pk)


def _switch(image: Image, target: str, filename: str) -> None:
    from appliance.exports.models import Export

    source = image.node
    with transaction.atomic():
        locked = Image.objects.select_for_update().get(pk=image.pk)
        locked.node = target
        locked.filename = filename
        locked.moving_to = ""
        locked.move_token = ""
        locked.save(update_fields=["node", "filename", "moving_to", "move_token",
                                   "updated_at"])
        Export.objects.filter(image=locked).update(node=target)
        sync_on_commit(source)
        sync_on_commit(target)


def _abandon(image: Image, reason: str) -> None:
    with transaction.atomic():
        locked = Image.objects.select_for_update().get(pk=image.pk)
        locked.moving_to = ""
        locked.move_token = ""
        locked.move_error = reason[:1000]
        locked.save(update_fields=["moving_to", "move_token", "move_error", "updated_at"])
        sync_on_commit(locked.node)
    log.error("image %s: move abandoned: %s", image.name, reason)


# ------------------------------------------------------------------ the target's side


@operation("move_in")
def _op_move_in(*, image: int, host: str, port: int, export: str, size: int) -> dict[str, Any]:
    """Copy the source engine's move export into a new file here; verify it; return the
    file's name. The partial file is removed on any failure."""
    from nbdcore.client import copy_allocated, digest_allocated, digest_file

    from .services import _check_free_space, _fsync_dir, _new_filename, storage_root

    row = Image.objects.get(pk=image)
    _check_free_space(needed=0, action="move an image here")
    filename = _new_filename()
    path = storage_root() / filename
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        with _connect(host, port, export) as client:
            if client.size != size:
                raise ImageMoveRefused(f"the source serves {client.size} bytes, not {size}")
            copied = copy_allocated(client, fd)
            os.fsync(fd)
            again = digest_allocated(client)
        if again != copied:
            raise ImageMoveRefused(f"image {row.name!r} changed on the source during the copy")
        if digest_file(fd, copied.extents) != copied.sha256:
            raise ImageMoveRefused("the copy does not read back as written")
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    _fsync_dir(path.parent)
    return {"filename": filename, "data_bytes": copied.data_bytes,
            "hole_bytes": copied.hole_bytes, "sha256": copied.sha256}


def _connect(host: str, port: int, export: str) -> Any:
    """A node's engine, over TLS when the appliance requires it; a hidden transfer export
    may take a moment to appear after the image was marked."""
    from nbdcore.client import NbdClient, NbdClientError

    context = _tls_context() if settings.NBD_TLS_MODE == "required" else None
    deadline = time.monotonic() + CONNECT_PATIENCE_S
    while True:
        try:
            return NbdClient.connect(host, port, export, tls=context)
        except (NbdClientError, OSError) as exc:
            if time.monotonic() > deadline:
                raise ImageMoveRefused(
                    f"cannot reach the engine at {host}:{port} ({export[:8]}...): {exc}"
                ) from exc
            time.sleep(0.25)


def _tls_context() -> ssl.SSLContext:
    """Trust the appliance's own CA (from the database every node shares). The nodes share
    one server certificate whose names need not include every node's address, so the
    chain is checked and the name is not."""
    from appliance.pki.services import ca_certificate_pem

    context = ssl.create_default_context(cadata=ca_certificate_pem())
    context.check_hostname = False
    return context



# ------------------------------------------------------------------ uploads to another node

IMPORT_EXPORT_PREFIX = ".import-"


def import_export_name(image: Image) -> str:
    return f"{IMPORT_EXPORT_PREFIX}{image.import_token}"


def image_import_over_nbd(*, image: Image, stream: Any, length: int) -> Image:
    """An upload for an image placed on another node: the node creates the (sparse, empty)
    image, its engine publishes a hidden writable export of it for this upload only, and
    this host writes the upload's non-zero blocks there over NBD. A failed upload deletes
    the image again."""
    from appliance.nodes.models import Node

    from .services import image_create, image_delete, write_sparse_with

    created = image_create(name=image.name, size=length, description=image.description,
                           node=image.node)
    _set_import_token(created, secrets.token_hex(16))
    node = Node.objects.get(name=created.node)
    try:
        with _connect(node.nbd_host, node.nbd_port, import_export_name(created)) as client:
            data = write_sparse_with(lambda view, offset: client.pwrite(view, offset), stream,
                                     length)
            client.flush()
    except BaseException:
        _set_import_token(created, "")
        image_delete(image=created)
        raise
    _set_import_token(created, "")
    log.info("imported image %s on %s over NBD: %d bytes, %d of data", created.name,
             created.node, length, data)
    return created


def _set_import_token(image: Image, token: str) -> None:
    """Open ("" closes) the hidden writable export of ``image`` on its node's engine."""
    Image.objects.filter(pk=image.pk).update(import_token=token)
    image.refresh_from_db()
    sync_on_commit(image.node)
