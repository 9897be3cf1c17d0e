from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import models

from appliance.exports.validators import validate_node_name

from .validators import IMAGE_NAME_MAX, validate_image_name, validate_image_size

if TYPE_CHECKING:
    from .selectors import ImageUsage


def default_node() -> str:
    return settings.APPLIANCE_NODE_NAME


class Image(models.Model):
    """A sparse raw disk image: one file under the ``STORAGE_ROOT`` of its ``node``, named
    by the appliance."""

    name = models.CharField(max_length=IMAGE_NAME_MAX, validators=[validate_image_name])
    description = models.CharField(max_length=1024, blank=True, default="")
    size = models.BigIntegerField(
        validators=[validate_image_size], help_text="virtual size in bytes, as provisioned"
    )
    filename = models.CharField(max_length=64, unique=True, editable=False)
    cloned_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="clones"
    )
    node = models.CharField(
        max_length=253,
        default=default_node,
        db_index=True,
        validators=[validate_node_name],
        help_text="node whose storage root holds the file (its exports are served there)",
    )
    # A move to another node in progress (see appliance/storage/move.py): the target, the
    # secret naming the source engine's hidden export for the copy, and why the last move
    # failed, if it did.
    moving_to = models.CharField(max_length=253, blank=True, default="")
    move_token = models.CharField(max_length=64, blank=True, default="", editable=False)
    move_error = models.TextField(blank=True, default="")
    # An upload being written into this image on its node, through a hidden writable export
    # of that node's engine (see appliance/storage/move.py): the secret in its name.
    import_token = models.CharField(max_length=64, blank=True, default="", editable=False)
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
