"""Reads about images. Sizes come from the files: read here for the images of this host,
and for the images of other nodes from what those nodes measured (``Node.image_usage``,
written at each heartbeat and after each storage operation they run)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db.models import Count, QuerySet, Sum
from django.db.models.query import ModelIterable

from .models import Image
from .remote import is_local
from .services import image_path


@dataclass(frozen=True, slots=True)
class ImageUsage:
    """Sizes of the image's file; ``None`` when the file is missing, or when it is on
    another node that has not measured it yet."""

    virtual_size: int | None  # st_size
    allocated_size: int | None  # st_blocks * 512: what the sparse file really occupies


UNKNOWN = ImageUsage(None, None)


def image_usage(image: Image) -> ImageUsage:
    """The sizes of one image's file: ``stat`` here when this host holds it, else the
    sizes its node last measured (its last heartbeat, at most a few seconds old, or its
    last storage operation; a node that is down keeps its last measurement)."""
    return image_usages([image])[image.pk]


def image_usages(images: Iterable[Image]) -> dict[int, ImageUsage]:
    """``image_usage`` of many images by id, with one query for all the other nodes'
    measurements (not one per image)."""
    images = list(images)
    remote = {image.node for image in images if not is_local(image.node)}
    measured = _measurements(remote) if remote else {}
    usages = {}
    for image in images:
        if is_local(image.node):
            usages[image.pk] = _stat_usage(image)
        else:
            sizes = measured.get(image.node, {}).get(str(image.pk))
            usages[image.pk] = ImageUsage(*sizes) if _sizes_ok(sizes) else UNKNOWN
    return usages


def _stat_usage(image: Image) -> ImageUsage:
    try:
        st = os.stat(image_path(image))
    except FileNotFoundError:
        return UNKNOWN
    return ImageUsage(st.st_size, st.st_blocks * 512)


def _measurements(nodes: set[str]) -> dict[str, dict[str, Any]]:
    from appliance.nodes.models import Node

    rows = Node.objects.filter(name__in=nodes).values_list("name", "image_usage")
    return {name: usage if isinstance(usage, dict) else {} for name, usage in rows}


def _sizes_ok(sizes: Any) -> bool:
    return (isinstance(sizes, list) and len(sizes) == 2
            and all(isinstance(n, int) and n >= 0 for n in sizes))


class _ImagesWithUsage(ModelIterable):
    """The images a query yields, each with ``Image.usage`` (a cached property) already
    filled in for the whole batch: a page of images on other nodes costs one query for
    their sizes, not one per image."""

    def __iter__(self) -> Iterator[Image]:
        images = list(super().__iter__())
        usages = image_usages(images)
        for image in images:
            image.__dict__["usage"] = usages[image.pk]
            yield image


def image_list() -> QuerySet[Image]:
    """Images with their exports, and their sizes read in one batch when evaluated."""
    return with_usage(Image.objects.prefetch_related("exports"))


def with_usage(images: QuerySet[Image]) -> QuerySet[Image]:
    """``images`` whose evaluation fills in every image's ``usage`` in one batch (the
    iterable class is kept by filter(), order_by(), slicing and get())."""
    images = images.all()
    images._iterable_class = _ImagesWithUsage
    return images


@dataclass(frozen=True, slots=True)
class StorageUsage:
    images: int
    provisioned: int  # sum of virtual sizes
    quota: int
    free: int  # bytes free for images: this host's storage root, and every other node up
    reserve: int
    nodes: int = 1  # storage roots counted in ``free``


def storage_usage() -> StorageUsage:
    totals = Image.objects.aggregate(images=Count("pk"), provisioned=Sum("size"))
    free, nodes = storage_free()
    return StorageUsage(
        images=totals["images"],
        provisioned=totals["provisioned"] or 0,
        quota=settings.APPLIANCE_PROVISION_QUOTA,
        free=free,
        reserve=settings.APPLIANCE_STORAGE_RESERVE,
        nodes=nodes,
    )


def storage_free() -> tuple[int, int]:
    """Bytes free where images can go, and on how many storage roots: this host's root
    read now (when this host has storage), plus each other node that is up, as its last
    heartbeat measured it. A central host counts the nodes only; a node that is down
    counts for nothing (nothing can be placed on it). Two nodes whose roots share one
    filesystem are counted twice."""
    from appliance.nodes.selectors import nodes_up

    here = settings.APPLIANCE_NODE_NAME if is_local(settings.APPLIANCE_NODE_NAME) else None
    free, roots = (_local_free(), 1) if here else (0, 0)
    for other in nodes_up().exclude(name=here or "").values_list("free_bytes", flat=True):
        free, roots = free + max(other, 0), roots + 1
    return free, roots


def _local_free() -> int:
    root = settings.STORAGE_ROOT
    try:
        st = os.statvfs(root)
    except FileNotFoundError:
        st = os.statvfs(os.path.dirname(os.path.abspath(root)) or "/")
    return st.f_bavail * st.f_frsize
