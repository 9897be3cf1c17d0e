"""/api/v1/exports/: CRUD with validated names, networks and policy."""

from __future__ import annotations

import pytest
from appliance_testing import engine_snapshot, place_on

from appliance.exports.models import Export
from appliance.sessions.services import session_record_from_engine

pytestmark = pytest.mark.django_db


@pytest.fixture
def image(make_image):
    return make_image("disk")


def publish(api, image, name: str = "vm1", **extra):
    return api.post("/api/v1/exports/", {"name": name, "image": image.pk, **extra}, format="json")


def test_publish_with_defaults(api, image) -> None:
    response = publish(api, image)
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["name"] == "vm1"
    assert body["image"] == image.pk
    assert body["image_name"] == "disk"
    assert body["read_only"] is False
    assert body["enabled"] is True
    assert body["multi_conn"] is True
    assert body["allowed_networks"] == []
    assert body["tls_policy"] == "off"
    assert body["node"] == "node1"
    assert body["active_sessions"] == 0


def test_publish_with_every_field(api, image) -> None:
    place_on(image, "nbd-2.example.net")
    response = publish(
        api, image, "vm2", description="golden image", read_only=True, enabled=False,
        allowed_networks=["192.0.2.0/24", "2001:db8::1"], multi_conn=False,
        tls_policy="required", node="ignored.example.net",  # read-only: the image's node
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["allowed_networks"] == ["192.0.2.0/24", "2001:db8::1/128"]
    assert (body["tls_policy"], body["node"], body["read_only"]) == (
        "required", "nbd-2.example.net", True
    )
    stored = Export.objects.get(pk=body["id"])
    assert stored.allowed_networks == body["allowed_networks"]
    assert not stored.enabled


@pytest.mark.parametrize(
    ("payload", "field", "fragment"),
    [
        ({"name": "a/b"}, "name", "letters, digits"),
        ({"name": "../vm"}, "name", "letters, digits"),
        ({"name": "x" * 256}, "name", "no more than 255"),
        ({"name": "vm 1"}, "name", "got 'vm 1'"),
        ({"name": ""}, "name", "may not be blank"),
        ({"allowed_networks": ["10.0.0.1/8"]}, "allowed_networks", "did you mean '10.0.0.0/8'"),
        ({"allowed_networks": ["300.0.0.0/8"]}, "allowed_networks", "not a CIDR network"),
        ({"allowed_networks": "10.0.0.0/8"}, "allowed_networks", "Expected a list"),
        ({"tls_policy": "sometimes"}, "tls_policy", "is not a valid choice"),
        ({"image": 999999}, "image", "does not exist"),
        ({"read_only": "perhaps"}, "read_only", "Must be a valid boolean"),
    ],
)
def test_publish_refuses_bad_input_naming_the_field(api, image, payload, field, fragment) -> None:
    response = api.post(
        "/api/v1/exports/", {"name": "vm1", "image": image.pk, **payload}, format="json"
    )
    assert response.status_code == 400
    body = response.json()
    assert field in body, body
    assert fragment in " ".join(str(m) for m in body[field])
    assert not Export.objects.exists()


def test_a_taken_name_gets_a_kind_message(api, image, make_image) -> None:
    assert publish(api, image, "vm1").status_code == 201
    response = publish(api, make_image("other"), "vm1")
    assert response.status_code == 400
    assert response.json() == {
        "name": ["export name 'vm1' is already taken by the export of image 'disk'; "
                 "choose another name"]
    }


def test_update_and_delete(api, image, make_image) -> None:
    export = publish(api, image).json()
    url = f"/api/v1/exports/{export['id']}/"
    patched = api.patch(url, {"enabled": False, "allowed_networks": ["198.51.100.0/24"]},
                        format="json")
    assert patched.status_code == 200
    assert patched.json()["enabled"] is False
    assert patched.json()["allowed_networks"] == ["198.51.100.0/24"]
    other = make_image("other")
    replaced = api.put(url, {"name": "vm1-renamed", "image": other.pk, "read_only": True},
                       format="json")
    assert replaced.status_code == 200, replaced.json()
    assert replaced.json()["image_name"] == "other"
    assert replaced.json()["read_only"]
    publish(api, image, "taken")
    clash = api.patch(url, {"name": "taken"}, format="json")
    assert clash.status_code == 400
    assert "already taken" in clash.json()["name"][0]
    assert api.delete(url).status_code == 204
    assert not Export.objects.filter(pk=export["id"]).exists()
    # With its export gone, the image can be deleted.
    assert api.delete(f"/api/v1/images/{other.pk}/").status_code == 204


def test_list_filters_and_counts_active_sessions(api, image, make_image) -> None:
    publish(api, image, "a", tls_policy="required")
    publish(api, make_image("b-disk"), "b", enabled=False)
    publish(api, image, "c")
    session_record_from_engine(snapshot=engine_snapshot({"export_name": "a"}, connection_id=1))
    session_record_from_engine(
        snapshot=engine_snapshot({"export_name": "a"}, connection_id=2, closed_at=2e9)
    )
    listed = api.get("/api/v1/exports/").json()
    assert [(e["name"], e["active_sessions"]) for e in listed["results"]] == [
        ("a", 1), ("b", 0), ("c", 0)
    ]
    disabled = api.get("/api/v1/exports/?enabled=false").json()["results"]
    assert [e["name"] for e in disabled] == ["b"]
    by_image = api.get(f"/api/v1/exports/?image={image.pk}&ordering=-name").json()["results"]
    assert [e["name"] for e in by_image] == ["c", "a"]
    tls = api.get("/api/v1/exports/?tls_policy=required").json()["results"]
    assert [e["name"] for e in tls] == ["a"]
    bad = api.get("/api/v1/exports/?tls_policy=sometimes")
    assert bad.status_code == 400
    assert "tls_policy" in bad.json()
    vague = api.get("/api/v1/exports/?enabled=maybe")
    assert vague.status_code == 400
    assert "enabled" in vague.json()


# ------------------------------------------------------------------ TLS and access control


def test_publish_with_client_names_and_a_limit(api, image) -> None:
    response = publish(api, image, tls_policy="optional",
                       allowed_clients=["backup01", " alice@example.org ", "backup01"],
                       max_connections=4)
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["allowed_clients"] == ["backup01", "alice@example.org"]
    assert body["max_connections"] == 4
    stored = Export.objects.get(pk=body["id"])
    assert (stored.allowed_clients, stored.max_connections) == (
        ["backup01", "alice@example.org"], 4)
    defaults = publish(api, image, "vm2").json()
    assert (defaults["allowed_clients"], defaults["max_connections"]) == ([], 0)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"tls_policy": "optional", "allowed_clients": ["bad name"]}, "got 'bad name'"),
        ({"tls_policy": "optional", "allowed_clients": ["a:b"]}, "letters, digits"),
        ({"tls_policy": "optional", "allowed_clients": ["x" * 65]}, "1 to 64"),
        ({"tls_policy": "optional", "allowed_clients": "alice"}, "Expected a list"),
        ({"allowed_clients": ["alice"]}, "client names can only be checked over TLS: "
                                         "set tls_policy to optional or required"),
    ],
)
def test_bad_client_names_are_refused(api, image, payload, fragment) -> None:
    response = publish(api, image, **payload)
    assert response.status_code == 400
    body = response.json()
    assert "allowed_clients" in body, body
    assert fragment in " ".join(str(m) for m in body["allowed_clients"])
    assert not Export.objects.exists()


def test_a_negative_limit_is_refused(api, image) -> None:
    response = publish(api, image, max_connections=-1)
    assert response.status_code == 400
    assert "max_connections" in response.json()


def test_client_names_need_tls_when_patched_too(api, image) -> None:
    export = publish(api, image, tls_policy="required", allowed_clients=["alice"]).json()
    url = f"/api/v1/exports/{export['id']}/"
    off = api.patch(url, {"tls_policy": "off"}, format="json")
    assert off.status_code == 400
    assert "only be checked over TLS" in off.json()["allowed_clients"][0]
    assert Export.objects.get(pk=export["id"]).tls_policy == "required"
    cleared = api.patch(url, {"tls_policy": "off", "allowed_clients": []}, format="json")
    assert cleared.status_code == 200, cleared.json()
    assert cleared.json()["allowed_clients"] == []


def test_uris_follow_the_tls_policy(api, image, settings) -> None:
    settings.NBD_PUBLIC_HOST, settings.NBD_PORT, settings.NBD_TLS_MODE = (
        "storage1.example.org", 10809, "optional")
    uris = {}
    for name, extra in [("plain", {}), ("either", {"tls_policy": "optional"}),
                        ("secure", {"tls_policy": "required"}),
                        ("named", {"tls_policy": "optional", "allowed_clients": ["alice"]})]:
        body = publish(api, image, name, **extra).json()
        uris[name] = (body["uri"], body["tls_uri"])
    host = "storage1.example.org"
    assert uris == {
        "plain": (f"nbd://{host}/plain", None),
        "either": (f"nbd://{host}/either", f"nbds://{host}/either"),
        "secure": (f"nbds://{host}/secure", f"nbds://{host}/secure"),
        "named": (f"nbds://{host}/named", f"nbds://{host}/named"),
    }
    settings.NBD_TLS_MODE = "required"  # the whole server: no clear text anywhere
    plain = api.get("/api/v1/exports/?name=plain").json()["results"][0]
    assert (plain["uri"], plain["tls_uri"]) == (f"nbds://{host}/plain", f"nbds://{host}/plain")
