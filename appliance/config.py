"""Settings helpers: environment parsing with working local defaults.

Kept apart from ``settings.py`` so they can be tested without reloading Django's settings.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "database_from_url",
    "env_bool",
    "env_choice",
    "env_labels",
    "env_number",
    "env_server_names",
    "env_size",
    "is_host_name",
    "is_node_label",
    "parse_size",
    "secret_key",
]

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """``"64T"``, ``"1 GiB"``, ``"4096"`` -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use bytes, or a number with K, M, G, T or P)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def env_size(name: str, default: str) -> int:
    return parse_size(os.environ.get(name) or default)


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """One of ``choices`` (case-insensitive); anything else is a configuration error."""
    value = (os.environ.get(name) or default).strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(
            f"{name} must be one of {', '.join(choices)}; got {os.environ.get(name)!r}"
        )
    return value


def env_number(name: str, default: float, *, minimum: float, maximum: float,
               integer: bool = True, size: bool = False) -> Any:
    """An int (or a float with ``integer=False``; a size like ``64K`` with ``size=True``)
    within ``[minimum, maximum]``."""
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return default
    what = "a size in bytes" if size else "a whole number" if integer else "a number"
    try:
        value: float = parse_size(raw) if size else int(raw) if integer else float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be {what}; got {raw!r}") from None
    if not minimum <= value <= maximum:  # also refuses nan
        raise ImproperlyConfigured(
            f"{name} must be {what} from {minimum:g} to {maximum:g}; got {raw!r}"
        )
    return value


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_host_name(value: str) -> bool:
    """An RFC 1123 host name (letters, digits and '-' in dot-separated labels)."""
    labels = value.split(".")
    return 1 <= len(value) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


_NODE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:=/-]{0,62}")
MAX_NODE_LABELS = 32


def is_node_label(value: object) -> bool:
    """A node label: 1 to 63 letters, digits, '.', '_', ':', '=', '/' or '-', starting with
    a letter or digit (``ssd``, ``rack=a2``, ``zone/eu-west``)."""
    return isinstance(value, str) and _NODE_LABEL.fullmatch(value) is not None


def env_labels(name: str) -> list[str]:
    """Comma-separated node labels (see ``is_node_label``), deduplicated, in order."""
    out: list[str] = []
    for item in (os.environ.get(name) or "").split(","):
        item = item.strip()
        if not item:
            continue
        if not is_node_label(item):
            raise ImproperlyConfigured(
                f"{name} lists labels separated by commas, each 1 to 63 letters, digits, "
                f"'.', '_', ':', '=', '/' or '-' starting with a letter or digit; got {item!r}"
            )
        if item not in out:
            out.append(item)
    if len(out) > MAX_NODE_LABELS:
        raise ImproperlyConfigured(f"{name} lists {len(out)} labels; at most "
                                   f"{MAX_NODE_LABELS} are allowed")
    return out


def env_server_names(name: str) -> list[str]:
    """Comma-separated host names (``*.example.net`` allowed) or IP addresses."""
    out: list[str] = []
    for item in (os.environ.get(name) or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            item = str(ipaddress.ip_address(item))
        except ValueError:
            host = item[2:] if item.startswith("*.") else item
            if not is_host_name(host):
                raise ImproperlyConfigured(
                    f"{name} lists host names or IP addresses separated by commas; "
                    f"{item!r} is neither"
                ) from None
        if item not in out:
            out.append(item)
    return out


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def secret_key(var_dir: Path) -> str:
    """``DJANGO_SECRET_KEY`` if set, else a key generated once and kept in ``var/secret_key``.

    The file is created with mode 0600 and published with ``link()``, so two processes
    starting at once agree on one key.
    """
    from_env = os.environ.get("DJANGO_SECRET_KEY")
    if from_env:
        return from_env
    path = var_dir / "secret_key"
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    var_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    tmp = var_dir / f".secret_key.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_text().strip()  # another process published its key first
        return key
    finally:
        tmp.unlink(missing_ok=True)


def database_from_url(url: str | None, *, default_sqlite: Path) -> dict[str, Any]:
    """A ``DATABASES["default"]`` entry from ``DATABASE_URL``.

    Unset or empty: SQLite at ``default_sqlite``. ``postgres://`` / ``postgresql://``
    (``user:password@host:port/name?sslmode=...``): PostgreSQL through psycopg 3.
    ``sqlite:///relative.db`` or ``sqlite:////absolute.db``: SQLite at that path.
    """
    if not url:
        return _sqlite(default_sqlite)
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if scheme in {"postgres", "postgresql", "pgsql"}:
        name = unquote(parts.path.lstrip("/"))
        if not name:
            raise ValueError(f"DATABASE_URL names no database: {url!r}")
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "OPTIONS": dict(parse_qsl(parts.query)),
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
        }
    if scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ValueError(f"DATABASE_URL names no SQLite file: {url!r}")
        return _sqlite(Path(unquote(path)))
    raise ValueError(f"DATABASE_URL scheme {parts.scheme!r} is not supported (postgresql, sqlite)")


def _sqlite(path: Path) -> dict[str, Any]:
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": path,
        # The web process and the engine worker write sessions concurrently: take the write
        # lock at BEGIN (no upgrade deadlocks), wait for it, and let readers run beside it.
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }
