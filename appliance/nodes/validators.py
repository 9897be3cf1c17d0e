"""Input rules of nodes: names are host names (as exports' ``node``), labels short words."""

from __future__ import annotations

from django.core.exceptions import ValidationError

from appliance.config import MAX_NODE_LABELS, is_node_label
from appliance.exports.validators import validate_node_name

__all__ = ["normalize_labels", "validate_labels", "validate_node_name"]


def normalize_labels(value: object) -> list[str]:
    """A list of labels (``ssd``, ``rack=a2``), stripped and deduplicated, in order."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValidationError(
            "labels must be a list of labels like ['ssd', 'rack=a2']; got %(v)r",
            code="invalid_labels", params={"v": value},
        )
    out: list[str] = []
    for item in value:
        label = item.strip() if isinstance(item, str) else item
        if not is_node_label(label):
            raise ValidationError(
                "a label is 1 to 63 letters, digits, '.', '_', ':', '=', '/' or '-', starting "
                "with a letter or digit; got %(v)r",
                code="invalid_label", params={"v": item},
            )
        if label not in out:
            out.append(label)
    if len(out) > MAX_NODE_LABELS:
        raise ValidationError(
            "at most %(max)d labels are allowed; got %(n)d",
            code="invalid_labels", params={"max": MAX_NODE_LABELS, "n": len(out)},
        )
    return out


def validate_labels(value: object) -> None:
    normalize_labels(value)
