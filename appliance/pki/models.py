"""The appliance's PKI in the database.

The private keys of the CA and of the server certificate are kept here, unencrypted: the
database (PostgreSQL in production) is the appliance's trust root, as it already decides
which disks are served to whom. Back it up and protect it accordingly. A client's private
key is handed out once, when its certificate is issued, and never stored; a PSK must be
stored, since the engine needs it to check the client.
"""

from __future__ import annotations

from django.db import models

from .validators import CLIENT_NAME_MAX, validate_client_name

# Serial numbers are random 159-bit integers: kept as decimal strings (no database
# integer holds them).
SERIAL_MAX = 48


class CertificateAuthority(models.Model):
    """The one CA (row id 1) and its current certificate revocation list."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    cert_pem = models.TextField()
    key_pem = models.TextField()
    fingerprint = models.CharField(max_length=64, help_text="SHA-256 of the DER certificate")
    not_after = models.DateTimeField()
    crl_pem = models.TextField()
    crl_number = models.PositiveBigIntegerField(default=1)
    crl_next_update = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "certificate authority"
        constraints = [models.CheckConstraint(condition=models.Q(id=1), name="pki_ca_one_row")]

    def __str__(self) -> str:
        return f"CA {self.fingerprint[:16]}"


class ServerCertificate(models.Model):
    """The engine's certificate; rotation adds an active one and deactivates the old."""

    cert_pem = models.TextField()
    key_pem = models.TextField()
    serial = models.CharField(max_length=SERIAL_MAX, unique=True)
    fingerprint = models.CharField(max_length=64)
    names = models.JSONField(default=list, help_text="its DNS names and IP addresses")
    not_after = models.DateTimeField()
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["active"], condition=models.Q(active=True),
                                    name="pki_one_active_server_cert"),
        ]

    def __str__(self) -> str:
        return f"server certificate {self.serial}"


class RevocationReason(models.TextChoices):
    # The RFC 5280 reasons an operator of this appliance can mean.
    UNSPECIFIED = "unspecified", "unspecified"
    KEY_COMPROMISE = "key_compromise", "key compromise"
    AFFILIATION_CHANGED = "affiliation_changed", "affiliation changed"
    SUPERSEDED = "superseded", "superseded"
    CESSATION_OF_OPERATION = "cessation_of_operation", "cessation of operation"


class ClientCertificate(models.Model):
    """A certificate issued to a named client (its key is not kept)."""

    name = models.CharField(max_length=CLIENT_NAME_MAX, validators=[validate_client_name])
    serial = models.CharField(max_length=SERIAL_MAX, unique=True)
    fingerprint = models.CharField(max_length=64)
    cert_pem = models.TextField()
    issued_at = models.DateTimeField()
    not_after = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    revocation_reason = models.CharField(
        max_length=32, choices=RevocationReason.choices, blank=True, default=""
    )

    class Meta:
        ordering = ["name", "-issued_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["name"],
                condition=models.Q(revoked_at__isnull=True),
                name="pki_client_name_unique_unrevoked",
            ),
            models.CheckConstraint(
                condition=models.Q(revocation_reason="") | models.Q(revoked_at__isnull=False),
                name="pki_client_reason_only_if_revoked",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.serial})"

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class PskIdentity(models.Model):
    """A TLS-PSK identity and its key, as the engine's PSK file lists them."""

    name = models.CharField(max_length=CLIENT_NAME_MAX, unique=True,
                            validators=[validate_client_name])
    key_hex = models.CharField(max_length=128)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "PSK identity"
        verbose_name_plural = "PSK identities"

    def __str__(self) -> str:
        return self.name
