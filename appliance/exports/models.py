from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from appliance.storage.models import Image

from .validators import (
    EXPORT_NAME_MAX,
    validate_allowed_clients,
    validate_allowed_networks,
    validate_export_name,
    validate_node_name,
)


class TlsPolicy(models.TextChoices):
    OFF = "off", "off (plain NBD)"
    OPTIONAL = "optional", "optional (STARTTLS offered)"
    REQUIRED = "required", "required (plain connections refused)"


CLIENT_NAMES_NEED_TLS = (
    "client names can only be checked over TLS: set tls_policy to optional or required"
)


def default_node() -> str:
    return settings.APPLIANCE_NODE_NAME


class Export(models.Model):
    """An image published under an NBD export name, with its access policy."""

    name = models.CharField(max_length=EXPORT_NAME_MAX, validators=[validate_export_name])
    image = models.ForeignKey(Image, on_delete=models.PROTECT, related_name="exports")
    description = models.CharField(max_length=1024, blank=True, default="")
    read_only = models.BooleanField(default=False)
    enabled = models.BooleanField(default=True)
    allowed_networks = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_allowed_networks],
        help_text="CIDR networks whose clients may connect; empty allows every client",
    )
    multi_conn = models.BooleanField(default=True)
    tls_policy = models.CharField(max_length=8, choices=TlsPolicy.choices, default=TlsPolicy.OFF)
    allowed_clients = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_allowed_clients],
        help_text="names in client certificates (or PSK identities) that may connect over "
        "TLS; empty allows every client",
    )
    max_connections = models.PositiveIntegerField(
        default=0, help_text="clients connected at once; 0 means no limit"
    )
    node = models.CharField(
        max_length=253,
        default=default_node,
        validators=[validate_node_name],
        help_text="host whose engine serves this export",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["name"], name="exports_export_name_unique"),
            models.CheckConstraint(
                condition=models.Q(tls_policy__in=TlsPolicy.values),
                name="exports_export_tls_policy_valid",
            ),
        ]
        indexes = [models.Index(fields=["node", "enabled"], name="exports_node_enabled_idx")]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.allowed_clients and self.tls_policy == TlsPolicy.OFF:
            raise ValidationError({"allowed_clients": CLIENT_NAMES_NEED_TLS})
