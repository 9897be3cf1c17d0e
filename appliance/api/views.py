"""Viewsets and views of /api/v1/: thin, each write is one service call."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, mixins, parsers, status, viewsets
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from appliance.engine.live import export_live, live_by_session, live_sessions, node_status
from appliance.exports.selectors import (
    export_available,
    export_list,
    export_tls_uri,
    export_uri,
)
from appliance.exports.services import export_delete, export_publish, export_update
from appliance.nodes.selectors import node_list
from appliance.sessions.selectors import (
    export_history,
    refusal_list,
    session_feature_stats,
    session_list,
)
from appliance.storage.models import Image
from appliance.storage.selectors import image_list, storage_usage
from appliance.storage.services import (
    image_clone,
    image_create,
    image_create_from_upload,
    image_delete,
    image_grow,
    image_import,
    image_update,
)

from .exceptions import LengthRequired
from .filters import (
    ClientSessionFilter,
    ConnectionRefusalFilter,
    ExportFilter,
    ImageFilter,
    NodeFilter,
)
from .serializers import (
    ClientSessionSerializer,
    ConnectionRefusalSerializer,
    ExportHistoryQuerySerializer,
    ExportSampleSerializer,
    ExportSerializer,
    FeatureStatsQuerySerializer,
    FeatureStatsSerializer,
    ImageCloneSerializer,
    ImageGrowSerializer,
    ImageMoveSerializer,
    ImageSerializer,
    ImageUploadQuerySerializer,
    NodeSerializer,
    StorageUsageSerializer,
    TokenRequestSerializer,
    TokenResponseSerializer,
)

RAW = "application/octet-stream"
_RAW_BODY = {RAW: {"type": "string", "format": "binary"}}


class RawImageParser(parsers.BaseParser):
    """Declares that import endpoints take a raw body. The views read ``request.stream``
    themselves, in chunks; this parser is never asked to load the body."""

    media_type = RAW

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        raise exceptions.ParseError("a raw image body is streamed by the view, not parsed")


def _upload(request: Request) -> tuple[Any, int]:
    """The request's body stream and its announced length, checked before reading."""
    content_type = (request.content_type or "").split(";", 1)[0].strip().lower()
    if content_type != RAW:
        raise exceptions.UnsupportedMediaType(
            content_type or "(none)",
            detail=f"send the raw image as the body with Content-Type: {RAW}; "
            f"got {content_type or 'no Content-Type'}",
        )
    if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
        raise LengthRequired()
    raw_length = request.META.get("CONTENT_LENGTH") or ""
    if not raw_length.isdigit():
        raise LengthRequired()
    length = int(raw_length)
    return (request.stream if length else None), length


class _EmptyStream:
    def read(self, size: int = -1) -> bytes:
        return b""


@extend_schema(tags=["images"])
class ImageViewSet(viewsets.ModelViewSet):
    """Sparse raw disk images under the appliance's storage root."""

    serializer_class = ImageSerializer
    filterset_class = ImageFilter
    ordering_fields = ["name", "size", "created_at", "node"]

    def get_queryset(self) -> Any:
        return image_list()

    def perform_create(self, serializer: ImageSerializer) -> None:
        serializer.instance = image_create(**serializer.validated_data)

    def perform_update(self, serializer: ImageSerializer) -> None:
        serializer.instance = image_update(image=serializer.instance, **serializer.validated_data)

    def perform_destroy(self, instance: Image) -> None:
        image_delete(image=instance)

    @extend_schema(request=ImageGrowSerializer, responses=ImageSerializer)
    @action(detail=True, methods=["post"])
    def grow(self, request: Request, pk: str | None = None) -> Response:
        """Set the virtual size; shrinking needs ``force`` and no export using the image."""
        params = ImageGrowSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        image = image_grow(image=self.get_object(), **params.validated_data)
        return Response(ImageSerializer(image, context=self.get_serializer_context()).data)

    @extend_schema(request=ImageMoveSerializer, responses={202: ImageSerializer})
    @action(detail=True, methods=["post"])
    def move(self, request: Request, pk: str | None = None) -> Response:
        """Move the image's file to another node: its exports are read-only meanwhile; the
        copy (allocated extents only, over NBD) runs in the background and is verified
        before the exports switch over. Poll the image: ``moving_to`` empties when done,
        ``move_error`` says why a move failed."""
        from appliance.storage.move import image_move_start

        params = ImageMoveSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        image = image_move_start(image=self.get_object(), **params.validated_data)
        data = ImageSerializer(image, context=self.get_serializer_context()).data
        return Response(data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=ImageCloneSerializer, responses={201: ImageSerializer})
    @action(detail=True, methods=["post"])
    def clone(self, request: Request, pk: str | None = None) -> Response:
        """A new image with this one's contents (reflink, else a hole-preserving copy)."""
        params = ImageCloneSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        image = image_clone(source=self.get_object(), **params.validated_data)
        data = ImageSerializer(image, context=self.get_serializer_context()).data
        return Response(data, status=status.HTTP_201_CREATED)

    @extend_schema(
        request=_RAW_BODY,
        responses={200: ImageSerializer, 411: OpenApiResponse(description="no Content-Length")},
    )
    @action(detail=True, methods=["put"], url_path="import", parser_classes=[RawImageParser])
    def import_into(self, request: Request, pk: str | None = None) -> Response:
        """Replace the image's contents with the raw image in the body (zero blocks stay
        holes); the image's size becomes the body's length."""
        image = self.get_object()
        stream, length = _upload(request)
        image = image_import(image=image, stream=stream or _EmptyStream(), length=length)
        return Response(ImageSerializer(image, context=self.get_serializer_context()).data)

    @extend_schema(
        request=_RAW_BODY,
        parameters=[ImageUploadQuerySerializer],
        responses={201: ImageSerializer, 411: OpenApiResponse(description="no Content-Length")},
    )
    @action(detail=False, methods=["post"], url_path="import", parser_classes=[RawImageParser])
    def import_new(self, request: Request) -> Response:
        """Create an image from the raw image in the body: ``?name=...&description=...``."""
        params = ImageUploadQuerySerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        stream, length = _upload(request)
        image = image_create_from_upload(
            stream=stream or _EmptyStream(), length=length, **params.validated_data
        )
        data = ImageSerializer(image, context=self.get_serializer_context()).data
        return Response(data, status=status.HTTP_201_CREATED)

    @extend_schema(responses=StorageUsageSerializer, filters=False)
    @action(detail=False, methods=["get"], filter_backends=[], pagination_class=None)
    def usage(self, request: Request) -> Response:
        """Provisioned bytes against the quota, and free space on the storage root."""
        return Response(StorageUsageSerializer(storage_usage()).data)


@extend_schema(tags=["exports"])
class ExportViewSet(viewsets.ModelViewSet):
    """Images published under an NBD export name, with their access policy."""

    serializer_class = ExportSerializer
    filterset_class = ExportFilter
    ordering_fields = ["name", "created_at", "node"]

    def get_queryset(self) -> Any:
        return export_list()

    def perform_create(self, serializer: ExportSerializer) -> None:
        serializer.instance = export_publish(**serializer.validated_data)

    def perform_update(self, serializer: ExportSerializer) -> None:
        serializer.instance = export_update(export=serializer.instance, **serializer.validated_data)

    def perform_destroy(self, instance: Any) -> None:
        export_delete(export=instance)

    @extend_schema(responses=OpenApiTypes.OBJECT)
    @action(detail=True, methods=["get"])
    def live(self, request: Request, pk: str | None = None) -> Response:
        """What the engine is doing for this export now: clients, counters, rates."""
        export = self.get_object()
        data = export_live(export.name)
        data.update(export=export.name, uri=export_uri(export), tls_uri=export_tls_uri(export),
                    enabled=export.enabled, engine=node_status(export.node), node=export.node,
                    node_available=export_available(export))
        data["sessions"] = [s for s in live_sessions() if s.get("export") == export.name]
        return Response(data)

    @extend_schema(parameters=[ExportHistoryQuerySerializer],
                   responses=ExportSampleSerializer(many=True))
    @action(detail=True, methods=["get"])
    def history(self, request: Request, pk: str | None = None) -> Response:
        """Samples of the export's cumulative counters (about every 10 s) for plots."""
        export = self.get_object()
        params = ExportHistoryQuerySerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        samples = export_history(export_name=export.name, **params.validated_data)
        return Response(ExportSampleSerializer(samples, many=True).data)


@extend_schema(tags=["nodes"])
class NodeViewSet(viewsets.ReadOnlyModelViewSet):
    """The storage nodes: their NBD address, space, labels, health and what they hold.
    Engine workers register and refresh them; a node is down once it misses heartbeats for
    APPLIANCE_NODE_DOWN_AFTER seconds."""

    serializer_class = NodeSerializer
    filterset_class = NodeFilter
    lookup_field = "name"
    lookup_value_regex = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
    ordering_fields = ["name", "free_bytes", "capacity_bytes", "last_heartbeat"]

    def get_queryset(self) -> Any:
        return node_list()


@extend_schema(tags=["sessions"])
class ClientSessionViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """NBD client sessions as the engine recorded them (read-only)."""

    serializer_class = ClientSessionSerializer
    filterset_class = ClientSessionFilter
    ordering_fields = ["connected_at", "disconnected_at", "bytes_read", "bytes_written"]

    def get_queryset(self) -> Any:
        return session_list()

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        queryset = self.filter_queryset(self.get_queryset())
        page = self.paginate_queryset(queryset)
        sessions = list(page if page is not None else queryset)
        context = {**self.get_serializer_context(), "live": live_by_session(sessions)}
        data = ClientSessionSerializer(sessions, many=True, context=context).data
        if page is not None:
            return self.get_paginated_response(data)
        return Response(data)


@extend_schema(tags=["sessions"])
class ConnectionRefusalViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Clients the engine refused, and why (read-only, newest first): handshake timeouts,
    TLS failures, TLS required, networks or client names not allowed, connection limits."""

    serializer_class = ConnectionRefusalSerializer
    filterset_class = ConnectionRefusalFilter
    ordering_fields = ["at"]
    ordering = ["-at", "-id"]

    def get_queryset(self) -> Any:
        return refusal_list()


@extend_schema(tags=["stats"])
class FeatureStatsView(APIView):
    @extend_schema(parameters=[FeatureStatsQuerySerializer], responses=FeatureStatsSerializer)
    def get(self, request: Request) -> Response:
        """Share of sessions that negotiated each feature, overall and by fingerprint."""
        params = FeatureStatsQuerySerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        query = dict(params.validated_data)
        stats = session_feature_stats(
            since=query.get("since"),
            until=query.get("until"),
            export_name=query.get("export"),
            node=query.get("node"),
        )
        return Response(FeatureStatsSerializer(stats).data)


@extend_schema(
    tags=["auth"],
    request=TokenRequestSerializer,
    responses={200: TokenResponseSerializer},
)
class TokenView(ObtainAuthToken):
    """Trade a username and password for the user's API token."""
