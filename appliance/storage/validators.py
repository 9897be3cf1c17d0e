"""Input rules for images, shared by the model, the serializers and the services."""

from __future__ import annotations

import re

from django.conf import settings
from django.core.exceptions import ValidationError

from appliance.errors import human_size

SECTOR = 512
IMAGE_NAME_MAX = 128
_IMAGE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{IMAGE_NAME_MAX - 1}}}")


def validate_image_name(value: object) -> None:
    """A display name, never a path: the appliance chooses where the file lives."""
    if not isinstance(value, str) or not _IMAGE_NAME.fullmatch(value):
        raise ValidationError(
            "image names are 1 to %(max)d letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (a name, not a path); got %(value)r",
            code="invalid_name",
            params={"max": IMAGE_NAME_MAX, "value": value},
        )


def validate_image_size(value: object) -> None:
    low, high = settings.APPLIANCE_IMAGE_MIN_SIZE, settings.APPLIANCE_IMAGE_MAX_SIZE
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value % SECTOR
        or not low <= value <= high
    ):
        raise ValidationError(
            "size must be a multiple of %(sector)d bytes between %(low)s and %(high)s "
            "(%(high_bytes)d bytes); got %(value)r",
            code="invalid_size",
            params={
                "sector": SECTOR,
                "low": human_size(low),
                "high": human_size(high),
                "high_bytes": high,
                "value": value,
            },
        )
