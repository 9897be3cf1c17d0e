"""Input rules for exports, shared by the model, the serializers and the services."""

from __future__ import annotations

import ipaddress
import re

from django.core.exceptions import ValidationError

from appliance.pki.validators import validate_client_name

EXPORT_NAME_MAX = 255
MAX_NETWORKS = 64
MAX_CLIENT_NAMES = 64
_EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def validate_export_name(value: object) -> None:
    """What a client puts after ``nbd://host/``: no slashes, spaces or control characters."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= EXPORT_NAME_MAX
        or not _EXPORT_NAME.fullmatch(value)
    ):
        raise ValidationError(
            "export names are 1 to %(max)d letters, digits, '.', '_', ':' or '-', starting "
            "with a letter or digit; got %(value)r",
            code="invalid_export_name",
            params={"max": EXPORT_NAME_MAX, "value": value},
        )


def normalize_networks(value: object) -> list[str]:
    """A list of CIDR strings (a bare address is a /32 or /128), deduplicated, canonical."""
    if not isinstance(value, list | tuple):
        raise ValidationError(
            "allowed_networks must be a list of CIDR networks like '192.0.2.0/24'; got %(v)r",
            code="invalid_networks",
            params={"v": value},
        )
    if len(value) > MAX_NETWORKS:
        raise ValidationError(
            "at most %(max)d networks are allowed; got %(n)d",
            code="invalid_networks",
            params={"max": MAX_NETWORKS, "n": len(value)},
        )
    out: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ValidationError(
                "each allowed network is a string like '192.0.2.0/24'; got %(v)r",
                code="invalid_network",
                params={"v": item},
            )
        try:
            network = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as exc:
            hint = ""
            try:
                loose = ipaddress.ip_network(item.strip(), strict=False)
                hint = f"; it has host bits set: did you mean '{loose}'?"
            except ValueError:
                pass
            raise ValidationError(
                "%(v)r is not a CIDR network like '192.0.2.0/24' or '2001:db8::/32'%(hint)s",
                code="invalid_network",
                params={"v": item, "hint": hint},
            ) from exc
        text = str(network)
        if text not in out:
            out.append(text)
    return out


def validate_allowed_networks(value: object) -> None:
    normalize_networks(value)


def normalize_client_names(value: object) -> list[str]:
    """Certificate names (subject CN or DNS SAN) or PSK identities: a deduplicated list."""
    if not isinstance(value, list | tuple):
        raise ValidationError(
            "allowed_clients must be a list of client names like 'backup01'; got %(v)r",
            code="invalid_client_names",
            params={"v": value},
        )
    if len(value) > MAX_CLIENT_NAMES:
        raise ValidationError(
            "at most %(max)d client names are allowed; got %(n)d",
            code="invalid_client_names",
            params={"max": MAX_CLIENT_NAMES, "n": len(value)},
        )
    out: list[str] = []
    for item in value:
        name = item.strip() if isinstance(item, str) else item
        validate_client_name(name)
        if name not in out:
            out.append(name)
    return out


def validate_allowed_clients(value: object) -> None:
    normalize_client_names(value)


def validate_node_name(value: object) -> None:
    """A host name (RFC 1123): the node whose engine serves the export."""
    labels = value.split(".") if isinstance(value, str) else []
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 253
        or not all(_HOST_LABEL.fullmatch(label) for label in labels)
    ):
        raise ValidationError(
            "node must be a host name (letters, digits and '-' in dot-separated labels of "
            "at most 63, 253 in all); got %(value)r",
            code="invalid_node",
            params={"value": value},
        )
