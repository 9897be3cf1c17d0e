"""Reads about images: sizes come from the files themselves."""

from __future__ import annotations

import os
from dataclasses import dataclass

from django.conf import settings
from django.db.models import Count, QuerySet, Sum

from .models import Image
from .services import image_path


@dataclass(frozen=True, slots=True)
class ImageUsage:
    """Sizes read from the image file; ``None`` when the file is missing."""

    virtual_size: int | None  # st_size
    allocated_size: int | None  # st_blocks * 512: what the sparse file really occupies


def image_usage(image: Image) -> ImageUsage:
    try:
        st = os.stat(image_path(image))
    except FileNotFoundError:
        return ImageUsage(None, None)
    return ImageUsage(st.st_size, st.st_blocks * 512)


def image_list() -> QuerySet[Image]:
    return Image.objects.prefetch_related("exports")


@dataclass(frozen=True, slots=True)
class StorageUsage:
    images: int
    provisioned: int  # sum of virtual sizes
    quota: int
    free: int  # bytes free on the storage root's filesystem
    reserve: int


def storage_usage() -> StorageUsage:
    totals = Image.objects.aggregate(images=Count("pk"), provisioned=Sum("size"))
    root = settings.STORAGE_ROOT
    try:
        st = os.statvfs(root)
        free = st.f_bavail * st.f_frsize
    except FileNotFoundError:
        st = os.statvfs(os.path.dirname(os.path.abspath(root)) or "/")
        free = st.f_bavail * st.f_frsize
    return StorageUsage(
        images=totals["images"],
        provisioned=totals["provisioned"] or 0,
        quota=settings.APPLIANCE_PROVISION_QUOTA,
        free=free,
        reserve=settings.APPLIANCE_STORAGE_RESERVE,
    )
