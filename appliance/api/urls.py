"""/api/v1/: one router; a trailing slash is optional everywhere."""

from django.urls import include, re_path
from rest_framework.routers import DefaultRouter

from .views import (
    ClientSessionViewSet,
    ConnectionRefusalViewSet,
    ExportViewSet,
    FeatureStatsView,
    ImageViewSet,
    NodeViewSet,
    TokenView,
)

router = DefaultRouter()
router.trailing_slash = "/?"  # the constructor only knows "/" or ""
router.register("images", ImageViewSet, basename="image")
router.register("exports", ExportViewSet, basename="export")
router.register("nodes", NodeViewSet, basename="node")
router.register("sessions", ClientSessionViewSet, basename="session")
router.register("refusals", ConnectionRefusalViewSet, basename="refusal")

urlpatterns = [
    re_path(r"^auth/token/?$", TokenView.as_view(), name="auth-token"),
    re_path(r"^stats/features/?$", FeatureStatsView.as_view(), name="stats-features"),
    re_path(r"^tls/", include("appliance.api.tls")),
    *router.urls,
]
