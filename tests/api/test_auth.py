"""Authentication: nothing is readable or writable without it; tokens and sessions work."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from appliance.exports.models import Export
from appliance.storage.models import Image

pytestmark = pytest.mark.django_db

ENDPOINTS = [
    ("get", "/api/v1/"),
    ("get", "/api/v1/images/"),
    ("post", "/api/v1/images/"),
    ("get", "/api/v1/images/usage"),
    ("get", "/api/v1/images/{image}/"),
    ("patch", "/api/v1/images/{image}/"),
    ("put", "/api/v1/images/{image}/"),
    ("delete", "/api/v1/images/{image}/"),
    ("post", "/api/v1/images/{image}/grow"),
    ("post", "/api/v1/images/{image}/clone"),
    ("put", "/api/v1/images/{image}/import"),
    ("post", "/api/v1/images/import?name=x"),
    ("get", "/api/v1/exports/"),
    ("post", "/api/v1/exports/"),
    ("get", "/api/v1/exports/{export}/"),
    ("patch", "/api/v1/exports/{export}/"),
    ("delete", "/api/v1/exports/{export}/"),
    ("get", "/api/v1/sessions/"),
    ("get", "/api/v1/sessions/1/"),
    ("get", "/api/v1/stats/features"),
    ("get", "/api/schema/"),
    ("get", "/api/schema/ui/"),
    ("get", "/api/schema/redoc/"),
]


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
def test_every_endpoint_refuses_anonymous_clients(anon, make_export, method, url) -> None:
    export = make_export("vm1")
    url = url.format(image=export.image.pk, export=export.pk)
    body = {"name": "new", "size": 1 << 20}
    response = getattr(anon, method)(url, body, format="json")
    assert response.status_code == 401, (url, response.status_code)
    assert response["WWW-Authenticate"] == "Token"
    if response["Content-Type"].startswith("application/json"):
        assert response.json()["code"] == "not_authenticated"
    assert Image.objects.count() == 1
    assert Export.objects.count() == 1
    assert Image.objects.get().size == 64 << 20


def test_the_api_root_lists_the_collections(api) -> None:
    root = api.get("/api/v1/")
    assert root.status_code == 200
    assert {"images", "exports", "sessions"} <= set(root.json())


def test_a_wrong_token_is_refused(anon) -> None:
    anon.credentials(HTTP_AUTHORIZATION="Token 0123456789abcdef0123456789abcdef01234567")
    response = anon.get("/api/v1/images/")
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid token.", "code": "authentication_failed"}


def test_token_endpoint_trades_credentials_for_a_token(anon, user) -> None:
    response = anon.post(
        "/api/v1/auth/token", {"username": "alice", "password": "correct horse battery"}
    )
    assert response.status_code == 200
    token = response.json()["token"]
    assert len(token) == 40
    again = anon.post(
        "/api/v1/auth/token/", {"username": "alice", "password": "correct horse battery"}
    )
    assert again.json()["token"] == token  # one token per user, and the slash is optional

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/v1/images/").status_code == 200


def test_token_endpoint_refuses_bad_credentials(anon, user) -> None:
    wrong = anon.post("/api/v1/auth/token", {"username": "alice", "password": "nope"})
    assert wrong.status_code == 400
    assert wrong.json()["non_field_errors"] == ["Unable to log in with provided credentials."]
    missing = anon.post("/api/v1/auth/token", {"username": "alice"})
    assert missing.status_code == 400
    assert missing.json() == {"password": ["This field is required."]}


def test_session_authentication_with_csrf(user) -> None:
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="alice", password="correct horse battery")
    assert client.get("/api/v1/images/").status_code == 200
    refused = client.post("/api/v1/images/", {"name": "disk", "size": 1 << 20}, format="json")
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["detail"]
    # The browsable API's login page hands out the token a browser sends back.
    page = client.get("/api/auth/login/")
    token = page.cookies["csrftoken"].value
    created = client.post(
        "/api/v1/images/", {"name": "disk", "size": 1 << 20}, format="json",
        HTTP_X_CSRFTOKEN=token,
    )
    assert created.status_code == 201, created.json()


def test_admin_needs_a_staff_login(anon, user, client) -> None:
    assert anon.get("/admin/storage/image/").status_code == 302
    client.force_login(user)
    assert client.get("/admin/storage/image/").status_code == 302  # not staff
