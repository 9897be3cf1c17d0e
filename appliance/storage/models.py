from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from django.db import models

from .validators import IMAGE_NAME_MAX, validate_image_name, validate_image_size

if TYPE_CHECKING:
    from .selectors import ImageUsage


class Image(models.Model):
    """A sparse raw disk image: one file under ``STORAGE_ROOT`` named by the appliance."""

    name = models.CharField(max_length=IMAGE_NAME_MAX, validators=[validate_image_name])
    description = models.CharField(max_length=1024, blank=True, default="")
    size = models.BigIntegerField(
        validators=[validate_image_size], help_text="virtual size in bytes, as provisioned"
    )
    filename = models.CharField(max_length=64, unique=True, editable=False)
    cloned_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="clones"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["name"], name="storage_image_name_unique")]

    def __str__(self) -> str:
        return self.name

    @property
    def path(self) -> Path:
        from .services import image_path

        return image_path(self)

    @cached_property
    def usage(self) -> ImageUsage:
        """Virtual and allocated size, read from the file (once per instance)."""
        from .selectors import image_usage

        return image_usage(self)
