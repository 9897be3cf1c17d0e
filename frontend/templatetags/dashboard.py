"""Filters of the dashboard's templates."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()

_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


@register.filter
def size(value: Any) -> str:
    """Bytes for people: ``1.5 GiB``; an em dash when unknown."""
    if value is None or value == "":
        return "—"
    n = float(value)
    for unit, scale in _UNITS:
        if abs(n) >= scale:
            amount = n / scale
            return f"{amount:.0f} {unit}" if amount == int(amount) else f"{amount:.1f} {unit}"
    return f"{n:.0f} B"


@register.filter
def rate(value: Any) -> str:
    """Bytes per second."""
    return "0 B/s" if not value else f"{size(value)}/s"


@register.filter
def share(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.0f}%"


@register.filter
def ago(seconds: Any) -> str:
    """A heartbeat's age: ``3 s``, ``4 min``, ``2 h``, ``3 d`` (an em dash when unknown)."""
    if seconds is None or seconds == "":
        return "—"
    n = float(seconds)
    for unit, scale in (("d", 86400), ("h", 3600), ("min", 60)):
        if n >= scale:
            return f"{n // scale:.0f} {unit}"
    return f"{n:.0f} s"
