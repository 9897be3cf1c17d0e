"""The dashboard's pages (mounted at the site root)."""

from django.contrib.auth import views as auth_views
from django.urls import path

from . import views
from .csp import csp

app_name = "frontend"

urlpatterns = [
    path("login/", csp(auth_views.LoginView.as_view(
        template_name="frontend/login.html", redirect_authenticated_user=True)), name="login"),
    path("logout/", csp(auth_views.LogoutView.as_view()), name="logout"),
    path("", views.overview, name="overview"),
    path("overview/panel", views.overview_panel, name="overview-panel"),
    path("overview/rates.json", views.overview_rates, name="overview-rates"),
    path("images/", views.images, name="images"),
    path("images/<int:pk>/", views.image_detail, name="image"),
    path("images/<int:pk>/delete/", views.image_confirm_delete, name="image-delete"),
    path("exports/", views.exports, name="exports"),
    path("exports/<int:pk>/", views.export_detail, name="export"),
    path("exports/<int:pk>/panel", views.export_panel, name="export-panel"),
    path("exports/<int:pk>/toggle", views.export_toggle, name="export-toggle"),
    path("exports/<int:pk>/delete/", views.export_confirm_delete, name="export-delete"),
    path("nodes/", views.nodes, name="nodes"),
    path("nodes/panel", views.nodes_panel, name="nodes-panel"),
    path("features/", views.features, name="features"),
    path("security/", views.security, name="security"),
    path("security/ca-cert.pem", views.security_ca, name="security-ca"),
    path("security/rotate", views.security_rotate, name="security-rotate"),
    path("security/certificates/", views.security_issue, name="security-issue"),
    path("security/certificates/<int:pk>/revoke", views.security_revoke,
         name="security-revoke"),
    path("security/psk/", views.security_psk_create, name="security-psk"),
    path("security/psk/<int:pk>/delete", views.security_psk_delete, name="security-psk-delete"),
]
