"""Input rules for the names of clients: certificate subjects and PSK identities."""

from __future__ import annotations

import ipaddress
import re

from django.core.exceptions import ValidationError

from appliance.config import is_host_name

CLIENT_NAME_MAX = 64
# Also the rule for an export's allowed_clients: no ':' (the PSK file separates identity
# and key with it), no spaces, nothing a shell would expand.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9._@-]+")


def validate_client_name(value: object) -> None:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= CLIENT_NAME_MAX
        or not _CLIENT_NAME.fullmatch(value)
    ):
        raise ValidationError(
            "client names are 1 to %(max)d letters, digits, '.', '_', '@' or '-' (the name in "
            "the client's certificate or its PSK identity); got %(v)r",
            code="invalid_client_name",
            params={"max": CLIENT_NAME_MAX, "v": value},
        )


def is_dns_name(name: str) -> bool:
    """Whether ``name`` may also go in a certificate as a DNS subjectAltName."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return is_host_name(name)
    return False
