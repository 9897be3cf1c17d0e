from __future__ import annotations

from django.db import models

from appliance.exports.models import Export

# Negotiated features, each a boolean column of ClientSession (indexed together with the
# fingerprint and the connect time, so the feature statistics are one grouped scan).
FEATURES: tuple[str, ...] = (
    "fixed_newstyle",  # client flag NBD_FLAG_C_FIXED_NEWSTYLE
    "no_zeroes",  # client flag NBD_FLAG_C_NO_ZEROES
    "structured_replies",  # agreed (STRUCTURED_REPLY, or implied by EXTENDED_HEADERS)
    "extended_headers",  # agreed EXTENDED_HEADERS (64-bit requests and replies)
    "meta_context",  # at least one meta context agreed with SET_META_CONTEXT
    "base_allocation",  # the base:allocation context agreed (block status)
    "block_size_requested",  # GO asked for NBD_INFO_BLOCK_SIZE
    "tls",  # the connection went through STARTTLS
    "opt_go",  # options the client sent, in any order and with any reply
    "opt_export_name",
    "opt_info",
    "opt_list",
    "opt_list_meta_context",
    "opt_starttls",
)


class Fingerprint(models.TextChoices):
    QEMU = "qemu", "qemu"
    LIBNBD = "libnbd", "libnbd (nbdcopy, nbdinfo, nbdsh)"
    NBD_CLIENT = "nbd-client", "nbd-client (Linux kernel)"
    UNKNOWN = "unknown", "unknown"


class ClientSession(models.Model):
    """One NBD client connection as the engine recorded it: what it negotiated and did."""

    # Identity in the engine: (node, engine_run, connection_id, connected_at) is unique.
    node = models.CharField(max_length=253)
    engine_run = models.CharField(max_length=64, blank=True, default="")
    connection_id = models.BigIntegerField()

    export = models.ForeignKey(
        Export, null=True, blank=True, on_delete=models.SET_NULL, related_name="sessions"
    )
    export_name = models.CharField(max_length=4096, blank=True, default="")
    peer = models.CharField(max_length=300, help_text="address:port as the engine saw it")
    peer_address = models.GenericIPAddressField(null=True, blank=True)
    peer_port = models.PositiveIntegerField(null=True, blank=True)
    connected_at = models.DateTimeField()
    disconnected_at = models.DateTimeField(null=True, blank=True)
    close_reason = models.CharField(max_length=500, blank=True, default="")

    negotiated = models.JSONField(default=dict, help_text="nbdcore's NegotiationRecord")
    stats = models.JSONField(default=dict, help_text="nbdcore's counters at the last update")
    via = models.CharField(
        max_length=16, blank=True, default="", help_text="GO or EXPORT_NAME; empty if none"
    )
    fingerprint = models.CharField(
        max_length=16, choices=Fingerprint.choices, default=Fingerprint.UNKNOWN
    )
    fingerprint_reason = models.CharField(max_length=300, blank=True, default="")

    fixed_newstyle = models.BooleanField(default=False)
    no_zeroes = models.BooleanField(default=False)
    structured_replies = models.BooleanField(default=False)
    extended_headers = models.BooleanField(default=False)
    meta_context = models.BooleanField(default=False)
    base_allocation = models.BooleanField(default=False)
    block_size_requested = models.BooleanField(default=False)
    tls = models.BooleanField(default=False)
    opt_go = models.BooleanField(default=False)
    opt_export_name = models.BooleanField(default=False)
    opt_info = models.BooleanField(default=False)
    opt_list = models.BooleanField(default=False)
    opt_list_meta_context = models.BooleanField(default=False)
    opt_starttls = models.BooleanField(default=False)

    ops_total = models.BigIntegerField(default=0)
    reads = models.BigIntegerField(default=0)
    writes = models.BigIntegerField(default=0)
    bytes_read = models.BigIntegerField(default=0, help_text="data bytes sent to the client")
    bytes_written = models.BigIntegerField(default=0)
    hole_bytes = models.BigIntegerField(default=0, help_text="bytes answered as holes")
    zero_bytes = models.BigIntegerField(default=0, help_text="bytes zeroed or trimmed")
    errors_total = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-connected_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["node", "engine_run", "connection_id", "connected_at"],
                name="clientsessions_engine_key",
            )
        ]
        indexes = [
            models.Index(fields=["-connected_at"], name="csess_connected_idx"),
            models.Index(fields=["export_name", "-connected_at"], name="csess_export_idx"),
            models.Index(fields=["peer_address", "-connected_at"], name="csess_peer_idx"),
            models.Index(
                fields=["connected_at"],
                condition=models.Q(disconnected_at__isnull=True),
                name="csess_active_idx",
            ),
            models.Index(
                fields=["fingerprint", "connected_at", *FEATURES], name="csess_features_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.peer} -> {self.export_name or '?'} at {self.connected_at:%Y-%m-%d %H:%M:%S}"

    @property
    def active(self) -> bool:
        return self.disconnected_at is None


class ExportSample(models.Model):
    """Cumulative counters of one export at one moment, written by the engine every ~10 s.

    Rates for plots are differences between neighbouring samples; the reconcile task
    prunes samples older than APPLIANCE_HISTORY_RETENTION.
    """

    export_name = models.CharField(max_length=4096)
    node = models.CharField(max_length=253)
    at = models.DateTimeField()
    clients = models.PositiveIntegerField(default=0)
    sessions = models.BigIntegerField(default=0, help_text="connections ended so far")
    ops = models.BigIntegerField(default=0)
    bytes_read = models.BigIntegerField(default=0)
    bytes_written = models.BigIntegerField(default=0)
    hole_bytes = models.BigIntegerField(default=0)
    zero_bytes = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)
    latency_sum_us = models.BigIntegerField(default=0)
    latency_count = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["export_name", "at"]
        indexes = [models.Index(fields=["export_name", "at"], name="esample_export_at_idx"),
                   models.Index(fields=["at"], name="esample_at_idx")]

    def __str__(self) -> str:
        return f"{self.export_name} at {self.at:%Y-%m-%d %H:%M:%S}"


class RefusalKind(models.TextChoices):
    """Why the engine refused a client (nbdcore's ``ConnectionInfo.refusal_kind``)."""

    TIMEOUT = "timeout", "handshake not finished in time"
    TLS_HANDSHAKE = "tls_handshake", "TLS handshake failed"
    TLS_REQUIRED = "tls_required", "TLS required"
    NOT_ALLOWED = "not_allowed", "network not allowed"
    CLIENT_NOT_ALLOWED = "client_not_allowed", "client name not allowed"
    LIMIT = "limit", "export connection limit"
    UNKNOWN_EXPORT = "unknown_export", "unknown export"
    DISABLED = "disabled", "export disabled"
    PROTOCOL = "protocol", "protocol error"
    TOO_MANY_CONNECTIONS = "too_many_connections", "server connection limit"
    OTHER = "", "other"


class ConnectionRefusal(models.Model):
    """A client the engine turned away, and why: written by the engine worker, pruned with
    the history samples (APPLIANCE_HISTORY_RETENTION)."""

    # Identity in the engine, like ClientSession's: a retried write stores one row.
    node = models.CharField(max_length=253)
    engine_run = models.CharField(max_length=64, blank=True, default="")
    connection_id = models.BigIntegerField()
    at = models.DateTimeField(help_text="when the engine gave up on the connection")
    peer = models.CharField(max_length=300, help_text="address:port as the engine saw it")
    peer_address = models.GenericIPAddressField(null=True, blank=True)
    export_name = models.CharField(
        max_length=4096, blank=True, default="",
        help_text="the export the client last asked for; empty if it named none",
    )
    kind = models.CharField(max_length=32, blank=True, default="", choices=RefusalKind.choices)
    reason = models.CharField(max_length=500, blank=True, default="")
    tls = models.BooleanField(default=False, help_text="the connection had gone through TLS")
    tls_names = models.JSONField(
        default=list, blank=True, help_text="verified certificate names or PSK identity"
    )

    class Meta:
        ordering = ["-at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["node", "engine_run", "connection_id", "at"],
                name="clientsessions_refusal_engine_key",
            )
        ]
        indexes = [
            models.Index(fields=["at"], name="crefusal_at_idx"),
            models.Index(fields=["export_name", "at"], name="crefusal_export_at_idx"),
        ]

    def __str__(self) -> str:
        what = self.export_name or "?"
        when = f"{self.at:%Y-%m-%d %H:%M:%S}"
        return f"{self.peer} -> {what} refused ({self.kind or 'other'}) at {when}"
