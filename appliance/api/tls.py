"""/api/v1/tls/: the appliance's CA, the server certificate, client certificates and PSK
identities. Views and serializers together; every write is one call to appliance.pki.services.
"""

from __future__ import annotations

from typing import Any

import django_filters as filters
from django.db.models import QuerySet
from django.http import HttpResponse
from django.urls import re_path
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.routers import SimpleRouter
from rest_framework.views import APIView

from appliance.pki.models import ClientCertificate, PskIdentity, RevocationReason
from appliance.pki.selectors import (
    client_certificate_list,
    psk_identity_list,
    server_certificate_active,
    tls_status,
)
from appliance.pki.services import (
    CLIENT_DAYS_DEFAULT,
    CLIENT_DAYS_MAX,
    ca_certificate_pem,
    client_certificate_issue,
    client_certificate_revoke,
    psk_identity_create,
    psk_identity_delete,
    server_certificate_rotate,
)
from appliance.pki.validators import CLIENT_NAME_MAX, validate_client_name

from .filters import StrictBooleanFilter

PEM = "application/x-pem-file"

# ------------------------------------------------------------------ serializers


class ClientCertificateSerializer(serializers.ModelSerializer):
    revoked = serializers.BooleanField(read_only=True)

    class Meta:
        model = ClientCertificate
        fields = ["id", "name", "serial", "fingerprint", "issued_at", "not_after", "revoked",
                  "revoked_at", "revocation_reason"]
        read_only_fields = fields
        extra_kwargs = {
            "serial": {"help_text": "the certificate's serial number, in decimal"},
            "fingerprint": {"help_text": "SHA-256 of the certificate (DER), in hex"},
        }


class ClientCertificateDetailSerializer(ClientCertificateSerializer):
    class Meta(ClientCertificateSerializer.Meta):
        fields = [*ClientCertificateSerializer.Meta.fields, "cert_pem"]
        read_only_fields = fields


class ClientCertificateIssueSerializer(serializers.Serializer):
    name = serializers.CharField(
        max_length=CLIENT_NAME_MAX, validators=[validate_client_name],
        help_text="the client's name: subject CN (and DNS name when it is a host name), "
        "what an export's allowed_clients lists")
    days = serializers.IntegerField(min_value=1, max_value=CLIENT_DAYS_MAX,
                                    default=CLIENT_DAYS_DEFAULT, help_text="validity in days")


class ClientCertificateIssuedSerializer(ClientCertificateDetailSerializer):
    key_pem = serializers.CharField(
        read_only=True, help_text="the private key: shown this once, never stored")
    ca_pem = serializers.CharField(read_only=True, help_text="the CA certificate to trust")

    class Meta(ClientCertificateDetailSerializer.Meta):
        fields = [*ClientCertificateDetailSerializer.Meta.fields, "key_pem", "ca_pem"]
        read_only_fields = fields


class ClientCertificateRevokeSerializer(serializers.Serializer):
    reason = serializers.ChoiceField(choices=RevocationReason.choices,
                                     default=RevocationReason.UNSPECIFIED)


class ServerCertificateSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    serial = serializers.CharField()
    fingerprint = serializers.CharField()
    names = serializers.ListField(child=serializers.CharField(),
                                  help_text="DNS names and IP addresses clients may use")
    not_after = serializers.DateTimeField()
    created_at = serializers.DateTimeField()
    cert_pem = serializers.CharField()


class PskIdentitySerializer(serializers.ModelSerializer):
    class Meta:
        model = PskIdentity
        fields = ["id", "name", "created_at"]
        read_only_fields = ["created_at"]
        extra_kwargs = {"name": {"validators": [validate_client_name]}}


class PskIdentityCreatedSerializer(PskIdentitySerializer):
    key = serializers.CharField(read_only=True,
                                help_text="the key in hex: shown this once")
    psk_line = serializers.CharField(
        read_only=True, help_text="the client's PSK file line (identity:key), as qemu "
        "tls-creds-psk, nbdkit and libnbd read it")

    class Meta(PskIdentitySerializer.Meta):
        fields = [*PskIdentitySerializer.Meta.fields, "key", "psk_line"]


class _CaStatusSerializer(serializers.Serializer):
    subject = serializers.CharField()
    fingerprint = serializers.CharField(help_text="SHA-256 of the CA certificate, in hex")
    not_after = serializers.DateTimeField()
    crl_next_update = serializers.DateTimeField()


class _ServerStatusSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    serial = serializers.CharField()
    fingerprint = serializers.CharField()
    names = serializers.ListField(child=serializers.CharField())
    not_after = serializers.DateTimeField()


class _ClientCountsSerializer(serializers.Serializer):
    active = serializers.IntegerField()
    revoked = serializers.IntegerField()


class TlsStatusSerializer(serializers.Serializer):
    mode = serializers.ChoiceField(choices=["off", "optional", "required"],
                                   help_text="the engine's TLS mode (NBD_TLS_MODE)")
    psk_supported = serializers.BooleanField(
        help_text="whether the engine's Python can do TLS-PSK (3.13 and newer)")
    psk_detail = serializers.CharField(help_text="why not, when it cannot")
    ca = _CaStatusSerializer()
    server_certificate = _ServerStatusSerializer()
    client_certificates = _ClientCountsSerializer()
    psk_identities = serializers.IntegerField()


class ClientCertificateFilter(filters.FilterSet):
    name = filters.CharFilter(help_text="only this client's certificates")
    revoked = StrictBooleanFilter(method="filter_revoked",
                                  help_text="true: revoked ones only; false: the others")

    class Meta:
        model = ClientCertificate
        fields = ["name", "revoked"]

    def filter_revoked(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return queryset.filter(revoked_at__isnull=value not in StrictBooleanFilter.TRUE)


# ------------------------------------------------------------------ views


@extend_schema(tags=["tls"])
class TlsStatusView(APIView):
    @extend_schema(responses=TlsStatusSerializer)
    def get(self, request: Request) -> Response:
        """The TLS mode, whether PSK is possible, the CA and the server certificate."""
        return Response(TlsStatusSerializer(tls_status()).data)


@extend_schema(tags=["tls"])
class CaCertificateView(APIView):
    @extend_schema(responses={(200, PEM): OpenApiResponse(
        OpenApiTypes.STR, description="the CA certificate (clients' ca-cert.pem)")})
    def get(self, request: Request) -> HttpResponse:
        """Download the CA certificate clients trust, in PEM."""
        response = HttpResponse(ca_certificate_pem(), content_type=PEM)
        response["Content-Disposition"] = 'attachment; filename="ca-cert.pem"'
        return response


@extend_schema(tags=["tls"])
class ServerCertificateView(APIView):
    @extend_schema(responses=ServerCertificateSerializer)
    def get(self, request: Request) -> Response:
        """The certificate the engine presents now."""
        return Response(ServerCertificateSerializer(server_certificate_active()).data)


@extend_schema(tags=["tls"])
class ServerCertificateRotateView(APIView):
    @extend_schema(request=None, responses=ServerCertificateSerializer)
    def post(self, request: Request) -> Response:
        """Replace the server certificate and key: new connections get the new one,
        connected clients keep their sessions."""
        return Response(ServerCertificateSerializer(server_certificate_rotate()).data)


@extend_schema(tags=["tls"])
class ClientCertificateViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Certificates the appliance's CA issued to named clients."""

    serializer_class = ClientCertificateSerializer
    filterset_class = ClientCertificateFilter
    ordering_fields = ["name", "issued_at", "not_after", "revoked_at"]

    def get_queryset(self) -> Any:
        return client_certificate_list()

    def get_serializer_class(self) -> Any:
        return ClientCertificateDetailSerializer if self.action == "retrieve" else (
            ClientCertificateSerializer)

    @extend_schema(request=ClientCertificateIssueSerializer,
                   responses={201: ClientCertificateIssuedSerializer})
    def create(self, request: Request) -> Response:
        """Issue a certificate for a client; the answer carries its private key, this once."""
        params = ClientCertificateIssueSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        certificate, _, key_pem = client_certificate_issue(**params.validated_data)
        certificate.key_pem, certificate.ca_pem = key_pem, ca_certificate_pem()
        data = ClientCertificateIssuedSerializer(certificate).data
        return Response(data, status=status.HTTP_201_CREATED)

    @extend_schema(request=ClientCertificateRevokeSerializer,
                   responses=ClientCertificateSerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str | None = None) -> Response:
        """Revoke: the engine refuses the certificate and drops its live connections."""
        params = ClientCertificateRevokeSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        certificate = client_certificate_revoke(certificate=self.get_object(),
                                                **params.validated_data)
        return Response(ClientCertificateSerializer(certificate).data)


@extend_schema(tags=["tls"])
class PskIdentityViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """TLS-PSK identities (when the engine's Python supports PSK: 3.13 and newer)."""

    serializer_class = PskIdentitySerializer
    ordering_fields = ["name", "created_at"]

    def get_queryset(self) -> Any:
        return psk_identity_list()

    @extend_schema(request=PskIdentitySerializer,
                   responses={201: PskIdentityCreatedSerializer})
    def create(self, request: Request) -> Response:
        """A new identity with a random 256-bit key (400 when the engine cannot do PSK)."""
        params = PskIdentitySerializer(data=request.data)
        params.is_valid(raise_exception=True)
        identity, key_hex = psk_identity_create(name=params.validated_data["name"])
        identity.key, identity.psk_line = key_hex, f"{identity.name}:{key_hex}"
        return Response(PskIdentityCreatedSerializer(identity).data,
                        status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: PskIdentity) -> None:
        psk_identity_delete(identity=instance)


router = SimpleRouter()
router.trailing_slash = "/?"
router.register("client-certificates", ClientCertificateViewSet, basename="tls-client-cert")
router.register("psk-identities", PskIdentityViewSet, basename="tls-psk-identity")

urlpatterns = [
    re_path(r"^status/?$", TlsStatusView.as_view(), name="tls-status"),
    re_path(r"^ca/?$", CaCertificateView.as_view(), name="tls-ca"),
    re_path(r"^server-certificate/?$", ServerCertificateView.as_view(),
            name="tls-server-certificate"),
    re_path(r"^server-certificate/rotate/?$", ServerCertificateRotateView.as_view(),
            name="tls-server-certificate-rotate"),
    *router.urls,
]
