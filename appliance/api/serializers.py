"""Serializers: shapes and field rules. Writes go through the services (see views.py)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from appliance.exports.models import Export, TlsPolicy
from appliance.exports.selectors import export_tls_uri, export_uri
from appliance.exports.validators import (
    normalize_client_names,
    normalize_networks,
    validate_export_name,
)
from appliance.sessions.models import (
    FEATURES,
    ClientSession,
    ConnectionRefusal,
    ExportSample,
    Fingerprint,
    RefusalKind,
)
from appliance.storage.models import Image
from appliance.storage.validators import validate_image_name, validate_image_size

# ------------------------------------------------------------------ images


class ImageSerializer(serializers.ModelSerializer):
    virtual_size = serializers.IntegerField(
        source="usage.virtual_size",
        read_only=True,
        allow_null=True,
        help_text="st_size of the file, in bytes (null if the file is missing)",
    )
    allocated_size = serializers.IntegerField(
        source="usage.allocated_size",
        read_only=True,
        allow_null=True,
        help_text="st_blocks * 512: bytes the sparse file really occupies",
    )
    exports = serializers.SlugRelatedField(many=True, read_only=True, slug_field="name")

    class Meta:
        model = Image
        fields = [
            "id",
            "name",
            "description",
            "size",
            "virtual_size",
            "allocated_size",
            "cloned_from",
            "exports",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["cloned_from", "created_at", "updated_at"]
        extra_kwargs = {
            # Uniqueness is checked in validate_name (a kinder message than DRF's default)
            # and enforced by the database constraint.
            "name": {"validators": [validate_image_name]},
            "size": {
                "validators": [validate_image_size],
                "help_text": "virtual size in bytes: a multiple of 512",
            },
        }

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        if self.instance is not None:
            fields["size"].required = False  # an update never carries it (see validate)
        return fields

    def validate_name(self, value: str) -> str:
        others = Image.objects.filter(name=value)
        if self.instance is not None:
            others = others.exclude(pk=self.instance.pk)
        other = others.first()
        if other is not None:
            raise serializers.ValidationError(
                f"an image named {value!r} already exists (id {other.pk}); choose another name"
            )
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if self.instance is not None and "size" in self.initial_data:
            raise serializers.ValidationError(
                {
                    "size": [
                        "the size of an existing image changes with POST "
                        f"/api/v1/images/{self.instance.pk}/grow "
                        '{"size": N} (shrinking also needs "force": true)'
                    ]
                }
            )
        return attrs


class ImageGrowSerializer(serializers.Serializer):
    size = serializers.IntegerField(
        validators=[validate_image_size], help_text="new virtual size in bytes"
    )
    force = serializers.BooleanField(
        default=False, help_text="confirm a shrink (refused anyway while exported)"
    )


class ImageCloneSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=128, validators=[validate_image_name])
    description = serializers.CharField(max_length=1024, required=False, default="",
                                        allow_blank=True)

    def validate_name(self, value: str) -> str:
        other = Image.objects.filter(name=value).first()
        if other is not None:
            raise serializers.ValidationError(
                f"an image named {value!r} already exists (id {other.pk}); choose another name"
            )
        return value


class ImageUploadQuerySerializer(ImageCloneSerializer):
    """Query parameters of ``POST /api/v1/images/import?name=...``."""


class StorageUsageSerializer(serializers.Serializer):
    images = serializers.IntegerField()
    provisioned = serializers.IntegerField(help_text="sum of the images' virtual sizes")
    quota = serializers.IntegerField(help_text="provisioning quota in bytes")
    free = serializers.IntegerField(help_text="bytes free on the storage filesystem")
    reserve = serializers.IntegerField(help_text="free bytes never given to images")


# ------------------------------------------------------------------ exports


class ExportSerializer(serializers.ModelSerializer):
    image = serializers.PrimaryKeyRelatedField(queryset=Image.objects.all())
    image_name = serializers.CharField(source="image.name", read_only=True)
    allowed_networks = serializers.ListField(
        child=serializers.CharField(max_length=64),
        required=False,
        default=list,
        help_text="CIDR networks whose clients may connect; empty allows every client",
    )
    tls_policy = serializers.ChoiceField(choices=TlsPolicy.choices, default=TlsPolicy.OFF)
    allowed_clients = serializers.ListField(
        child=serializers.CharField(trim_whitespace=False),  # validate_allowed_clients rules
        required=False,
        default=list,
        help_text="names in client certificates (subject CN or DNS names) or PSK identities "
        "that may connect, over TLS only; empty allows every client",
    )
    active_sessions = serializers.SerializerMethodField()
    uri = serializers.SerializerMethodField(
        help_text="URI clients connect to: nbds:// when the export requires TLS, else nbd://")
    tls_uri = serializers.SerializerMethodField(
        help_text="nbds:// URI when TLS is offered for this export (policy optional or "
        "required), else null")

    class Meta:
        model = Export
        fields = [
            "id",
            "name",
            "image",
            "image_name",
            "description",
            "read_only",
            "enabled",
            "allowed_networks",
            "multi_conn",
            "tls_policy",
            "allowed_clients",
            "max_connections",
            "node",
            "uri",
            "tls_uri",
            "active_sessions",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["created_at", "updated_at"]
        extra_kwargs = {
            "name": {"validators": [validate_export_name]},
            "node": {"required": False},
        }

    def validate_name(self, value: str) -> str:
        others = Export.objects.filter(name=value).select_related("image")
        if self.instance is not None:
            others = others.exclude(pk=self.instance.pk)
        other = others.first()
        if other is not None:
            raise serializers.ValidationError(
                f"export name {value!r} is already taken by the export of image "
                f"{other.image.name!r}; choose another name"
            )
        return value

    def validate_allowed_networks(self, value: list[str]) -> list[str]:
        return normalize_networks(value)

    def validate_allowed_clients(self, value: list[str]) -> list[str]:
        return normalize_client_names(value)

    @extend_schema_field(OpenApiTypes.STR)
    def get_uri(self, export: Export) -> str:
        return export_uri(export)

    @extend_schema_field({"type": "string", "nullable": True})
    def get_tls_uri(self, export: Export) -> str | None:
        return export_tls_uri(export)

    @extend_schema_field(OpenApiTypes.INT)
    def get_active_sessions(self, export: Export) -> int:
        annotated = getattr(export, "active_sessions", None)
        if annotated is not None:
            return int(annotated)
        return export.sessions.filter(disconnected_at__isnull=True).count()


# ------------------------------------------------------------------ sessions


class ClientSessionSerializer(serializers.ModelSerializer):
    active = serializers.BooleanField(read_only=True)
    features = serializers.SerializerMethodField()
    fingerprint = serializers.ChoiceField(choices=Fingerprint.choices, read_only=True)
    live = serializers.SerializerMethodField(
        help_text="the engine's counters of this connection now (active sessions only)")

    class Meta:
        model = ClientSession
        fields = [
            "id",
            "node",
            "engine_run",
            "connection_id",
            "export",
            "export_name",
            "peer",
            "peer_address",
            "peer_port",
            "connected_at",
            "disconnected_at",
            "active",
            "close_reason",
            "fingerprint",
            "fingerprint_reason",
            "via",
            "features",
            "ops_total",
            "reads",
            "writes",
            "bytes_read",
            "bytes_written",
            "hole_bytes",
            "zero_bytes",
            "errors_total",
            "negotiated",
            "stats",
            "live",
            "updated_at",
        ]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_live(self, session: ClientSession) -> dict[str, Any] | None:
        live: dict[int, dict[str, Any]] = self.context.get("live") or {}
        return live.get(session.pk)

    @extend_schema_field(
        {"type": "object", "properties": {name: {"type": "boolean"} for name in FEATURES}}
    )
    def get_features(self, session: ClientSession) -> dict[str, bool]:
        return {name: getattr(session, name) for name in FEATURES}


class ConnectionRefusalSerializer(serializers.ModelSerializer):
    kind = serializers.ChoiceField(
        choices=RefusalKind.choices, read_only=True,
        help_text="why: " + ", ".join(f"{k} ({label})" for k, label in RefusalKind.choices if k))
    kind_label = serializers.CharField(source="get_kind_display", read_only=True)

    class Meta:
        model = ConnectionRefusal
        fields = ["id", "at", "node", "engine_run", "connection_id", "peer", "peer_address",
                  "export_name", "kind", "kind_label", "reason", "tls", "tls_names"]
        read_only_fields = fields


class ExportHistoryQuerySerializer(serializers.Serializer):
    seconds = serializers.IntegerField(
        min_value=10, max_value=366 * 86400, default=3600,
        help_text="how far back, in seconds (default one hour)")


class ExportSampleSerializer(serializers.ModelSerializer):
    class Meta:
        model = ExportSample
        fields = ["at", "node", "clients", "sessions", "ops", "bytes_read", "bytes_written",
                  "hole_bytes", "zero_bytes", "errors", "latency_sum_us", "latency_count"]
        read_only_fields = fields


# ------------------------------------------------------------------ statistics


class FeatureStatsQuerySerializer(serializers.Serializer):
    since = serializers.DateTimeField(required=False, help_text="connected at or after (ISO 8601)")
    until = serializers.DateTimeField(required=False, help_text="connected before (ISO 8601)")
    export = serializers.CharField(required=False, help_text="only sessions of this export name")
    node = serializers.CharField(required=False, help_text="only sessions seen on this node")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        since, until = attrs.get("since"), attrs.get("until")
        if since is not None and until is not None and until <= since:
            raise serializers.ValidationError(
                {"until": [f"until must be later than since ({since.isoformat()})"]}
            )
        return attrs


_FEATURE_MAP = {
    "type": "object",
    "properties": {
        name: {
            "type": "object",
            "properties": {
                "sessions": {"type": "integer"},
                "share": {"type": "number", "nullable": True},
            },
        }
        for name in FEATURES
    },
}


class FeatureStatsSerializer(serializers.Serializer):
    since = serializers.DateTimeField(allow_null=True)
    until = serializers.DateTimeField(allow_null=True)
    sessions = serializers.IntegerField(help_text="sessions in the range")
    features = serializers.SerializerMethodField()
    by_fingerprint = serializers.SerializerMethodField()

    @extend_schema_field(_FEATURE_MAP)
    def get_features(self, stats: dict[str, Any]) -> dict[str, Any]:
        return stats["features"]

    @extend_schema_field(
        {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "properties": {"sessions": {"type": "integer"}, "features": _FEATURE_MAP},
            },
            "description": f"keyed by fingerprint: {', '.join(Fingerprint.values)}",
        }
    )
    def get_by_fingerprint(self, stats: dict[str, Any]) -> dict[str, Any]:
        return stats["by_fingerprint"]


class TokenRequestSerializer(serializers.Serializer):
    username = serializers.CharField()
    password = serializers.CharField(style={"input_type": "password"}, trim_whitespace=False)


class TokenResponseSerializer(serializers.Serializer):
    token = serializers.CharField(help_text='send as "Authorization: Token <token>"')
