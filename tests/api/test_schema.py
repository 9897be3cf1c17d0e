"""The OpenAPI 3 schema and its browsable UIs, with their assets served locally."""

from __future__ import annotations

import re

import pytest
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def test_schema_is_openapi_3_and_covers_the_api(api) -> None:
    response = api.get("/api/schema/?format=json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    paths = set(schema["paths"])
    for path in [
        "/api/v1/images/", "/api/v1/images/{id}/", "/api/v1/images/{id}/grow",
        "/api/v1/images/{id}/clone", "/api/v1/images/{id}/import", "/api/v1/images/import",
        "/api/v1/images/usage", "/api/v1/exports/", "/api/v1/exports/{id}/",
        "/api/v1/sessions/", "/api/v1/sessions/{id}/", "/api/v1/stats/features",
        "/api/v1/auth/token", "/api/v1/nodes/", "/api/v1/nodes/{name}/",
    ]:
        assert any(p.rstrip("/") == path.rstrip("/") for p in paths), path
    assert {"tokenAuth", "cookieAuth"} <= set(schema["components"]["securitySchemes"])
    imports = next(v for k, v in schema["paths"].items() if k.rstrip("/").endswith("{id}/import"))
    assert "application/octet-stream" in imports["put"]["requestBody"]["content"]
    sessions = next(v for k, v in schema["paths"].items() if k.rstrip("/") == "/api/v1/sessions")
    params = {p["name"] for p in sessions["get"]["parameters"]}
    assert {"export", "peer", "fingerprint", "since", "until", "active", "feature",
            "page", "page_size"} <= params


def test_schema_generates_without_warnings(tmp_path) -> None:
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    assert out.read_text().startswith("openapi: 3.")


@pytest.mark.parametrize("ui", ["/api/schema/ui/", "/api/schema/redoc/"])
def test_schema_uis_use_local_assets_only(client, user, ui) -> None:
    client.force_login(user)
    response = client.get(ui)
    assert response.status_code == 200
    html = response.content.decode()
    assert "cdn." not in html
    assert "unpkg" not in html
    assert "jsdelivr" not in html
    assets = re.findall(r"""(?:src|href)=["'](/static/[^"']+)["']""", html)
    scripts = [a for a in assets if a.endswith(".js")]
    assert scripts
    assert all("drf_spectacular_sidecar" in a for a in scripts)
    for asset in assets:
        served = client.get(asset)
        assert served.status_code == 200, asset
        assert b"".join(served.streaming_content)
