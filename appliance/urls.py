from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from appliance.engine.prometheus import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("appliance.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/schema/ui/", SpectacularSwaggerView.as_view(url_name="schema"), name="schema-ui"),
    path("api/schema/redoc/", SpectacularRedocView.as_view(url_name="schema"), name="schema-redoc"),
    # Log in and out of the browsable API and the schema UI (session authentication).
    path("api/auth/", include("rest_framework.urls")),
    # Prometheus text format; a token, a session or APPLIANCE_METRICS_TOKEN is needed.
    path("metrics", metrics_view, name="metrics"),
    # The dashboard: server-rendered pages at the root.
    path("", include("frontend.urls")),
]
