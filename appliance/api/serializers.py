"""Serializers: shapes and field rules. Writes go through the services (see views.py)."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.utils import html

from appliance.exports.models import Export, TlsPolicy
from appliance.exports.selectors import export_tls_uri, export_uri
from appliance.exports.validators import (
    normalize_client_names,
    normalize_networks,
    validate_export_name,
)
from appliance.nodes.models import Node, NodeStatus
from appliance.nodes.selectors import node_heartbeat_age, node_is_up, node_map
from appliance.nodes.validators import normalize_labels, validate_node_name
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


class LabelsField(serializers.ListField):
    """Node labels: a JSON list, or in a query string repeated and/or comma separated
    (``?labels=ssd,rack=a2`` or ``?labels=ssd&labels=rack=a2``)."""

    child = serializers.CharField(max_length=63, trim_whitespace=True)

    def get_value(self, dictionary: Any) -> Any:
        value = super().get_value(dictionary)
        if html.is_html_input(dictionary) and isinstance(value, list):
            value = [part for item in value for part in str(item).split(",") if part.strip()]
        return value

    def to_internal_value(self, data: Any) -> list[str]:
        value = super().to_internal_value(data)
        try:
            return normalize_labels(value)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from exc


def _placement_fields() -> dict[str, serializers.Field]:
    return {
        "node": serializers.CharField(
            required=False, max_length=253, validators=[validate_node_name],
            help_text="the node to create the image on (it must be up); leave it out to let "
            "the appliance choose the node with the most free space"),
        "labels": LabelsField(
            required=False, write_only=True,
            help_text="placement only: choose among the nodes having all these labels "
            "(APPLIANCE_NODE_LABELS of each node)"),
    }


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
    node = _placement_fields()["node"]
    labels = _placement_fields()["labels"]

    class Meta:
        model = Image
        fields = [
            "id",
            "name",
            "description",
            "size",
            "node",
            "labels",
            "virtual_size",
            "allocated_size",
            "cloned_from",
            "exports",
            "moving_to",
            "move_error",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["cloned_from", "moving_to", "move_error", "created_at",
                            "updated_at"]
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
        if self.instance is not None:
            if attrs.get("node", self.instance.node) != self.instance.node:
                raise serializers.ValidationError({"node": [
                    f"image {self.instance.name!r} is on node {self.instance.node!r}: the node "
                    "is chosen when the image is created (moving it is another operation)"]})
            if "labels" in attrs:
                raise serializers.ValidationError({"labels": [
                    "labels only guide where a new image is placed; an existing image keeps "
                    "its node"]})
            attrs.pop("node", None)
        return attrs


class ImageGrowSerializer(serializers.Serializer):
    size = serializers.IntegerField(
        validators=[validate_image_size], help_text="new virtual size in bytes"
    )
    force = serializers.BooleanField(
        default=False, help_text="confirm a shrink (refused anyway while exported)"
    )


class ImageMoveSerializer(serializers.Serializer):
    node = serializers.CharField(max_length=253, help_text="the node to move the image to")


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
    """Query parameters of ``POST /api/v1/images/import?name=...`` (``&node=...`` or
    ``&labels=ssd,fast`` to choose where the new image goes)."""

    node = _placement_fields()["node"]
    labels = _placement_fields()["labels"]


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
    node = serializers.CharField(
        read_only=True, help_text="the node serving the export: the one holding its image")
    available = serializers.SerializerMethodField(
        help_text="whether the export's node is up (its engine worker beats)")
    uri = serializers.SerializerMethodField(
        help_text="URI clients connect to, naming the address of the export's node: nbds:// "
        "when the export requires TLS, else nbd://")
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
            "available",
            "uri",
            "tls_uri",
            "active_sessions",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["created_at", "updated_at"]
        extra_kwargs = {"name": {"validators": [validate_export_name]}}

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

    def _nodes(self) -> dict[str, Node]:
        """Every node, looked up once for all the exports rendered together."""
        nodes = self.context.get("nodes")
        if nodes is None:
            nodes = node_map()
            if isinstance(self.context, dict):
                self.context["nodes"] = nodes
        return nodes

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_available(self, export: Export) -> bool:
        node = self._nodes().get(export.node)
        return node is not None and node_is_up(node)

    @extend_schema_field(OpenApiTypes.STR)
    def get_uri(self, export: Export) -> str:
        return export_uri(export, nodes=self._nodes())

    @extend_schema_field({"type": "string", "nullable": True})
    def get_tls_uri(self, export: Export) -> str | None:
        return export_tls_uri(export, nodes=self._nodes())

    @extend_schema_field(OpenApiTypes.INT)
    def get_active_sessions(self, export: Export) -> int:
        annotated = getattr(export, "active_sessions", None)
        if annotated is not None:
            return int(annotated)
        return export.sessions.filter(disconnected_at__isnull=True).count()


# ------------------------------------------------------------------ nodes


class NodeSerializer(serializers.ModelSerializer):
    status = serializers.ChoiceField(
        choices=NodeStatus.choices, read_only=True,
        help_text="up while its engine worker beats (within APPLIANCE_NODE_DOWN_AFTER "
        "seconds), else down")
    heartbeat_age = serializers.SerializerMethodField(
        help_text="seconds since the last heartbeat")
    address = serializers.CharField(read_only=True, help_text="host:port NBD clients dial")
    images_count = serializers.IntegerField(read_only=True, help_text="images on this node")
    exports_count = serializers.IntegerField(read_only=True,
                                             help_text="exports served by this node")

    class Meta:
        model = Node
        fields = ["name", "status", "heartbeat_age", "last_heartbeat", "started_at", "nbd_host",
                  "nbd_port", "address", "storage_root", "capacity_bytes", "free_bytes",
                  "labels", "version", "images_count", "exports_count"]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.DOUBLE)
    def get_heartbeat_age(self, node: Node) -> float:
        return round(node_heartbeat_age(node), 1)


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
